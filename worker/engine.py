"""The only module that calls llama.cpp: model, context, batch, samplers and sequence memory.

Every method runs on the engine thread; the caller holds `Engine.lock` around each step. The scheduler and KV
bookkeeping above it never see a llama.cpp object, only sequence ids and token lists.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NewType

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llamaq.protocol import ChatMessage, SamplingParams

log = logging.getLogger("llamaq.engine")

SamplerHandle = NewType("SamplerHandle", int)
"""An opaque sampler chain owned by one sequence; free it with Engine.free_sampler."""

# Template used when a GGUF file carries none: ChatML, which llama.cpp's server also falls back to.
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class KvType(StrEnum):
    """Storage type of the KV cache."""

    Q8_0 = "q8_0"
    F16 = "f16"

    @property
    def ggml_type(self) -> int:
        """The ggml type id llama.cpp expects."""
        return {KvType.Q8_0: llama_cpp.GGML_TYPE_Q8_0, KvType.F16: llama_cpp.GGML_TYPE_F16}[self]


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes the llama.cpp context."""

    model_path: Path
    n_ctx: int = 16384
    n_seq_max: int = 8
    n_batch: int = 512
    n_threads: int = 2
    n_gpu_layers: int = 0
    kv_unified: bool = False
    kv_type: KvType = KvType.Q8_0
    flash_attn: bool = True

    def kv_settings(self) -> dict[str, object]:
        """The settings a saved sequence state depends on, with the llama.cpp build that wrote it."""
        return {
            "n_ctx": self.n_ctx,
            "n_seq_max": self.n_seq_max,
            "kv_unified": self.kv_unified,
            "kv_type": self.kv_type.value,
            "flash_attn": self.flash_attn,
            "n_gpu_layers": self.n_gpu_layers,
            "llama_cpp_python": llama_cpp.__version__,
        }


@dataclass(frozen=True)
class BatchSlice:
    """Tokens of one sequence placed in one decode; logits are wanted for the last one when `sample` is set."""

    seq_id: int
    tokens: SequenceOf[int]
    start_pos: int
    sample: bool


class DecodeError(RuntimeError):
    """llama_decode refused the batch; `status` is its return code (1: no KV slot)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"llama_decode returned {status}")
        self.status = status


class Engine:
    """A loaded model with one context that decodes many sequences per step."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.lock = threading.RLock()
        llama_cpp.llama_backend_init()
        install_log_handler()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = config.n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(config.model_path).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"could not load model {config.model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._ctx = llama_cpp.llama_init_from_model(self._model, self._context_params(config))
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError("could not create the llama.cpp context (n_ctx too large for memory?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._samplers: dict[SamplerHandle, Any] = {}
        self._greedy: set[SamplerHandle] = set()
        self._greedy_past_eog: set[SamplerHandle] = set()
        """Greedy handles of requests with ignore_eos: their argmax leaves out end-of-generation tokens."""
        self._eog_ids: list[int] | None = None
        """Plain greedy handles: no chain, their tokens are the argmax of the logits (see sample_all)."""
        self._n_outputs = 0
        self._output_row: dict[int, int] = {}
        """Row of the last decode's logits for each sampled batch index."""
        self._next_sampler = 0
        self._piece_buffer = ctypes.create_string_buffer(256)
        self.n_seq_max = llama_cpp.llama_n_seq_max(self._ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # Unified: any one sequence may use every cell (the KV manager preempts others to make room).
        self.window = llama_cpp.llama_n_ctx_seq(self._ctx)
        self.model_name = config.model_path.stem
        self.tokens_decoded = 0
        """Tokens fed to llama_decode since the context was created: the work actually done."""
        self.decodes = 0
        """Successful llama_decode calls since the context was created."""
        self._formatter = self._chat_formatter()

    @staticmethod
    def _context_params(config: EngineConfig) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.n_seq_max
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = config.kv_type.ggml_type
        params.type_v = config.kv_type.ggml_type
        params.kv_unified = config.kv_unified
        params.no_perf = True
        return params

    # --- text ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokens of text with special tokens parsed and BOS added only where the model asks for it."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        return list(tokens[:n])

    def render_chat(self, messages: SequenceOf[ChatMessage]) -> str:
        """The prompt text of a chat, rendered with the model's own template; raises ValueError if it refuses."""
        wire: Any = [{"role": m.role, "content": m.content} for m in messages]
        response = self._formatter(messages=wire)
        prompt: str = response.prompt
        return prompt

    def chat_tokens(self, messages: SequenceOf[ChatMessage]) -> list[int]:
        """Tokens of a rendered chat; a BOS the template already wrote is not doubled."""
        tokens = self.tokenize(self.render_chat(messages))
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        if len(tokens) >= 2 and tokens[0] == tokens[1] == bos:
            tokens = tokens[1:]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token stands for; control tokens stand for none."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            return buffer.raw[:n]
        return self._piece_buffer.raw[:n]

    def detokenize(self, tokens: SequenceOf[int]) -> str:
        """The text of a token list, special tokens written out (so it tokenizes back the same).

        A leading BOS the tokenizer adds by itself is left out, or tokenizing the text again would double it.
        """
        if (
            tokens
            and llama_cpp.llama_vocab_get_add_bos(self._vocab)
            and tokens[0] == llama_cpp.llama_vocab_bos(self._vocab)
        ):
            tokens = tokens[1:]
        pieces = []
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, True)
            pieces.append(self._piece_buffer.raw[: max(n, 0)])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        """True for EOS, EOT and the other tokens after which the model has nothing more to say."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def end_of_generation_tokens(self) -> list[int]:
        """Every token id llama.cpp counts as end of generation (read once from the vocabulary)."""
        if self._eog_ids is None:
            self._eog_ids = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        return self._eog_ids

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        text = template.decode("utf-8") if template else _CHATML
        return Jinja2ChatFormatter(
            template=text,
            eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)),
            bos_token=self._special_text(llama_cpp.llama_vocab_bos(self._vocab)),
            add_generation_prompt=True,
        )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    # --- sampling -----------------------------------------------------------------------------------------

    def new_sampler(self, params: SamplingParams, seed: int) -> SamplerHandle:
        """A sampler chain for one sequence, in llama-server's order; greedy when temperature is 0."""
        handle = SamplerHandle(self._next_sampler)
        self._next_sampler += 1
        if params.greedy and not _penalized(params):
            self._greedy.add(handle)
            if params.ignore_eos:
                self._greedy_past_eog.add(handle)
            return handle
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if params.ignore_eos:
            # llama-server's ignore_eos: every end-of-generation token biased to -inf before anything else looks.
            eog = self.end_of_generation_tokens()
            biases = (llama_cpp.llama_logit_bias * len(eog))(*[llama_cpp.llama_logit_bias(t, -math.inf) for t in eog])
            add(chain, llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(eog), biases))
        if _penalized(params):
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab,
                    params.repeat_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.greedy:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        self._samplers[handle] = chain
        return handle

    def free_sampler(self, handle: SamplerHandle) -> None:
        """Release a sampler chain."""
        self._greedy.discard(handle)
        self._greedy_past_eog.discard(handle)
        chain = self._samplers.pop(handle, None)
        if chain is not None:
            llama_cpp.llama_sampler_free(chain)

    def sample(self, handle: SamplerHandle, batch_index: int) -> int:
        """Pick the next token from the logits at batch_index of the last decode (the chain records it)."""
        return self.sample_all([(handle, batch_index)])[0]

    def sample_all(self, picks: SequenceOf[tuple[SamplerHandle, int]]) -> list[int]:
        """The next token of each (sampler, batch index) of the last decode, in order.

        Plain greedy picks are one argmax over the decode's logits for all of them: llama_sampler_sample builds
        a candidate array of the whole vocabulary per call, which at 64 sequences costs more than a tenth of a
        step. numpy's argmax returns the first maximum, as llama.cpp's greedy sampler does.
        """
        tokens = [0] * len(picks)
        greedy = [(k, index) for k, (handle, index) in enumerate(picks) if handle in self._greedy]
        if greedy:
            # Logits are stored one row per output, in batch order (llama.h), and only sampled positions output.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(self._n_outputs, self.n_vocab))
            rows = logits[[self._output_row[index] for _, index in greedy]]  # a copy: masking it is safe
            past_eog = [j for j, (k, _) in enumerate(greedy) if picks[k][0] in self._greedy_past_eog]
            if past_eog:
                rows[np.ix_(past_eog, self.end_of_generation_tokens())] = -np.inf
            for (k, _), token in zip(greedy, rows.argmax(axis=1).tolist(), strict=True):
                tokens[k] = token
        for k, (handle, index) in enumerate(picks):
            if handle not in self._greedy:
                tokens[k] = llama_cpp.llama_sampler_sample(self._samplers[handle], self._ctx, index)
        return tokens

    # --- decoding and memory ------------------------------------------------------------------------------

    def decode(self, slices: SequenceOf[BatchSlice]) -> list[int]:
        """Decode all slices in one llama_decode; return each sampling slice's batch index, in slice order.

        The batch is written in ascending sequence-id order whatever the order of `slices`: with per-sequence
        KV streams llama.cpp cuts a batch into one micro-batch per run of consecutive ids in batch order
        (`split_equal(..., sequential=true)` in llama-batch.cpp), and each micro-batch is a full pass over the
        weights. docs/kv-layouts.md#batch-order has the measurements.
        """
        n_tokens = sum(len(piece.tokens) for piece in slices)
        # Checked before filling: the batch's arrays hold n_batch tokens, and ctypes writes past them silently.
        if n_tokens > self.config.n_batch:
            raise ValueError(f"batch of {n_tokens} tokens exceeds n_batch {self.config.n_batch}")
        batch = self._batch
        i = 0
        sample_index: dict[int, int] = {}
        for position in sorted(range(len(slices)), key=lambda k: slices[k].seq_id):
            piece = slices[position]
            self._check_seq_id(piece.seq_id)
            for offset, token in enumerate(piece.tokens):
                batch.token[i] = token
                batch.pos[i] = piece.start_pos + offset
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = piece.seq_id
                batch.logits[i] = 0
                i += 1
            if piece.sample:
                batch.logits[i - 1] = 1
                sample_index[position] = i - 1
        batch.n_tokens = i
        self._n_outputs = 0
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise DecodeError(status)
        self._n_outputs = len(sample_index)
        self._output_row = {index: row for row, index in enumerate(sorted(sample_index.values()))}
        self.tokens_decoded += n_tokens
        self.decodes += 1
        return [sample_index[k] for k in sorted(sample_index)]

    def free_sequence(self, seq_id: int) -> None:
        """Drop every KV cell of a sequence; removing a whole sequence never fails."""
        self._check_seq_id(seq_id)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def copy_sequence(self, source: int, target: int) -> None:
        """Replace target's KV with a copy of source's (shared cells in the unified layout).

        Always the whole sequence: with per-sequence streams a partial range aborts the process; the caller
        truncates the copy afterwards. Across streams the data moves at the next decode, the cells at once.
        """
        self._check_seq_id(source)
        self._check_seq_id(target)
        llama_cpp.llama_memory_seq_rm(self._memory, target, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def truncate_sequence(self, seq_id: int, length: int) -> bool:
        """Keep a sequence's first `length` positions and drop the rest; False if llama.cpp refused."""
        self._check_seq_id(seq_id)
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, length, -1))

    def sequence_state(self, seq_id: int) -> bytearray:
        """llama.cpp's serialised KV of one sequence (`llama_state_seq_get_data`): cells, positions, data."""
        self._check_seq_id(seq_id)
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq_id))
        data = bytearray(size)
        # Written in place: a 4,096-token state is ~50 MB, and each Python-side copy of it costs tens of ms.
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx, view, size, seq_id))
        del view
        if written != size:
            del data[written:]
        return data

    def restore_sequence_state(self, seq_id: int, payload: bytes | bytearray) -> bool:
        """Replace a sequence's KV with a saved state; False when llama.cpp refused it (the sequence is empty)."""
        self._check_seq_id(seq_id)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        array = ctypes.c_uint8 * len(payload)
        # A bytearray is read in place; bytes are immutable, so ctypes needs a copy of them.
        buffer = array.from_buffer(payload) if isinstance(payload, bytearray) else array.from_buffer_copy(payload)
        read = int(llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(payload), seq_id))
        if read != len(payload):
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            return False
        return True

    def move_sequence(self, source: int, target: int) -> bool:
        """Move a sequence's KV to another id, whose own cells are dropped; False if llama.cpp refused it (then
        both are empty).

        Through the state API rather than `seq_cp`: a copy across per-sequence streams is only carried out at the
        next decode, so the source stream could not be reused before it, and it moves the whole stream's buffer
        where this moves only the cells in use.
        """
        if self.sequence_length(source) == 0:
            self.free_sequence(target)
            return True
        state = self.sequence_state(source)
        self.free_sequence(source)
        return self.restore_sequence_state(target, state)

    def swap_sequences(self, a: int, b: int) -> bool:
        """Exchange the KV of two sequence ids; False if llama.cpp refused either (then both are empty)."""
        if self.sequence_length(a) == 0:
            return self.move_sequence(b, a)
        if self.sequence_length(b) == 0:
            return self.move_sequence(a, b)
        state_a, state_b = self.sequence_state(a), self.sequence_state(b)
        if self.restore_sequence_state(b, state_a) and self.restore_sequence_state(a, state_b):
            return True
        self.free_sequence(a)
        self.free_sequence(b)
        return False

    def next_token_logits(self, seq_id: int, tokens: SequenceOf[int]) -> bytes:
        """The float32 logits after `tokens`, which the sequence holds: its last position is decoded again.

        A single-token decode of its own is what both a save and a restore run, so on a deterministic backend the
        two agree to the bit exactly when the cells before that position hold the same KV.
        """
        n = len(tokens)
        if n < 1 or self.sequence_length(seq_id) != n:
            raise ValueError(f"sequence {seq_id} does not hold the {n} tokens given")
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, n - 1, -1)
        (index,) = self.decode([BatchSlice(seq_id, [tokens[-1]], n - 1, True)])
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return ctypes.string_at(pointer, self.n_vocab * ctypes.sizeof(ctypes.c_float))

    def state_bytes(self) -> int:
        """Size of the context's serialised state; it grows with the KV cells in use, shared or not."""
        return int(llama_cpp.llama_state_get_size(self._ctx))

    def sequence_length(self, seq_id: int) -> int:
        """Number of positions a sequence holds in the KV cache (0 when empty)."""
        self._check_seq_id(seq_id)
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id)) + 1

    def _check_seq_id(self, seq_id: int) -> None:
        # With per-sequence streams an id >= n_seq_max aborts the whole process inside llama.cpp.
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence id {seq_id} outside [0, {self.n_seq_max})")

    def close(self) -> None:
        """Free the batch, samplers, context and model."""
        for handle in list(self._samplers):
            self.free_sampler(handle)
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None
            self._model = None


def _penalized(params: SamplingParams) -> bool:
    return params.repeat_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)


# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line (kept at its level).
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_native_log = logging.getLogger("llamaq.llama_cpp")
# llama.cpp narrates every load at INFO; operators raise this logger's level to see it.
_native_log.setLevel(logging.WARNING)
_log_callback: Any = None


def install_log_handler() -> None:
    """Route llama.cpp's own logging into Python logging (quiet below WARNING by default)."""
    global _log_callback
    if _log_callback is not None:
        return

    last_level = [logging.DEBUG]

    def forward(level: int, text: bytes, _user_data: Any) -> None:
        py_level = last_level[0] if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
        last_level[0] = py_level
        if text and _native_log.isEnabledFor(py_level):
            _native_log.log(py_level, text.decode("utf-8", "replace").rstrip())

    # The ctypes object must outlive every call llama.cpp makes to it: a collected callback segfaults.
    _log_callback = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))

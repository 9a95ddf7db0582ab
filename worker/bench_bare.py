"""The engine limit: a bare batched decode loop over llama-cpp-python's low-level API, nothing else.

Like llama.cpp's examples/batched: one llama_batch, sequence i has id i and every batch lists the sequences in
ascending id order, one greedy llama_sampler for all, the prompts prefilled first (chunks of at most n_batch
tokens), then one token per live sequence per llama_decode. A sequence ends at an end-of-generation token or
after max_tokens generated tokens, as a request to the engine does. Same context settings as llamaq's Engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from .engine import install_log_handler


@dataclass(frozen=True)
class BareSettings:
    """The context every run of the loop and of the engine it is compared with shares."""

    model: Path
    n_ctx: int
    n_seq_max: int
    n_batch: int
    threads: int
    kv_unified: bool


@dataclass
class BareRun:
    """Timings of one run of the bare loop, in seconds of time.perf_counter()."""

    n_sequences: int
    prompt_tokens: int = 0
    generated: int = 0
    e2e_s: float = 0.0
    """From tokenizing the first prompt to the last token sampled."""
    prefill_s: float = 0.0
    full_steps_s: list[float] = field(default_factory=list)
    """Each decode step in which every sequence was still live: fill the batch, llama_decode, sample."""

    def summary(self) -> dict[str, float]:
        """Tokens/s end to end and in full decode steps alone, as the engine's are computed."""
        full = sum(self.full_steps_s)
        return {
            "sequences": float(self.n_sequences),
            "prompt_tokens": float(self.prompt_tokens),
            "generated": float(self.generated),
            "e2e_s": round(self.e2e_s, 3),
            "prefill_s": round(self.prefill_s, 3),
            "e2e_tokens_per_s": round(self.generated / self.e2e_s, 2) if self.e2e_s else 0.0,
            "decode_steps": float(len(self.full_steps_s)),
            "decode_step_ms": round(full / len(self.full_steps_s) * 1000, 3) if self.full_steps_s else 0.0,
            "decode_tokens_per_s": round(self.n_sequences * len(self.full_steps_s) / full, 2) if full else 0.0,
        }


class BareLoop:
    """A model and context for the loop, warmed up on entry; `generate` runs it once; use as a context manager."""

    def __init__(self, settings: BareSettings) -> None:
        self.settings = settings
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._sampler: Any = None

    def __enter__(self) -> BareLoop:
        llama_cpp.llama_backend_init()
        install_log_handler()  # llama.cpp's narration to Python logging, as the engine has it
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0  # as the engine's default: everything on the CPU
        self._model = llama_cpp.llama_model_load_from_file(str(self.settings.model).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"could not load {self.settings.model}")
        self._ctx = llama_cpp.llama_init_from_model(self._model, _context_params(self.settings))
        self._batch = llama_cpp.llama_batch_init(self.settings.n_batch, 0, 1)
        self._sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self._sampler, llama_cpp.llama_sampler_init_greedy())
        _warm_up(self._ctx, self._batch, self.settings.n_seq_max, self.settings.n_batch)
        return self

    def __exit__(self, *exc: object) -> None:
        llama_cpp.llama_sampler_free(self._sampler)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    def generate(self, prompts: list[str], max_tokens: int) -> BareRun:
        """Generate greedily for every prompt at once (sequence i = prompts[i]) and time it."""
        if len(prompts) > self.settings.n_seq_max:
            raise ValueError(f"{len(prompts)} prompts for {self.settings.n_seq_max} sequences")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        return _generate(self._ctx, vocab, self._batch, self._sampler, self.settings, prompts, max_tokens)


def _context_params(settings: BareSettings) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = settings.n_ctx
    params.n_batch = params.n_ubatch = settings.n_batch
    params.n_seq_max = settings.n_seq_max
    params.n_threads = params.n_threads_batch = settings.threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_Q8_0
    params.kv_unified = settings.kv_unified
    params.no_perf = True
    return params


def _generate(
    ctx: Any, vocab: Any, batch: Any, sampler: Any, settings: BareSettings, prompts: list[str], max_tokens: int
) -> BareRun:
    run = BareRun(len(prompts))
    started = time.perf_counter()
    tokens = [tokenize(vocab, prompt) for prompt in prompts]
    run.prompt_tokens = sum(len(t) for t in tokens)
    last: dict[int, int] = {}
    """Sequence id -> the token it sampled last and has yet to feed (absent once it ended)."""
    generated = [0] * len(prompts)

    def sample(seq_id: int, index: int) -> None:
        token = llama_cpp.llama_sampler_sample(sampler, ctx, index)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            last.pop(seq_id, None)
            return
        generated[seq_id] += 1
        if generated[seq_id] < max_tokens:
            last[seq_id] = token
        else:
            last.pop(seq_id, None)

    # Prefill: every prompt in id order, packed into batches of up to n_batch tokens.
    pending = [(seq_id, pos, token) for seq_id, prompt in enumerate(tokens) for pos, token in enumerate(prompt)]
    for begin in range(0, len(pending), settings.n_batch):
        chunk = pending[begin : begin + settings.n_batch]
        ends = []
        for i, (seq_id, pos, token) in enumerate(chunk):
            ends.append(pos == len(tokens[seq_id]) - 1)
            _put(batch, i, token, pos, seq_id, ends[-1])
        batch.n_tokens = len(chunk)
        _decode(ctx, batch)
        for i, (seq_id, _pos, _token) in enumerate(chunk):
            if ends[i]:
                sample(seq_id, i)
    run.prefill_s = time.perf_counter() - started
    while last:
        step_started = time.perf_counter()
        live = sorted(last)
        for i, seq_id in enumerate(live):
            _put(batch, i, last[seq_id], len(tokens[seq_id]) + generated[seq_id] - 1, seq_id, True)
        batch.n_tokens = len(live)
        _decode(ctx, batch)
        for i, seq_id in enumerate(live):
            sample(seq_id, i)
        if len(live) == len(prompts):
            run.full_steps_s.append(time.perf_counter() - step_started)
    run.e2e_s = time.perf_counter() - started
    run.generated = sum(generated)
    return run


def _warm_up(ctx: Any, batch: Any, n_sequences: int, n_batch: int) -> None:
    """One prompt-sized and one decode-sized batch, then an empty cache: the first timed decode pays no
    first-use costs (the engine, compared with this loop, has served a warm-up before its measured run)."""
    for per_sequence in (max(1, min(32, n_batch // n_sequences)), 1):
        for i in range(n_sequences * per_sequence):
            _put(batch, i, 1, i % per_sequence, i // per_sequence, True)
        batch.n_tokens = n_sequences * per_sequence
        _decode(ctx, batch)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def tokenize(vocab: Any, text: str) -> list[int]:
    """Tokens of text as the engine makes them: special tokens parsed, BOS where the model asks for it."""
    data = text.encode()
    capacity = len(data) + 8
    buffer = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, capacity, True, True)
    return list(buffer[: max(n, 0)])


def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = int(logits)


def _decode(ctx: Any, batch: Any) -> None:
    # Looked up per call, as the engine does, so a recorder wrapped around it sees both alike.
    status = llama_cpp.llama_decode(ctx, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status}")

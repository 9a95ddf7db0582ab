"""A step reaches llama.cpp as few micro-batches as its shape allows: the batch in ascending sequence-id order and
the running sequences on consecutive ids, whatever order requests came and went in.

Counted, not timed: llama.cpp logs every micro-batch it cuts when LLAMA_BATCH_DEBUG is set at context creation,
so these tests read llama.cpp's own split (`llama_batch_allocr::split_equal`) of each decode.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import pytest

from llamaq.protocol import DoneEvent, Event, Request, RequestKind, SamplingParams, TokenEvent
from llamaq.worker.engine import BatchSlice, Engine, EngineConfig
from llamaq.worker.engine_loop import EngineLoop, Outgoing, StepStats

from .greedy_reference import MAX_TOKENS, solo_llama_texts
from .prompts import SHORT_PROMPTS

pytestmark = pytest.mark.slow

_MICRO_BATCH_LINE = "added ubatch to split"


class MicroBatches(logging.Handler):
    """Counts the micro-batches llama.cpp reports through its log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if _MICRO_BATCH_LINE in record.getMessage():
            self.count += 1


@contextmanager
def engine_counting_micro_batches(model_path: Path, n_seq_max: int) -> Iterator[tuple[Engine, MicroBatches]]:
    """An engine (per-sequence layout) whose context reports its micro-batches."""
    native = logging.getLogger("llamaq.llama_cpp")
    counter, level, propagate = MicroBatches(), native.level, native.propagate
    os.environ["LLAMA_BATCH_DEBUG"] = "1"
    try:
        engine = Engine(EngineConfig(model_path, n_ctx=256 * n_seq_max, n_seq_max=n_seq_max, n_batch=256))
    finally:
        # Read once, by the context's batch allocator: later contexts of this process stay quiet.
        del os.environ["LLAMA_BATCH_DEBUG"]
    native.addHandler(counter)
    native.setLevel(logging.DEBUG)
    native.propagate = False
    try:
        yield engine, counter
    finally:
        native.removeHandler(counter)
        native.setLevel(level)
        native.propagate = propagate
        engine.close()


def test_a_step_in_any_sequence_order_is_one_micro_batch(model_path: Path) -> None:
    """Before the fix, a batch listing sequences 3, 1, 2, 0 was cut into three passes over the weights."""
    with engine_counting_micro_batches(model_path, n_seq_max=8) as (engine, micro_batches):
        prompts = {seq_id: engine.tokenize(SHORT_PROMPTS[seq_id % len(SHORT_PROMPTS)]) for seq_id in range(8)}
        for seq_id, tokens in prompts.items():
            engine.decode([BatchSlice(seq_id, tokens[:-1], 0, False)])
        order = [5, 3, 7, 1, 2, 0, 6, 4]
        greedy = {seq_id: engine.new_sampler(SamplingParams(temperature=0.0), 0) for seq_id in order}
        before = micro_batches.count
        slices = [BatchSlice(s, prompts[s][-1:], len(prompts[s]) - 1, True) for s in order]
        indices = engine.decode(slices)
        assert micro_batches.count - before == 1
        sampled = {s: engine.sample(greedy[s], index) for s, index in zip(order, indices, strict=True)}
        # Each index must point at its own sequence's logits: the last position decoded again alone agrees.
        for seq_id, tokens in prompts.items():
            logits = engine.next_token_logits(seq_id, tokens)
            values = struct.unpack(f"{engine.n_vocab}f", logits)
            assert sampled[seq_id] == max(range(engine.n_vocab), key=values.__getitem__)


def test_scattered_traffic_is_packed_into_one_micro_batch_without_changing_answers(model_path: Path) -> None:
    """Eight prompts park their KV at ids 0-7; then three conversations go on in place at scattered ids and two
    new requests take evicted ones. Every step that only decodes must be one micro-batch (the running sequences
    moved onto consecutive ids), and every answer must equal the prompt run alone."""
    rng = random.Random(7)
    with engine_counting_micro_batches(model_path, n_seq_max=8) as (engine, micro_batches):
        served = Served(engine, micro_batches)
        first_round = [_completion(f"warm{i}", SHORT_PROMPTS[i % 7] + " " * (i // 7), 1) for i in range(8)]
        served.run(first_round)
        continued = [first_round[i] for i in (1, 3, 6)]
        second_round = [_completion(f"next{r.id[4]}", r.prompt + " and", MAX_TOKENS) for r in continued]
        second_round += [
            _completion(f"new{i}", f"Write about the number {rng.randrange(100)}:", MAX_TOKENS) for i in (0, 1)
        ]
        served.run(second_round)
        texts = [served.text(request) for request in second_round]
        dones = [served.done(request) for request in second_round]
    assert [d.usage.cached_tokens > 0 for d in dones] == [True, True, True, False, False]
    decode_only = [(runs, seen) for shape, runs, seen in served.steps if shape == "decode"]
    assert len(decode_only) > 20
    assert all(seen == runs == 1 for runs, seen in decode_only), decode_only
    assert served.relocations > 0, "the scenario did not scatter the running sequences"
    if not llama_cpp.llama_supports_gpu_offload():
        prompts = [str(r.prompt) for r in second_round]
        assert texts == solo_llama_texts(model_path, prompts, llama_cpp.GGML_TYPE_Q8_0)


class Served:
    """An EngineLoop run on this thread, recording each step's shape and micro-batch count."""

    def __init__(self, engine: Engine, micro_batches: MicroBatches) -> None:
        self._micro_batches = micro_batches
        self._seen = micro_batches.count
        self.loop = EngineLoop(engine, token_budget=256, emit=self._collect)
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.steps: list[tuple[str, int, int]] = []
        """(decode or mixed, runs of ids the loop counted, micro-batches llama.cpp cut) per step."""

    @property
    def relocations(self) -> int:
        """Sequences the loop moved to other ids."""
        return self.loop.relocations

    def run(self, requests: list[Request]) -> None:
        """Serve these requests, all admitted in one round, until they are done."""
        for request in requests:
            self.loop.submit(request, time.time())
        self.loop.stop(600.0)
        self.loop.run()

    def _collect(self, out: list[Outgoing], stats: StepStats | None) -> None:
        for outgoing in out:
            self.events[outgoing.request_key].append(outgoing.event)
        if stats is not None:
            seen, self._seen = self._micro_batches.count - self._seen, self._micro_batches.count
            shape = "decode" if stats.n_tokens == stats.n_sequences else "mixed"
            self.steps.append((shape, stats.id_runs, seen))

    def text(self, request: Request) -> str:
        """A finished request's text."""
        return "".join(e.text for e in self.events[request.key] if isinstance(e, TokenEvent))

    def done(self, request: Request) -> DoneEvent:
        """A finished request's final event."""
        done = self.events[request.key][-1]
        assert isinstance(done, DoneEvent), done
        return done


def _completion(request_id: str, prompt: str, max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(f"{request_id:0<8}", "client00", RequestKind.COMPLETION, prompt=prompt, params=params)


def test_a_refused_move_sends_the_sequence_back_to_be_computed_again(model_path: Path) -> None:
    """If llama.cpp refused to load a moved sequence's cells (both ids are then empty), the sequence is preempted
    and recomputed: its answer is the same as when nothing went wrong, and no cell is left behind."""
    with engine_counting_micro_batches(model_path, n_seq_max=8) as (engine, micro_batches):
        refused: list[tuple[int, int]] = []
        moves = {"move_sequence": engine.move_sequence, "swap_sequences": engine.swap_sequences}

        def refuse_first(name: str):  # type: ignore[no-untyped-def]
            def move(a: int, b: int) -> bool:
                if refused:
                    return moves[name](a, b)
                refused.append((a, b))
                engine.free_sequence(a)
                engine.free_sequence(b)
                return False

            return move

        for name in moves:
            setattr(engine, name, refuse_first(name))
        served = Served(engine, micro_batches)
        first_round = [_completion(f"warm{i}", SHORT_PROMPTS[i % 7] + " " * (i // 7), 1) for i in range(8)]
        served.run(first_round)
        second_round = [_completion(f"next{i}", first_round[i].prompt + " and", MAX_TOKENS) for i in (1, 3, 6)]
        served.run(second_round)
        assert refused, "no move was attempted"
        assert served.loop.scheduler.preemptions == 1
        held = {seq_id: engine.sequence_length(seq_id) for seq_id in range(8)}
        assert held == dict(_expected_cells(served)), "llama.cpp holds cells the KV manager does not know of"
        texts = [served.text(request) for request in second_round]
    if not llama_cpp.llama_supports_gpu_offload():
        prompts = [str(r.prompt) for r in second_round]
        assert texts == solo_llama_texts(model_path, prompts, llama_cpp.GGML_TYPE_Q8_0)


def _expected_cells(served: Served) -> list[tuple[int, int]]:
    """What the KV manager says each id holds once nothing runs."""
    expected = dict.fromkeys(range(served.loop.engine.n_seq_max), 0)
    expected.update(served.loop.kv.cells_held())
    return sorted(expected.items())

"""The engine thread: takes commands, runs one batched decode per step, turns sampled tokens into events.

It owns every Sequence and is the only thread that drives the Engine, holding `Engine.lock` for each iteration.
Commands arrive on a thread-safe inbox; events leave through `emit`, called once per step with all it produced.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llamaq.protocol import (
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    History,
    PrefixSource,
    ProtocolError,
    Request,
    RequestKind,
    ResultEvent,
    Timings,
    TokenEvent,
    Usage,
)

from .conversations import next_history
from .engine import BatchSlice, DecodeError, Engine
from .heartbeat import WorkerLoad
from .id_packing import Relocation, count_runs
from .kv_cache import KvCache
from .metrics import ERROR, WorkerMetrics
from .resume import Resume
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .state_keeper import StateKeeper
from .text_stream import TextStream

log = logging.getLogger("llamaq.engine_loop")

# How long an idle engine thread sleeps on its inbox before looking at deadlines again.
_IDLE_WAIT_S = 0.5
# A step with at least this many prompt tokens is timed as prefill for the restore-or-recompute choice.
_PREFILL_SAMPLE_TOKENS = 32


@dataclass(frozen=True)
class Outgoing:
    """One event for one request (by Request.key); `final` marks the request's last event. A final event of a
    named conversation's turn carries the conversation's new history, written before the event."""

    request_key: str
    event: Event
    history: tuple[str, History] | None = None

    @property
    def final(self) -> bool:
        """True for done and error events."""
        return not isinstance(self.event, TokenEvent)


@dataclass(frozen=True)
class StepStats:
    """What one decode step did."""

    n_sequences: int
    n_tokens: int
    decode_s: float
    step_s: float
    id_runs: int = 1
    """Runs of consecutive sequence ids in the batch (see id_packing)."""


@dataclass(frozen=True)
class _Submit:
    request: Request
    received_at: float
    resume: Resume | None = None


@dataclass(frozen=True)
class _Cancel:
    request_key: str


@dataclass(frozen=True)
class _Forget:
    conversation: str
    """Owner-qualified (Request.owned_conversation)."""


@dataclass(frozen=True)
class _Stop:
    drain_deadline: float
    """time.monotonic() after which sequences still running are cancelled."""


_Command = _Submit | _Cancel | _Forget | _Stop
Emit = Callable[[list[Outgoing], StepStats | None], None]


class EngineLoop:
    """Continuous batching over one Engine, run by `run()` on a dedicated thread."""

    def __init__(
        self,
        engine: Engine,
        token_budget: int,
        emit: Emit,
        prefix_cache: bool = True,
        state: Callable[[KvCache], StateKeeper] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.kv = KvCache(
            n_seq_max=engine.n_seq_max,
            window=engine.window,
            prefix_cache=prefix_cache,
            n_cells=engine.n_ctx if engine.config.kv_unified else None,
        )
        self.scheduler = Scheduler(self.kv, token_budget)
        self.state = None if state is None else state(self.kv)
        """The swap tier's policy when the worker has a state directory."""
        self._emit = emit
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._by_key: dict[str, Sequence] = {}
        self._stop: _Stop | None = None
        self.decode_retries = 0
        self.relocations = 0
        """Sequences moved to other ids to keep the running ones consecutive."""
        """Decodes retried after llama.cpp found no KV slot (each after evicting every idle sequence)."""
        self.metrics = metrics
        self._exported: dict[str, int] = {}
        self.load = WorkerLoad(kv_cells_total=engine.n_ctx)
        """What the loop is doing, as of its last iteration; read by the heartbeat from another thread."""
        self._thread: threading.Thread | None = None

    # --- called from other threads ------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on its own thread."""
        self._thread = threading.Thread(target=self.run, name="llamaq-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, received_at: float, resume: Resume | None = None) -> None:
        """Queue a validated request; its events (or its error) come out through emit. With `resume`, it goes
        on after the tokens and events another worker already published."""
        self._inbox.put(_Submit(request, received_at, resume))

    def cancel(self, request_key: str) -> None:
        """Stop a request (by Request.key) at the next step; it ends with a done event, finish_reason cancelled."""
        self._inbox.put(_Cancel(request_key))

    def forget(self, conversation: str) -> None:
        """Drop the cached KV of a deleted conversation (its owner-qualified id)."""
        self._inbox.put(_Forget(conversation))

    def stop(self, drain_timeout_s: float) -> None:
        """Finish what is in flight, cancelling whatever still runs after drain_timeout_s, then end the loop."""
        self._inbox.put(_Stop(time.monotonic() + drain_timeout_s))

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the loop thread to end; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """True while the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # --- the engine thread --------------------------------------------------------------------------------

    def run(self) -> None:
        """Loop until stopped: commands, deadlines, one decode step, events."""
        try:
            while True:
                # Nothing running means nothing can change until a command comes (or a deadline passes).
                commands = self._take_commands(block=not self.scheduler.running)
                out: list[Outgoing] = []
                with self.engine.lock:
                    for command in commands:
                        self._apply(command, out)
                    self._expire(out)
                    done = self._drain_if_stopping(out)
                    if done and self.state is not None:
                        log.info("saved %d conversations to the state directory", self.state.save_all())
                    stats = None if done or not self.scheduler.has_work else self._step(out)
                    self._observe(stats)
                if out or stats:
                    self._emit(out, stats)
                if done:
                    return
        except Exception:
            log.exception("engine loop crashed")
            out = []
            for sequence in list(self.scheduler):
                self._fail(sequence, ProtocolError(ErrorCode.INTERNAL, "the worker's engine failed"), out)
            self._emit(out, None)
            raise

    def _take_commands(self, block: bool) -> list[_Command]:
        commands: list[_Command] = []
        try:
            commands.append(self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait())
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            return commands

    def _drain_if_stopping(self, out: list[Outgoing]) -> bool:
        """Cancel what outlived the drain deadline; True once a stop was asked for and nothing is left."""
        if self._stop is None:
            return False
        if time.monotonic() >= self._stop.drain_deadline:
            for sequence in list(self.scheduler):
                self._finish(sequence, FinishReason.CANCELLED, out)
        return not self.scheduler.has_work

    def _apply(self, command: _Command, out: list[Outgoing]) -> None:
        if isinstance(command, _Submit):
            self._admit_request(command, out)
        elif isinstance(command, _Cancel):
            sequence = self._by_key.get(command.request_key)
            if sequence is not None:
                self._finish(sequence, FinishReason.CANCELLED, out)
        elif isinstance(command, _Forget):
            for seq_id in self.kv.forget(command.conversation):
                self.engine.free_sequence(seq_id)
            if self.state is not None:
                self.state.forget(command.conversation)
        else:
            self._stop = command

    def _admit_request(self, command: _Submit, out: list[Outgoing]) -> None:
        request = command.request
        if request.kind is RequestKind.OP:
            self._run_state_op(request, out)
            return
        try:
            tokens = self._prompt_tokens(request)
            max_tokens = request.params.max_tokens or self.kv.window - len(tokens)
            if max_tokens < 1 or not self.kv.fits(len(tokens), max_tokens):
                raise ProtocolError(
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"prompt of {len(tokens)} tokens plus max_tokens {max_tokens} exceeds the "
                    f"{self.kv.window}-token window of a sequence",
                )
        except ProtocolError as exc:
            out.append(Outgoing(request.key, ErrorEvent(n=0, code=exc.code, message=exc.message)))
            if self.metrics is not None:
                self.metrics.count_rejected(exc.code.value)
            return
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(32) % (2**32 - 1)
        sequence = Sequence(
            request=request,
            prompt_tokens=tokens,
            max_tokens=max_tokens,
            received_at=command.received_at,
            text=TextStream(request.params.stop),
        )
        sequence.sampler = self.engine.new_sampler(request.params, seed)
        if command.resume is not None and command.resume.usable(self.engine.n_vocab, max_tokens):
            self._resume(sequence, command.resume)
        elif command.resume is not None:
            # Only a client (the reply stream is its key) or a bug writes such events: generate the answer again
            # from the prompt, numbering its events after those on the stream.
            log.warning("request %s: the events on its reply stream cannot be resumed from; restarting", request.key)
            sequence.next_event = command.resume.next_event
            if self.metrics is not None:
                self.metrics.count_resume_refused()
        self._by_key[request.key] = sequence
        self.scheduler.add(sequence)
        if len(sequence.generated) >= max_tokens:
            # A resumed request whose last token was sent just before its worker died.
            self._finish(sequence, FinishReason.LENGTH, out)

    def _run_state_op(self, request: Request, out: list[Outgoing]) -> None:
        try:
            if self.state is None:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, "this worker has no state directory (--state-dir)")
            event: Event = ResultEvent(n=0, data=self.state.run(request))
        except ProtocolError as exc:
            event = ErrorEvent(n=0, code=exc.code, message=exc.message)
        out.append(Outgoing(request.key, event))

    def _resume(self, sequence: Sequence, resume: Resume) -> None:
        """Take over what was already sent: the tokens (computed again with the prompt, like a preempted
        sequence), the event numbering, and the text decoder's state (held-back UTF-8 or stop-string prefix)."""
        sequence.generated = list(resume.tokens)
        sequence.reply = list(resume.texts)
        sequence.next_event = resume.next_event
        for token in resume.tokens:
            sequence.text.push(self.engine.token_bytes(token))  # its output was published already

    def _prompt_tokens(self, request: Request) -> list[int]:
        if request.kind is RequestKind.CHAT:
            try:
                return self.engine.chat_tokens(request.messages)
            except Exception as exc:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, f"chat template refused the messages: {exc}") from exc
        return self.engine.tokenize(request.prompt)

    def _expire(self, out: list[Outgoing]) -> None:
        now = time.time()
        for sequence in list(self.scheduler):
            if sequence.expired(now):
                self._fail(sequence, ProtocolError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed"), out)

    def _step(self, out: list[Outgoing]) -> StepStats | None:
        if self.state is not None:
            self.state.restore_waiting(self.scheduler.waiting, self._running_tokens)
        step = self.scheduler.schedule()
        if self.state is not None:
            self.state.swap_out(step.evicted + step.displaced)
        for seq_id in step.cleared:
            self.engine.free_sequence(seq_id)
        self._relocate(step.relocations)
        for sequence in step.admitted:
            self._reuse_cached_prefix(sequence)
        # A sequence whose cells were lost on the way (a refused move) went back to the queue: not decoded now.
        plan = [chunk for chunk in step.chunks if chunk.sequence.seq_id is not None]
        if not plan:
            return None
        started = time.perf_counter()
        slices = [
            BatchSlice(
                seq_id=chunk.sequence.seq_id,
                tokens=chunk.tokens,
                start_pos=chunk.sequence.n_computed,
                sample=chunk.completes_input,
            )
            for chunk in plan
            if chunk.sequence.seq_id is not None
        ]
        try:
            indices = self._decode(slices)
        except DecodeError as exc:
            log.error("decode failed (%s) for %d sequences", exc, len(plan))
            for chunk in plan:
                self._fail(chunk.sequence, ProtocolError(ErrorCode.INTERNAL, str(exc)), out)
            return None
        decode_s = time.perf_counter() - started
        if self.state is not None:
            prompt_tokens = sum(len(c.tokens) for c in plan if len(c.tokens) > 1)
            if prompt_tokens >= _PREFILL_SAMPLE_TOKENS:
                self.state.swap.cost.record_prefill(sum(len(c.tokens) for c in plan), decode_s)
        sampled = self._sample(plan, indices)
        for chunk, token in sampled:
            self._accept(chunk.sequence, token, out)
        n_tokens = sum(len(c.tokens) for c in plan)
        runs = count_runs(piece.seq_id for piece in slices)
        return StepStats(len(plan), n_tokens, decode_s, time.perf_counter() - started, runs)

    def _relocate(self, relocations: list[Relocation]) -> None:
        """Move the cells of sequences the scheduler put on other ids. A move llama.cpp refuses leaves both ids
        empty: the running sequence is preempted (computed again later), the idle one it was swapped with is lost."""
        moved = {s.seq_id: s for s in self.scheduler.running}
        for relocation in relocations:
            source, target = relocation.source, relocation.target
            if relocation.swap:
                done = self.engine.swap_sequences(source, target)
            else:
                done = self.engine.move_sequence(source, target)
            self.relocations += 1
            if not done:
                log.error("llama.cpp refused to move sequence %d to %d; recomputing it", source, target)
                self.scheduler.lost_kv(moved[target], idle_id=source if relocation.swap else None)

    def _running_tokens(self, domain: str) -> dict[int, list[int]]:
        """What the running sequences of one cache domain have computed, by sequence id."""
        running = (s for s in self.scheduler.running if s.request.cache_domain == domain)
        return {s.seq_id: s.computed_tokens() for s in running if s.seq_id is not None}

    def _reuse_cached_prefix(self, sequence: Sequence) -> None:
        """Give the admitted sequence its cached prefix: copy it from another sequence if need be, then cut
        the cells back to the prefix it shares with the prompt."""
        assert sequence.seq_id is not None
        if sequence.restored_into is not None and not sequence.preemptions:
            # Admission continued the sequence its saved state was restored into, or found something better.
            if sequence.restored_into == sequence.seq_id and sequence.copy_from is None:
                sequence.restored_tokens = sequence.cached_tokens
            sequence.restored_into = None
        if sequence.copy_from is not None:
            self.engine.copy_sequence(sequence.copy_from, sequence.seq_id)
            sequence.copy_from = None
        if not self.engine.truncate_sequence(sequence.seq_id, sequence.n_computed):
            log.warning("llama.cpp refused to truncate sequence %d; recomputing its prompt", sequence.seq_id)
        elif (held := self.engine.sequence_length(sequence.seq_id)) != sequence.n_computed:
            # llama.cpp decodes onto an empty sequence at any position without a word, so a prefix lost by a
            # bookkeeping bug would silently change the answer: recompute instead.
            log.error(
                "sequence %d holds %d positions where %d were expected; recomputing its prompt",
                sequence.seq_id,
                held,
                sequence.n_computed,
            )
        else:
            return
        self.engine.free_sequence(sequence.seq_id)
        sequence.n_computed = sequence.cached_tokens = 0

    def _decode(self, slices: list[BatchSlice]) -> list[int]:
        """One llama_decode; on "no KV slot" (status 1, nothing kept) free every idle sequence and retry once."""
        try:
            return self.engine.decode(slices)
        except DecodeError as exc:
            if exc.status != 1:
                raise
            self.decode_retries += 1
            evicted = self.kv.evict_idle()
            log.warning(
                "no KV slot for a batch of %d tokens; evicted %d idle sequences and retrying",
                sum(len(s.tokens) for s in slices),
                len(evicted),
            )
            for seq_id in evicted:
                self.engine.free_sequence(seq_id)
            return self.engine.decode(slices)

    def _sample(self, plan: list[Chunk], indices: list[int]) -> list[tuple[Chunk, int]]:
        wanted = [chunk for chunk in plan if self.scheduler.record_decoded(chunk)]
        picks = []
        for chunk, index in zip(wanted, indices, strict=True):
            assert chunk.sequence.sampler is not None
            picks.append((chunk.sequence.sampler, index))
        return list(zip(wanted, self.engine.sample_all(picks), strict=True))

    def _accept(self, sequence: Sequence, token: int, out: list[Outgoing]) -> None:
        sequence.mark_token()
        if self.engine.is_end_of_generation(token):
            self._finish(sequence, FinishReason.STOP, out)
            return
        sequence.generated.append(token)
        text = sequence.text.push(self.engine.token_bytes(token))
        sequence.reply.append(text)
        out.append(Outgoing(sequence.key, TokenEvent(n=sequence.take_event_number(), text=text, tokens=(token,))))
        if sequence.text.stopped:
            self._finish(sequence, FinishReason.STOP, out)
        elif len(sequence.generated) >= sequence.max_tokens:
            self._finish(sequence, FinishReason.LENGTH, out)

    def _finish(self, sequence: Sequence, reason: FinishReason, out: list[Outgoing]) -> None:
        tail = sequence.text.finish()
        if tail:
            sequence.reply.append(tail)
            out.append(Outgoing(sequence.key, TokenEvent(n=sequence.take_event_number(), text=tail, tokens=())))
        self._release(sequence)
        request = sequence.request
        self._observe_finished(sequence, reason.value, None)
        history = None
        # A cancelled turn is not part of the conversation: the client never accepted its reply.
        if request.owned_conversation is not None and reason is not FinishReason.CANCELLED:
            tokens = sequence.prompt_tokens + sequence.generated
            history = (request.owned_conversation, next_history(request, "".join(sequence.reply), tokens))
        out.append(Outgoing(sequence.key, self._done_event(sequence, reason), history))

    def _fail(self, sequence: Sequence, error: ProtocolError, out: list[Outgoing]) -> None:
        # After an internal error the sequence's cells may not match its tokens: never reuse them.
        self._release(sequence, keep_cache=error.code is not ErrorCode.INTERNAL)
        self._observe_finished(sequence, ERROR, error.code.value)
        out.append(
            Outgoing(sequence.key, ErrorEvent(n=sequence.take_event_number(), code=error.code, message=error.message))
        )

    def _release(self, sequence: Sequence, keep_cache: bool = True) -> None:
        if sequence.sampler is not None:
            self.engine.free_sampler(sequence.sampler)
            sequence.sampler = None
        to_clear = self.scheduler.release(sequence, keep_cache)
        if to_clear is not None:
            self.engine.free_sequence(to_clear)
        self._by_key.pop(sequence.key, None)

    def _observe(self, stats: StepStats | None) -> None:
        """Bring the load snapshot and the metrics up to date after an iteration."""
        running = self.scheduler.running
        cells = min(sum(s.n_computed for s in running), self.engine.n_ctx)
        cached = len(self.kv.idle_conversations())
        self.load = WorkerLoad(
            running=len(running),
            waiting=len(self.scheduler.waiting),
            kv_cells_used=cells,
            kv_cells_total=self.engine.n_ctx,
            sequences_in_use=self.kv.n_used,
            conversations_cached=cached,
        )
        metrics = self.metrics
        if metrics is None:
            return
        if stats is not None:
            metrics.observe_step(stats.n_sequences, stats.n_tokens, stats.decode_s, stats.step_s, stats.id_runs)
        metrics.set_kv(cells, self.engine.n_ctx, self.kv.n_used, cached)
        metrics.set_queue(len(running), len(self.scheduler.waiting))
        counts = {
            "evictions": self.kv.evictions,
            "preemptions": self.scheduler.preemptions,
            "decode_retries": self.decode_retries,
            "relocations": self.relocations,
        }
        if self.state is not None:
            swap = self.state.swap
            counts |= {"swap_out": swap.swaps_out, "swap_in": swap.swaps_in, "check_failures": swap.check_failures}
            counts |= {f"refused:{reason}": n for reason, n in swap.refusals.items()}
        for name, total in counts.items():
            delta = total - self._exported.get(name, 0)
            if delta:
                self._exported[name] = total
                self._export_count(metrics, name, delta)

    @staticmethod
    def _export_count(metrics: WorkerMetrics, name: str, delta: int) -> None:
        if name == "evictions":
            metrics.count_eviction(delta)
        elif name == "preemptions":
            metrics.count_preemption(delta)
        elif name == "swap_out":
            metrics.count_swap_out(delta)
        elif name == "swap_in":
            metrics.count_swap_in(delta)
        elif name == "check_failures":
            for _ in range(delta):
                metrics.count_restore_check_failure()
        elif name == "relocations":
            metrics.count_relocations(delta)
        elif name == "decode_retries":
            for _ in range(delta):
                metrics.count_decode_retry()
        else:
            for _ in range(delta):
                metrics.count_restore_refused(name.removeprefix("refused:"))

    def _observe_finished(self, sequence: Sequence, reason: str, code: str | None) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        admitted = sequence.admitted_at or now
        first = sequence.first_token_at
        self.metrics.observe_finished(
            reason,
            code,
            prompt_tokens=len(sequence.prompt_tokens),
            cached_tokens=sequence.cached_tokens,
            generation_tokens=len(sequence.generated),
            queue_s=admitted - sequence.received_at,
            ttft_s=None if first is None else first - sequence.received_at,
            e2e_s=now - sequence.received_at,
            inter_token_s=sequence.inter_token_s,
        )

    def _done_event(self, sequence: Sequence, reason: FinishReason) -> DoneEvent:
        now = time.monotonic()
        admitted = sequence.admitted_at or now
        first = sequence.first_token_at or now
        return DoneEvent(
            n=sequence.take_event_number(),
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=len(sequence.prompt_tokens),
                completion_tokens=len(sequence.generated),
                cached_tokens=sequence.cached_tokens,
                restored_tokens=sequence.restored_tokens,
                prefix_source=_prefix_source(sequence).value,
            ),
            timings=Timings(
                queue_ms=_ms(admitted - sequence.received_at),
                prefill_ms=_ms(first - admitted),
                decode_ms=_ms(now - first),
                ttft_ms=_ms(first - sequence.received_at),
                total_ms=_ms(now - sequence.received_at),
                restore_ms=round(sequence.restore_ms, 3),
            ),
        )


def _prefix_source(sequence: Sequence) -> PrefixSource:
    if sequence.restored_tokens:
        return PrefixSource.DISK
    if sequence.prefix_source is PrefixSource.RECOMPUTE:
        return PrefixSource.RECOMPUTE
    return PrefixSource.CACHE if sequence.cached_tokens else PrefixSource.NONE


def cancelled_before_start() -> DoneEvent:
    """The only event of a request cancelled before the worker started it."""
    return DoneEvent(
        n=0,
        finish_reason=FinishReason.CANCELLED,
        usage=Usage(prompt_tokens=0, completion_tokens=0),
        timings=Timings(queue_ms=0.0, prefill_ms=0.0, decode_ms=0.0, ttft_ms=0.0, total_ms=0.0),
    )


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000.0, 3)

"""The terminal front ends and the multi-user demo, against a real Valkey and a scripted stand-in worker."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client.demo_chat import percentile, run_demo
from llamaq.client.terminal import run_chat, run_generate
from llamaq.protocol import ChatMessage, ErrorCode, ErrorEvent, Keys, Request, Timings, TokenEvent, Usage

from .hand_worker import HandWorker, done

Reply = Callable[[Request, "ScriptedWorker"], Awaitable[None]]


async def _delete_default_keys(redis: aioredis.Redis) -> None:
    async for key in redis.scan_iter(match=f"{Keys().prefix}:*"):
        await redis.delete(key)


@pytest.fixture
async def redis(redis: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    # These front ends use the default prefix and queue, so each test starts with none of those keys on the server.
    await _delete_default_keys(redis)
    yield redis
    await _delete_default_keys(redis)


class ScriptedWorker(HandWorker):
    """Answers every request on the default queue: by default "echo <last user text>" in two tokens."""

    def __init__(self, redis: aioredis.Redis, reply: Reply | None = None) -> None:
        super().__init__(redis, Keys())
        self.seen: list[Request] = []
        self._reply = reply or echo

    async def run(self) -> None:
        while True:
            for request in await self.poll():
                self.seen.append(request)
                await self._reply(request, self)


async def echo(request: Request, worker: ScriptedWorker) -> None:
    text = request.messages[-1].content if request.messages else request.prompt
    final = done(2, usage=Usage(5, 2, 1), timings=Timings(1.0, 2.0, 40.0, 3.0, 50.0))
    await worker.send(request, TokenEvent(0, "echo", (1,)), TokenEvent(1, f" {text}", (2,)), final)


async def with_worker(worker: ScriptedWorker, body: Callable[[], Awaitable[int]]) -> int:
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(worker.run)
        with anyio.fail_after(10):
            code = await body()
        tasks.cancel_scope.cancel()
    return code


async def test_generate_streams_the_answer(
    redis_url: str, redis: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    worker = ScriptedWorker(redis)
    code = await with_worker(worker, lambda: run_generate(redis_url, "hello", chat=False, params={"max_tokens": 5}))
    out, err = capsys.readouterr()
    assert code == 0 and out == "echo hello\n"
    assert "[stop] 5 prompt (1 cached) + 2 completion tokens" in err and "50.0 tokens/s" in err
    assert worker.seen[0].prompt == "hello" and worker.seen[0].params.max_tokens == 5


async def test_generate_in_chat_mode_sends_one_user_message(redis_url: str, redis: aioredis.Redis) -> None:
    worker = ScriptedWorker(redis)
    code = await with_worker(worker, lambda: run_generate(redis_url, "hi", chat=True, params={}))
    assert code == 0 and worker.seen[0].messages == (ChatMessage("user", "hi"),)


async def test_generate_reports_a_failed_request(
    redis_url: str, redis: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    async def refuse(request: Request, worker: ScriptedWorker) -> None:
        await worker.send(request, ErrorEvent(0, ErrorCode.OVERLOADED, "queue full"))

    code = await with_worker(ScriptedWorker(redis, refuse), lambda: run_generate(redis_url, "x", chat=True, params={}))
    assert code == 1 and "error: overloaded: queue full" in capsys.readouterr().err


async def test_generate_refuses_unknown_params(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_generate(redis_url, "x", chat=False, params={"temprature": 1}) == 2
    assert "temprature" in capsys.readouterr().err


async def test_chat_resends_the_whole_conversation(
    redis_url: str, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you\n/exit\nnever read\n"))
    worker = ScriptedWorker(redis)
    code = await with_worker(worker, lambda: run_chat(redis_url, {"temperature": 0.2}, "be nice"))
    assert code == 0 and len(worker.seen) == 2
    assert worker.seen[1].messages == (
        ChatMessage("system", "be nice"),
        ChatMessage("user", "hello"),
        ChatMessage("assistant", "echo hello"),
        ChatMessage("user", "how are you"),
    )
    assert worker.seen[1].params.temperature == 0.2
    assert "echo how are you" in capsys.readouterr().out


async def test_chat_ends_at_end_of_input(
    redis_url: str, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("only line\n"))
    worker = ScriptedWorker(redis)
    assert await with_worker(worker, lambda: run_chat(redis_url, {}, None)) == 0
    assert worker.seen[0].messages == (ChatMessage("user", "only line"),)


async def test_ctrl_c_stops_the_reply_not_the_chat(
    redis_url: str, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(request: Request, worker: ScriptedWorker) -> None:
        if len(worker.seen) == 1:
            await worker.send(request, TokenEvent(0, "long answ", (1,)))
            await anyio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
        else:
            await echo(request, worker)

    monkeypatch.setattr("sys.stdin", io.StringIO("tell me a story\nagain\n/exit\n"))
    worker = ScriptedWorker(redis, interrupted)
    code = await with_worker(worker, lambda: run_chat(redis_url, {}, None))
    assert code == 0 and "long answ [stopped]" in capsys.readouterr().out
    first, second = worker.seen
    assert await redis.exists(worker.keys.cancel(first.client_id, first.id))
    assert second.messages[1] == ChatMessage("assistant", "long answ")


async def test_demo_runs_every_conversation(redis_url: str, redis: aioredis.Redis) -> None:
    worker = ScriptedWorker(redis)
    out = io.StringIO()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(worker.run)
        summary = await run_demo(redis_url, users=3, turns=2, max_tokens=16, out=out)
        tasks.cancel_scope.cancel()
    assert (summary.users, summary.requests, summary.errors, summary.completion_tokens) == (3, 6, 0, 12)
    assert summary.ttft_p50_ms is not None and summary.ttft_p95_ms is not None
    assert summary.tokens_per_s > 0
    assert {r.params.seed for r in worker.seen} == {4242, 4243, 4244}
    assert all(r.params.temperature == 0.7 and r.params.max_tokens == 16 for r in worker.seen)
    second_turns = [r for r in worker.seen if len(r.messages) == 4]
    assert len(second_turns) == 3 and all(r.messages[2].role == "assistant" for r in second_turns)
    text = out.getvalue()
    assert "user 2 turn 2/2: done: 2 tokens" in text and "6 requests, 0 errors" in text


async def test_demo_counts_failed_requests(redis_url: str, redis: aioredis.Redis) -> None:
    async def fail_first(request: Request, worker: ScriptedWorker) -> None:
        if len(worker.seen) == 1:
            await worker.send(request, ErrorEvent(0, ErrorCode.INTERNAL, "boom"))
        else:
            await echo(request, worker)

    worker = ScriptedWorker(redis, fail_first)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(worker.run)
        summary = await run_demo(redis_url, users=2, turns=2, out=io.StringIO())
        tasks.cancel_scope.cancel()
    assert (summary.requests, summary.errors, summary.completion_tokens) == (4, 1, 6)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0 and percentile(values, 95) == 19.0 and percentile(values, 100) == 20.0
    assert percentile([], 50) is None and percentile([7.0], 95) == 7.0

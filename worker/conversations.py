"""Named conversations in Redis: read a history to extend it, write it back after a turn, run operations.

Redis holds the truth (messages or text, and the last turn's token ids, with a TTL the operator sets), so a
conversation outlives its KV: a worker that no longer caches it rebuilds it by prefill.

Every conversation belongs to the owner of the requests that name it (Request.owner: the tenant, else the client),
and is stored under its owner-qualified id (Request.owned_conversation). Another owner's conversation is therefore
not refused but unreachable: to anyone else its id names a conversation that does not exist yet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from llamaq.protocol import (
    ChatMessage,
    ConversationOp,
    History,
    Keys,
    Request,
    RequestKind,
    conversation_owner,
    decode_history,
    encode_history,
    owned_conversation,
)
from llamaq.protocol.errors import invalid

Detokenize = Callable[[list[int]], Awaitable[str]]


class ConversationStore:
    """Conversation histories under one key prefix."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_s: int, detokenize: Detokenize, worker: str = "") -> None:
        self._worker = worker
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_s
        self._detokenize = detokenize

    async def load(self, owned: str) -> History | None:
        """The stored history of an owner-qualified conversation, or None for an unknown (or expired) one."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.conversation(owned))  # type: ignore[assignment]
        return decode_history(fields, conversation_owner(owned))

    async def resolve(self, request: Request) -> Request:
        """The request with its whole history: an `append` turn gets the stored messages or text in front."""
        owned = request.owned_conversation
        if owned is None or not request.append:
            return request
        history = await self.load(owned)
        if history is None:
            # A first turn sent in the append form: there is nothing to continue yet.
            return replace(request, append=False)
        if history.kind is not request.kind:
            raise invalid(f"conversation {request.conversation} is a {history.kind.value} conversation")
        if request.kind is RequestKind.CHAT:
            return replace(request, messages=history.messages + request.messages, append=False)
        return replace(request, prompt=history.text + request.prompt, append=False)

    def save(self, pipe: Pipeline, owned: str, history: History, served_here: bool = False) -> None:
        """Queue the write of a turn's history (and its TTL) on a pipeline; a turn this worker served also
        makes it the worker that holds the conversation, so other workers hand it the next turn (its KV is
        here). `owned` is the owner-qualified id."""
        key = self._keys.conversation(owned)
        pipe.delete(key)
        pipe.hset(key, mapping=encode_history(history, conversation_owner(owned)))  # type: ignore[arg-type]
        pipe.expire(key, self._ttl_s)
        if served_here and self._worker:
            pipe.set(self._keys.owner(owned), self._worker, ex=self._ttl_s)

    async def run(self, request: Request) -> dict[str, Any]:
        """Carry out an `op` request; the map its result event carries. ProtocolError for what cannot be done."""
        command, conversation, owned = request.command, request.conversation, request.owned_conversation
        assert command is not None and conversation is not None and owned is not None
        history = await self.load(owned)
        if history is None:
            # Also another owner's conversation: the same answer, so the reply tells nothing about who has which id.
            raise invalid(f"unknown conversation {conversation}")
        if command.op is ConversationOp.GET:
            return history.summary(conversation)
        if command.op is ConversationOp.DELETE:
            await self._redis.delete(self._keys.conversation(owned), self._keys.owner(owned))
            return {"conversation": conversation, "deleted": True}
        if command.op is ConversationOp.FORK:
            assert command.into is not None
            into = owned_conversation(request.owner, command.into)
            if await self._redis.exists(self._keys.conversation(into)):
                raise invalid(f"conversation {command.into} already exists")
            await self._write(into, history)
            return history.summary(command.into)
        rewound = await self._rewind(history, command.to_message, command.drop_tokens)
        await self._write(owned, rewound)
        return rewound.summary(conversation)

    async def _rewind(self, history: History, to_message: int | None, drop_tokens: int | None) -> History:
        if history.kind is RequestKind.CHAT:
            if to_message is None:
                raise invalid("a chat is rewound to a message (to_message); drop_tokens is for completions")
            # Token ids no longer match the shortened chat; the next turn re-renders and re-tokenizes it.
            return History(kind=history.kind, messages=history.messages[:to_message])
        if drop_tokens is None:
            raise invalid("a completion conversation is rewound by tokens (drop_tokens)")
        kept = list(history.tokens[: max(len(history.tokens) - drop_tokens, 0)])
        return History(kind=history.kind, text=await self._detokenize(kept), tokens=tuple(kept))

    async def _write(self, owned: str, history: History) -> None:
        pipe = self._redis.pipeline(transaction=True)
        self.save(pipe, owned, history)
        await pipe.execute()


def next_history(request: Request, reply_text: str, tokens: list[int]) -> History:
    """A conversation's history after a turn: the request's whole history plus what was generated."""
    if request.kind is RequestKind.CHAT:
        messages = (*request.messages, ChatMessage("assistant", reply_text))
        return History(kind=RequestKind.CHAT, messages=messages, tokens=tuple(tokens))
    return History(kind=RequestKind.COMPLETION, text=request.prompt + reply_text, tokens=tuple(tokens))


async def live_owner(redis: aioredis.Redis, keys: Keys, owned: str) -> str | None:
    """The worker that holds an (owner-qualified) conversation's KV, if it is alive (its heartbeat is the lease)."""
    owner = await redis.get(keys.owner(owned))
    if owner is None:
        return None
    worker = owner.decode() if isinstance(owner, bytes) else str(owner)
    return worker if await redis.exists(keys.heartbeat(worker)) else None

"""Named conversations: the history a worker keeps in Redis, and the operations a client can ask for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import invalid
from .keys import is_valid_id
from .messages import ChatMessage, ConversationCommand, ConversationOp, RequestKind


@dataclass(frozen=True)
class History:
    """A conversation as stored in Redis: the source of truth a worker rebuilds the KV cache from."""

    kind: RequestKind
    messages: tuple[ChatMessage, ...] = ()
    """Chat conversations: every message, the assistant's replies included."""
    text: str = ""
    """Completion conversations: the prompts and generated text so far, as one text."""
    tokens: tuple[int, ...] = ()
    """Token ids of the last turn's prompt and reply, as the worker computed them."""

    def summary(self, conversation: str) -> dict[str, Any]:
        """The map a `result` event carries for this conversation."""
        body: dict[str, Any] = {"conversation": conversation, "kind": self.kind.value, "n_tokens": len(self.tokens)}
        if self.kind is RequestKind.CHAT:
            body["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        else:
            body["text"] = self.text
        return body


def encode_history(history: History, owner: str) -> dict[str, bytes]:
    """The hash fields a history is stored as, with the owner it belongs to (Request.owner)."""
    return {
        "owner": owner.encode(),
        "kind": history.kind.value.encode(),
        "messages": msgpack.packb([[m.role, m.content] for m in history.messages], use_bin_type=True),
        "text": history.text.encode(),
        "tokens": msgpack.packb(list(history.tokens), use_bin_type=True),
    }


def decode_history(fields: Mapping[bytes, bytes], owner: str) -> History | None:
    """A history read back with HGETALL; None for a missing or unreadable conversation, or another owner's."""
    try:
        if fields[b"owner"].decode() != owner:
            return None
        kind = RequestKind(fields[b"kind"].decode())
        messages = tuple(ChatMessage(str(r), str(c)) for r, c in msgpack.unpackb(fields[b"messages"], raw=False))
        tokens = tuple(int(t) for t in msgpack.unpackb(fields[b"tokens"], raw=False))
        return History(kind=kind, messages=messages, text=fields[b"text"].decode(), tokens=tokens)
    except (KeyError, ValueError, TypeError, msgpack.UnpackException):
        return None


def conversation_owner(owned: str) -> str:
    """The owner part of an owner-qualified conversation id (Request.owned_conversation)."""
    return owned.partition("/")[0]


def command_to_wire(command: ConversationCommand) -> dict[str, Any]:
    """The wire fields of an `op` request's command."""
    wire: dict[str, Any] = {"op": command.op.value}
    for name in ("to_message", "drop_tokens", "into"):
        value = getattr(command, name)
        if value is not None:
            wire[name] = value
    return wire


def parse_command(body: Mapping[str, Any]) -> ConversationCommand:
    """Validate an `op` request's command fields."""
    value = body.get("op")
    try:
        # Only a string is looked up: str() of a deeply nested list would overflow the stack.
        op = ConversationOp(value if isinstance(value, str) else "")
    except ValueError:
        raise invalid(f"op must be one of {[o.value for o in ConversationOp]}") from None
    to_message, drop_tokens, into = body.get("to_message"), body.get("drop_tokens"), body.get("into")
    if op is ConversationOp.REWIND:
        if (to_message is None) == (drop_tokens is None):
            raise invalid("rewind takes exactly one of to_message and drop_tokens")
        for name, value, low in (("to_message", to_message, 0), ("drop_tokens", drop_tokens, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise invalid(f"{name} must be an integer >= {low}")
    elif to_message is not None or drop_tokens is not None:
        raise invalid("to_message and drop_tokens belong to rewind")
    if op is ConversationOp.FORK:
        if not isinstance(into, str) or not is_valid_id(into):
            raise invalid("fork needs `into`: 8 to 64 characters of [A-Za-z0-9_-]")
    elif into is not None:
        raise invalid("into belongs to fork")
    return ConversationCommand(op=op, to_message=to_message, drop_tokens=drop_tokens, into=into)

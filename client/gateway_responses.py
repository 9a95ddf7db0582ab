"""Queue answers -> OpenAI response bodies: whole completions, streamed chunks and usage, as OpenAI clients parse them.

Choices are numbered prompt-major: with several prompts (/v1/completions), choice `p * n + i` is the i-th
generation of prompt p, as OpenAI numbers them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llamaq.protocol import Usage

from .gateway_openai import Call, Endpoint
from .request_handle import Completion

DONE_LINE = b"data: [DONE]\n\n"


class Shape:
    """The identity every body of one call shares (id, object type, creation time, model) and their layout."""

    def __init__(self, call: Call, request_id: str, created: int, model: str) -> None:
        self.call = call
        self.chat = call.endpoint is Endpoint.CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = created
        self.model = model

    def completion(self, completions: Sequence[Completion]) -> dict[str, Any]:
        """The whole answer of a call that did not stream."""
        choices = [self._choice(index, c.text, c.finish_reason.value) for index, c in enumerate(completions)]
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage_body([c.usage for c in completions], self.call.n)
        return body

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """One streamed piece of choice `index`: new text (None: the opening chunk of a chat), or its end."""
        if self.chat:
            delta: dict[str, str] = {}
            if text is None:
                delta = {"role": "assistant", "content": ""}
            elif finish_reason is None:
                delta = {"content": text}
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.call.include_usage:
            # OpenAI sends `usage: null` on every chunk but the last when usage was asked for.
            body["usage"] = None
        return body

    def usage_chunk(self, usages: Sequence[Usage]) -> dict[str, Any]:
        """The last chunk of a stream that asked for usage: no choices, the call's usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage_body(usages, self.call.n)
        return body

    def _choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}


def usage_body(usages: Sequence[Usage], n: int) -> dict[str, Any]:
    """OpenAI usage of a call: each prompt counted once (its first choice's count), every completion summed."""
    # The n choices of one prompt share its tokens: the worker computes them once and copies them.
    firsts = usages[::n]
    prompt_tokens = sum(u.prompt_tokens for u in firsts)
    completion_tokens = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in firsts)},
    }


def sse(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON body."""
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

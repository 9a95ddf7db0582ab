"""How a failed request reaches the caller: an error event becomes a `RequestFailed` exception."""

from __future__ import annotations

from llamaq.protocol import DoneEvent, ErrorCode, ErrorEvent, Event, ResultEvent, TokenEvent


class RequestFailed(Exception):
    """A request that ended with an `error` event (or failed on the client side)."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def succeeded(event: Event, request_id: str) -> TokenEvent | DoneEvent:
    """The event itself, unless it is an error event: then raise it as RequestFailed."""
    if isinstance(event, ErrorEvent):
        raise RequestFailed(event.code, event.message, request_id)
    if isinstance(event, ResultEvent):
        raise RequestFailed(ErrorCode.INTERNAL, "a result event answered a generation request", request_id)
    return event

"""Stable error codes and the exception that carries one to the edge."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Error codes a client can switch on; their spelling is part of the protocol."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request that cannot be served, with the code its `error` event will carry."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def invalid(message: str) -> ProtocolError:
    """Shorthand for the most common error: the request itself is malformed."""
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)

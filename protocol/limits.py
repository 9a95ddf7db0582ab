"""Bounds on what one request may ask for; a worker refuses anything beyond them as `invalid_request`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Configurable request limits with safe defaults."""

    max_entry_bytes: int = 1 << 20
    max_messages: int = 512
    max_text_chars: int = 400_000
    max_stop_strings: int = 8
    max_stop_chars: int = 256
    max_tokens: int = 1 << 16
    max_role_chars: int = 64

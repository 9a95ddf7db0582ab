"""The on-disk format of one saved KV sequence, and every check a file must pass before it is trusted.

Pure bytes in, bytes out: no llama.cpp and no file system. A file is

    magic (8 bytes) | header length (u32, little endian) | header (msgpack map) | payload | logits | sha256 (32 bytes)

where the payload is llama.cpp's own sequence state (`llama_state_seq_get_data`), the logits are the float32
next-token logits recorded when the state was saved, and the digest covers everything before it. The header names
the format version, the model and context settings the state belongs to, the token ids it covers and the sizes of
the two blobs, so a truncated, corrupt, foreign or incompatible file is refused before llama.cpp reads a byte of it.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

MAGIC = b"LLQSTATE"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<I")
_DIGEST_BYTES = 32
_MAX_HEADER_BYTES = 16 << 20
"""A header holds token ids and a few names; anything larger is not one of ours."""


class RefusalReason(StrEnum):
    """Why a state file was not loaded; each is a label of the refusal metric."""

    NOT_A_STATE_FILE = "not_a_state_file"
    UNSUPPORTED_VERSION = "unsupported_version"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    OTHER_MODEL = "other_model"
    INCOMPATIBLE_SETTINGS = "incompatible_settings"
    FAILED_CHECK = "failed_check"
    """The file was sound but the restored sequence did not reproduce the recorded logits."""
    LOAD_FAILED = "load_failed"
    """llama.cpp did not accept the state (no room for its cells, or a layout it cannot read)."""


class StateRefused(Exception):
    """A state file that must not be loaded, with the reason and a message for people."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Fingerprint:
    """What a saved state depends on: the model file, and the context settings that shape its KV data."""

    model: str
    """Digest of the GGUF file (see model_files.model_digest)."""
    settings: tuple[tuple[str, str], ...]
    """Sorted (name, value) pairs: n_ctx, n_seq_max, KV type and layout, flash attention, offload, llama.cpp."""

    @staticmethod
    def of(model: str, **settings: object) -> Fingerprint:
        """A fingerprint from a model digest and named settings (values compared as text)."""
        return Fingerprint(model, tuple(sorted((name, str(value)) for name, value in settings.items())))


@dataclass(frozen=True)
class StateHeader:
    """What a state file says about itself; readable without loading the payload."""

    conversation: str
    """Owner-qualified (`<owner>/<conversation id>`): whose state this is."""
    tokens: tuple[int, ...]
    """The token ids whose KV the payload holds, in position order."""
    fingerprint: Fingerprint
    saved_at: float
    payload_bytes: int
    logits_bytes: int
    version: int = FORMAT_VERSION
    cache_domain: str | None = None
    """The cache domain of the requests that computed the KV: only requests of this domain may reuse it."""


@dataclass(frozen=True)
class StateRecord:
    """A sequence's saved state: the header, llama.cpp's state bytes, and the logits to verify a restore by."""

    header: StateHeader
    payload: bytes = field(repr=False)
    logits: bytes = field(repr=False)


def encode_state(
    conversation: str,
    tokens: list[int],
    fingerprint: Fingerprint,
    payload: bytes,
    logits: bytes,
    cache_domain: str | None = None,
) -> bytes:
    """The bytes of a state file."""
    header = {
        "version": FORMAT_VERSION,
        "conversation": conversation,
        "cache_domain": cache_domain,
        "tokens": list(tokens),
        "model": fingerprint.model,
        "settings": dict(fingerprint.settings),
        "saved_at": time.time(),
        "payload_bytes": len(payload),
        "logits_bytes": len(logits),
    }
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    body = b"".join((MAGIC, _LENGTH.pack(len(packed)), packed, payload, logits))
    return body + hashlib.sha256(body).digest()


def header_length(prefix: bytes) -> int:
    """Bytes of magic, length and header, from the first 12 bytes of a file; StateRefused if not ours."""
    if len(prefix) < len(MAGIC) + _LENGTH.size or not prefix.startswith(MAGIC):
        raise StateRefused(RefusalReason.NOT_A_STATE_FILE, "the file does not start with a llamaq state header")
    length: int = _LENGTH.unpack_from(prefix, len(MAGIC))[0]
    if length > _MAX_HEADER_BYTES:
        raise StateRefused(RefusalReason.CORRUPT, f"header length {length} is not plausible")
    return len(MAGIC) + _LENGTH.size + length


def decode_header(head: bytes) -> StateHeader:
    """The header of a file from its first header_length() bytes; StateRefused when unreadable."""
    start = len(MAGIC) + _LENGTH.size
    end = header_length(head)
    if len(head) < end:
        raise StateRefused(RefusalReason.TRUNCATED, f"the header needs {end} bytes; the file has {len(head)}")
    try:
        body: Any = msgpack.unpackb(head[start:end], raw=False)
        version = int(body["version"])
        if version != FORMAT_VERSION:
            raise StateRefused(
                RefusalReason.UNSUPPORTED_VERSION,
                f"format version {version}; this worker reads version {FORMAT_VERSION}",
            )
        settings = tuple(sorted((str(k), str(v)) for k, v in dict(body["settings"]).items()))
        return StateHeader(
            conversation=str(body["conversation"]),
            tokens=tuple(int(t) for t in body["tokens"]),
            fingerprint=Fingerprint(str(body["model"]), settings),
            saved_at=float(body["saved_at"]),
            payload_bytes=int(body["payload_bytes"]),
            logits_bytes=int(body["logits_bytes"]),
            version=version,
            cache_domain=None if body.get("cache_domain") is None else str(body["cache_domain"]),
        )
    except StateRefused:
        raise
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise StateRefused(RefusalReason.CORRUPT, f"unreadable header ({type(exc).__name__})") from exc


def decode_state(data: bytes, expected: Fingerprint) -> StateRecord:
    """A whole file checked for size, checksum and fingerprint; StateRefused for the first check it fails."""
    header = decode_header(data)
    start = header_length(data)
    end = start + header.payload_bytes + header.logits_bytes
    if len(data) < end + _DIGEST_BYTES:
        raise StateRefused(RefusalReason.TRUNCATED, f"the file has {len(data)} of {end + _DIGEST_BYTES} bytes")
    if len(data) > end + _DIGEST_BYTES:
        raise StateRefused(RefusalReason.CORRUPT, f"{len(data) - end - _DIGEST_BYTES} bytes after the checksum")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise StateRefused(RefusalReason.CORRUPT, "checksum mismatch")
    check_fingerprint(header, expected)
    payload = data[start : start + header.payload_bytes]
    return StateRecord(header, payload, data[start + header.payload_bytes : end])


def check_fingerprint(header: StateHeader, expected: Fingerprint) -> None:
    """StateRefused unless a header was written for this model and these context settings."""
    found = header.fingerprint
    if found.model != expected.model:
        raise StateRefused(
            RefusalReason.OTHER_MODEL, f"saved with model {found.model[:16]}, this worker runs {expected.model[:16]}"
        )
    if found.settings != expected.settings:
        ours, theirs = dict(expected.settings), dict(found.settings)
        differ = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
        detail = ", ".join(f"{name} {theirs.get(name)} (here {ours.get(name)})" for name in differ)
        raise StateRefused(RefusalReason.INCOMPATIBLE_SETTINGS, f"saved with {detail}")

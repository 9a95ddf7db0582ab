"""API keys of the gateway: loaded from a file and/or $LLAMAQ_API_KEYS, kept only as SHA-256 digests, each
naming the tenant its requests are scheduled and counted under.

Both sources hold `tenant:key` entries: one per line in the file (blank lines and `#` comments skipped), separated
by commas or whitespace in the variable. A digest is enough to recognise a key, so a memory dump or a debugger shows
no usable key; keys are long random strings, for which an unsalted fast hash is the usual choice.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ENV_VAR = "LLAMAQ_API_KEYS"
MIN_KEY_CHARS = 8

_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ApiKeys:
    """Digest of each accepted key -> its tenant; empty when the gateway serves anyone."""

    def __init__(self, tenants: dict[bytes, str] | None = None) -> None:
        self._tenants = dict(tenants or {})

    @classmethod
    def load(cls, path: Path | None, env_value: str | None) -> ApiKeys:
        """Keys from a file and from the variable's value; ValueError names the first malformed entry."""
        tenants: dict[bytes, str] = {}
        if path is not None:
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    _add(tenants, entry, f"{path}:{number}")
        for entry in (env_value or "").replace(",", " ").split():
            _add(tenants, entry, ENV_VAR)
        return cls(tenants)

    @classmethod
    def from_environment(cls, path: Path | None) -> ApiKeys:
        """Keys from a file (if given) and from $LLAMAQ_API_KEYS."""
        return cls.load(path, os.environ.get(ENV_VAR))

    @property
    def enabled(self) -> bool:
        """True when requests must carry one of the keys."""
        return bool(self._tenants)

    @property
    def tenants(self) -> set[str]:
        """The tenants the keys name."""
        return set(self._tenants.values())

    def tenant_for(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer <key>` header, or None when it names no known key."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self._tenants.get(digest(key.strip()))

    def __len__(self) -> int:
        return len(self._tenants)


def digest(key: str) -> bytes:
    """What is kept of a key."""
    return hashlib.sha256(key.encode()).digest()


def _add(tenants: dict[bytes, str], entry: str, where: str) -> None:
    tenant, sep, key = entry.partition(":")
    if not sep or not _TENANT.fullmatch(tenant):
        raise ValueError(f"{where}: expected tenant:key with a tenant of [A-Za-z0-9_.-], 1 to 64 characters")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{where}: the key of tenant {tenant} is shorter than {MIN_KEY_CHARS} characters")
    tenants[digest(key)] = tenant

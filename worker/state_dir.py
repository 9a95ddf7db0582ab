"""The state directory: saved sequence states as files, under a size cap with least-recently-used deletion.

Two kinds of file per conversation: a `swap` file, written when the KV manager evicts an idle conversation and
deleted first when the directory is over its cap, and a `saved` file, written by an explicit save and deleted only
by an explicit delete. Writes go to a temporary name and are renamed into place, so a reader (this worker after
a restart, or another worker sharing the directory) never sees half a file. Reading a file marks it used.

Files live in one folder per owner (Request.owner): `<dir>/<owner>/<conversation>.<kind>.llqs`, named by the
owner-qualified conversation id, so one owner's listing or lookup never reaches another's files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from llamaq.protocol import is_valid_id, is_valid_owner

from .state_file import StateHeader, decode_header, header_length

log = logging.getLogger("llamaq.state_dir")

SUFFIX = ".llqs"


class StateKind(StrEnum):
    """Why a state file exists: swapped out by the KV manager, or saved on request."""

    SWAP = "swap"
    SAVED = "saved"


@dataclass(frozen=True)
class StateEntry:
    """One state file as the directory lists it."""

    conversation: str
    """Owner-qualified (`<owner>/<conversation id>`)."""
    kind: StateKind
    path: Path
    n_bytes: int
    last_used: float


class StateDirFull(Exception):
    """A state does not fit under the cap even after every swap file that may go has gone."""


class StateDir:
    """State files of one worker (or of several that share the directory)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.mkdir(parents=True, exist_ok=True)
        ownerless = list(path.glob(f"*{SUFFIX}"))
        if ownerless:
            log.warning(
                "%d state files in %s have no owner (written before conversations had owners); they are never "
                "used and may be deleted",
                len(ownerless),
                path,
            )

    def file(self, conversation: str, kind: StateKind) -> Path:
        """Where an owner-qualified conversation's state of one kind lives; ValueError for anything but one."""
        owner, _, name = conversation.partition("/")
        if not is_valid_owner(owner) or not is_valid_id(name):
            raise ValueError(f"not an owner-qualified conversation id: {conversation!r}")
        return self.path / owner / f"{name}.{kind.value}{SUFFIX}"

    def write(self, conversation: str, kind: StateKind, data: bytes) -> Path:
        """Store a state, replacing one of the same kind; swap files go, oldest first, to keep under the cap."""
        target = self.file(conversation, kind)
        self._make_room(len(data), replacing=target)
        target.parent.mkdir(exist_ok=True)
        temporary = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            with open(temporary, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        return target

    def read(self, conversation: str, kind: StateKind) -> bytes | None:
        """A state file's bytes, marking it used; None when there is none."""
        target = self.file(conversation, kind)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(target)
        return data

    def read_header(self, conversation: str, kind: StateKind) -> StateHeader | None:
        """The header of a state file without its payload; None when there is none, StateRefused if unreadable."""
        try:
            with open(self.file(conversation, kind), "rb") as source:
                head = source.read(12)
                head += source.read(header_length(head) - len(head))
        except FileNotFoundError:
            return None
        return decode_header(head)

    def entries(self, owner: str | None = None) -> list[StateEntry]:
        """Every state file (of one owner), least recently used first."""
        found = []
        for path in self.path.glob(f"{owner or '*'}/*{SUFFIX}"):
            name, _, kind = path.name.removesuffix(SUFFIX).rpartition(".")
            folder = path.parent.name
            if kind not in StateKind.__members__.values() or not (is_valid_owner(folder) and is_valid_id(name)):
                continue
            conversation = f"{folder}/{name}"
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # deleted by another worker meanwhile
            found.append(StateEntry(conversation, StateKind(kind), path, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda entry: entry.last_used)

    def total_bytes(self) -> int:
        """Bytes all state files take."""
        return sum(entry.n_bytes for entry in self.entries())

    def delete(self, conversation: str, kind: StateKind | None = None) -> int:
        """Delete a conversation's state files (one kind, or both); how many there were."""
        kinds = list(StateKind) if kind is None else [kind]
        deleted = 0
        for each in kinds:
            with contextlib.suppress(FileNotFoundError):
                self.file(conversation, each).unlink()
                deleted += 1
        return deleted

    def promote(self, conversation: str) -> bool:
        """Turn a conversation's swap file into a saved one; False when it has none."""
        try:
            os.replace(self.file(conversation, StateKind.SWAP), self.file(conversation, StateKind.SAVED))
        except FileNotFoundError:
            return False
        return True

    def _make_room(self, n_bytes: int, replacing: Path) -> None:
        entries = [entry for entry in self.entries() if entry.path != replacing]
        total = sum(entry.n_bytes for entry in entries)
        for entry in entries:
            if total + n_bytes <= self.max_bytes:
                return
            if entry.kind is StateKind.SWAP:
                with contextlib.suppress(FileNotFoundError):
                    entry.path.unlink()
                total -= entry.n_bytes
        if total + n_bytes > self.max_bytes:
            raise StateDirFull(
                f"a state of {n_bytes} bytes does not fit: saved states hold {total} of {self.max_bytes} bytes"
            )

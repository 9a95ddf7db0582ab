"""Hostile entries the request codec once mishandled, found by tests/test_fuzz_hostile_entries.py: regressions.

Fast: no worker, no Redis. The fuzz test throws the same kinds of values at a live worker.
"""

from __future__ import annotations

import msgpack
import pytest

from llamaq.protocol import Keys, Limits, ProtocolError, decode_request

KEYS = Keys()
REQUEST_ID, CLIENT_ID = "req0000000000001", "cli0000000000001"


def entry(**fields: object) -> bytes:
    """A valid completion request with fields replaced (the reply key follows id and client)."""
    body: dict[str, object] = {"v": 1, "id": REQUEST_ID, "client": CLIENT_ID, "kind": "completion", "prompt": "hi"}
    body.update(fields)
    body["reply"] = KEYS.reply(str(body["client"]), str(body["id"]))
    packed: bytes = msgpack.packb(body)
    return packed


def with_deep_field(name: str, depth: int) -> bytes:
    """A completion (for `v`) or a get op (for `op`) whose field `name` is a list nested depth deep."""
    body: dict[str, object] = {
        "v": 1,
        "id": REQUEST_ID,
        "client": CLIENT_ID,
        "reply": KEYS.reply(CLIENT_ID, REQUEST_ID),
    }
    body.update({"kind": "op", "conversation": "conv000000000001"} if name == "op" else {"kind": "completion"})
    body.pop(name, None)
    packed: bytes = msgpack.packb(body)
    assert packed[0] & 0xF0 == 0x80, "a fixmap"
    # msgpack.packb refuses nesting over 511; the decoder takes up to 1024, so the value is written by hand.
    key: bytes = msgpack.packb(name)
    return bytes([packed[0] + 1]) + packed[1:] + key + b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize("field", ["v", "op"])
def test_a_deeply_nested_version_or_op_is_refused_not_raised(field: str) -> None:
    """`v` or `op` nested 1000 deep (msgpack decodes up to 1024) once made decode_request raise RecursionError from
    repr()/str() of the value instead of ProtocolError: the worker's intake task died on it, the entry stayed
    pending, and a worker that reclaimed it lost its reclaimer the same way."""
    with pytest.raises(ProtocolError):
        decode_request(with_deep_field(field, 1000), KEYS, Limits())


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_version_that_only_equals_1_is_refused(version: object) -> None:
    """protocol/README.md: `v` must be the integer 1, and booleans are never numbers (`v != 1` let both pass)."""
    with pytest.raises(ProtocolError):
        decode_request(entry(v=version), KEYS, Limits())


@pytest.mark.parametrize("field", ["id", "client", "conversation"])
def test_an_id_with_a_trailing_newline_is_refused(field: str) -> None:
    """An id of valid characters plus "\\n" once passed (re.match with `$` matches before a final newline), and the
    worker answered on a key with a newline in its hash tag."""
    value = {"id": REQUEST_ID, "client": CLIENT_ID, "conversation": "conv000000000001"}[field] + "\n"
    with pytest.raises(ProtocolError):
        decode_request(entry(**{field: value}), KEYS, Limits())

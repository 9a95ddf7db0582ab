"""A worker and a client through a password, through the ACL users of deploy/acl.conf, and over TLS (rediss://).

Each test starts a server of its own on free loopback ports: the embedded Valkey for passwords and ACLs, and a
TLS-capable redis-server or valkey-server from the system for TLS (the embedded one is built without TLS).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError

from llamaq.client import Client
from llamaq.protocol import Keys, owner_of
from llamaq.worker.embedded_valkey import free_port
from llamaq.worker.startup import StartupError

from .conftest import running_worker, worker_settings
from .private_server import ServerExited, embedded_valkey_binary, private_server

REPO = Path(__file__).resolve().parent.parent
ACL_CONF = REPO / "deploy" / "acl.conf"
PROMPT = "The capital of France is"

# The example users of deploy/acl.conf: its comments name these passwords, its rules hold their hashes.
ADMIN = "admin:admin-example-password"
WORKER = "worker:worker-example-password"
ALICE, ALICE_ID = "client-alice:alice-example-password", "alice-0000001"
BOB, BOB_ID = "client-bob:bob-example-password", "bob-00000002"
ACL_KEYS = Keys()  # deploy/acl.conf is written for the default prefix and queue


def url(port: int, credentials: str = "", scheme: str = "redis", query: str = "") -> str:
    """A URL of a test server; credentials are `user:password` or `:password`."""
    at = f"{credentials}@" if credentials else ""
    return f"{scheme}://{at}127.0.0.1:{port}/0" + (f"?{query}" if query else "")


async def greedy_completion(client: Client) -> str:
    """A short greedy completion that must come back whole."""
    result = await client.completion(PROMPT, max_tokens=6, temperature=0)
    assert result.usage.completion_tokens == 6 and result.text.strip(), result
    return result.text


@pytest.mark.slow
async def test_password_protected_server(model_path: Path, prefix: str) -> None:
    """With --requirepass, a worker and a client that send the password serve a request; a wrong password fails
    at once with AuthenticationError, for a client as for a worker, instead of hanging."""
    port = free_port()
    password = "s3cret-Pa55word"
    with private_server(
        embedded_valkey_binary(), "--port", str(port), "--requirepass", password, ping_url=url(port, f":{password}")
    ):
        good = url(port, f":{password}")
        async with running_worker(worker_settings(good, model_path, prefix)):
            async with Client.from_url(good, prefix=prefix) as client:
                await greedy_completion(client)
            for bad in (url(port, ":wrong-password"), url(port)):
                with anyio.fail_after(15), pytest.raises(AuthenticationError):
                    async with Client.from_url(bad, prefix=prefix) as client:
                        await client.completion(PROMPT, max_tokens=2)
        with anyio.fail_after(60), pytest.raises(StartupError, match="refused the credentials") as refused:
            async with running_worker(worker_settings(url(port, ":wrong-password"), model_path, prefix)):
                pytest.fail("a worker with a wrong password must not become ready")
        assert isinstance(refused.value.__cause__, AuthenticationError)


def acl_file_without_comments(directory: Path) -> Path:
    """deploy/acl.conf as an aclfile, which cannot hold comments, the way its header says to make one."""
    lines = [line for line in ACL_CONF.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    path = directory / "users.acl"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def acl_server(tmp_path: Path, *, as_aclfile: bool = False) -> Iterator[int]:
    """The embedded Valkey with deploy/acl.conf loaded verbatim as a config file (or as an aclfile); its port."""
    port = free_port()
    copy = tmp_path / "acl.conf"
    # A copy: nothing the server might write back (ACL SAVE) can touch the file in the repository.
    shutil.copyfile(ACL_CONF, copy)
    extra = ("--aclfile", str(acl_file_without_comments(tmp_path))) if as_aclfile else ()
    with private_server(
        embedded_valkey_binary(),
        "--port",
        str(port),
        *extra,
        config_file=None if as_aclfile else copy,
        ping_url=url(port, ADMIN),
    ):
        yield port


async def acl_list(port: int) -> list[str]:
    """ACL LIST as the admin sees it."""
    async with aioredis.Redis.from_url(url(port, ADMIN), decode_responses=True) as admin:
        return [str(rule) for rule in await admin.acl_list()]


async def test_acl_conf_loads_the_same_as_config_and_as_aclfile(tmp_path: Path) -> None:
    """deploy/acl.conf loads as it is (config directives with comments) and, stripped, as an aclfile, to the same
    users; anonymous access is off."""
    with acl_server(tmp_path) as port:
        as_config = await acl_list(port)
        async with aioredis.Redis.from_url(url(port)) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.ping()
    with acl_server(tmp_path, as_aclfile=True) as port:
        as_aclfile = await acl_list(port)
    # Users made from config lines get the sanitize-payload default, some from an aclfile not; the rules are equal.
    assert [rule.replace(" sanitize-payload", "") for rule in as_config] == [
        rule.replace(" sanitize-payload", "") for rule in as_aclfile
    ]
    assert {rule.split()[1] for rule in as_aclfile} == {"default", "admin", "worker", "client-alice", "client-bob"}


async def acl_denials(port: int, username: str | None = None) -> list[dict[str, Any]]:
    """The server's ACL LOG entries (denied commands and failed logins), of one user or of all."""
    async with aioredis.Redis.from_url(url(port, ADMIN), decode_responses=True) as admin:
        entries: list[dict[str, Any]] = await admin.acl_log()
    return [entry for entry in entries if username is None or entry.get("username") == username]


@pytest.mark.slow
async def test_acl_users_serve_requests_with_least_privilege(model_path: Path, tmp_path: Path) -> None:
    """The worker as user `worker` and a client as `client-alice` run completions and a named conversation with
    every op; no command of theirs is denied. Alice cannot read Bob's replies, cancel his requests, take his
    client id, read or consume the request stream, or delete it; the worker cannot create cancel keys, delete
    replies, trim the queue or touch keys outside the protocol's."""
    with acl_server(tmp_path) as port:
        async with running_worker(worker_settings(url(port, WORKER), model_path, ACL_KEYS.prefix)):
            async with Client.from_url(url(port, ALICE), client_id=ALICE_ID) as alice:
                await greedy_completion(alice)
                await exercise_conversation(alice)
            assert await acl_denials(port) == [], "the happy path needs no command the ACL file refuses"
            async with aioredis.Redis.from_url(url(port, ADMIN)) as admin:
                assert await admin.smembers(ACL_KEYS.workers), "the worker's heartbeat ran under its user"
            await assert_alice_is_confined(port)
            async with Client.from_url(url(port, ALICE), client_id=BOB_ID) as impostor:
                with pytest.raises(Exception) as caught:
                    await impostor.completion(PROMPT, max_tokens=2)
                assert refused_by_acl(caught.value), repr(caught.value)
            async with aioredis.Redis.from_url(url(port, WORKER)) as worker_user:
                for command in (
                    worker_user.set(ACL_KEYS.cancel(BOB_ID, "reply000001"), 1),
                    worker_user.delete(ACL_KEYS.reply(BOB_ID, "reply000001")),
                    worker_user.get("some-other-application:key"),
                    worker_user.xtrim(ACL_KEYS.requests, maxlen=0),
                    worker_user.keys("*"),
                ):
                    with pytest.raises(NoPermissionError):
                        await command
            await reset_acl_log(port)
            async with Client.from_url(url(port, BOB), client_id=BOB_ID) as bob:
                await greedy_completion(bob)
        # Bob's request, heartbeats and the worker's leaving (on stop) ran since the reset: nothing refused.
        assert await acl_denials(port) == []


def refused_by_acl(exc: BaseException | None) -> bool:
    """NOPERM is the error or what led to it.

    The client's submit can end in a KeyError raised while it handles the NOPERM: its reply reader, refused too,
    failed every request and emptied the table that submit's own error handling deletes from (reported as a bug).
    """
    while exc is not None:
        if isinstance(exc, NoPermissionError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def reset_acl_log(port: int) -> None:
    """Forget the denials a test provoked on purpose."""
    async with aioredis.Redis.from_url(url(port, ADMIN)) as admin:
        await admin.acl_log_reset()


async def test_a_client_user_survives_a_lost_connection(tmp_path: Path) -> None:
    """A client user keeps working after its connections drop: its waiting request keeps waiting for a worker,
    and it can submit again. The reconnect check reads only the client's own keys, which deploy/acl.conf allows
    (reading the request stream would expose every client's prompts)."""
    with acl_server(tmp_path) as port:
        async with Client.from_url(url(port, ALICE), client_id=ALICE_ID) as alice:
            waiting = await alice.submit(prompt=PROMPT, max_tokens=2)  # no worker runs: it waits
            await anyio.sleep(0.3)
            async with aioredis.Redis.from_url(url(port, ADMIN)) as admin:
                assert await admin.execute_command("CLIENT", "KILL", "USER", "client-alice")
            with anyio.move_on_after(3) as still_waiting:
                await waiting.result()
            assert still_waiting.cancelled_caught, "the waiting request ended without a worker"
            await (await alice.submit(prompt=PROMPT, max_tokens=2)).aclose()


async def exercise_conversation(client: Client) -> None:
    """One named conversation through a turn and every history op, so the worker runs all its conversation
    commands (HGETALL, DEL + HSET + EXPIRE in MULTI/EXEC, EXISTS) under its ACL user."""
    conversation = "alice-conversation-01"
    await client.chat([{"role": "user", "content": "Hello"}], conversation=conversation, max_tokens=4, temperature=0)
    assert len((await client.get_conversation(conversation))["messages"]) == 2
    assert (await client.rewind_conversation(conversation, to_message=0))["messages"] == []
    fork = await client.fork_conversation(conversation, into="alice-conversation-02")
    await client.delete_conversation(fork)
    await client.delete_conversation(conversation)


async def assert_alice_is_confined(port: int) -> None:
    """Every way out of client-alice's own keys answers NOPERM, while her own keys work."""
    bob_reply = ACL_KEYS.reply(BOB_ID, "reply000001")
    async with aioredis.Redis.from_url(url(port, ADMIN)) as admin:
        await admin.xadd(bob_reply, {"e": b"for bob only"})
    own_wake = ACL_KEYS.wake(ALICE_ID)
    async with aioredis.Redis.from_url(url(port, ALICE)) as alice:
        await alice.xadd(own_wake, {"w": "1"})
        assert await alice.xread({own_wake: "0-0"}, count=1)
        refused = [
            alice.xread({bob_reply: "0-0"}),
            alice.xread({own_wake: "0-0", bob_reply: "0-0"}),  # one multi-key XREAD, as the client's reader does
            alice.xrange(bob_reply),
            alice.delete(bob_reply),
            alice.set(ACL_KEYS.cancel(BOB_ID, "reply000001"), 1),
            alice.xreadgroup(ACL_KEYS.group, "thief", {ACL_KEYS.requests: ">"}, count=1),
            alice.xrange(ACL_KEYS.requests),
            alice.xread({ACL_KEYS.requests: "0-0"}),
            alice.delete(ACL_KEYS.requests),
            alice.expire(ACL_KEYS.requests, 1),
            alice.hgetall(ACL_KEYS.conversation("alice-conversation-01")),
            alice.keys("*"),
            alice.flushall(),
        ]
        for command in refused:
            with pytest.raises(NoPermissionError):
                await command
        await alice.delete(own_wake)
    async with aioredis.Redis.from_url(url(port, ADMIN)) as admin:
        assert await admin.xlen(bob_reply) == 1 and await admin.exists(ACL_KEYS.requests)
        await admin.delete(bob_reply)


def tls_server_binaries() -> list[str]:
    """Servers on this machine that may have TLS: the system's redis-server and valkey-server."""
    found = [shutil.which(name) for name in ("redis-server", "valkey-server")]
    return [binary for binary in found if binary is not None]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1: (ca, cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make test certificates: apt-get install openssl")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=llamaq test CA"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [
            openssl,
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    ):
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return ca, cert, key


@contextlib.contextmanager
def tls_server(directory: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only server (no plain port) on loopback and the CA that signed its certificate; skips without one."""
    ca, cert, key = make_certificates(directory)
    failures = []
    for binary in tls_server_binaries():
        port = free_port()
        args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        args += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        try:
            with private_server(binary, *args, ping_url=url(port, scheme="rediss", query=f"ssl_ca_certs={ca}")):
                yield port, ca
                return
        except ServerExited as exc:
            # Built without TLS: it refuses --tls-port (or finds no TLS support) and exits at once.
            failures.append(f"{binary}: {str(exc).strip().splitlines()[-1]}")
    pytest.skip(f"no TLS-capable redis-server: apt-get install redis-server ({'; '.join(failures) or 'none found'})")


@pytest.mark.slow
async def test_worker_and_client_over_tls(model_path: Path, prefix: str, tmp_path: Path) -> None:
    """Over rediss:// with the test CA, a worker and a client serve a request; a client that does not trust the
    CA fails to connect with an error instead of hanging."""
    with tls_server(tmp_path) as (port, ca):
        trusted = url(port, scheme="rediss", query=f"ssl_ca_certs={ca}")
        async with running_worker(worker_settings(trusted, model_path, prefix)):
            async with Client.from_url(trusted, prefix=prefix) as client:
                await greedy_completion(client)
            for untrusted in (url(port, scheme="rediss"), url(port)):
                with anyio.fail_after(30), pytest.raises(RedisConnectionError):
                    async with Client.from_url(untrusted, prefix=prefix) as client:
                        await client.completion(PROMPT, max_tokens=2)


def test_acl_patterns_name_the_protocol_keys() -> None:
    """Every kind of key protocol/keys.py names is covered by a pattern of deploy/acl.conf, and every pattern
    covers one, so a key added to the protocol (or renamed) cannot leave the ACL file behind unnoticed."""
    rules = "\n".join(line for line in ACL_CONF.read_text().splitlines() if line.startswith("user "))
    patterns = {m.group(1) for m in re.finditer(r"~(\S+?)(?=[\s)]|$)", rules, flags=re.MULTILINE)} - {"*"}
    derived = protocol_keys(ACL_KEYS, ALICE_ID)
    assert {"requests", "reply", "cancel", "wake", "conversation"} <= set(derived), derived
    unmatched = {name: key for name, key in derived.items() if not any(fnmatch_redis(p, key) for p in patterns)}
    assert not unmatched, f"keys no ACL pattern covers: {unmatched}"
    every_key = {*derived.values(), *protocol_keys(ACL_KEYS, BOB_ID).values()}
    unused = {p for p in patterns if not any(fnmatch_redis(p, key) for key in every_key)}
    assert not unused, f"ACL patterns for keys the protocol does not have: {sorted(unused)}"


def protocol_keys(keys: Keys, client_id: str) -> dict[str, str]:
    """Every key name Keys derives, by the name of its property or method, for made-up ids but the client's."""
    found = {}
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            value = getattr(keys, name)
        elif inspect.isfunction(member):
            # A client id that deploy/acl.conf has a user for: only that user may write its wake stream (and the
            # count sets of its owner, the client itself when it names no tenant).
            parameters = list(inspect.signature(member).parameters)[1:]
            named = {"client_id": client_id, "owner": owner_of(None, client_id)}
            arguments = [named.get(parameter, f"some-{parameter}") for parameter in parameters]
            value = getattr(keys, name)(*arguments)
        else:
            continue
        if isinstance(value, str) and value.startswith(f"{keys.prefix}:"):  # `group` names a group, not a key
            found[name] = value
    return found


def fnmatch_redis(pattern: str, key: str) -> bool:
    """Redis glob matching for the patterns used here: `*` is the only special character they contain."""
    assert not set(pattern) & set("?[]\\"), pattern
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), key, flags=re.DOTALL) is not None

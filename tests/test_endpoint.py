"""Over the network: the MessagePack-RPC client endpoint and the authenticated admin
endpoint, driven over real loopback sockets by a raw msgpack client written here (not
otpy's own client), plus otpy.connect and a hypothesis test of random frames.
"""

from __future__ import annotations

import errno
import functools
import gc
import hashlib
import hmac
import os
import pickle
import socket
import ssl
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otpy
import otpy._client
from otpy._protocol.handshake import Session
from otpy._protocol.msgpack_rpc import Decoder, Response, Sealed
from otpy._serve import rpc as _endpoint
from otpy._serve.rpc import serve_admin, serve_client

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
COOKIE = "test-cookie-123"


class Echo(otpy.GenServer[dict[str, Any]]):
    """Calls: ("echo", x) -> x; ("shape", x) -> type name of x; ("defer", key) waits for
    ("release", key, value); "crash" raises; "object" replies with an unencodable object;
    ("blob", n) -> n bytes (and counts it); "hits" -> the count."""

    vsn = "1"

    def init(self, arg: Any) -> dict[str, Any]:
        return {"waiting": {}, "blobs": 0, "casts": []}

    def handle_call(self, request: Any, caller: otpy.Caller, state: dict[str, Any]) -> Any:
        match request:
            case ("echo", x):
                return otpy.Reply(x, state)
            case ("shape", x):
                return otpy.Reply(type(x).__name__, state)
            case ("defer", key):
                return otpy.NoReply({**state, "waiting": {**state["waiting"], key: caller}})
            case ("release", key, value):
                waiting = dict(state["waiting"])
                waiting.pop(key).reply(value)
                return otpy.Reply("released", {**state, "waiting": waiting})
            case "crash":
                raise ZeroDivisionError("crash requested")
            case "object":
                return otpy.Reply(object(), state)
            case ("blob", n):
                return otpy.Reply(b"x" * n, {**state, "blobs": state["blobs"] + 1})
            case "casts":
                return otpy.Reply(state["casts"], state)
        return otpy.Reply(request, state)

    def handle_cast(self, message: Any, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "casts": [*state["casts"], message]}


class Versioned(otpy.GenServer[int]):
    """Version 2 speaks ("get",) -> {"value": n}; version 1 clients said "value" -> n."""

    vsn = "2"

    def init(self, arg: Any) -> int:
        return 42

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == ("get",):
            return otpy.Reply({"value": state}, state)
        raise ValueError(f"unknown request {request!r}")

    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        return ("get",) if request == "value" else request

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        return reply["value"]


def tree() -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child("echo", Echo), otpy.Child("v", Versioned)],
                           max_restarts=1000)


class Raw:
    """A raw MessagePack-RPC client over a trio stream; once ``session`` is set (an
    authenticated admin session), it seals what it sends and opens what it gets."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(use_list=False, raw=False, strict_map_key=False)
        self.session: Session | None = None

    async def send(self, *objs: Any) -> None:
        frames = [msgpack.packb(o) for o in objs]
        if self.session is not None:
            frames = [self.session.seal(f) for f in frames]
        await self.stream.send_all(b"".join(frames))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> Any:
        with trio.fail_after(5):
            while True:
                for obj in self.unpacker:
                    if self.session is not None:
                        [opened] = self.session.open(Sealed(obj[1], obj[2]))
                        assert isinstance(opened, Response)
                        return (1, *opened)
                    return obj
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the node closed the connection")
                self.unpacker.feed(data)

    async def call(self, msgid: int, *params: Any, method: str = "call") -> Any:
        await self.send([0, msgid, method, list(params)])
        return await self.recv()

    async def closed(self) -> bool:
        """True once the node closes the connection (replies before that are skipped)."""
        with trio.fail_after(5):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return True


@asynccontextmanager
async def raw(address: tuple[str, int] | None) -> AsyncIterator[Raw]:
    assert address is not None
    stream = await trio.open_tcp_stream(*address)
    try:
        yield Raw(stream)
    finally:
        await trio.aclose_forcefully(stream)


def answer(cookie: str, node_nonce: bytes, client_nonce: bytes) -> bytes:
    """The client's proof, computed here from the documented construction."""
    return hmac.new(cookie.encode(), b"otpy admin client\x00" + node_nonce + client_nonce,
                    hashlib.sha256).digest()


@asynccontextmanager
async def admin_raw(address: tuple[str, int] | None, cookie: str = COOKIE) -> AsyncIterator[Raw]:
    async with raw(address) as r:
        challenge = await r.recv()
        assert "challenge" == challenge[1]
        nonce, mine = challenge[2][0], os.urandom(32)
        _, msgid, error, proof = await r.call(0, mine, answer(cookie, nonce, mine),
                                              method="auth")
        assert (0, None) == (msgid, error)
        assert hmac.new(cookie.encode(), b"otpy admin node\x00" + nonce + mine,
                        hashlib.sha256).digest() == proof
        r.session = Session(cookie, nonce, mine, node_side=False,
                            decoder=Decoder(replies=True))
        yield r


@pytest.fixture(autouse=True)
def cookie_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTPY_COOKIE", COOKIE)
    monkeypatch.setenv("OTPY_COOKIE_FILE", str(tmp_path / "cookie"))


@asynccontextmanager
async def node(**limits: Any) -> AsyncIterator[otpy.Node]:
    """A node with the admin endpoint and a client endpoint with ``limits``."""
    async with otpy.open_node(tree(), admin=("127.0.0.1", 0)) as n, \
            trio.open_nursery() as nursery:
        n.address = await nursery.start(functools.partial(
            serve_client, n._rt, ("127.0.0.1", 0), limits=otpy.EndpointLimits(**limits)))
        yield n
        nursery.cancel_scope.cancel()


# -- the client endpoint -------------------------------------------------------------


async def test_listen_binds_a_free_port_and_exposes_it() -> None:
    """``listen=(host, 0)`` picks a free port, shown as ``node.address``."""
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0)) as n:
        assert n.address is not None
        assert "127.0.0.1" == n.address[0] and n.address[1] > 0
        assert n.admin_address is None
        async with raw(n.address) as r:
            assert (1, 1, None, "hi") == await r.call(1, "echo", ("echo", "hi"))


async def test_request_reaches_handle_call_in_its_in_process_shape() -> None:
    """Arrays decode as tuples, maps as dicts: the same shape as an in-process call."""
    async with node() as n, raw(n.address) as r:
        assert (1, 1, None, "tuple") == await r.call(1, "echo", ("shape", [1, 2]))
        assert (1, 2, None, (1, {"a": (2,)})) == await r.call(2, "echo", ("echo", [1, {"a": [2]}]))
        assert await n.call("echo", ("shape", (1, 2))) == "tuple"


async def test_cast_as_request_and_as_notification() -> None:
    """``cast`` answers nil as a request, nothing as a notification; both arrive."""
    async with node() as n, raw(n.address) as r:
        assert (1, 1, None, None) == await r.call(1, "echo", "first", method="cast")
        await r.send([2, "cast", ["echo", ["second", 2]]])
        assert (1, 2, None, ("first", ("second", 2))) == await r.call(2, "echo", "casts")


async def test_errors_come_back_as_kind_and_message() -> None:
    """Errors are ``[kind, message]``: an unknown name, a crash."""
    async with node() as n, raw(n.address) as r:
        _, msgid, error, result = await r.call(7, "kv9", "x")
        assert (7, None) == (msgid, result)
        assert "NoSuchServer" == error[0] and "'kv9'" in error[1]
        _, _, error, _ = await r.call(8, "echo", "crash")
        assert "ServerCrashed" == error[0]
        assert (1, 9, None, 5) == await r.call(9, "echo", ("echo", 5))


async def test_pipelined_requests_complete_out_of_order() -> None:
    """A deferred reply does not hold back the requests behind it on the connection."""
    async with node() as n, raw(n.address) as r:
        await r.send([0, 1, "call", ["echo", ["defer", "k"]]],
                     [0, 2, "call", ["echo", ["echo", "two"]]])
        assert (1, 2, None, "two") == await r.recv()
        await r.send([0, 3, "call", ["echo", ["release", "k", "one"]]])
        replies = {(await r.recv())[1:] for _ in range(2)}
        assert {(1, None, "one"), (3, None, "released")} == replies


async def test_many_requests_in_flight_on_one_connection() -> None:
    """Hundreds of requests sent before any reply is read all get their own reply."""
    async with node() as n, raw(n.address) as r:
        await r.send(*[[0, i, "call", ["echo", ["echo", i]]] for i in range(500)])
        got = [await r.recv() for _ in range(500)]
        assert [(1, i, None, i) for i in range(500)] == sorted(got)


async def test_versioned_call_is_adapted_both_ways() -> None:
    """``call(name, request, vsn)`` goes through upgrade_request and downgrade_reply."""
    async with node() as n, raw(n.address) as r:
        assert (1, 1, None, 42) == await r.call(1, "v", "value", "1")
        assert (1, 2, None, {"value": 42}) == await r.call(2, "v", ["get"])
        assert (1, 3, None, {"value": 42}) == await r.call(3, "v", ["get"], None)


async def test_deferred_versioned_call_and_suspended_server() -> None:
    """Calls to a suspended server wait and are answered when it resumes (each reply
    goes out as it completes, so in any order)."""
    async with node() as n, raw(n.address) as r:
        n.suspend("v")
        await r.send([0, 1, "call", ["v", "value", "1"]], [0, 2, "call", ["v", ["get"]]])
        await trio.sleep(0.01)
        n.resume("v")
        replies = [await r.recv(), await r.recv()]
        assert [(1, 1, None, 42), (1, 2, None, {"value": 42})] == sorted(
            replies, key=lambda reply: reply[1])


async def test_without_direct_io_the_stream_does_all_the_io(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where sockets are not file descriptors the endpoint reads and writes through
    trio's stream only: pipelined, deferred and large replies all arrive."""
    monkeypatch.setattr(_endpoint, "DIRECT_IO", False)
    async with node() as n, raw(n.address) as r:
        await r.send([0, 1, "call", ["echo", ["defer", "k"]]],
                     *[[0, i, "call", ["echo", ["echo", i]]] for i in range(2, 100)],
                     [0, 100, "call", ["echo", ["blob", 1 << 20]]],
                     [0, 101, "call", ["echo", ["release", "k", "late"]]])
        got = {(await r.recv())[1:] for _ in range(101)}
        assert {(i, None, i) for i in range(2, 100)} <= got
        assert {(1, None, "late"), (100, None, b"x" * (1 << 20)),
                (101, None, "released")} <= got


# -- limits set through open_node -----------------------------------------------------


async def test_open_node_limits_bound_both_endpoints() -> None:
    """``open_node(..., limits=otpy.EndpointLimits(max_frame=...))``: a request larger
    than the limit gets FrameTooLarge at the client and the admin endpoint alike, and
    each connection goes on serving."""
    limits = otpy.EndpointLimits(max_frame=1024)
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0), admin=("127.0.0.1", 0),
                              limits=limits) as n, \
            raw(n.address) as r, admin_raw(n.admin_address) as a:
        _, _, error, _ = await r.call(1, "echo", ("echo", "x" * 2000))
        assert "FrameTooLarge" == error[0] and "1024" in error[1]
        assert (1, 2, None, "x" * 900) == await r.call(2, "echo", ("echo", "x" * 900))
        _, _, error, _ = await a.call(3, "v" * 2000, method="get_state")
        assert "FrameTooLarge" == error[0]
        assert (1, 4, None, 42) == await a.call(4, "v", method="get_state")


async def test_open_node_call_timeout_answers_a_deferred_call(autojump_clock: Any) -> None:
    """``EndpointLimits(call_timeout=...)``: a call whose reply is deferred longer gets
    CallTimeout; the connection keeps serving."""
    limits = otpy.EndpointLimits(call_timeout=2.0)
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0), limits=limits) as n, \
            raw(n.address) as r:
        start = trio.current_time()
        _, _, error, _ = await r.call(1, "echo", ("defer", "never"))
        assert "CallTimeout" == error[0]
        assert 2.0 <= trio.current_time() - start
        assert (1, 2, None, "on") == await r.call(2, "echo", ("echo", "on"))


def test_run_takes_the_endpoint_limits() -> None:
    """``otpy.run(..., limits=...)`` passes the limits on to the endpoint it starts."""

    async def main(n: otpy.Node) -> Any:
        assert n.address is not None
        async with otpy.connect(*n.address) as client:
            with pytest.raises(otpy.RemoteError) as info:
                await client.call("echo", ("echo", [[[[["deep"]]]]]))
            return info.value.kind

    limits = otpy.EndpointLimits(max_depth=4)
    assert "TooDeep" == otpy.run(tree(), main, listen=("127.0.0.1", 0), limits=limits)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"max_frame": 0}, ValueError),
    ({"max_inflight": -1}, ValueError),
    ({"max_depth": "32"}, TypeError),
    ({"max_send_buffer": 1.5}, TypeError),
    ({"call_timeout": 0}, ValueError),
    ({"call_timeout": "5"}, TypeError),
])
def test_endpoint_limits_refuse_values_out_of_range(kwargs: dict[str, Any],
                                                    error: type[Exception]) -> None:
    """Each limit is checked when the value is made, naming the field."""
    field = next(iter(kwargs))
    with pytest.raises(error, match=field):
        otpy.EndpointLimits(**kwargs)


async def test_open_node_refuses_limits_of_another_type() -> None:
    """``limits=`` must be an ``otpy.EndpointLimits``; the error says how to make one."""
    with pytest.raises(TypeError, match="EndpointLimits"):
        async with otpy.open_node(tree(), listen=("127.0.0.1", 0),
                                  limits={"max_frame": 10}):  # type: ignore[arg-type]
            raise AssertionError("the body must not run")  # pragma: no cover


# -- bad input -----------------------------------------------------------------------


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@pytest.mark.parametrize(("message", "kind"), [
    ([0, 5, "call"], "BadRequest"),
    ([0, 5, "call", "not-an-array"], "BadRequest"),
    ([0, 5, 17, []], "BadRequest"),
    ([0, 5, "nope", []], "NoSuchMethod"),
    ([0, 5, "call", ["echo"]], "BadRequest"),
    ([0, 5, "call", [17, "x"]], "BadRequest"),
    ([0, 5, "call", [{"a": 1}, "x"]], "BadRequest"),
    ([0, 5, "call", ["echo", "x", 3]], "BadRequest"),
    ([0, 5, "cast", ["echo"]], "BadRequest"),
    ([0, 5, "call", ["echo", "object"]], "UnencodableReply"),
    ([0, 5, "call", ["echo", ["echo", "x" * 5000]]], "FrameTooLarge"),
    ([0, 5, "call", ["echo", ["echo", [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]], "TooDeep"),
])
async def test_bad_request_with_a_msgid_gets_an_error_reply(
        message: Any, kind: str, logs: list[dict[str, Any]]) -> None:
    """A request whose msgid is known gets ``[kind, message]``, is logged, and the
    connection keeps serving."""
    async with node(max_frame=4096, max_depth=16) as n, raw(n.address) as r:
        reply = await r.call(0, "echo", ("echo", "before"))
        assert (1, 0, None, "before") == reply
        await r.send(message)
        _, msgid, error, result = await r.recv()
        assert (5, kind, None) == (msgid, error[0], result)
        assert isinstance(error[1], str) and error[1]
        assert (1, 6, None, "after") == await r.call(6, "echo", ("echo", "after"))
    assert events(logs, "wire_bad_request") or events(logs, "wire_reply_unencodable")


@pytest.mark.parametrize("data", [
    b"\xc1",  # never used in msgpack
    msgpack.packb("hello"),
    msgpack.packb([]),
    msgpack.packb(["zero", 1]),
    msgpack.packb([0, "id", "call", []]),
    msgpack.packb([0, -1, "call", []]),
    msgpack.packb([1, 1, None, None]),
    msgpack.packb([3, "x"]),
    msgpack.packb([2, "cast"]),
    msgpack.packb([2, 5, []]),
    b"\x91" * 5000,  # nested deeper than msgpack's own stack
    msgpack.packb([2, "cast", ["echo", "x" * 20000]]),  # a notification over max_frame
    b"\xa5\xff\xfe\xfd\xfc\xfb",  # a str that is not UTF-8
])
async def test_input_without_a_usable_msgid_closes_only_that_connection(
        data: bytes, logs: list[dict[str, Any]]) -> None:
    """Malformed msgpack, non-messages and oversized frames close the connection (after
    logging why); the node and the other connections keep serving."""
    async with node(max_frame=4096) as n, raw(n.address) as bystander, raw(n.address) as r:
        await r.send_bytes(data)
        assert await r.closed()
        assert (1, 1, None, 1) == await bystander.call(1, "echo", ("echo", 1))
        async with raw(n.address) as fresh:
            assert (1, 2, None, 2) == await fresh.call(2, "echo", ("echo", 2))
    assert events(logs, "wire_protocol_error")
    assert not events(logs, "server_crashed")


async def test_a_request_over_max_frame_is_answered_and_the_connection_kept(
        logs: list[dict[str, Any]]) -> None:
    """A request many times ``max_frame`` is answered FrameTooLarge under its msgid (its
    bytes dropped as they come), and the connection serves the next request."""
    async with node(max_frame=4096) as n, raw(n.address) as r:
        await r.send([0, 1, "call", ["echo", ["echo", "x" * 200_000]]])
        _, msgid, error, _ = await r.recv()
        assert (1, "FrameTooLarge") == (msgid, error[0])
        assert "200" in error[1] and "4096" in error[1]
        assert (1, 2, None, "after") == await r.call(2, "echo", ("echo", "after"))
    assert ["FrameTooLarge"] == [e["kind"] for e in events(logs, "wire_bad_request")]


async def test_replies_already_made_are_sent_before_a_protocol_error_closes() -> None:
    """Good requests ahead of garbage in the same packet are still answered."""
    async with node() as n, raw(n.address) as r:
        await r.send_bytes(msgpack.packb([0, 1, "call", ["echo", ["echo", "ok"]]]) + b"\xc1")
        assert (1, 1, None, "ok") == await r.recv()
        assert await r.closed()


async def test_client_vanishing_mid_request_crashes_nothing(logs: list[dict[str, Any]]) -> None:
    """A client that leaves while its call is deferred: the late reply is dropped, the
    server keeps running, the node keeps serving."""
    async with node() as n:
        async with raw(n.address) as r:
            await r.send([0, 1, "call", ["echo", ["defer", "gone"]]])
            await trio.sleep(0.01)
        async with raw(n.address) as r2:
            assert (1, 1, None, "released") == await r2.call(1, "echo", ("release", "gone", 0))
            await trio.sleep(0.05)
            assert (1, 2, None, "still") == await r2.call(2, "echo", ("echo", "still"))
    assert not events(logs, "server_crashed")
    assert not events(logs, "wire_connection_failed")


async def test_slow_reader_does_not_make_the_node_buffer_without_bound() -> None:
    """A client that sends and never reads: the node stops reading its requests once
    its replies back up, instead of queueing them all."""
    async with node(max_send_buffer=1 << 16, max_inflight=8) as n, raw(n.address) as r:
        total = 2000
        await r.send(*[[0, i, "call", ["echo", ["blob", 1 << 16]]] for i in range(total)])
        await trio.sleep(0.3)
        served = n.get_state("echo")["blobs"]
        assert served < 200  # a few replies of 64 KiB, not the 2000 asked for
        async with raw(n.address) as other:
            assert (1, 1, None, "ok") == await other.call(1, "echo", ("echo", "ok"))


async def test_max_inflight_stops_reading_until_a_call_completes(
        autojump_clock: Any) -> None:
    """With ``max_inflight`` deferred calls waiting, the connection reads no more
    requests; each reply that completes lets one more in."""
    async with node(max_inflight=3) as n, raw(n.address) as r, raw(n.address) as other:
        await r.send(*[[0, i, "call", ["echo", ["defer", i]]] for i in range(6)])
        await trio.sleep(1)
        assert [0, 1, 2] == sorted(n.get_state("echo")["waiting"])
        assert (1, 1, None, "released") == await other.call(1, "echo", ("release", 0, "a"))
        assert (1, 0, None, "a") == await r.recv()
        await trio.sleep(1)
        assert [1, 2, 3] == sorted(n.get_state("echo")["waiting"])


async def test_notifications_that_cannot_be_served_are_logged_and_dropped(
        logs: list[dict[str, Any]]) -> None:
    """A notification has no reply to carry an error: an unknown method or a cast to a
    missing server is logged, and the connection keeps serving."""
    async with node() as n, raw(n.address) as r:
        await r.send([2, "nope", ["echo", 1]], [2, "cast", ["kv9", 1]], [2, "cast", ["echo"]])
        assert (1, 1, None, ()) == await r.call(1, "echo", "casts")
    assert ["NoSuchMethod"] == [e["kind"] for e in events(logs, "wire_bad_request")]
    assert ["NoSuchServer", "BadRequest"] == [
        e["error"][0] for e in events(logs, "wire_notification_failed")]


# -- the admin endpoint --------------------------------------------------------------


async def test_admin_authenticated_session_serves_every_method() -> None:
    """After the challenge is answered, the admin methods work."""
    async with node() as n, admin_raw(n.admin_address) as a:
        _, _, err, children = await a.call(1, method="which_children")
        assert err is None
        assert ["echo", "v"] == [c["id"] for c in children]
        assert {"id": "echo", "kind": "worker", "status": "running", "vsn": "1",
                "restarts": 0} == children[0]
        assert (1, 2, None, {"specs": 2, "active": 2, "supervisors": 0, "workers": 2}) == \
            await a.call(2, "root", method="count_children")
        assert (1, 3, None, 42) == await a.call(3, "v", method="get_state")
        assert (1, 4, None, None) == await a.call(4, "v", method="suspend")
        await a.send([0, 5, "call", ["v", "value", "1"]])
        assert (1, 6, None, None) == await a.call(6, "v", method="resume")
        assert (1, 5, None, 42) == await a.recv()
        _, _, err, _ = await a.call(7, "nope", method="get_state")
        assert "NoSuchServer" == err[0]
        assert (1, 8, None, ()) == await a.call(8, method="releases")


async def test_admin_upgrade_and_downgrade_from_a_release_file() -> None:
    """``upgrade(release_file)`` loads and installs the release; ``downgrade()`` undoes."""
    sys.path.insert(0, str(RELEASES))
    try:
        from counter_v1 import Counter  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(RELEASES))
    root = otpy.Supervisor([otpy.Child("c0", Counter)])
    async with otpy.open_node(root, admin=("127.0.0.1", 0)) as n, \
            admin_raw(n.admin_address) as a:
        await n.call("c0", "incr")
        _, _, err, report = await a.call(1, str(RELEASES / "v2.toml"), method="upgrade")
        assert err is None and report
        assert "2" == n.vsn_of("c0")
        assert (1, 2, None, (1, 1)) == await a.call(2, "c0", method="get_state")
        _, _, err, releases = await a.call(3, method="releases")
        assert "2" == releases[-1]["vsn"]
        _, _, err, _ = await a.call(4, method="downgrade")
        assert err is None
        assert "1" == n.vsn_of("c0")
        _, _, err, _ = await a.call(5, str(RELEASES / "missing.toml"), method="upgrade")
        assert "UpgradeFailed" == err[0]


def counter_v1() -> type[otpy.GenServer[Any]]:
    sys.path.insert(0, str(RELEASES))
    try:
        from counter_v1 import Counter  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(RELEASES))
    cls: type[otpy.GenServer[Any]] = Counter
    return cls


GATED = """
import os, threading, time
from typing import Any
import otpy

open({started!r}, "w").close()
for _ in range(500):  # at most 5 s
    if os.path.exists({go!r}):
        break
    time.sleep(0.01)
else:
    raise RuntimeError("the test never opened the gate")
with open({where!r}, "w") as f:
    f.write("main" if threading.current_thread() is threading.main_thread() else "worker")


class Counter(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def handle_call(self, request: Any, caller: Any, state: Any) -> Any:
        return otpy.Reply(state, state)

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        return (state, state)
"""


def gated_release(tmp_path: Path) -> Path:
    """A release whose module, when imported, says so (file ``started``), then waits
    for the file ``go`` (at most 5 s) and writes which thread imported it (``where``)."""
    code = tmp_path / "gated"
    code.mkdir()
    (code / "gated_v2.py").write_text(GATED.format(
        started=str(tmp_path / "started"), go=str(tmp_path / "go"),
        where=str(tmp_path / "where")))
    path = code / "r.toml"
    path.write_text('vsn = "2"\n[[updates]]\ntarget = "counter_v1:Counter"\n'
                    'new = "gated_v2:Counter"\n')
    return path


async def test_admin_upgrade_imports_the_release_off_the_loop(tmp_path: Path) -> None:
    """The release's modules are imported in a worker thread: while one takes its time
    the node goes on serving (before, the loop was held for the whole import)."""
    path = gated_release(tmp_path)
    root = otpy.Supervisor([otpy.Child("c0", counter_v1())])
    async with otpy.open_node(root, admin=("127.0.0.1", 0)) as n, \
            admin_raw(n.admin_address) as a:
        await a.send([0, 1, "upgrade", [str(path)]])
        for _ in range(500):
            if (tmp_path / "started").exists():
                break
            await trio.sleep(0.01)
        assert 0 == await n.call("c0", "count")  # served while the import waits
        (tmp_path / "go").touch()
        assert (1, 1, None) == (await a.recv())[:3]
        assert "2" == n.vsn_of("c0")
    assert "worker" == (tmp_path / "where").read_text()


async def test_an_import_that_does_not_finish_is_abandoned_after_the_load_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        autojump_clock: trio.testing.MockClock) -> None:
    """A release whose import does not finish within the load timeout is refused,
    nothing changed, and the node serves on (the import goes on in its thread)."""
    from otpy import _release_files

    monkeypatch.setattr(_release_files, "RELEASE_LOAD_TIMEOUT", 1.0)
    path = gated_release(tmp_path)
    root = otpy.Supervisor([otpy.Child("c0", counter_v1())])
    async with otpy.open_node(root, admin=("127.0.0.1", 0)) as n, \
            admin_raw(n.admin_address) as a:
        _, _, err, _ = await a.call(1, str(path), method="upgrade")
        assert "UpgradeFailed" == err[0]
        assert "did not finish within 1 s" in err[1]
        assert "1" == n.vsn_of("c0")
        (tmp_path / "go").touch()  # let the abandoned import finish


async def test_admin_upgrade_from_a_bundle_needs_no_copy_on_the_node(
        tmp_path: Path) -> None:
    """``upgrade(bundle)``: the release travels in the request (its file and modules with
    their digests); the node installs it with the files gone from every disk."""
    from otpy._protocol.release_bundle import encode_bundle
    from otpy._release_files import read_bundle

    code = tmp_path / "rel"
    code.mkdir()
    (code / "counter_v2.py").write_text((RELEASES / "counter_v2.py").read_text())
    (code / "v2.toml").write_text((RELEASES / "v2.toml").read_text())
    bundle = encode_bundle(read_bundle(code / "v2.toml"))
    for file in code.iterdir():
        file.unlink()
    root = otpy.Supervisor([otpy.Child("c0", counter_v1())])
    async with otpy.open_node(root, admin=("127.0.0.1", 0)) as n, \
            admin_raw(n.admin_address) as a:
        await n.call("c0", "incr")
        _, _, err, report = await a.call(1, bundle, method="upgrade")
        assert (None, ("c0",)) == (err, report["servers"])
        assert (1, 1) == n.get_state("c0")


@pytest.mark.parametrize(("params", "kind", "message"), [
    ([b"\x94garbage"], "UpgradeFailed", "release bundle refused"),
    ([b"\x91" * 500_000], "UpgradeFailed", "release bundle refused"),
    ([7], "BadRequest", "a release bundle (bytes"),
    ([], "BadRequest", "a release bundle (bytes"),
])
async def test_admin_upgrade_refuses_a_bad_bundle_and_keeps_serving(
        params: list[Any], kind: str, message: str) -> None:
    """A bundle that is not one gets an error reply saying why; the session goes on."""
    async with node() as n, admin_raw(n.admin_address) as a:
        await a.send([0, 1, "upgrade", params])
        _, _, err, _ = await a.recv()
        assert kind == err[0] and message in err[1]
        assert (1, 2, None, ()) == await a.call(2, method="releases")


@pytest.mark.parametrize("endpoint", ["client", "admin"])
async def test_address_in_use_names_the_endpoint_and_the_address(endpoint: str) -> None:
    """A node that cannot listen says which endpoint and which address, and keeps the
    OSError (errno EADDRINUSE) that a caller may catch."""
    import errno

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        where = {"listen" if endpoint == "client" else "admin": ("127.0.0.1", port)}
        with pytest.raises(OSError) as info:
            async with otpy.open_node(tree(), **where):  # type: ignore[arg-type]
                pass
    assert errno.EADDRINUSE == info.value.errno
    assert f"the {endpoint} endpoint cannot listen on 127.0.0.1:{port}" in str(info.value)


async def test_admin_runs_nothing_before_authentication(logs: list[dict[str, Any]]) -> None:
    """A request before answering the challenge gets AuthRequired and the connection
    closes; the request is not run."""
    async with node() as n, raw(n.admin_address) as r:
        await r.recv()  # the challenge
        _, msgid, error, _ = await r.call(1, "v", method="suspend")
        assert (1, "AuthRequired") == (msgid, error[0])
        assert await r.closed()
        assert "running" == n.which_children()[1].status
        assert 42 == await n.call("v", "value", vsn="1")
    assert events(logs, "admin_auth_failed")


async def test_admin_wrong_hmac_is_refused_and_closed(logs: list[dict[str, Any]]) -> None:
    """An answer made with another cookie fails; the connection closes."""
    async with node() as n, raw(n.admin_address) as r:
        nonce, mine = (await r.recv())[2][0], os.urandom(32)
        wrong = answer("not-the-cookie", nonce, mine)
        _, _, error, _ = await r.call(1, mine, wrong, method="auth")
        assert "AuthFailed" == error[0]
        assert await r.closed()
    assert events(logs, "admin_auth_failed")


async def test_admin_replayed_answer_is_refused() -> None:
    """An answer that was good for one connection's nonce fails on another's."""
    async with node() as n:
        async with raw(n.admin_address) as first:
            nonce, mine = (await first.recv())[2][0], os.urandom(32)
            good = answer(COOKIE, nonce, mine)
            assert (1, 1, None) == (await first.call(1, mine, good, method="auth"))[:3]
        async with raw(n.admin_address) as second:
            assert nonce != (await second.recv())[2][0]
            _, _, error, _ = await second.call(1, mine, good, method="auth")
            assert "AuthFailed" == error[0]
            assert await second.closed()


async def test_admin_answer_of_the_single_proof_protocol_is_refused_with_why() -> None:
    """A client that answers with HMAC(cookie, nonce) alone (otpy before mutual
    authentication) is refused with a message that says to update it."""
    async with node() as n, raw(n.admin_address) as r:
        nonce = (await r.recv())[2][0]
        old = hmac.new(COOKIE.encode(), nonce, hashlib.sha256).digest()
        _, _, error, _ = await r.call(1, old, method="auth")
        assert "AuthFailed" == error[0] and "update" in error[1]
        assert await r.closed()


async def test_admin_silent_client_is_closed_after_the_auth_timeout(
        autojump_clock: Any, logs: list[dict[str, Any]]) -> None:
    """A client that never answers the challenge is closed (after 10 s)."""
    async with node() as n, raw(n.admin_address) as r:
        await r.recv()
        start = trio.current_time()
        with trio.fail_after(60):
            while await r.stream.receive_some(65536):
                pass  # pragma: no cover - the node sends nothing more
        assert 10.0 <= trio.current_time() - start
    assert ["no answer in time"] == [e["reason"] for e in events(logs, "admin_auth_failed")]


@pytest.mark.parametrize("params", [
    [None], ["text"], [12], [b""], [b"\x00" * 32], [b"\x00" * 32, b"\x00" * 32],
    [b"\x00" * 31, b"\x00" * 32], ["x" * 32, b"\x00" * 32], [b"\x00" * 32, None],
])
async def test_admin_malformed_answers_are_refused(params: list[Any]) -> None:
    """Answers of the wrong type or length fail like a wrong HMAC."""
    async with node() as n, raw(n.admin_address) as r:
        await r.recv()
        _, _, error, _ = await r.call(1, *params, method="auth")
        assert "AuthFailed" == error[0]
        assert await r.closed()


async def test_admin_garbage_before_authentication_closes() -> None:
    """Garbage, a notification or a huge frame instead of the answer closes."""
    async with node() as n:
        for data in (b"\xc1", msgpack.packb([2, "cast", ["v", 1]]),
                     b"\xdb\xff\xff\xff\xff" + b"x" * 2000, b"\xdd\xff\xff\xff\xff"):
            async with raw(n.admin_address) as r:
                await r.recv()
                await r.send_bytes(data)
                assert await r.closed()


async def test_admin_pipelined_after_auth_in_the_same_packet() -> None:
    """Sealed requests sent right behind the answer, in the same packet, are served."""
    async with node() as n, raw(n.admin_address) as r:
        nonce, mine = (await r.recv())[2][0], os.urandom(32)
        session = Session(COOKIE, nonce, mine, node_side=False,
                          decoder=Decoder(replies=True))
        await r.send_bytes(msgpack.packb([0, 1, "auth", [mine, answer(COOKIE, nonce, mine)]])
                           + session.seal(msgpack.packb([0, 2, "get_state", ["v"]])))
        assert (1, 1, None) == (await r.recv())[:3]
        r.session = session
        assert (1, 2, None, 42) == await r.recv()


async def test_admin_get_state_of_an_unencodable_state_is_shown_as_repr() -> None:
    """The admin endpoint sends what msgpack cannot encode as its repr."""
    async with node() as n, raw(n.address) as r, admin_raw(n.admin_address) as a:
        await r.send([0, 1, "call", ["echo", ["defer", "k"]]])
        await trio.sleep(0.01)
        _, _, err, state = await a.call(1, "echo", method="get_state")
        assert err is None
        assert "Caller" in state["waiting"]["k"]


# -- otpy.connect --------------------------------------------------------------------


async def test_connect_client_calls_casts_and_raises_remote_errors() -> None:
    """otpy.connect: call, cast, pipelined calls from many tasks, RemoteError."""
    async with node() as n, otpy.connect(*n.address) as c:  # type: ignore[misc]
        assert "x" == await c.call("echo", ("echo", "x"))
        await c.cast("echo", "hello")
        assert ("hello",) == await c.call("echo", "casts")
        assert 42 == await c.call("v", "value", vsn="1")
        with pytest.raises(otpy.RemoteError) as info:
            await c.call("kv9", "x")
        assert "NoSuchServer" == info.value.kind
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await c.call("echo", ("echo", i))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.call, "echo", ("defer", "k"))
            for i in range(100):
                nursery.start_soon(one, i)
            await trio.sleep(0.01)
            await c.call("echo", ("release", "k", "late"))
        assert {i: i for i in range(100)} == results


async def test_remote_errors_are_also_the_local_errors(autojump_clock: Any) -> None:
    """An error reply whose kind names one of otpy's errors raises an error that is
    both ``otpy.RemoteError`` (with ``kind`` and ``message``) and that error, so code
    written against a local node catches it unchanged; other kinds stay RemoteError."""
    limits = otpy.EndpointLimits(call_timeout=1.0, max_depth=8)
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0), limits=limits) as n, \
            otpy.connect(*n.address) as c:  # type: ignore[misc]
        with pytest.raises(otpy.NoSuchServer) as missing:
            await c.call("kv9", "x")
        assert isinstance(missing.value, otpy.RemoteError)
        assert isinstance(missing.value, LookupError)
        assert "NoSuchServer" == missing.value.kind
        assert "'kv9'" in missing.value.message
        with pytest.raises(otpy.ServerCrashed) as crashed:
            await c.call("echo", "crash")
        assert isinstance(crashed.value, otpy.ServerStopped | otpy.RemoteError)
        with pytest.raises(otpy.CallTimeout) as timeout:
            await c.call("echo", ("defer", "k"))
        assert isinstance(timeout.value, otpy.RemoteError)
        with pytest.raises(otpy.BadRequest) as bad:
            await c.request("call", "echo")
        assert isinstance(bad.value, ValueError) and "BadRequest" == bad.value.kind
        with pytest.raises(otpy.RemoteError) as deep:
            await c.call("echo", [[[[[[[[["deep"]]]]]]]]])
        assert ("TooDeep", otpy.RemoteError) == (deep.value.kind, type(deep.value))
    assert type(missing.value) is type(
        pickle.loads(pickle.dumps(missing.value)))  # one class per kind, picklable
    assert "RemoteError[NoSuchServer]" == type(missing.value).__qualname__


# -- random frames -------------------------------------------------------------------

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
    | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=8)
methods = st.sampled_from(["call", "cast", "auth", "which_children", "get_state",
                           "count_children", "releases", "nope"])
names = st.sampled_from(["echo", "v", "nope"])
messages = st.one_of(
    st.builds(lambda i, m, n, p: [0, i, m, [n, p]], st.integers(0, 2**32 - 1), methods, names,
              payloads),
    st.builds(lambda m, n, p: [2, m, [n, p]], methods, names, payloads),
    st.lists(payloads, max_size=5),
    payloads,
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    data = msgpack.packb(draw(messages))
    how = draw(st.sampled_from(["keep", "flip", "cut", "insert", "random"]))
    if how == "random":
        return draw(st.binary(min_size=1, max_size=64))
    if how == "keep":
        return bytes(data)
    at = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    if how == "cut":
        return data[:at]
    return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(client=st.lists(frames(), max_size=6), admin=st.lists(frames(), max_size=6),
       authenticate=st.booleans())
def test_random_and_mutated_frames_leave_the_node_serving(
        client: list[bytes], admin: list[bytes], authenticate: bool) -> None:
    """Whatever bytes arrive at either endpoint, the node then answers a well-formed
    call on a fresh connection of each."""

    async def main() -> None:
        async with node() as n:
            async with raw(n.address) as r:
                for f in client:
                    try:
                        await r.send_bytes(f)
                    except trio.BrokenResourceError:
                        break
            if authenticate:
                ctx = admin_raw(n.admin_address)
            else:
                ctx = raw(n.admin_address)
            async with ctx as a:
                for f in admin:
                    try:
                        await a.send_bytes(f)
                    except trio.BrokenResourceError:
                        break
            async with raw(n.address) as fresh:
                assert (1, 1, None, "alive") == await fresh.call(1, "echo", ("echo", "alive"))
            async with admin_raw(n.admin_address) as fresh_admin:
                assert (1, 1, None, 42) == await fresh_admin.call(1, "v", method="get_state")

    trio.run(main)


async def test_serve_admin_with_explicit_cookie() -> None:
    """``serve_admin`` can be given the cookie directly (used by embedders and tests)."""
    async with otpy.open_node(tree()) as n, trio.open_nursery() as nursery:
        address = await nursery.start(functools.partial(
            serve_admin, n._rt, n._install, ("127.0.0.1", 0), cookie=b"direct"))
        async with admin_raw(address, cookie="direct") as a:
            assert (1, 1, None, 42) == await a.call(1, "v", method="get_state")
        nursery.cancel_scope.cancel()


async def test_a_port_in_use_fails_the_start_and_stops_the_tree() -> None:
    """``listen=`` on a taken port raises OSError from open_node, bare, after stopping
    the tree that had started."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with pytest.raises(OSError):
            async with otpy.open_node(tree(), listen=("127.0.0.1", port)):
                raise AssertionError("the body must not run")  # pragma: no cover
    finally:
        for listener in listeners:
            await listener.aclose()


def test_run_serves_the_client_endpoint() -> None:
    """``otpy.run(root, main, listen=...)`` starts the endpoint for ``main`` to use."""

    async def main(n: otpy.Node) -> Any:
        assert n.address is not None
        async with otpy.connect(*n.address) as client:
            return await client.call("echo", ("echo", "via run"))

    assert "via run" == otpy.run(tree(), main, listen=("127.0.0.1", 0))


async def test_client_resetting_while_replies_are_written_is_logged_as_vanished(
        logs: list[dict[str, Any]]) -> None:
    """A client that resets the connection while big replies are being sent: logged as
    ``wire_client_vanished``, and the node keeps serving."""
    async with node() as n:
        assert n.address is not None
        sock = socket.create_connection(n.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"".join(msgpack.packb([0, i, "call", ["echo", ["blob", 1 << 20]]])
                              for i in range(20)))
        await trio.sleep(0.05)
        sock.close()  # with linger 0: a reset
        await trio.sleep(0.1)
        async with raw(n.address) as r:
            assert (1, 1, None, "ok") == await r.call(1, "echo", ("echo", "ok"))
    assert events(logs, "wire_client_vanished")
    assert not events(logs, "wire_connection_failed")


async def test_a_batch_received_before_the_peer_reset_is_served_to_its_end() -> None:
    """A client that sends 40 calls and a cast, then resets the connection: writing the
    first replies fails, yet every message received is served, as in process."""
    class Log(otpy.GenServer[list[Any]]):
        vsn = "1"

        def init(self, arg: Any) -> list[Any]:
            return []

        def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
            return otpy.Reply(request, [*state, request])

        def handle_cast(self, message: Any, state: list[Any]) -> list[Any]:
            return [*state, message]

    async with otpy.open_node(otpy.Supervisor([otpy.Child("s", Log)]),
                              listen=("127.0.0.1", 0)) as n:
        assert n.address is not None
        sock = socket.create_connection(n.address)
        await trio.sleep(0.05)  # accepted: its reader waits for bytes
        batch = b"".join(msgpack.packb([0, i, "call", ["s", i]]) for i in range(40))
        sock.sendall(batch + msgpack.packb([2, "cast", ["s", "last"]]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, before the node has read a byte (the loop is held)
        time.sleep(0.05)
        with trio.fail_after(5):
            while len(n.get_state("s")) < 41:
                await trio.sleep(0.01)
        assert [*range(40), "last"] == n.get_state("s")


# -- hardening the edges (issue 11) --------------------------------------------------


async def test_admin_auth_message_is_bounded_before_any_cookie(
        logs: list[dict[str, Any]]) -> None:
    """Before authenticating, a client may send one small message: an unfinished auth
    request of 20 KiB of empty maps closes the connection at once (nothing is built of
    it, and nothing waits for the auth timeout)."""
    async with node() as n, raw(n.admin_address) as r:
        await r.recv()  # the challenge
        await r.send_bytes(b"\x94\x00\x01\xa4auth\xdd\x00\x00\xea\x60" + b"\x80" * 20_000)
        assert await r.closed()
    assert events(logs, "admin_auth_failed")


def connections() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is _endpoint._Connection)


async def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    """A connection's memory (its decoder, its buffers) comes back when it closes, by
    reference counting alone: with the cycle collector off, no connection object
    outlives its socket."""
    async with node() as n:
        gc.collect()
        gc.disable()
        try:
            before = connections()
            async with raw(n.address) as r:
                assert (1, 1, None, "x") == await r.call(1, "echo", ("echo", "x"))
                await r.send_bytes(msgpack.packb([0, 2, "call", ["echo", "y" * 99]])[:50])
                assert before + 1 == connections()
            with trio.fail_after(5):
                while connections() > before:
                    await trio.sleep(0.01)
        finally:
            gc.enable()


class Order(otpy.GenServer[list[Any]]):
    """Records the requests it serves; on ("burst", 0) it makes another connection send
    a call meanwhile (see the test)."""

    vsn = "1"
    other: socket.socket | None = None

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        if request == ("burst", 0) and Order.other is not None:
            Order.other.sendall(msgpack.packb([0, 1, "call", ["order", "other"]]))
        return otpy.Reply(None, [*state, request])


async def test_a_burst_on_one_connection_lets_another_connection_in_between() -> None:
    """3000 pipelined calls in one packet are served in slices: a call that another
    connection sends while the first of them is served is served long before the
    burst ends."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("order", Order)]),
                              listen=("127.0.0.1", 0)) as n:
        assert n.address is not None
        burst = socket.create_connection(n.address)
        other = socket.create_connection(n.address)
        try:
            await trio.sleep(0.05)  # both accepted, their readers waiting
            Order.other = other
            burst.sendall(b"".join(msgpack.packb([0, i, "call", ["order", ["burst", i]]])
                                   for i in range(3000)))
            with trio.fail_after(10):
                while len(n.get_state("order")) < 3001:
                    await trio.sleep(0.01)
            assert n.get_state("order").index("other") < 1000
        finally:
            Order.other = None
            burst.close()
            other.close()


@asynccontextmanager
async def capped(**limits: Any) -> AsyncIterator[otpy.Node]:
    """A node whose client endpoint has ``limits`` (and no admin endpoint)."""
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0),
                              limits=otpy.EndpointLimits(**limits)) as n:
        yield n


async def is_open(r: Raw) -> bool:
    """Whether the node still serves ``r`` (a call on it is answered)."""
    try:
        return (1, 99, None, "?") == await r.call(99, "echo", ("echo", "?"))
    except (EOFError, trio.BrokenResourceError):
        return False


async def test_at_the_connection_cap_a_new_connection_closes_the_longest_idle(
        autojump_clock: Any, logs: list[dict[str, Any]]) -> None:
    """``max_connections``: a connection over the cap makes room by closing the one
    idle the longest, and is served."""
    async with capped(max_connections=2, idle_timeout=20.0) as n, \
            raw(n.address) as first, raw(n.address) as second:
        assert (1, 1, None, 1) == await first.call(1, "echo", ("echo", 1))
        await trio.sleep(6)  # a sweep sees `first` idle
        assert (1, 2, None, 2) == await second.call(2, "echo", ("echo", 2))
        await trio.sleep(6)  # and then `second`
        async with raw(n.address) as third:
            assert (1, 3, None, 3) == await third.call(3, "echo", ("echo", 3))
            assert await first.closed()
            assert await is_open(second)
    assert 1 == len(events(logs, "wire_connection_evicted"))


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(
        logs: list[dict[str, Any]]) -> None:
    """When no connection is idle (each has a call in flight), a connection over the
    cap is closed at once, and logged."""
    async with capped(max_connections=1) as n, raw(n.address) as busy:
        await busy.send([0, 1, "call", ["echo", ["defer", "k"]]])
        await trio.sleep(0.05)
        async with raw(n.address) as refused:
            assert await refused.closed()
        assert "released" == await n.call("echo", ("release", "k", "done"))
        assert (1, 1, None, "done") == await busy.recv()
    assert [1] == [e["max_connections"] for e in events(logs, "wire_connection_refused")]


async def test_a_connection_idle_for_idle_timeout_is_closed(autojump_clock: Any) -> None:
    """A connection that completes no message for ``idle_timeout`` while nothing is
    owed either way is closed; one with a call in flight is not, nor is one sending
    calls, while one that only trickles an unfinished message is."""
    async with capped(idle_timeout=8.0, call_timeout=100.0) as n, \
            raw(n.address) as idle, raw(n.address) as waiting, \
            raw(n.address) as trickling:
        await waiting.send([0, 1, "call", ["echo", ["defer", "k"]]])
        start = trio.current_time()
        for i in range(12):
            try:
                await trickling.send_bytes(b"\x94" if i == 0 else b"\x00")
            except trio.BrokenResourceError:  # closed by the node meanwhile
                break
            await trio.sleep(1)
        assert await idle.closed()
        assert await trickling.closed()
        assert 8.0 <= trio.current_time() - start <= 12.0
        await trio.sleep(20)
        assert "released" == await n.call("echo", ("release", "k", "late"))
        assert (1, 1, None, "late") == await waiting.recv()


LOW_FD_NODE = r"""
import logging, resource, sys, structlog, trio, otpy
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

class Echo(otpy.GenServer[None]):
    vsn = "1"
    def init(self, arg): return None
    def handle_call(self, request, caller, state): return otpy.Reply(request, state)

async def main():
    root = otpy.Supervisor([otpy.Child("echo", Echo)])
    async with otpy.open_node(root, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0)) as n:
        print(n.address[1], n.admin_address[1], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)

trio.run(main)
"""


async def test_under_a_low_descriptor_limit_idle_sockets_lock_out_neither_clients_nor_admin(
        tmp_path: Path) -> None:
    """A node limited to 256 descriptors (as ``ulimit -n 256``), sent 400 idle
    connections: a new client is still served, and so is the operator on the admin
    endpoint."""
    script = tmp_path / "node.py"
    script.write_text(LOW_FD_NODE)
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        with trio.fail_after(10):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(100)
        port, admin_port = map(int, line.split())
        for _ in range(400):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        await trio.sleep(0.2)
        with trio.fail_after(10):
            async with otpy.connect("127.0.0.1", port) as client:
                assert "in" == await client.call("echo", "in")
            async with otpy._client.connect_admin("127.0.0.1", admin_port,
                                                  COOKIE.encode()) as admin:
                assert ["echo"] == [c["id"] for c in await admin.request("which_children",
                                                                          "root")]
    finally:
        for s in idle:
            s.close()
        proc.kill()
        await proc.wait()


async def test_accept_out_of_descriptors_is_logged_once_and_retried(
        monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]) -> None:
    """accept() failing with EMFILE: one event (not one per retry), a backoff, and the
    waiting connection is served once a descriptor is free."""
    failures = iter(range(5))
    accept = trio.SocketListener.accept

    async def failing(self: trio.SocketListener) -> trio.SocketStream:
        if next(failures, None) is not None:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await accept(self)

    monkeypatch.setattr(trio.SocketListener, "accept", failing)
    async with capped() as n, raw(n.address) as r:
        assert (1, 1, None, "ok") == await r.call(1, "echo", ("echo", "ok"))
    [event] = events(logs, "endpoint_accept_failed")
    assert "EMFILE" == event["error"]


async def test_repeated_bad_requests_from_one_peer_are_one_event_per_interval(
        autojump_clock: Any, logs: list[dict[str, Any]]) -> None:
    """50 bad requests from one peer: each is answered, the first is logged, and the
    other 49 are logged once, as a count, when the interval ends."""
    async with node() as n, raw(n.address) as r:
        await r.send(*[[0, i, "nope", []] for i in range(50)])
        for i in range(50):
            _, msgid, error, _ = await r.recv()
            assert (i, "NoSuchMethod") == (msgid, error[0])
        assert 1 == len(events(logs, "wire_bad_request"))
        await trio.sleep(15)
    assert [None, 49] == [e.get("repeated") for e in events(logs, "wire_bad_request")]


@asynccontextmanager
async def fake_admin(answer: Any) -> AsyncIterator[tuple[int, list[Any]]]:
    """A listener that plays a node's admin endpoint without the cookie: it sends a
    challenge and answers any auth with ``answer``. Yields its port and what it got."""
    got: list[Any] = []

    async def handler(stream: trio.SocketStream) -> None:
        unpacker = msgpack.Unpacker(use_list=False, raw=False)
        await stream.send_all(msgpack.packb([2, "challenge", [os.urandom(32)]]))
        try:
            async for data in stream:
                unpacker.feed(data)
                for msg in unpacker:
                    got.append(msg)
                    if msg[2] == "auth":
                        await stream.send_all(msgpack.packb([1, msg[1], None, answer]))
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(
            trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listener.socket.getsockname()[1], got
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("answer", [True, b"\x00" * 32, None])
async def test_admin_client_refuses_a_peer_that_cannot_prove_the_cookie(answer: Any) -> None:
    """A listener that takes any answer but cannot prove it holds the cookie (a wrong
    port, a stale address): the admin client raises AuthFailed saying so, and sends it
    nothing after its answer."""
    async with fake_admin(answer) as (port, got):
        with pytest.raises(otpy.AuthFailed, match="did not prove"):
            async with otpy._client.connect_admin("127.0.0.1", port, COOKIE.encode()):
                raise AssertionError("the session must not open")  # pragma: no cover
        await trio.sleep(0.05)
        assert ["auth"] == [m[2] for m in got]


async def test_cli_refuses_a_peer_that_cannot_prove_the_cookie() -> None:
    """``otpy tree`` against such a listener exits 77 and says the peer did not prove
    the cookie."""
    async with fake_admin(True) as (port, _):
        result = await trio.run_process(
            [sys.executable, "-m", "otpy._cli", "tree", "--node", f"127.0.0.1:{port}",
             "--timeout", "5"],
            capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "OTPY_COOKIE": COOKIE})
    assert 77 == result.returncode
    assert b"did not prove" in result.stderr


async def test_a_relay_of_the_handshake_gains_nothing(logs: list[dict[str, Any]]) -> None:
    """A listener that the operator reaches by mistake relays the real node's
    challenge and the operator's answer, then sends a request of its own on the
    authenticated connection: the node runs nothing of it and closes the session."""
    async with node() as n, trio.open_nursery() as nursery:
        assert n.admin_address is not None

        async def relay(client: trio.SocketStream) -> None:
            upstream = await trio.open_tcp_stream(*n.admin_address)  # type: ignore[misc]
            seen = msgpack.Unpacker(use_list=False, raw=False)

            async def up() -> None:
                async for data in client:
                    await upstream.send_all(data)

            async def down() -> None:
                replies = 0
                async for data in upstream:
                    await client.send_all(data)
                    seen.feed(data)
                    replies += sum(1 for _ in seen)
                    if replies == 2:  # the challenge, then the answer to auth
                        await upstream.send_all(msgpack.packb([0, 99, "suspend", ["v"]]))
                pumps.cancel_scope.cancel()  # the node hung up: so does the relay

            try:
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(up)
                    pumps.start_soon(down)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await upstream.aclose()

        [listener] = await nursery.start(functools.partial(
            trio.serve_tcp, relay, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(otpy.ConnectionLost):
            async with otpy._client.connect_admin("127.0.0.1", port,
                                                  COOKIE.encode()) as admin:
                await trio.sleep(0.1)
                await admin.request("which_children", "root", timeout=5)
        assert "running" == n.which_children()[1].status
        nursery.cancel_scope.cancel()
    assert any("unsealed" in e["reason"] for e in events(logs, "wire_protocol_error"))


async def test_tls_on_both_endpoints_with_a_certificate_made_here() -> None:
    """``open_node(..., ssl=context)``: both endpoints speak TLS with a certificate the
    test makes (trustme); otpy.connect and the admin client verify it; a client that
    does not speak TLS is served nothing (a peer that never completes the TLS handshake
    is closed after 10 s, as one that never authenticates)."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0), admin=("127.0.0.1", 0),
                              ssl=server) as n:
        assert n.address is not None and n.admin_address is not None
        async with otpy.connect(*n.address, ssl=client) as c:
            assert "over tls" == await c.call("echo", ("echo", "over tls"))
        async with otpy._client.connect_admin(*n.admin_address, COOKIE.encode(),
                                              ssl=client) as admin:
            assert 42 == await admin.request("get_state", "v")
        with pytest.raises(otpy.ConnectionLost, match="TLS"):
            async with otpy.connect(*n.address, ssl=ssl.create_default_context()):
                raise AssertionError("an unknown CA must be refused")  # pragma: no cover
        async with raw(n.address) as plain:
            await plain.send_bytes(b"GET / HTTP/1.0\r\n\r\n")
            assert await plain.closed()


async def test_connect_raises_frame_too_large_and_keeps_the_connection() -> None:
    """``otpy.connect``: a request over the node's ``max_frame`` raises
    otpy.FrameTooLarge, and the same connection serves the next call."""
    async with node(max_frame=4096) as n, otpy.connect(*n.address) as c:  # type: ignore[misc]
        with pytest.raises(otpy.FrameTooLarge):
            await c.call("echo", ("echo", "x" * 100_000))
        assert "after" == await c.call("echo", ("echo", "after"))


async def test_connect_reconnects_on_the_next_call_after_the_connection_broke() -> None:
    """The connection breaks (the endpoint stopped, then came back): the call in flight
    raises otpy.ConnectionLost, the next call connects again and is served; after
    ``aclose`` every call raises ConnectionLost."""
    async with otpy.open_node(tree()) as n, trio.open_nursery() as nursery:
        scopes: list[trio.CancelScope] = []

        async def endpoint(port: int, task_status: Any) -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await serve_client(n._rt, ("127.0.0.1", port), task_status=task_status)

        host, port = await nursery.start(endpoint, 0)
        async with otpy.connect(host, port) as c:
            assert 1 == await c.call("echo", ("echo", 1))

            async def waiting() -> None:
                with pytest.raises(otpy.ConnectionLost, match="may or may not"):
                    await c.call("echo", ("defer", "k"))

            async with trio.open_nursery() as inner:
                inner.start_soon(waiting)
                await trio.sleep(0.05)
                scopes[0].cancel()
            await nursery.start(endpoint, port)
            assert 2 == await c.call("echo", ("echo", 2))
            await c.aclose()
            with pytest.raises(otpy.ConnectionLost, match="closed"):
                await c.call("echo", ("echo", 3))
        nursery.cancel_scope.cancel()


async def test_connect_without_reconnect_says_so() -> None:
    """``reconnect=False``: after the connection broke, a call raises ConnectionLost
    saying that this client does not reconnect."""
    async with node() as n, otpy.connect(*n.address, reconnect=False) as c:  # type: ignore[misc]
        await c._stream.aclose()
        with pytest.raises(otpy.ConnectionLost, match="does not reconnect"):
            await c.call("echo", ("echo", 1))


async def test_client_decoding_is_bounded_against_a_hostile_node() -> None:
    """A node that answers with 3 MB of empty maps in one reply: the client holds no
    more than its ``max_frame`` and a read of it, and the call raises FrameTooLarge."""

    async def hostile(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(4096)
        msgid = msgpack.unpackb(data)[1]
        await stream.send_all(b"\x94\x01" + msgpack.packb(msgid) + b"\xc0\xdd"
                              + (3_000_000).to_bytes(4, "big"))
        chunk = b"\x80" * 65536
        for _ in range(3_000_000 // 65536):
            await stream.send_all(chunk)
        await stream.send_all(b"\x80" * (3_000_000 % 65536))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(
            trio.serve_tcp, hostile, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        tracemalloc.start()
        try:
            async with otpy.connect("127.0.0.1", port, max_frame=65536) as c:
                with pytest.raises(otpy.FrameTooLarge):
                    await c.call("x", "y", timeout=30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    assert peak < 2_000_000

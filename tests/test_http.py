"""The node's HTTP endpoint over real loopback sockets: calls and casts in JSON and
msgpack, errors as statuses, health and metrics, and hostile peers (unknown routes,
wrong methods, bad and oversized bodies, header floods, slowloris, too many
connections, clients that never read, pipelined floods, drains), each answered with the
right status while the node keeps serving another client.

The client here is written on httptools' response parser, not on otpy's code. Tests
that wait on time run on trio's autojump clock: every socket is in process, so virtual
time only jumps when every task, client and server, is blocked.
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from _http import Client, Reply, call, connect, healthy, raw

import otpy
from otpy._protocol.http1 import Request, Response
from otpy._protocol.json_rules import pid_json as encode_pid
from otpy._serve.http import HttpLimits, HttpStats, NodeRouter, serve_http, serve_router

COOKIE = b"test-http-cookie"


class Echo(otpy.GenServer[int]):
    """Replies ``[type name, request]``, counts its calls; "crash" raises, "object"
    replies with what JSON cannot carry, ("big", n) replies n bytes of text; a cast adds
    to the count."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "crash":
            raise ValueError("a secret detail of the node")
        if request == "object":
            return otpy.Reply(object(), state + 1)
        if request == "count":
            return otpy.Reply(state, state)
        if isinstance(request, tuple) and request[:1] == ("big",):
            return otpy.Reply("x" * request[1], state + 1)
        return otpy.Reply((type(request).__name__, request), state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + message if isinstance(message, int) else state


class Never(otpy.GenServer[None]):
    """Defers every reply and never answers."""

    vsn = "1"

    def init(self, arg: Any) -> None:
        return None

    def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
        return otpy.NoReply(state)


class Small(Echo):
    """An Echo with a mailbox of one message."""

    max_mailbox = 1


class Versioned(otpy.GenServer[int]):
    """Version 2 speaks ("get",) -> {"value": n}; version 1 clients said "value" -> n."""

    vsn = "2"

    def init(self, arg: Any) -> int:
        return 42

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == ("get",):
            return otpy.Reply({"value": state}, state)
        return otpy.Reply(("unknown", request), state)

    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        return ("get",) if request == "value" else request

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        return reply["value"]


def tree() -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child("echo", Echo), otpy.Child("never", Never),
                            otpy.Child("small", Small), otpy.Child("v", Versioned)],
                           max_restarts=1000)


@asynccontextmanager
async def http_node(limits: HttpLimits | None = None,
                    shutdown: trio.Event | None = None) -> AsyncIterator[tuple[otpy.Node,
                                                                              int]]:
    """A node with the test tree and its HTTP endpoint on a free port."""
    async with otpy.open_node(tree()) as node, trio.open_nursery() as nursery:
        _, port = await nursery.start(functools.partial(
            serve_http, node._rt, ("127.0.0.1", 0), limits=limits, cookie=COOKIE,
            shutdown=shutdown))
        yield node, port
        nursery.cancel_scope.cancel()


# -- calls and casts ---------------------------------------------------------------------


async def test_call_in_json_reaches_handle_call_with_tuples_and_answers_json() -> None:
    """``POST /call/echo`` with ``["add", [1]]``: handle_call gets ("add", (1,)), the
    shape MessagePack-RPC gives, and the reply comes back as JSON."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", b'["add", [1]]')
    assert (200, "application/json") == (reply.status, reply.headers["content-type"])
    assert ["tuple", ["add", [1]]] == reply.json()


async def test_curl_s_form_content_type_is_read_as_json() -> None:
    """``curl -d`` sends application/x-www-form-urlencoded: the body is JSON all the
    same, so the README's one-liner works."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", b'["add", 1]',
                           headers=(("Content-Type", "application/x-www-form-urlencoded"),))
    assert ["tuple", ["add", 1]] == reply.json()


async def test_call_in_msgpack_answers_msgpack() -> None:
    """A msgpack body (by Content-Type) gets a msgpack reply."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", msgpack.packb(["add", b"\x00"]),
                           headers=(("Content-Type", "application/msgpack"),))
    assert "application/msgpack" == reply.headers["content-type"]
    assert ["tuple", ["add", b"\x00"]] == msgpack.unpackb(reply.body)


async def test_json_request_can_ask_for_a_msgpack_reply() -> None:
    """``Accept: application/msgpack`` with a JSON body gets msgpack."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", b'"x"', headers=(("Accept", "application/msgpack"),))
    assert ["str", "x"] == msgpack.unpackb(reply.body)


async def test_cast_answers_202_and_reaches_the_server() -> None:
    """``POST /cast/echo`` answers 202 with no body; the cast is served."""
    async with http_node() as (_, port), connect(port) as client:
        reply = await client.request("POST", "/cast/echo", b"5")
        assert (202, b"") == (reply.status, reply.body)
        assert 5 == (await client.request("POST", "/call/echo", b'"count"')).json()


async def test_vsn_option_adapts_request_and_reply() -> None:
    """``?vsn=1``: the server's upgrade_request/downgrade_reply speak version 1."""
    async with http_node() as (_, port):
        assert 42 == (await call(port, "v", b'"value"', "?vsn=1")).json()
        assert {"value": 42} == (await call(port, "v", b'["get"]')).json()


async def test_a_reply_json_cannot_carry_is_a_500_naming_its_type(
        logs: list[dict[str, Any]]) -> None:
    """A reply of an unencodable type: 500 UnencodableReply naming it; the connection
    goes on serving."""
    async with http_node() as (_, port), connect(port) as client:
        reply = await client.request("POST", "/call/echo", b'"object"')
        assert (500, "UnencodableReply") == (reply.status, reply.json()["error"])
        assert "builtins.object" in reply.json()["message"]
        assert 200 == (await client.request("POST", "/call/echo", b"1")).status
    assert ["http_reply_unencodable"] == [e["event"] for e in logs
                                          if e["event"].startswith("http_reply")]


async def test_a_pid_in_its_json_form_addresses_a_call_and_a_reply_carries_one() -> None:
    """A reply's pid is ``{"$pid": [...]}``; that same JSON, percent-encoded in the
    path, calls that incarnation; once it has restarted, the pid is 404 saying which
    pid holds the name now, and a cast to it is dropped (202), as in Erlang."""
    async with http_node() as (node, port):
        pid = node.whereis("echo")
        assert pid is not None
        path = urllib.parse.quote(json.dumps(encode_pid(pid)), safe="")
        before = await call(port, path, b'"x"')
        echoed = (await call(port, "echo", json.dumps(encode_pid(pid)).encode())).json()
        await call(port, "echo", b'"crash"')  # a new incarnation, a new pid
        after = await call(port, path, b'"x"')
        async with connect(port) as client:
            cast = await client.request("POST", f"/cast/{path}", b"1")
    assert (200, ["str", "x"]) == (before.status, before.json())
    assert ["Pid", encode_pid(pid)] == echoed
    assert (404, "NoSuchServer") == (after.status, after.json()["error"])
    assert "is now <echo." in after.json()["message"]
    assert 202 == cast.status


async def test_an_address_in_json_that_is_not_a_pid_is_400() -> None:
    """``/call/{"name": ...}``: a JSON address must be a pid object."""
    async with http_node() as (_, port):
        reply = await call(port, urllib.parse.quote('{"name":"echo"}', safe=""), b"1")
    assert (400, "BadJson") == (reply.status, reply.json()["error"])


# -- errors as statuses ------------------------------------------------------------------


async def test_unknown_server_is_404_no_such_server() -> None:
    """404 with ``{"error": "NoSuchServer", ...}``."""
    async with http_node() as (_, port):
        reply = await call(port, "nobody", b"1")
    assert (404, "NoSuchServer") == (reply.status, reply.json()["error"])
    assert "nobody" in reply.json()["message"]


async def test_a_crash_is_500_without_traceback(logs: list[dict[str, Any]]) -> None:
    """500 ServerCrashed: the error's kind and message, no traceback, and the call
    after it is served by the restarted server."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", b'"crash"')
        assert (500, "ServerCrashed") == (reply.status, reply.json()["error"])
        assert b"Traceback" not in reply.body and b'File "' not in reply.body
        assert 200 == (await call(port, "echo", b"1")).status


async def test_no_reply_within_timeout_is_504(autojump_clock: trio.testing.MockClock) -> None:
    """``?timeout=0.5`` to a server that never answers: 504 CallTimeout after 0.5 s."""
    async with http_node() as (_, port):
        start = trio.current_time()
        reply = await call(port, "never", b"1", "?timeout=0.5")
        assert 0.5 == pytest.approx(trio.current_time() - start, abs=0.01)
    assert (504, "CallTimeout") == (reply.status, reply.json()["error"])


async def test_default_call_timeout_is_the_limits(
        autojump_clock: trio.testing.MockClock) -> None:
    """Without ``?timeout=`` a call waits ``HttpLimits.call_timeout``."""
    async with http_node(HttpLimits(call_timeout=2.0)) as (_, port):
        start = trio.current_time()
        reply = await call(port, "never", b"1")
        assert 2.0 == pytest.approx(trio.current_time() - start, abs=0.01)
    assert 504 == reply.status


async def test_full_mailbox_is_429_with_retry_after() -> None:
    """A cast to a suspended server whose mailbox (max_mailbox 1) is full: 429
    MailboxFull with Retry-After."""
    async with http_node() as (node, port), connect(port) as client:
        node.suspend("small")
        assert 202 == (await client.request("POST", "/cast/small", b"1")).status
        reply = await client.request("POST", "/cast/small", b"1")
    assert (429, "MailboxFull", "1") == (reply.status, reply.json()["error"],
                                         reply.headers["retry-after"])


@pytest.mark.parametrize(("query", "says"), [
    ("?timeout=0", "timeout must be"), ("?timeout=61", "at most 60"),
    ("?timeout=nan", "timeout must be"), ("?vsn=", "vsn must"),
    ("?timout=1", "unknown option 'timout'"), ("?a=1&b=2&c=3&d=4&e=5", "cannot be read")])
async def test_a_bad_option_is_400(query: str, says: str) -> None:
    """Options are checked: a timeout out of range, an empty vsn, an unknown name."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", b"1", query)
    assert (400, "BadRequest") == (reply.status, reply.json()["error"])
    assert says in reply.json()["message"]


@pytest.mark.parametrize(("body", "status", "kind"), [
    (b"bad json", 400, "BadJson"), (b"", 400, "BadRequest"),
    (b"[" * 40 + b"]" * 40, 400, "TooDeep"),
    (b"[" + b"1," * 100_000 + b"1]", 413, "TooManyObjects")])
async def test_a_body_that_cannot_be_read_is_refused(body: bytes, status: int,
                                                     kind: str) -> None:
    """Bodies that are not JSON, empty, too deep or with too many values."""
    async with http_node() as (node, port):
        reply = await call(port, "echo", body)
        assert 0 == await node.call("echo", "count")  # nothing reached the server
    assert (status, kind) == (reply.status, reply.json()["error"])


async def test_undecodable_msgpack_is_400() -> None:
    """A msgpack Content-Type with bytes that are not msgpack: 400 BadMsgpack."""
    async with http_node() as (_, port):
        reply = await call(port, "echo", b"\xc1",
                           headers=(("Content-Type", "application/msgpack"),))
    assert (400, "BadMsgpack") == (reply.status, reply.json()["error"])


async def test_wrong_method_is_405_with_allow() -> None:
    """GET on /call/...: 405 MethodNotAllowed and ``Allow: POST``; POST on /healthz:
    ``Allow: GET, HEAD``."""
    async with http_node() as (_, port), connect(port) as client:
        reply = await client.request("GET", "/call/echo")
        assert (405, "POST") == (reply.status, reply.headers["allow"])
        reply = await client.request("POST", "/healthz", b"1")
        assert (405, "GET, HEAD") == (reply.status, reply.headers["allow"])


async def test_unknown_route_is_404_not_found() -> None:
    """404 NotFound listing the routes."""
    async with http_node() as (_, port), connect(port) as client:
        reply = await client.request("GET", "/nope")
    assert (404, "NotFound") == (reply.status, reply.json()["error"])
    assert "/call/NAME" in reply.json()["message"]


async def test_a_router_that_raises_is_a_500_and_logged(logs: list[dict[str, Any]]) -> None:
    """A bug in a route answers 500 InternalError (the type only) and is logged with its
    traceback; the connection goes on."""

    class Broken:
        def route(self, request: Request) -> Response:
            if request.path == "/bug":
                raise KeyError("internal detail")
            return Response(200, b"{}")

    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(functools.partial(serve_router, Broken(),
                                                        ("127.0.0.1", 0)))
        async with connect(port) as client:
            reply = await client.request("GET", "/bug")
            assert (500, "InternalError") == (reply.status, reply.json()["error"])
            assert b"internal detail" not in reply.body
            assert 200 == (await client.request("GET", "/ok")).status
        nursery.cancel_scope.cancel()
    [event] = [e for e in logs if e["event"] == "http_request_failed"]
    assert "KeyError" in event["error"]


# -- health and metrics ------------------------------------------------------------------


async def test_healthz_readyz_and_head() -> None:
    """/healthz and /readyz answer 200; HEAD gets the headers and no body."""
    async with http_node() as (_, port), connect(port) as client:
        assert {"status": "ok"} == (await client.request("GET", "/healthz")).json()
        assert {"status": "ready"} == (await client.request("GET", "/readyz")).json()
        await client.send(raw("HEAD", "/healthz") + raw("GET", "/healthz"))
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b'"ok"}'):
            data += await client.stream.receive_some(4096)
    head, rest = data.split(b"\r\n\r\n", 1)
    assert b"content-length: 15" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body after the HEAD response


async def test_metrics_in_prometheus_text_with_top_k_servers() -> None:
    """/metrics has the node's counters, and per-server series only for the top-K
    servers by mailbox length."""
    async with http_node(HttpLimits(metrics_top_k=1)) as (node, port):
        for name, n in (("echo", 3), ("v", 2)):
            node.suspend(name)
            for _ in range(n):
                node.cast(name, 1)
        async with connect(port) as client:
            reply = await client.request("GET", "/metrics")
    text = reply.body.decode()
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "otpy_servers 4.0" in text.splitlines()
    assert "otpy_queued_messages 5.0" in text.splitlines()
    assert 'otpy_server_mailbox{server="echo"} 3.0' in text.splitlines()
    assert 'server="v"' not in text  # only the top 1


# -- connections -------------------------------------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    """One connection, several requests, in turn."""
    async with http_node() as (_, port), connect(port) as client:
        for i in range(5):
            assert ["int", i] == (await client.request("POST", "/call/echo",
                                                       str(i).encode())).json()


async def test_connection_close_is_answered_then_closed() -> None:
    """``Connection: close``: the response says close, then the server closes."""
    async with http_node() as (_, port), connect(port) as client:
        reply = await client.request("GET", "/healthz", headers=(("Connection", "close"),))
        assert "close" == reply.headers["connection"]
        assert await client.eof()


async def test_http10_without_keep_alive_is_closed_after_its_response() -> None:
    """HTTP/1.0 closes by default."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        [reply] = await client.read(1)
        assert 200 == reply.status
        assert await client.eof()


async def test_pipelined_requests_are_answered_in_order() -> None:
    """300 calls sent in one packet: 300 responses, in request order."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"".join(raw("POST", "/call/echo", str(i).encode())
                                   for i in range(300)))
        replies = await client.read(300)
    assert [["int", i] for i in range(300)] == [r.json() for r in replies]


async def test_pipelined_requests_behind_a_waiting_call_keep_their_order(
        autojump_clock: trio.testing.MockClock) -> None:
    """A call that waits (its timeout) holds the responses after it: they come in
    order, after it."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(raw("POST", "/call/echo", b"1")
                          + raw("POST", "/call/never?timeout=1", b"1")
                          + raw("POST", "/call/echo", b"2"))
        replies = await client.read(3)
    assert [200, 504, 200] == [r.status for r in replies]
    assert ["int", 2] == replies[2].json()


async def test_expect_100_continue_gets_continue_then_the_response() -> None:
    """The client sends headers, waits for 100 Continue, sends the body."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"POST /call/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                          b"Expect: 100-continue\r\n\r\n")
        assert b"HTTP/1.1 100 Continue\r\n\r\n" == await client.stream.receive_some(4096)
        await client.send(b'"x"')
        [reply] = await client.read(1)
    assert ["str", "x"] == reply.json()


async def test_a_chunked_request_body_is_served() -> None:
    """Transfer-Encoding: chunked bodies work."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"POST /call/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: "
                          b"chunked\r\n\r\n4\r\n[1, \r\n2\r\n2]\r\n0\r\n\r\n")
        [reply] = await client.read(1)
    assert ["tuple", [1, 2]] == reply.json()


# -- hostile peers -----------------------------------------------------------------------


async def test_a_header_flood_is_431_and_closed_while_others_are_served() -> None:
    """10,000 headers: 431 TooManyHeaders, the connection closes; another client is
    served meanwhile."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"GET / HTTP/1.1\r\n" + b"X-Flood: 1\r\n" * 10_000 + b"\r\n")
        [reply] = await client.read(1)
        assert (431, "TooManyHeaders") == (reply.status, reply.json()["error"])
        assert await healthy(port)
        assert await client.eof()


async def test_a_huge_content_length_is_413_before_any_body_is_read() -> None:
    """A Content-Length past max_body is refused from the headers: the client never
    sends the body and still gets 413, and the connection closes."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"POST /call/echo HTTP/1.1\r\nHost: t\r\n"
                          b"Content-Length: 1000000000\r\n\r\n")
        [reply] = await client.read(1)
        assert (413, "BodyTooLarge") == (reply.status, reply.json()["error"])
        assert await client.eof()


async def test_a_chunked_bomb_is_413() -> None:
    """A chunked body past max_body (sent as one-byte chunks) is 413."""
    async with http_node(HttpLimits(max_body=1000)) as (_, port), connect(port) as client:
        await client.send(b"POST /call/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: "
                          b"chunked\r\n\r\n" + b"1\r\n1\r\n" * 2000)
        [reply] = await client.read(1)
        assert (413, "BodyTooLarge") == (reply.status, reply.json()["error"])
        assert await healthy(port)


async def test_garbage_is_400_and_closed() -> None:
    """Bytes that are not HTTP: 400 BadRequest, then close."""
    async with http_node() as (_, port), connect(port) as client:
        await client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10)  # TLS
        [reply] = await client.read(1)
        assert (400, "BadRequest") == (reply.status, reply.json()["error"])
        assert await client.eof()


async def test_slowloris_gets_408_after_read_timeout_while_others_are_served(
        autojump_clock: trio.testing.MockClock) -> None:
    """A client that sends a header line every 5 s (each read resets nothing) is cut at
    read_timeout from its first byte with 408; another client is served meanwhile."""
    limits = HttpLimits(read_timeout=10.0)
    async with http_node(limits) as (_, port), connect(port) as client:
        start = trio.current_time()
        await client.send(b"GET / HTTP/1.1\r\n")
        for _ in range(100):
            await trio.sleep(5)
            assert await healthy(port)
            try:
                await client.send(b"X-Slow: 1\r\n")
            except trio.BrokenResourceError:
                break
            if trio.current_time() - start > 11:
                break
        [reply] = await client.read(1)
        assert (408, "RequestTimeout") == (reply.status, reply.json()["error"])
        assert 10 <= trio.current_time() - start <= 15


async def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    """No request for idle_timeout seconds: the server closes, without a response."""
    async with http_node(HttpLimits(idle_timeout=3.0)) as (_, port), connect(port) as c:
        assert 200 == (await c.request("GET", "/healthz")).status
        start = trio.current_time()
        assert await c.eof()
        # The endpoint's sweep honours a timeout within a quarter of the shorter one.
        assert 3.0 <= trio.current_time() - start <= 3.0 + 3.0 / 4
        assert [] == c.done


async def test_connections_past_the_cap_get_503_and_are_closed() -> None:
    """With max_connections 4, a fifth connection is answered 503 TooManyConnections
    with Retry-After and closed; once one of the four leaves, a new one is served."""
    async with http_node(HttpLimits(max_connections=4)) as (_, port):
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        try:
            for stream in streams:  # each is being served
                await stream.send_all(raw("GET", "/healthz"))
                assert b"200 OK" in await stream.receive_some(4096)
            async with connect(port) as extra:
                [reply] = await extra.read(1)
                assert (503, "TooManyConnections", "1") == (
                    reply.status, reply.json()["error"], reply.headers["retry-after"])
                assert await extra.eof()
        finally:
            await streams.pop().aclose()
            for _ in range(100):  # until the server has seen it go
                if await healthy(port):
                    break
                await trio.sleep(0.01)
            for stream in streams:
                await stream.aclose()
        assert await healthy(port)


async def test_a_client_that_never_reads_is_bounded_and_cut(
        autojump_clock: trio.testing.MockClock, logs: list[dict[str, Any]]) -> None:
    """A client pipelines 2,000 calls with 100 kB replies and reads none: the node
    serves only what fits its send buffer (not 200 MB), then closes the connection
    after write_timeout; another client is served meanwhile."""
    limits = HttpLimits(max_send_buffer=256 * 1024, write_timeout=5.0)

    async def flood(client: Client) -> None:
        try:  # may block once the server stops reading, until it cuts the connection
            await client.send(raw("POST", "/call/echo", b'["big", 100000]') * 2000)
        except trio.BrokenResourceError:
            pass

    def slow_readers() -> list[dict[str, Any]]:
        return [e for e in logs if e.get("kind") == "SlowReader"]

    async with http_node(limits) as (node, port), connect(port) as client, \
            trio.open_nursery() as nursery:
        nursery.start_soon(flood, client)
        await trio.sleep(1)
        assert await healthy(port)
        served = await node.call("echo", "count")
        assert served < 100  # about max_send_buffer + socket buffers of 100 kB replies
        for _ in range(30):
            if slow_readers():
                break
            await trio.sleep(1)
        assert served == await node.call("echo", "count")
        assert await client.eof()
    [event] = slow_readers()
    assert "http_request_refused" == event["event"]


async def test_a_pipelined_flood_lets_the_loop_run_between_batches() -> None:
    """2,000 casts in one write, with max_pipelined 8: all are answered, and the
    connection yields to the loop at least once per batch (another task ran in
    between), so one connection never holds the loop for its whole flood."""
    ran = 0
    done = False

    async def probe() -> None:
        nonlocal ran
        while not done:
            ran += 1
            await trio.lowlevel.checkpoint()

    limits = HttpLimits(max_pipelined=8)
    async with http_node(limits) as (node, port), connect(port) as client, \
            trio.open_nursery() as nursery:
        request = raw("POST", "/cast/echo", b"1")
        await client.send(request * 2000)
        nursery.start_soon(probe)
        replies = await client.read(2000)
        done = True
        assert [202] * 2000 == [r.status for r in replies]
        assert 2000 == await node.call("echo", "count")
    per_batch = 8 + 2048 // len(request) + 1
    assert ran >= 2000 // per_batch


async def test_repeated_refusals_from_one_peer_are_one_event_per_interval(
        autojump_clock: trio.testing.MockClock, logs: list[dict[str, Any]]) -> None:
    """Five bad requests within 10 s: one event; the next one after the interval says
    how many were left out."""
    async with http_node() as (_, port):
        for _ in range(5):
            async with connect(port) as client:
                await client.send(b"garbage\r\n\r\n")
                await client.read(1)
        await trio.sleep(11)
        async with connect(port) as client:
            await client.send(b"garbage\r\n\r\n")
            await client.read(1)
    events = [e for e in logs if e["event"] == "http_request_refused"]
    assert [None, 4] == [e.get("repeated") for e in events]
    assert ("127.0.0.1", 400, "BadRequest") == (events[0]["peer"], events[0]["status"],
                                                events[0]["kind"])


# -- the timeout sweep and a busy loop ---------------------------------------------------
#
# The read and idle timeouts are enforced by one sweep task per endpoint, not by a
# deadline on each wait. A request whose bytes arrive in time, while the loop is busy
# (a long step, a GC pause) past the sweep's tick, must be served as if nothing
# happened: the sweep may only end a connection still parked in its wait.


class _Later:
    """Starts the work at once (as a call does), answers after a moment."""

    def __init__(self) -> None:
        self.started = 0

    def route(self, request: Request) -> Any:
        self.started += 1

        async def answer() -> Response:
            await trio.sleep(0.01)
            return Response(200, b'{"ok":1}')
        return answer()


async def _busy_loop_trial(limits: HttpLimits, router: Any, first: bytes,
                           rest: bytes) -> bytes:
    """Send ``first``, then ``rest`` from a thread in time, while the loop is blocked
    past the deadline; what the client got back."""
    import socket
    import threading
    import time

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(serve_router, limits=limits), router, ("127.0.0.1", 0))
        sock = socket.create_connection((host, port))
        try:
            if first:
                sock.sendall(first)
            await trio.sleep(0.03)  # the connection waits
            timer = threading.Timer(0.1, sock.sendall, (rest,))
            timer.start()
            time.sleep(0.35)  # the loop is busy; the bytes arrive in time meanwhile
            timer.join()
            await trio.sleep(0.2)
            sock.settimeout(0.3)
            got = b""
            try:
                while chunk := sock.recv(65536):
                    got += chunk
            except TimeoutError:
                pass
        finally:
            sock.close()
            nursery.cancel_scope.cancel()
    return got


def test_a_request_finished_in_time_on_a_busy_loop_gets_no_408() -> None:
    limits = HttpLimits(read_timeout=0.2, idle_timeout=30.0)
    for _ in range(4):  # the race is hit in about half of the trials
        got = trio.run(_busy_loop_trial, limits, _Ok(), b"GET / HTTP/1.1\r\nHost: x\r\n",
                       b"\r\n")
        assert got.startswith(b"HTTP/1.1 200"), got
        assert b" 408 " not in got, got


def test_a_request_sent_within_idle_timeout_on_a_busy_loop_is_answered() -> None:
    limits = HttpLimits(read_timeout=30.0, idle_timeout=0.2)
    for _ in range(4):
        router = _Later()
        got = trio.run(_busy_loop_trial, limits, router, b"",
                       b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert router.started == 1 and got.startswith(b"HTTP/1.1 200"), got


class _Ok:
    def route(self, request: Request) -> Response:
        return Response(200, b'{"ok":1}')


# -- shutdown ----------------------------------------------------------------------------


class Slow(otpy.GenServer[None]):
    """Answers each call 2 s later (a call in progress while the endpoint drains)."""

    def init(self, arg: Any) -> None:
        return None

    def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
        self.send_after(2.0, "slow", caller)
        return otpy.NoReply(state)

    def handle_info(self, caller: Any, state: None) -> None:
        caller.reply("late")


async def test_drain_finishes_a_call_in_progress_and_refuses_new_connections(
        autojump_clock: trio.testing.MockClock) -> None:
    """On shutdown the endpoint stops accepting, closes idle connections at once, lets a
    call in progress finish (its response says close), then returns."""
    shutdown = trio.Event()
    stats = HttpStats()

    root = otpy.Supervisor([otpy.Child("slow", Slow)])
    async with otpy.open_node(root) as node, trio.open_nursery() as nursery:
        router = NodeRouter(node._rt, HttpLimits(), stats, COOKIE)
        _, port = await nursery.start(functools.partial(
            serve_router, router, ("127.0.0.1", 0), shutdown=shutdown, stats=stats))
        async with connect(port) as busy, connect(port) as idle:
            assert 200 == (await idle.request("GET", "/healthz")).status
            await busy.send(raw("POST", "/call/slow", b"1"))
            await trio.sleep(0.5)
            shutdown.set()
            assert await idle.eof()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            [reply] = await busy.read(1)
            assert ("late", "close") == (reply.json(), reply.headers["connection"])
            assert await busy.eof()
        assert stats.draining
        nursery.cancel_scope.cancel()


async def test_drain_cuts_what_is_not_done_within_the_grace(
        autojump_clock: trio.testing.MockClock) -> None:
    """A call that outlives drain_grace is cut: the client sees the connection close and
    serve_http returns at the end of the grace."""
    shutdown = trio.Event()
    limits = HttpLimits(drain_grace=2.0, call_timeout=30.0)
    async with otpy.open_node(tree()) as node, trio.open_nursery() as nursery:
        returned = trio.Event()

        async def serve(task_status: Any) -> None:
            await serve_http(node._rt, ("127.0.0.1", 0), limits=limits, cookie=COOKIE,
                             shutdown=shutdown, task_status=task_status)
            returned.set()

        _, port = await nursery.start(serve)
        async with connect(port) as client:
            await client.send(raw("POST", "/call/never", b"1"))
            await trio.sleep(1)
            shutdown.set()
            start = trio.current_time()
            assert await client.eof()
            assert [] == client.done
        await returned.wait()
        assert 2.0 == pytest.approx(trio.current_time() - start, abs=0.01)


EMFILE_NODE = """
import functools, json, resource, sys
import structlog, trio
import otpy
from otpy._serve.http import HttpLimits, serve_http

structlog.configure(processors=[structlog.processors.JSONRenderer()])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


class Echo(otpy.GenServer[None]):
    def init(self, arg):
        return None

    def handle_call(self, request, caller, state):
        return otpy.Reply(request, state)


async def main():
    async with otpy.open_node(otpy.Supervisor([otpy.Child("echo", Echo)])) as node, \\
            trio.open_nursery() as nursery:
        _, port = await nursery.start(functools.partial(
            serve_http, node._rt, ("127.0.0.1", 0), cookie=b"x",
            limits=HttpLimits(max_connections=1000)))
        print("PORT", port, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_running_out_of_descriptors_is_logged_and_survived(
        tmp_path: Any) -> None:
    """A node limited to 64 descriptors, flooded with 100 connections: accept() fails
    with EMFILE, which is logged (AcceptFailed), not fatal; once the flood leaves, new
    clients are served again."""
    import subprocess
    import sys

    script = tmp_path / "node.py"
    script.write_text(EMFILE_NODE)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        port = 0
        for _ in range(50):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            if line.startswith("PORT "):
                port = int(line.split()[1])
                break
        assert port
        flood = []
        for _ in range(100):
            flood.append(await trio.open_tcp_stream("127.0.0.1", port))
        await trio.sleep(0.5)
        for stream in flood:
            await stream.aclose()
        served = False
        for _ in range(100):  # until the node has seen the flood go
            with trio.move_on_after(1):
                served = await healthy(port)
            if served:
                break
            await trio.sleep(0.05)
        assert served
    finally:
        proc.kill()
        out, _ = await trio.to_thread.run_sync(proc.communicate)
    events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    refused = [e for e in events if e.get("event") == "http_request_refused"]
    assert "AcceptFailed" in {e["kind"] for e in refused}
    assert "Too many open files" in next(e["reason"] for e in refused
                                         if e["kind"] == "AcceptFailed")


async def test_a_call_to_an_idle_server_is_answered_without_waiting() -> None:
    """Through start_call, an idle server's reply is the response at once (no task, no
    await); a suspended server's is an awaitable, answered once it resumes."""
    from otpy._protocol.http1 import RequestParser

    def request(body: bytes) -> Request:
        [req] = RequestParser().feed(raw("POST", "/call/echo", body))
        assert isinstance(req, Request)
        return req

    async with otpy.open_node(tree()) as node:
        router = NodeRouter(node._rt, HttpLimits(), HttpStats(), COOKIE)
        now = router.route(request(b"1"))
        assert isinstance(now, Response)
        assert (200, b'["int",1]') == (now.status, now.body)
        node.suspend("echo")
        later = router.route(request(b"2"))
        assert not isinstance(later, Response)
        node.resume("echo")
        answered = await later
        assert (200, b'["int",2]') == (answered.status, answered.body)


async def test_readyz_is_503_while_a_release_installs_or_the_endpoint_drains() -> None:
    """Not ready while a release is being installed (a planner is active) and while the
    endpoint drains; ready otherwise."""
    from otpy._protocol.http1 import RequestParser

    [get] = RequestParser().feed(raw("GET", "/readyz"))
    assert isinstance(get, Request)

    def ready(router: NodeRouter) -> tuple[int, str]:
        response = router.route(get)
        assert isinstance(response, Response)
        return response.status, json.loads(response.body).get("error", "")

    async with otpy.open_node(tree()) as node:
        stats = HttpStats()
        router = NodeRouter(node._rt, HttpLimits(), stats, COOKIE)
        assert (200, "") == ready(router)
        planner = node._rt.planner(otpy.Release("2", [otpy.Update(Echo, Small)]))
        assert (503, "Upgrading") == ready(router)
        planner.abort()
        assert (200, "") == ready(router)
        stats.draining = True
        assert (503, "Draining") == ready(router)


# -- open_node(http=...) -----------------------------------------------------------------


async def test_open_node_serves_http_at_its_http_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_node(root, http=(host, 0))`` binds a free port, ``node.http_address``
    says which; the dashboard's cookie is the node's ($OTPY_COOKIE)."""
    monkeypatch.setenv("OTPY_COOKIE", "node-cookie")
    async with otpy.open_node(tree(), http=("127.0.0.1", 0)) as node:
        assert node.http_address is not None
        host, port = node.http_address
        reply = await call(port, "echo", b'["add", 1]')
        async with connect(port) as client:
            login = await client.request("POST", "/login", b"cookie=node-cookie")
    assert ("127.0.0.1", 200, 303) == (host, reply.status, login.status)
    assert port > 0


async def test_open_node_drains_http_before_the_tree_shuts_down(
        autojump_clock: trio.testing.MockClock) -> None:
    """A call in progress when the body ends is answered by the still-running tree:
    the endpoint stops accepting, finishes it, then the tree stops."""

    replies: list[Reply] = []

    async def client(port: int, task_status: Any) -> None:
        async with connect(port) as conn:
            await conn.send(raw("POST", "/call/slow", b"1"))
            task_status.started()
            replies.extend(await conn.read(1))

    async with trio.open_nursery() as nursery:
        async with otpy.open_node(otpy.Supervisor([otpy.Child("slow", Slow)]),
                                  http=("127.0.0.1", 0)) as node:
            assert node.http_address is not None
            await nursery.start(client, node.http_address[1])
            await trio.sleep(0.5)
        # the body ended at 0.5 s; the node waited for the call (answered at 2 s)
        ended = trio.current_time()
    assert [(200, "late")] == [(r.status, r.json()) for r in replies]
    assert ended >= 2.0


def test_run_forwards_http_options() -> None:
    """``otpy.run(root, main, http=...)`` serves HTTP too; a wrong http_limits is a
    TypeError that says what to pass."""

    async def main(node: otpy.Node) -> int:
        assert node.http_address is not None
        return (await call(node.http_address[1], "echo", b"7")).status

    assert 200 == otpy.run(tree(), main, http=("127.0.0.1", 0))
    with pytest.raises(TypeError, match=r"otpy\.HttpLimits"):
        otpy.run(tree(), main, http=("127.0.0.1", 0), http_limits={"max_body": 1})

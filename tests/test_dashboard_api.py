"""The dashboard's routes without a browser, over real loopback sockets: who may read
and act (the session, its CSRF token, the Origin check), each action, the live stream
and its bounds (a cap on streams, coalescing for a slow reader, the cut after
write_timeout, the end on logout and on drain), the views of a node of 100k servers,
the step statistics, and the metrics the event feed counts."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from _http import Client, Reply, connect, raw

import otpy
from otpy._protocol.http1 import Request, Stream
from otpy._sampler import StepSampler
from otpy._serve import views as views_module
from otpy._serve.http import HttpLimits, HttpStats, NodeRouter, serve_http, serve_router
from otpy._serve.views import NodeViews, bounded_repr

COOKIE = "dashboard-api-cookie"


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "crash":
            raise ValueError("asked to crash")
        return otpy.Reply(state, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + 1


class CounterV2(Counter):
    vsn = "2"

    def code_change(self, old_vsn: Any, state: int, extra: Any) -> int:
        return state


def tree() -> otpy.Supervisor:
    return otpy.Supervisor([
        otpy.Child("a", Counter),
        otpy.Supervisor([otpy.Child("b", Counter), otpy.Child("c", Counter)], name="sub"),
    ], max_restarts=100)


class Session:
    """A logged-in client: its session cookie and the page's CSRF token."""

    def __init__(self, port: int, token: str, csrf: str) -> None:
        self.port = port
        self.token = token
        self.csrf = csrf

    def headers(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("Cookie", f"otpy_session={self.token}"), *extra)

    async def get(self, path: str) -> Reply:
        async with connect(self.port) as client:
            return await client.request("GET", path, headers=self.headers())

    async def act(self, op: str, *args: str, csrf: str | None = None,
                  origin: str | None = None, content_type: str = "application/json"
                  ) -> Reply:
        headers = self.headers(("Content-Type", content_type),
                               ("X-Otpy-Csrf", self.csrf if csrf is None else csrf))
        if origin is not None:
            headers += (("Origin", origin),)
        body = json.dumps({"op": op, "args": list(args)}).encode()
        async with connect(self.port) as client:
            return await client.request("POST", "/api/action", body, headers)


async def log_in(port: int, cookie: str = COOKIE) -> Session:
    async with connect(port) as client:
        reply = await client.request("POST", "/login", f"cookie={cookie}".encode(),
                                     (("Content-Type", "application/x-www-form-urlencoded"),))
    assert 303 == reply.status, reply
    token = re.search(r"otpy_session=([^;]+)", reply.headers["set-cookie"])
    assert token is not None
    session = Session(port, token.group(1), "")
    page = (await session.get("/")).body.decode()
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert csrf is not None
    session.csrf = csrf.group(1)
    return session


@asynccontextmanager
async def dash_node(root: otpy.Supervisor | None = None,
                    limits: HttpLimits | None = None) -> AsyncIterator[tuple[otpy.Node, int]]:
    async with otpy.open_node(root or tree(), http=("127.0.0.1", 0),
                              http_limits=limits) as node:
        assert node.http_address is not None
        yield node, node.http_address[1]


@pytest.fixture
def quiet_logging() -> Iterator[Callable[[], None]]:
    """Filter out otpy's debug and info events while the test runs (a node of 100k
    servers logs one per start and per stop); the configuration is restored after."""
    saved = structlog.get_config()

    def quiet() -> None:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
            logging.WARNING))

    try:
        yield quiet
    finally:
        structlog.configure(wrapper_class=saved["wrapper_class"])


@pytest.fixture(autouse=True)
def node_cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTPY_COOKIE", COOKIE)


class EventStream:
    """A client of /events: reads the head, then one event at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.buffer = b""
        self.head = b""

    async def open(self, session: Session) -> EventStream:
        await self.client.send(raw("GET", "/events", headers=session.headers()))
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self.read_some()
        self.head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return self

    async def read_some(self) -> bytes:
        data = await self.client.stream.receive_some(1 << 16)
        if not data:
            raise EOFError
        return data

    async def event(self) -> tuple[str, Any]:
        """The next event (comments and the retry line skipped): (name, data)."""
        while True:
            while b"\n\n" not in self.buffer:
                self.buffer += await self.read_some()
            block, _, self.buffer = self.buffer.partition(b"\n\n")
            fields = dict(line.split(": ", 1) for line in block.decode().split("\n")
                          if ": " in line and not line.startswith(":"))
            if "event" in fields:
                return fields["event"], json.loads(fields["data"])


# -- who may read and act --------------------------------------------------------------


async def test_without_a_session_the_api_and_the_stream_are_401() -> None:
    """No session, a wrong one, or a wrong cookie at login: nothing of the node."""
    async with dash_node() as (_, port):
        async with connect(port) as client:
            login = await client.request("POST", "/login", b"cookie=wrong")
        replies = []
        for path in ("/api/snapshot", "/api/server?name=a", "/events"):
            async with connect(port) as client:
                replies.append(await client.request(
                    "GET", path, headers=(("Cookie", "otpy_session=forged"),)))
        page = Session(port, "forged", "")
        action = await page.act("suspend", "a", csrf="x")
    assert (403, None) == (login.status, login.headers.get("set-cookie"))
    assert [(401, "NoSession")] * 3 == [(r.status, r.json()["error"]) for r in replies]
    assert (401, "NoSession") == (action.status, action.json()["error"])
    assert b'"a"' not in login.body


async def test_failed_logins_are_counted_and_logged_once_per_interval(
        logs: list[dict[str, Any]], autojump_clock: trio.testing.MockClock) -> None:
    """A flood of wrong cookies is one http_login_failed event per 10 s, the next one
    saying how many attempts came between; each is counted in /metrics."""
    async with dash_node() as (_, port):
        for _ in range(5):
            async with connect(port) as client:
                await client.request("POST", "/login", b"cookie=guess")
        await trio.sleep(11)
        async with connect(port) as client:
            await client.request("POST", "/login", b"cookie=guess")
            metrics = (await client.request("GET", "/metrics")).body.decode()
    events = [e for e in logs if e["event"] == "http_login_failed"]
    assert [1, 5] == [e["attempts"] for e in events]
    assert 'otpy_http_refused_total{kind="LoginFailed"} 6.0' in metrics.splitlines()


async def test_an_action_without_the_sessions_csrf_token_is_refused() -> None:
    """The session alone is not enough to act: no token, another session's token, or a
    form's content type are refused, and nothing is done."""
    async with dash_node() as (node, port):
        mine, other = await log_in(port), await log_in(port)
        replies = [await mine.act("suspend", "a", csrf=""),
                   await mine.act("suspend", "a", csrf=other.csrf),
                   await mine.act("suspend", "a", content_type="text/plain")]
        status = node.statistics("a")["status"]
    assert [(403, "BadCsrfToken"), (403, "BadCsrfToken"), (415, "UnsupportedMediaType")] == [
        (r.status, r.json()["error"]) for r in replies]
    assert "idle" == status


async def test_an_action_from_another_origin_is_refused() -> None:
    """With the token, but sent from another site's page: 403 CrossOrigin; from the
    node's own origin it is done."""
    async with dash_node() as (node, port):
        session = await log_in(port)
        foreign = await session.act("suspend", "a", origin="http://evil.example")
        status = node.statistics("a")["status"]
        own = await session.act("suspend", "a", origin="http://test")
    assert (403, "CrossOrigin", "idle") == (foreign.status, foreign.json()["error"], status)
    assert 200 == own.status


async def test_logout_ends_the_session() -> None:
    """After POST /logout the session's cookie opens nothing."""
    async with dash_node() as (_, port):
        session = await log_in(port)
        async with connect(port) as client:
            out = await client.request("POST", "/logout", headers=session.headers())
        after = await session.get("/api/snapshot")
    assert (303, "otpy_session=;") == (out.status, out.headers["set-cookie"][:14])
    assert 401 == after.status


# -- each action -------------------------------------------------------------------------


async def test_suspend_and_resume_through_the_admin_table() -> None:
    """suspend holds the server (its messages wait), resume serves them."""
    async with dash_node() as (node, port):
        session = await log_in(port)
        suspended = await session.act("suspend", "a")
        node.cast("a", 1)
        held = (node.statistics("a")["status"], node.statistics("a")["mailbox"])
        resumed = await session.act("resume", "a")
        served = node.get_state("a")
    assert ({"ok": True, "result": None}, ("suspended", 1)) == (suspended.json(), held)
    assert (200, 1) == (resumed.status, served)


async def test_terminate_then_start_a_child_and_restart_a_running_one() -> None:
    """terminate_child stops it (its spec stays), restart_child starts it again (OTP's
    restart_child); restart stops and starts a running child: a new pid, a fresh
    state."""
    async with dash_node() as (node, port):
        session = await log_in(port)
        await node.call("b", "x")
        pid = node.whereis("b")
        terminated = await session.act("terminate_child", "sub", "b")
        gone = node.whereis("b")
        started = await session.act("restart_child", "sub", "b")
        await node.call("b", "x")
        restarted = await session.act("restart", "sub", "b")
        state, new_pid = node.get_state("b"), node.whereis("b")
    assert (200, None) == (terminated.status, gone)
    assert {"id": "b", "kind": "worker", "status": "running", "vsn": "1",
            "restarts": 0} == started.json()["result"]
    assert (200, 0) == (restarted.status, state)
    assert new_pid is not None and new_pid != pid


async def test_an_action_that_fails_says_why_with_a_status() -> None:
    """Errors of the admin table as statuses: an unknown server 404, a child already
    running 409, a malformed action 400, a downgrade with nothing installed 409."""
    async with dash_node() as (_, port):
        session = await log_in(port)
        replies = [await session.act("suspend", "nobody"),
                   await session.act("restart_child", "sub", "b"),
                   await session.act("explode", "a"),
                   await session.act("suspend"),
                   await session.act("downgrade")]
    assert [(404, "NoSuchServer"), (409, "SupervisorError"), (400, "BadRequest"),
            (400, "BadRequest"), (409, "UpgradeFailed")] == [
        (r.status, r.json()["error"]) for r in replies]


async def test_downgrade_is_installed_by_the_node_and_reported() -> None:
    """A downgrade asked for on the dashboard is installed by the node's installer:
    the servers run the older code again and the release is gone from the history."""
    async with dash_node() as (node, port):
        await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
        session = await log_in(port)
        reply = await session.act("downgrade")
        vsn, releases = node.vsn_of("a"), node.releases()
    assert (200, "2", True) == (reply.status, reply.json()["result"]["release"],
                                reply.json()["result"]["downgrade"])
    assert ("1", []) == (vsn, releases)


# -- what the views show -------------------------------------------------------------------


async def test_the_snapshot_shows_the_tree_servers_releases_and_a_crash() -> None:
    """The tree with each supervisor's restarts in its window, each child's status,
    vsn, restarts and last crash; the table; the node's figures; the events."""
    async with dash_node() as (node, port):
        session = await log_in(port)
        node.suspend("c")
        async with connect(port) as client:
            await client.request("POST", "/call/b", b'"crash"')
        view = (await session.get("/api/snapshot")).json()
        detail = (await session.get("/api/server?name=b")).json()
    root = view["tree"]
    sub = root["children"][1]["supervisor"]
    assert ("root", 0, 100, ["a", "sub"]) == (
        root["name"], root["in_window"], root["max_restarts"],
        [c["id"] for c in root["children"]])
    assert ("sub", 1, 3, 5.0) == (sub["name"], sub["in_window"], sub["max_restarts"],
                                  sub["max_seconds"])
    assert [("b", "running", "1", 1, "ValueError: asked to crash"),
            ("c", "suspended", "1", 0, None)] == [
        (c["id"], c["status"], c["vsn"], c["restarts"], c["last_crash"])
        for c in sub["children"]]
    assert {"b", "c"} == {r["name"] for r in view["servers"]["rows"]}
    assert (3, 2, 1, 1) == (view["node"]["servers"], view["node"]["supervisors"],
                            view["node"]["crashes"], view["node"]["restarts"])
    assert ["server_crashed"] == [e["event"] for e in view["events"]]
    assert ("b", "sub", 1) == (detail["name"], detail["supervisor"], len(detail["crash_log"]))
    assert detail["pid"].startswith("<b.")


async def test_a_100k_server_node_is_shown_within_bounds(
        quiet_logging: Callable[[], None]) -> None:
    """100k servers under one supervisor: the tree shows the first CHILDREN_SHOWN and
    those restarted most, and counts the rest; the table holds at most the top of each
    column; the whole snapshot stays small; /metrics has per-server series only for
    the top K."""
    n = 100_000
    quiet_logging()
    root = otpy.Supervisor([otpy.Child(f"s{i}", Counter) for i in range(n)],
                           max_restarts=1000)
    limits = HttpLimits(metrics_top_k=5)
    async with dash_node(root, limits) as (node, port):
        session = await log_in(port)
        for i in range(0, n, n // 10):  # ten crash, and restart
            async with connect(port) as client:
                await client.request("POST", f"/call/s{i + 7}", b'"crash"')
        for i in range(200):  # two hundred have queued messages
            node.suspend(f"s{i * 11}")
            for _ in range(i % 7 + 1):
                node.cast(f"s{i * 11}", 1)
        reply = await session.get("/api/snapshot")
        async with connect(port) as client:
            metrics = (await client.request("GET", "/metrics")).body.decode()
    view = reply.json()
    root_view = view["tree"]
    shown = [c["id"] for c in root_view["children"]]
    table = view["servers"]["rows"]
    limit = views_module.CHILDREN_SHOWN
    assert shown[:limit] == [f"s{i}" for i in range(limit)]
    assert {f"s{i + 7}" for i in range(0, n, n // 10)} <= set(shown)
    assert (n - len(shown), n, n) == (root_view["hidden"], root_view["specs"],
                                      root_view["running"])
    assert len(table) <= 7 * views_module.TABLE_ROWS
    assert max(r["mailbox"] for r in table) == 7
    assert (n, sum(i % 7 + 1 for i in range(200)), 200) == (
        view["node"]["servers"], view["node"]["queued"], view["node"]["suspended"])
    assert len(reply.body) < 256 * 1024
    assert 5 == metrics.count("otpy_server_mailbox{")
    assert 5 == metrics.count("otpy_server_crashes_total{")


async def test_an_upgrade_in_progress_is_shown_with_its_progress(
        quiet_logging: Callable[[], None]) -> None:
    """While a release of 3,000 servers installs (in chunks, between which the loop
    runs), the views show its phase and how far it got; then it is in the history."""
    quiet_logging()
    root = otpy.Supervisor([otpy.Child(f"s{i}", Counter) for i in range(3000)])
    seen: list[tuple[str, int, int | None]] = []
    async with otpy.open_node(root) as node:
        views = NodeViews(node._rt)
        done = trio.Event()

        async def watch() -> None:
            while not done.is_set():
                installing = views.releases_view(trio.current_time())["installing"]
                if installing is not None:
                    seen.append((installing["phase"], installing["done"],
                                 installing["total"]))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
            done.set()
        after = views.releases_view(trio.current_time())
    phases = [phase for phase, _, _ in seen]
    assert {"planning", "migrating"} == set(phases)
    assert all(total == 3000 for phase, _, total in seen if phase == "migrating")
    assert any(0 < done < 3000 for phase, done, _ in seen if phase == "migrating")
    assert (None, [("2", 3000)]) == (after["installing"], [
        (r["vsn"], r["servers"]) for r in after["history"]])


def test_a_state_is_shown_as_a_bounded_repr() -> None:
    """A huge or deep state is shown cut in depth, items and characters; a dataclass
    as its fields."""
    import dataclasses

    @dataclasses.dataclass
    class Big:
        rows: list[int]
        name: str

    text = bounded_repr({"big": Big(list(range(1_000_000)), "x" * 10_000),
                         "deep": [[[[[[1]]]]]]})
    assert len(text) <= views_module.STATE_CHARS
    assert "Big(rows=[0, 1, 2," in text and "...]" in text
    assert "[[[[...]]]]" in text


async def test_crash_rings_are_bounded_per_server_and_in_servers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each server keeps its last CRASHES_PER_SERVER crashes; at most CRASH_SERVERS
    servers are remembered, the least recently crashed forgotten first."""
    monkeypatch.setattr(views_module, "CRASH_SERVERS", 3)
    root = otpy.Supervisor([otpy.Child(f"s{i}", Counter) for i in range(5)],
                           max_restarts=1000)
    async with otpy.open_node(root) as node:
        views = NodeViews(node._rt)
        stop = node._rt.sched.log.observe(views._event)
        for _ in range(views_module.CRASHES_PER_SERVER + 5):
            with pytest.raises(otpy.ServerCrashed):
                await node.call("s0", "crash")
        for i in range(1, 5):
            with pytest.raises(otpy.ServerCrashed):
                await node.call(f"s{i}", "crash")
        stop()
    assert ["s2", "s3", "s4"] == list(views.crashes)
    assert views_module.CRASHES_PER_SERVER + 9 == views.crashes_total
    assert views_module.RECENT_EVENTS >= len(views.events)


# -- the live stream ----------------------------------------------------------------------


async def test_the_stream_sends_snapshots_and_a_crash_soon() -> None:
    """/events sends a snapshot at once, and a new one soon after a crash."""
    async with dash_node() as (node, port):
        session = await log_in(port)
        async with connect(port) as client:
            stream = await EventStream(client).open(session)
            first = await stream.event()
            with pytest.raises(otpy.ServerCrashed):
                await node.call("a", "crash")
            with trio.fail_after(5):
                while True:
                    name, view = await stream.event()
                    if view["node"]["crashes"]:
                        break
    assert b"text/event-stream" in stream.head and b"connection: close" in stream.head
    assert ("snapshot", 0) == (first[0], first[1]["node"]["crashes"])
    assert ("snapshot", 1) == (name, view["tree"]["children"][0]["restarts"])


async def test_streams_past_max_streams_are_503() -> None:
    """At most max_streams pages are live; one more is refused, and a closed one frees
    its place."""
    async with dash_node(limits=HttpLimits(max_streams=2)) as (_, port):
        session = await log_in(port)
        async with connect(port) as c1, connect(port) as c2:
            s1 = await EventStream(c1).open(session)
            await EventStream(c2).open(session)
            await s1.event()
            third = await session.get("/events")
        with trio.fail_after(5):  # the two closed: their places are free again
            while b"otpy_dashboard_streams 0.0" not in (await session.get("/metrics")).body:
                await trio.sleep(0.05)
        async with connect(port) as c3:
            name, _ = await (await EventStream(c3).open(session)).event()
    assert (503, "TooManyStreams", "5") == (third.status, third.json()["error"],
                                            third.headers["retry-after"])
    assert "snapshot" == name


async def test_a_stream_that_never_starts_frees_its_place() -> None:
    """A HEAD of /events gets the stream's head and no stream; its place is free again
    at once (with max_streams=1, a GET after two HEADs is served)."""
    async with dash_node(limits=HttpLimits(max_streams=1)) as (_, port):
        session = await log_in(port)
        heads = []
        for _ in range(2):
            async with connect(port) as client:
                await client.send(raw("HEAD", "/events", headers=session.headers()))
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await client.stream.receive_some(4096)
                heads.append(data.split(b"\r\n", 1)[0])
        async with connect(port) as client:
            name, _ = await (await EventStream(client).open(session)).event()
    assert [b"HTTP/1.1 200 OK"] * 2 == heads
    assert "snapshot" == name


async def test_a_slow_stream_reader_gets_the_newest_snapshot_not_a_queue() -> None:
    """A reader slower than the snapshots skips to the newest: the stream holds one
    snapshot at most, and sends the one current when the client takes the last."""
    async with otpy.open_node(tree()) as node, trio.open_nursery() as nursery:
        stats = HttpStats()
        views = NodeViews(node._rt)
        router = NodeRouter(node._rt, HttpLimits(), stats, COOKIE.encode(), views=views)
        nursery.start_soon(views.run)
        _, port = await nursery.start(functools.partial(
            serve_router, router, ("127.0.0.1", 0), stats=stats))
        session = await log_in(port)
        gate = trio.Event()
        sent: list[bytes] = []

        async def send(piece: bytes) -> None:
            sent.append(piece)
            if piece.startswith(b"event: snapshot") and not gate.is_set():
                await gate.wait()  # the first snapshot: the client is slow to take it

        request = Request("GET", "/events", "", [(b"cookie", f"otpy_session="
                          f"{session.token}".encode())], b"", True, False)
        stream = router.dashboard.events(request)
        assert isinstance(stream, Stream)
        async with trio.open_nursery() as streaming:
            streaming.start_soon(stream.run, send)
            with trio.fail_after(5):
                while not any(p.startswith(b"event: snapshot") for p in sent):
                    await trio.sleep(0.01)
            first = views.seq
            for _ in range(3):  # three newer snapshots while the client is slow
                await trio.sleep(0.3)
                await views._publish()
            gate.set()
            with trio.fail_after(5):
                while sum(p.startswith(b"event: snapshot") for p in sent) < 2:
                    await trio.sleep(0.01)
            views.close()
        nursery.cancel_scope.cancel()
    seqs = [json.loads(p.split(b"data: ", 1)[1])["seq"] for p in sent
            if p.startswith(b"event: snapshot")]
    assert [first, first + 3] == seqs


async def test_a_stream_reader_that_never_reads_is_cut_after_write_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    """Snapshots pile up in the socket's buffers, then the stream waits for the client
    at most write_timeout, and cuts it: the node never holds more than one snapshot."""
    root = otpy.Supervisor([otpy.Child(f"s{i}", Counter) for i in range(3000)])
    limits = HttpLimits(write_timeout=3.0)
    async with dash_node(root, limits) as (_, port):
        session = await log_in(port)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        import socket

        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with stream:
            await stream.send_all(raw("GET", "/events", headers=session.headers()))
            with trio.fail_after(120):
                while (await session.get("/metrics")).body.count(
                        b'otpy_http_refused_total{kind="SlowReader"}') == 0:
                    await trio.sleep(1)
            metrics = (await session.get("/metrics")).body.decode()
    assert 'otpy_http_refused_total{kind="SlowReader"} 1.0' in metrics
    assert "otpy_dashboard_streams 0.0" in metrics


async def test_a_stream_ends_with_logout_and_with_the_drain() -> None:
    """A logged-out session's stream says so and ends; on shutdown every stream says
    bye and the endpoint drains without waiting for them."""
    shutdown = trio.Event()
    async with otpy.open_node(tree()) as node, trio.open_nursery() as nursery:
        port = (await nursery.start(lambda task_status: serve_http(
            node._rt, ("127.0.0.1", 0), cookie=COOKIE.encode(), shutdown=shutdown,
            task_status=task_status)))[1]
        first, second = await log_in(port), await log_in(port)
        async with connect(port) as c1, connect(port) as c2:
            s1 = await EventStream(c1).open(first)
            s2 = await EventStream(c2).open(second)
            await s1.event()
            await s2.event()
            async with connect(port) as client:
                await client.request("POST", "/logout", headers=first.headers())
            with trio.fail_after(5):
                logout = await s1.event()
            start = trio.current_time()
            shutdown.set()
            with trio.fail_after(5):
                bye = await s2.event()
                with pytest.raises(EOFError):
                    await s2.event()
        drained = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert ("logout", "bye") == (logout[0], bye[0])
    assert drained < 4.0  # not the 5 s grace


# -- step statistics ------------------------------------------------------------------------


async def test_count_steps_counts_the_flagged_servers_only_and_then_stops(
        autojump_clock: trio.testing.MockClock) -> None:
    """Runtime.count_steps: exact counts of the named servers' steps, inline and
    queued, none of the others', over the time they were counted; after stop their
    steps take the fast path again."""
    async with otpy.open_node(tree()) as node:
        rt = node._rt
        stop = rt.count_steps(["a", "b"])
        for _ in range(5):
            await node.call("a", "x")
            node.cast("b", 1)
            await node.call("c", "x")
        await trio.sleep(2.0)
        counts = stop()
        await node.call("a", "x")
        flags = [rt.server(n)._otpy_flags for n in ("a", "b", "c")]
    assert {"a": (5, 2.0), "b": (5, 2.0)} == counts
    assert [0, 0, 0] == flags
    assert rt.sched.on_step is None


async def test_count_steps_stops_counting_a_server_at_its_cap(
        autojump_clock: trio.testing.MockClock) -> None:
    """A server is counted for ``cap`` steps at most (so counting a very busy server
    costs a bounded number of slower steps); its count says over what time."""
    async with otpy.open_node(tree()) as node:
        rt = node._rt
        stop = rt.count_steps(["a", "b"], cap=3)
        for _ in range(5):
            await node.call("a", "x")
            await trio.sleep(1.0)
        flag = rt.server("a")._otpy_flags
        counts = stop()
    assert (0, {"a": (3, 2.0), "b": (0, 5.0)}) == (flag, counts)


async def test_the_sampler_finds_the_server_whose_callback_runs() -> None:
    """A sample taken while a callback runs names its server (from the interrupted
    frame, as the signal handler gets it, or from another thread's look at the
    stack); outside any callback, none."""
    results: dict[str, Any] = {}

    class Probe(otpy.GenServer[None]):
        def init(self, arg: Any) -> None:
            return None

        def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
            sampler = StepSampler(threading.get_ident())
            results["frame"] = sampler.record(sys._getframe())
            done = threading.Event()

            def look() -> None:
                results["thread"] = sampler.sample_once()
                done.set()

            threading.Thread(target=look).start()
            done.wait(5)  # the other thread reads this stack meanwhile
            return otpy.Reply(None, state)

    async with otpy.open_node(otpy.Supervisor([otpy.Child("probe", Probe)])) as node:
        await node.call("probe", "go")
        outside = StepSampler(threading.get_ident()).record(sys._getframe())
    assert ("probe", "probe", None) == (results["frame"], results["thread"], outside)


async def test_step_statistics_show_a_busy_servers_rate_and_step_time() -> None:
    """While watched, a server kept busy shows steps per second (counted) and a step
    time (its sampled share of the loop over its rate); idle ones show none."""

    class Busy(otpy.GenServer[int]):
        def init(self, arg: Any) -> int:
            return 0

        def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
            total = 0
            for i in range(3000):
                total += i
            return otpy.Reply(total, state + 1)

    root = otpy.Supervisor([otpy.Child("busy", Busy), otpy.Child("idle", Counter)])
    async with dash_node(root) as (node, port):
        session = await log_in(port)
        await session.get("/api/snapshot")  # someone watches: statistics start
        row: dict[str, Any] = {}
        with trio.fail_after(30):
            while not row.get("steps_per_s") or not row.get("step_s"):
                for _ in range(200):
                    await node.call("busy", "go")
                row = (await session.get("/api/server?name=busy")).json()
        idle = (await session.get("/api/server?name=idle")).json()
    assert row["steps_per_s"] > 0 and 0 < row["busy"] <= 1 and row["step_s"] > 0
    assert (None, None) == (idle["steps_per_s"], idle["step_s"])


def test_folding_a_tick_gives_step_time_as_share_over_rate() -> None:
    """One tick: a server busy 30% of the loop at 1000 steps/s steps 300 µs each; a
    server no longer counted fades."""
    views = NodeViews.__new__(NodeViews)
    views.busy, views.rates, views.step_seconds, views.loop_busy = {}, {"old": 10.0}, {}, None
    views._fold({"s": 0.3}, {"s": 1000.0})
    assert (0.15, 1000.0, 5.0) == (views.busy["s"], views.rates["s"], views.rates["old"])
    assert 0.15 / 1000.0 == pytest.approx(views.step_seconds["s"])


# -- metrics from the event feed ---------------------------------------------------------------


async def test_metrics_count_crashes_restarts_upgrades_and_loop_lag() -> None:
    """The event feed's counters, an upgrade's duration as a histogram, the loop's lag,
    and per-server crash counts."""
    async with dash_node() as (node, port):
        for _ in range(2):
            with pytest.raises(otpy.ServerCrashed):
                await node.call("b", "crash")
        await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
        async with connect(port) as client:
            text = (await client.request("GET", "/metrics")).body.decode()
        observers = len(node._rt.sched.log._observers)
    lines = text.splitlines()
    assert {"otpy_crashes_total 2.0", "otpy_restarts_total 2.0",
            'otpy_server_crashes_total{server="b"} 2.0',
            'otpy_upgrade_duration_seconds_count{outcome="committed"} 1.0',
            'otpy_upgrade_duration_seconds_bucket{le="+Inf",outcome="committed"} 1.0',
            } <= set(lines)
    assert any(line.startswith("otpy_loop_lag_max_seconds ") for line in lines)
    assert any(line.startswith("otpy_resident_memory_bytes ") for line in lines)
    assert 1 == observers


async def test_the_event_feed_is_left_when_the_endpoint_stops() -> None:
    """The views observe the node's events only while the endpoint runs."""
    async with otpy.open_node(tree()) as node:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_http(
                node._rt, ("127.0.0.1", 0), cookie=b"x", task_status=task_status))
            during = len(node._rt.sched.log._observers)
            nursery.cancel_scope.cancel()
        after = len(node._rt.sched.log._observers)
    assert (1, 0) == (during, after)

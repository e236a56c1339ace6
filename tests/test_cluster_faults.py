"""Cluster faults with real processes and a real nats-server.

Each remote node is a process of its own (tests/cluster_node.py, running ``otpy.run``
with ``cluster=URL``), stopped by its pid; node ``a`` runs in the test's own trio loop
and watches. What is pinned: a node killed with SIGKILL fails the calls in flight to it
with ``noconnection`` (never a wrong reply) and its monitors fire; a node frozen
(SIGSTOP: its connection stays open, it just stops answering) is cut off after
``cut_after``; a nats-server killed and started again under load loses no reply and
answers none twice; two processes racing for one cluster name; garbage sent to a node
is dropped with an event. Time bounds here are generous guards (the machine is shared);
the measured figures are bench/bench_cluster.py's.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from _nats import restart, running_server

import otpy
from otpy._cluster.jetstream import JetStream
from otpy._cluster.nats_client import open_client
from otpy._cluster.server import NatsServer

CHILD = Path(__file__).resolve().parent / "cluster_node.py"
START_TIMEOUT = 30.0  # a process's imports and join, on a loaded 2-core machine
_clusters = itertools.count()


def cluster_name() -> str:
    return f"f{os.getpid()}x{next(_clusters)}"


class Watcher(otpy.GenServer[list[Any]]):
    """Monitors what it is asked to, and keeps each message with when it came."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        if request == "downs":
            return otpy.Reply(list(state), state)
        return otpy.Reply(self.monitor(request[1]), state)

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, (time.monotonic(), message)]


class Child:
    """A node process (tests/cluster_node.py), stopped by its pid."""

    def __init__(self, proc: trio.Process, name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log
        self._buf = b""

    async def line(self) -> str:
        """The next line it prints ("" once its stdout closed)."""
        assert self.proc.stdout is not None
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in self._buf:
                data = await self.proc.stdout.receive_some(4096)
                if not data:
                    return ""
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    async def expect(self, wanted: str) -> None:
        got = await self.line()
        assert wanted == got, f"node {self.name} printed {got!r}:\n{self.log.read_text()}"

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with trio.fail_after(10):
            await self.proc.wait()


@asynccontextmanager
async def child(tmp_path: Path, url: str, cluster: str, name: str, *args: str,
                ready: bool = True) -> AsyncIterator[Child]:
    """Start node ``name`` in a process (until it prints READY, unless ``ready`` is
    False); SIGCONT and SIGKILL it by its pid after."""
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(CHILD), url, cluster, name, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    node = Child(proc, name, log)
    try:
        if ready:
            await node.expect("READY")
        yield node
    finally:
        node.signal(signal.SIGCONT)
        with trio.CancelScope(shield=True):
            await node.kill()


@asynccontextmanager
async def watching(url: str, cluster: str, **options: float) -> AsyncIterator[otpy.Node]:
    """Node ``a`` in this process, with a Watcher ``w``."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("w", Watcher)]), cluster=url,
                              cluster_name=cluster, node_name="a",
                              cluster_options=options or None) as a:
        yield a


async def until(what: Any, timeout: float = 10.0) -> None:
    """Poll ``what()`` (every 10 ms, at most ``timeout`` s) until it is true."""
    with trio.fail_after(timeout):
        while not await what():
            await trio.sleep(0.01)


async def sees(a: otpy.Node, node: str, status: str = "up", name: str = "kv") -> bool:
    info = a.cluster_info()
    assert info is not None
    return info["members"].get(node) == status and info["names"].get(name) == node


def noconnection(exc: BaseException) -> bool:
    return isinstance(exc, otpy.ServerStopped) and exc.reason == "noconnection"


# -- a node dies --------------------------------------------------------------------------


async def test_kill_9_fails_calls_in_flight_and_fires_monitors(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """SIGKILL of a node while another calls it: every call before the kill got its own
    reply, every call after fails promptly (noconnection, or NoSuchServer once NATS
    has dropped the node), a call the node was holding fails with noconnection, and
    each monitor of its servers gets one ServerDown(noconnection)."""
    cluster = cluster_name()
    async with child(tmp_path, nats_server.url, cluster, "b") as b, \
            watching(nats_server.url, cluster) as a:
        await until(lambda: sees(a, "b"))
        refs = {await a.call("w", ("monitor", "kv")),
                await a.call("w", ("monitor", "local@b"))}
        outcomes: dict[int, tuple[float, Any]] = {}
        ids = itertools.count()

        async def caller() -> None:
            while True:
                i = next(ids)
                try:
                    outcome = await a.call("kv", ("echo", i), timeout=5)
                except otpy.OtpyError as exc:
                    outcome = exc
                outcomes[i] = (time.monotonic(), outcome)
                if isinstance(outcome, BaseException) or i > 20_000:
                    return

        async def held(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            try:
                await a.call("local@b", "later", timeout=30)
            except otpy.OtpyError as exc:
                outcomes[-1] = (time.monotonic(), exc)

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await nursery.start(held)
                for _ in range(16):
                    nursery.start_soon(caller)
                await until(lambda: _at_least(outcomes, 200))
                t_kill = time.monotonic()
                await b.kill()
            await until(lambda: _downs(a, 2))
        downs = await a.call("w", "downs")

    replies = {i: o for i, (_, o) in outcomes.items() if not isinstance(o, BaseException)}
    errors = {i: (t, o) for i, (t, o) in outcomes.items() if isinstance(o, BaseException)}
    assert all(("echo", i) == reply for i, reply in replies.items())
    assert len(replies) >= 200
    assert 17 == len(errors)  # each of the 16 callers, and the held call
    assert noconnection(errors[-1][1])
    assert all(noconnection(o) or isinstance(o, otpy.NoSuchServer)
               for _, o in errors.values()), errors
    assert all(t - t_kill < 1.0 for t, _ in errors.values())
    assert refs == {d.ref for _, d in downs}
    assert ["noconnection"] * 2 == [d.reason for _, d in downs]
    assert all(t - t_kill < 1.0 for t, _ in downs)


async def _at_least(outcomes: dict[int, Any], n: int) -> bool:
    return len(outcomes) >= n


async def _downs(a: otpy.Node, n: int) -> bool:
    return len(await a.call("w", "downs")) >= n


async def test_a_frozen_node_is_cut_off_after_cut_after(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """A node that stops answering but keeps its connection (SIGSTOP: what a hung
    machine or a silent network cut looks like) is down after ``cut_after``: its
    monitors get noconnection, a call held there fails; once it answers again it is
    up and reached again."""
    cluster = cluster_name()
    cut_after = 0.5
    async with child(tmp_path, nats_server.url, cluster, "b") as b, \
            watching(nats_server.url, cluster, cut_after=cut_after) as a:
        await until(lambda: sees(a, "b"))
        ref = await a.call("w", ("monitor", "kv"))
        failed: list[tuple[float, BaseException]] = []

        async def held(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            try:
                await a.call("kv", "later", timeout=30)
            except otpy.OtpyError as exc:
                failed.append((time.monotonic(), exc))

        async with trio.open_nursery() as nursery:
            await nursery.start(held)
            await trio.sleep(0.05)  # the call is at b
            b.signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            await until(lambda: _downs(a, 1))
        [(t_down, down)] = await a.call("w", "downs")
        assert (ref, "noconnection") == (down.ref, down.reason)
        assert 1 == len(failed) and noconnection(failed[0][1])
        # cut_after after the oldest unanswered probe (which may have gone out up to a
        # probe interval before the stop), with a generous margin for a loaded machine
        assert cut_after - 0.1 <= t_down - t_stop < cut_after + 1.0
        with pytest.raises(otpy.ServerStopped, match=r"is down"):
            await a.call("kv", ("echo", 1))
        b.signal(signal.SIGCONT)
        await until(lambda: sees(a, "b", "up"))
        assert ("echo", 2) == await a.call("kv", ("echo", 2))


# -- the nats-server dies -------------------------------------------------------------------


async def test_nats_server_restarted_under_load(tmp_path: Path) -> None:
    """The nats-server killed (SIGKILL) and started again on its port and store while
    node a calls node b's kv: calls meanwhile fail (noconnection), the nodes
    reconnect, b registers kv again (a new revision in the bucket), calls resume, and
    no request is served twice or answered with another's reply."""
    cluster = cluster_name()
    server = running_server(tmp_path / "nats")
    first = server.__enter__()
    current = first
    try:
        async with child(tmp_path, first.url, cluster, "b"), \
                watching(first.url, cluster) as a:
            await until(lambda: sees(a, "b"))
            bucket = f"otpy-{cluster}-names"
            before = await _revision(first.url, bucket)
            outcomes: dict[int, list[Any]] = {}
            ids = itertools.count()
            phase = {"restarted": False}
            after: list[int] = []

            async def caller() -> None:
                for _ in range(100_000):
                    i = next(ids)
                    try:
                        reply: Any = await a.call("kv", ("echo", i), timeout=2)
                    except otpy.OtpyError as exc:
                        reply = exc
                        await trio.sleep(0.01)  # not a busy loop while NATS is away
                    outcomes.setdefault(i, []).append(reply)
                    if phase["restarted"] and not isinstance(reply, BaseException):
                        after.append(i)
                        if len(after) >= 300:
                            return

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(caller)
                    await until(lambda: _at_least(outcomes, 300))
                    first.kill()
                    await trio.sleep(0.1)
                    current = restart(first)
                    phase["restarted"] = True
                await until(lambda: sees(a, "b"))
            served = await a.call("kv", "served")
            after_rev = await _revision(current.url, bucket)
    finally:
        current.stop()
        first.stop()
    replies = {i: o[0] for i, o in outcomes.items() if not isinstance(o[0], BaseException)}
    failures = [o[0] for o in outcomes.values() if isinstance(o[0], BaseException)]
    assert all(1 == len(o) for o in outcomes.values())
    assert all(("echo", i) == reply for i, reply in replies.items())
    assert all(1 == served.get(i) for i in replies), "a reply for a request not served once"
    assert all(1 == n for n in served.values()), "a request served twice"
    assert len(replies) >= 600
    assert all(noconnection(f) or isinstance(f, otpy.NoSuchServer | otpy.CallTimeout)
               for f in failures), failures
    assert after_rev > before, "kv was not registered again after the restart"


async def _revision(url: str, bucket: str) -> int:
    async with open_client(url) as nc:
        entry = await (await JetStream(nc).key_value(bucket, create=False)).get("kv")
    assert entry is not None
    return entry.revision


# -- starting -----------------------------------------------------------------------------


async def test_two_processes_racing_for_a_cluster_name(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Two processes that start a node with the same cluster-scoped name at once: one
    runs it, the other's start fails naming the winner."""
    cluster = cluster_name()
    async with child(tmp_path, nats_server.url, cluster, "x", "--go", ready=False) as x, \
            child(tmp_path, nats_server.url, cluster, "y", "--go", ready=False) as y:
        await x.expect("LOADED")
        await y.expect("LOADED")
        for node in (x, y):
            assert node.proc.stdin is not None
            await node.proc.stdin.send_all(b"go\n")
        lines = {node.name: await node.line() for node in (x, y)}
        [winner] = [name for name, line in lines.items() if line == "READY"]
        [loser] = [node for node in (x, y) if lines[node.name] == ""]
        with trio.fail_after(10):
            assert 1 == await loser.proc.wait()
        error = loser.log.read_text()
        assert f"StartFailed: the cluster-scoped name 'kv' is registered by node " \
               f"{winner!r}" in error, error


# -- what arrives -------------------------------------------------------------------------


async def test_garbage_from_another_process_is_dropped(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Payloads that are not otpy's, or of another cluster, sent to a node in another
    process: a request is answered BadRequest, the node logs cluster_message_dropped,
    and it serves on."""
    cluster = cluster_name()
    async with child(tmp_path, nats_server.url, cluster, "b") as b, \
            watching(nats_server.url, cluster) as a:
        await until(lambda: sees(a, "b"))
        async with open_client(nats_server.url) as nc:
            for subject, payload in (
                    (f"otpy.{cluster}.node.b", b"\xc1 not msgpack"),
                    (f"otpy.{cluster}.name.kv", msgpack.packb(
                        ["otpy/1", "another", "call", "kv", "x", None, 1.0]))):
                reply = await nc.request(subject, payload, timeout=5)
                assert b"BadRequest" in reply.payload
        assert ("echo", 1) == await a.call("kv", ("echo", 1))
        await until(lambda: _logged(b.log, "cluster_message_dropped"))


async def _logged(log: Path, event: str) -> bool:
    return event in log.read_text()


# -- failover of a durable server -------------------------------------------------------


def durable_service() -> otpy.Supervisor:
    """Node a's tree: the same cluster supervisor as a child process's ``--durable``."""
    from cluster_node import DurableCounter

    return otpy.Supervisor([
        otpy.Supervisor([otpy.Child("kv", DurableCounter, scope="cluster")], name="svc",
                        scope="cluster"),
        otpy.Child("w", Watcher)])


async def test_a_durable_server_killed_with_its_node_resumes_elsewhere_with_every_ack(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Node b runs a durable cluster-scoped counter; 8 callers on node a increment it
    and note the highest count acknowledged. b is killed with SIGKILL: a, standing by,
    takes the counter over from the cluster's store within the bound, and its next
    count is above every count acknowledged before the kill (none lost)."""
    cluster = cluster_name()
    async with child(tmp_path, nats_server.url, cluster, "b", "--durable") as b, \
            otpy.open_node(durable_service(), cluster=nats_server.url, cluster_name=cluster,
                           node_name="a") as a:
        await until(lambda: sees(a, "b"))
        assert "standby" == a.which_children("svc")[0].status
        acked: list[tuple[float, int, str]] = []
        killed = trio.Event()

        async def caller() -> None:
            for _ in range(100_000):
                try:
                    count = await a.call("kv", "incr", timeout=5)
                except otpy.OtpyError:
                    await trio.sleep(0.01)
                    continue
                acked.append((time.monotonic(), count, "a" if a.whereis("kv") else "b"))
                if killed.is_set() and sum(1 for *_, n in acked if n == "a") >= 50:
                    return

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(caller)
                await until(lambda: _counted(acked, 300))
                t_kill = time.monotonic()
                await b.kill()
                killed.set()
    before = max(count for _, count, where in acked if where == "b")
    after = [(t, count) for t, count, where in acked if where == "a" and t > t_kill]
    first_t, _ = min(after)
    assert min(count for _, count in after) > before, "an acknowledged increment was lost"
    # the bound: the kill is seen within a probe (50 ms) and the takeover is one CAS,
    # one claim and a restart; 2 s, with room for a loaded machine
    assert first_t - t_kill < 5.0, first_t - t_kill


async def _counted(acked: list[Any], n: int) -> bool:
    return len(acked) >= n


class _Proxy:
    """A TCP proxy from a port to the nats-server: ``cut()`` drops every connection
    through it and refuses new ones (a partition of the node behind it) until
    ``heal()``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.open = True
        self.scopes: set[trio.CancelScope] = set()
        self.port = 0

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, down: trio.SocketStream) -> None:
        if not self.open:
            await down.aclose()
            return
        with trio.CancelScope() as scope:
            self.scopes.add(scope)
            try:
                up = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with up, down, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, down, up)
                    await self._pump(up, down)
                    nursery.cancel_scope.cancel()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.scopes.discard(scope)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        """Copy until either side ends (a node killed at the end resets its side);
        then both sides close."""
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(sink)
        await trio.aclose_forcefully(source)

    def cut(self) -> None:
        self.open = False
        for scope in list(self.scopes):
            scope.cancel()

    def heal(self) -> None:
        self.open = True


async def test_a_partitioned_node_heals_into_one_instance(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Node b reaches NATS through a proxy and runs the durable counter; the proxy cuts
    b off. Node a takes the counter over from the cluster's store; calls that reach b
    meanwhile (over its own TCP endpoint) are never acknowledged. The proxy heals: b
    reconnects, finds a running the counter, stops its copy (cluster_duplicate_stopped)
    and stands by: one instance, a's, whose count kept every acknowledged increment."""
    cluster = cluster_name()
    proxy = _Proxy(nats_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        url = f"nats://127.0.0.1:{proxy.port}"
        async with child(tmp_path, url, cluster, "b", "--durable", "--listen",
                         ready=False) as b:
            port = int((await b.line()).split()[1])
            await b.expect("READY")
            await partitioned(b, a_url=nats_server.url, cluster=cluster, port=port,
                              proxy=proxy)
        nursery.cancel_scope.cancel()
    log = b.log.read_text()
    assert "cluster_standby" in log and "nats_reconnected" in log


async def partitioned(b: Child, *, a_url: str, cluster: str, port: int,
                      proxy: _Proxy) -> None:
    """Node a (in this process, straight to NATS) and b (behind ``proxy``): the test
    of the partition above, from b's start on."""
    async with otpy.open_node(durable_service(), cluster=a_url, cluster_name=cluster,
                              node_name="a") as a:
        await until(lambda: sees(a, "b"))
        for i in range(1, 21):
            assert i == await a.call("kv", "incr")
        proxy.cut()
        t_cut = time.monotonic()
        await until(lambda: _runs_here(a), timeout=15)
        took_over = time.monotonic() - t_cut
        assert 21 == await a.call("kv", "incr")
        async with otpy.connect("127.0.0.1", port) as direct:
            # b still runs its copy, cut off: what it is asked is not acknowledged
            with pytest.raises(otpy.OtpyError):
                await direct.call("kv", "incr", timeout=1.0)
        proxy.heal()
        await until(lambda: _logged(b.log, "cluster_duplicate_stopped"), timeout=15)
        await until(lambda: sees(a, "a", name="kv"))
        await until(lambda: _member_up(a, "b"))
        with pytest.raises(otpy.NoSuchServer):
            await a.call("kv@b", "get")
        assert 22 == await a.call("kv", "incr")
        assert "a" == await a.call("kv", "node")
        assert took_over < 10.0


async def _member_up(a: otpy.Node, node: str) -> bool:
    return "up" == dict((a.cluster_info() or {}).get("members", {})).get(node)


async def _runs_here(a: otpy.Node) -> bool:
    return "kv" in a.servers()


async def test_a_node_that_died_while_this_one_was_cut_off_is_taken_over(
        nats_server: NatsServer) -> None:
    """Node c runs kv and this node stands by; this node is cut off from NATS, and c
    dies meanwhile. Back, this node finds c's process gone and takes kv over (it had
    marked c down when it lost NATS, with no failover possible then; the watch resumes
    from its last revision, so nothing marks c up again first)."""
    cluster = cluster_name()
    proxy = _Proxy(nats_server.port)
    async with trio.open_nursery() as nursery, open_client(nats_server.url) as nc:
        await nursery.start(proxy.serve)
        js = JetStream(nc)
        nodes = await js.key_value(f"otpy-{cluster}-nodes")
        names = await js.key_value(f"otpy-{cluster}-names")
        # c: a member that runs kv (played by a bare client: it answers nothing)
        await nodes.put("c", msgpack.packb(("c", 1)))
        await names.put("kv", msgpack.packb(("c", 1)))
        c = nc.subscribe(f"otpy.{cluster}.node.c", lambda msg: None)
        await nc.flush()
        from cluster_node import DurableCounter

        service = otpy.Supervisor([otpy.Supervisor(
            [otpy.Child("kv", DurableCounter, scope="cluster")], name="svc",
            scope="cluster")])
        async with otpy.open_node(service, cluster=f"nats://127.0.0.1:{proxy.port}",
                                  cluster_name=cluster, node_name="b") as b:
            assert "standby" == b.which_children("svc")[0].status
            proxy.cut()
            await until(lambda: _member_is(b, "c", "down"))
            c.unsubscribe()  # c's process is gone, while b is cut off
            await nc.flush()
            await trio.sleep(0.3)
            proxy.heal()
            await until(lambda: _runs(b, "kv"), timeout=15)
            assert 1 == await b.call("kv", "incr")
        nursery.cancel_scope.cancel()


async def _member_is(node: otpy.Node, member: str, status: str) -> bool:
    return status == (node.cluster_info() or {}).get("members", {}).get(member)


async def _runs(node: otpy.Node, name: str) -> bool:
    return name in node.servers()

"""A cluster on NATS: names, calls, casts, pids and monitors across nodes.

The nodes of these tests run in one trio loop, each its own ``open_node`` with
``cluster=<url>`` of a real nats-server the ``nats_server`` fixture starts (and stops
by its pid). Faults with real processes (kill -9, a restarted server) are in
tests/test_cluster_faults.py.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

import otpy
from otpy._cluster.nats_client import open_client
from otpy._cluster.server import NatsServer

_clusters = itertools.count()


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "pid":
            return otpy.Reply(self.pid, state)
        if request == "crash":
            raise ValueError("boom")
        if request == "later":
            return otpy.NoReply(state)
        if request == "tuple":
            return otpy.Reply(("a", [1, 2], {"k": b"v"}), state)
        if request == "unsendable":
            return otpy.Reply(object(), state)
        return otpy.Reply(state + 1, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + message

    def handle_info(self, message: Any, state: int) -> int:
        return state + 100


class CounterV2(Counter):
    vsn = "2"

    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        return "incr" if request == "old incr" else request

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        return ("old", reply)


class Watcher(otpy.GenServer[list[Any]]):
    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        op, arg = request
        if op == "monitor":
            return otpy.Reply(self.monitor(arg), state)
        if op == "demonitor":
            return otpy.Reply(self.demonitor(arg), state)
        if op == "call":
            try:
                return otpy.Reply(self.call(arg, "incr"), state)
            except otpy.WouldBlock as exc:
                return otpy.Reply(("would block", str(exc)), state)
        if op == "cast":
            self.cast(arg, 5)
            return otpy.Reply(None, state)
        if op == "tick":
            self.send_after(0.01, arg, "tick")
            return otpy.Reply(None, state)
        return otpy.Reply(list(state), state)

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, message]


@asynccontextmanager
async def nodes(server: NatsServer, **trees: otpy.Supervisor) -> AsyncIterator[
        dict[str, otpy.Node]]:
    """One node per tree, named by its keyword, in one cluster of the test's own."""
    cluster = f"t{next(_clusters)}"
    opened: dict[str, otpy.Node] = {}

    async def open_all(names: list[str]) -> AsyncIterator[None]:
        if not names:
            yield
            return
        async with otpy.open_node(trees[names[0]], cluster=server.url, cluster_name=cluster,
                                  node_name=names[0]) as node:
            opened[names[0]] = node
            async for _ in open_all(names[1:]):
                yield

    async for _ in open_all(list(trees)):
        await settle(opened)
        yield opened


async def settle(nodes: dict[str, otpy.Node]) -> None:
    """Until every node sees every other (their KV watches delivered)."""
    with trio.fail_after(5):
        while any(len((n.cluster_info() or {})["members"]) < len(nodes)
                  for n in nodes.values()):
            await trio.sleep(0.01)


def tree(*children: otpy.Child) -> otpy.Supervisor:
    return otpy.Supervisor(list(children), max_restarts=100)


# -- names and calls -------------------------------------------------------------------


async def test_a_cluster_scoped_name_is_reached_from_every_node(
        nats_server: NatsServer) -> None:
    """A call or cast by name reaches the node that registered it; the reply comes in
    the shape it has in process (arrays as tuples)."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        assert 1 == await n["a"].call("kv", "incr")
        n["a"].cast("kv", 10)
        assert 12 == await n["a"].call("kv", "incr")
        assert ("a", (1, 2), {"k": b"v"}) == await n["a"].call("kv", "tuple")
        assert {"kv": "b"} == n["a"].cluster_info()["names"]  # type: ignore[index]


async def test_a_local_name_is_preferred_and_name_at_node_reaches_one_node(
        nats_server: NatsServer) -> None:
    """A call by name prefers the local server; ``name@node`` reaches one node's
    local server; local names stay local."""
    async with nodes(nats_server, a=tree(otpy.Child("c", Counter)),
                     b=tree(otpy.Child("c", Counter))) as n:
        assert 1 == await n["a"].call("c", "incr")
        assert 1 == await n["a"].call("c@b", "incr")
        assert 2 == await n["a"].call("c@b", "incr")
        assert 2 == await n["a"].call("c@a", "incr")
        assert 2 == n["b"].get_state("c")


async def test_nobody_serving_a_name_is_no_such_server_at_once(
        nats_server: NatsServer) -> None:
    """An unknown name, a name on a node that is not a member, or a cluster name whose
    server stopped: NoSuchServer, not a timeout."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", Counter, scope="cluster", restart="temporary"))
                     ) as n:
        with pytest.raises(otpy.NoSuchServer, match="none is registered in cluster"):
            await n["a"].call("nobody", "incr")
        with pytest.raises(otpy.NoSuchServer, match="node 'z' is not in cluster"):
            await n["a"].call("kv@z", "incr")
        with pytest.raises(otpy.NoSuchServer):
            n["a"].cast("nobody", 1)
        await n["b"].terminate_child("root", "kv")
        with trio.fail_after(2), pytest.raises(otpy.NoSuchServer):  # not after 60 s
            await n["a"].call("kv@b", "incr", timeout=60)


async def test_remote_calls_keep_local_errors_and_versioned_clients(
        nats_server: NatsServer) -> None:
    """A crash is ServerCrashed, a timeout CallTimeout, a reply msgpack cannot carry
    a clear error, and vsn= adapts the request and the reply on the serving node."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", CounterV2, scope="cluster"))) as n:
        with pytest.raises(otpy.ServerCrashed, match="boom"):
            await n["a"].call("kv", "crash")
        with pytest.raises(otpy.CallTimeout):
            await n["a"].call("kv", "later", timeout=0.2)
        with pytest.raises(otpy.RemoteError, match="Unsendable"):
            await n["a"].call("kv", "unsendable")
        with pytest.raises(TypeError, match="cannot be sent to another node"):
            await n["a"].call("kv", object())
        assert ("old", 1) == await n["a"].call("kv", "old incr", vsn="1")


async def test_pids_route_to_their_node(nats_server: NatsServer) -> None:
    """A pid from another node reaches its server; once that incarnation is gone, a
    call to it is NoSuchServer saying which pid holds the name now."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        pid = await n["a"].call("kv", "pid")
        assert isinstance(pid, otpy.Pid) and "b" == pid.node
        assert 1 == await n["a"].call(pid, "incr")
        with pytest.raises(otpy.ServerCrashed):
            await n["a"].call("kv", "crash")
        with pytest.raises(otpy.NoSuchServer, match=r"incarnation.*gone"):
            await n["a"].call(pid, "incr")


async def test_a_call_from_a_callback_to_another_node_would_block(
        nats_server: NatsServer) -> None:
    """self.call to a server of another node raises WouldBlock (it cannot answer within
    the step); self.cast and timers reach it."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        answer = await n["a"].call("w", ("call", "kv"))
        assert "would block" == answer[0] and "another node" in answer[1]
        await n["a"].call("w", ("cast", "kv"))
        await n["a"].call("w", ("tick", "kv"))
        with trio.fail_after(5):
            while n["b"].get_state("kv") != 105:
                await trio.sleep(0.01)


async def test_a_cluster_name_runs_once(nats_server: NatsServer) -> None:
    """A second start of a cluster-scoped name, on another node, fails naming the node
    that runs it; so does start_child."""
    async with nodes(nats_server, b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        with pytest.raises(otpy.StartFailed, match="registered by node 'b'"):
            async with otpy.open_node(tree(otpy.Child("kv", Counter, scope="cluster")),
                                      cluster=nats_server.url, node_name="c",
                                      cluster_name=n["b"].cluster_info()["cluster"]):
                pass  # pragma: no cover
        async with otpy.open_node(tree(), cluster=nats_server.url, node_name="d",
                                  cluster_name=n["b"].cluster_info()["cluster"]) as d:
            with pytest.raises(otpy.StartFailed, match="registered by node 'b'"):
                await d.start_child("root", otpy.Child("kv", Counter, scope="cluster"))


async def test_two_nodes_racing_for_a_name_one_wins(nats_server: NatsServer) -> None:
    """Nodes started at once with the same cluster-scoped name: exactly one runs it."""
    cluster = f"race{next(_clusters)}"
    outcomes: list[str] = []

    async def start(name: str, started: trio.Event) -> None:
        try:
            async with otpy.open_node(tree(otpy.Child("kv", Counter, scope="cluster")),
                                      cluster=nats_server.url, cluster_name=cluster,
                                      node_name=name):
                outcomes.append(f"{name} runs kv")
                started.set()
                await trio.sleep(0.5)
        except otpy.StartFailed:
            outcomes.append(f"{name} refused")

    async with trio.open_nursery() as nursery:
        for name in ("x", "y", "z"):
            nursery.start_soon(start, name, trio.Event())
    assert 1 == sum(o.endswith("runs kv") for o in outcomes)
    assert 2 == sum(o.endswith("refused") for o in outcomes)


# -- monitors ----------------------------------------------------------------------------


async def test_monitors_work_across_nodes(nats_server: NatsServer) -> None:
    """A monitor of a server of another node fires once with the reason (a crash's
    exception as a RemoteError); noproc at once for a name nothing serves there;
    demonitor cancels."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", Counter, scope="cluster"),
                            otpy.Child("other", Counter))) as n:
        ref = await n["a"].call("w", ("monitor", "kv"))
        gone = await n["a"].call("w", ("monitor", "ghost@b"))
        quiet = await n["a"].call("w", ("monitor", "other@b"))
        assert await n["a"].call("w", ("demonitor", quiet))
        await trio.sleep(0.1)
        with pytest.raises(otpy.ServerCrashed):
            await n["a"].call("kv", "crash")
        with pytest.raises(otpy.ServerCrashed):
            await n["a"].call("other@b", "crash")
        with trio.fail_after(5):
            while len(await n["a"].call("w", ("downs", None))) < 2:
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        downs = await n["a"].call("w", ("downs", None))
        assert [(gone, "noproc"), (ref, "ValueError: boom")] == sorted(
            [(d.ref, d.reason if isinstance(d.reason, str) else str(d.reason))
             for d in downs], key=lambda x: x[1] != "noproc")
        assert not n["b"]._rt.server("kv")._otpy_links


async def test_a_node_that_stops_in_order_tells_its_monitors(
        nats_server: NatsServer) -> None:
    """When a node stops in order, the monitors of its servers get their ServerDown
    with the reason its supervisor saw ("shutdown"), and calls in flight to it fail at
    once (a node that dies or is cut off gives "noconnection": test_cluster_faults)."""
    cluster = f"t{next(_clusters)}"
    async with otpy.open_node(tree(otpy.Child("w", Watcher)), cluster=nats_server.url,
                              cluster_name=cluster, node_name="a") as a:
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []
            async with otpy.open_node(tree(otpy.Child("kv", Counter, scope="cluster")),
                                      cluster=nats_server.url, cluster_name=cluster,
                                      node_name="b") as b:
                await settle({"a": a, "b": b})
                await a.call("w", ("monitor", "kv"))

                async def pending() -> None:
                    try:
                        await a.call("kv", "later", timeout=30)
                    except otpy.OtpyError as exc:
                        failures.append(exc)

                nursery.start_soon(pending)
                await trio.sleep(0.2)
        assert 1 == len(failures)
        assert isinstance(failures[0], otpy.ServerStopped | otpy.NoSuchServer)
        with trio.fail_after(5):
            while not await a.call("w", ("downs", None)):
                await trio.sleep(0.01)
        [down] = await a.call("w", ("downs", None))
        assert "shutdown" == down.reason


# -- what arrives from outside -------------------------------------------------------------


async def test_foreign_and_malformed_messages_are_dropped(
        nats_server: NatsServer, logs: list[dict[str, Any]]) -> None:
    """A payload that is not msgpack, a message of another cluster, a call with bad
    fields: dropped with an event (a request is answered BadRequest); the node serves
    on."""
    async with nodes(nats_server, b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        info = n["b"].cluster_info()
        assert info is not None
        subject = f"otpy.{info['cluster']}.node.b"
        async with open_client(nats_server.url) as nc:
            for payload in (b"\xc1 garbage", msgpack.packb(["otpy/1", "elsewhere", "ping"]),
                            msgpack.packb(["otpy/1", info["cluster"], "call", 1, 2, 3, 4]),
                            msgpack.packb([[[[[]]]]] * 3)):
                reply = await nc.request(subject, payload, timeout=2)
                assert reply.payload.startswith(b"\x92\x01")  # [1, ["BadRequest", ...]]
            nc.publish_nowait(f"otpy.{info['cluster']}.name.kv", b"\x00" * 1000)
            await nc.flush()
        assert 1 == await n["b"].call("kv", "incr")
    assert any(e["event"] == "cluster_message_dropped" for e in logs)


async def test_a_message_of_a_million_empty_maps_is_counted_not_built(
        nats_server: NatsServer, logs: list[dict[str, Any]]) -> None:
    """A 1 MB payload that msgpack would turn into a million dicts (~64 MB) is walked
    before it is decoded and dropped past 65,536 objects, with an event saying so; a
    reply nested deeper than 32 levels is refused as BadReply, never handed on."""
    from otpy._protocol import cluster as wire

    flood = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x80" * 1_000_000
    assert "65536 objects" in wire.decode("c", flood).reason  # type: ignore[union-attr]
    many = msgpack.packb([[{}] * 40_000] * 2)
    assert "more than 65536 objects" in wire.decode("c", many).reason  # type: ignore[union-attr]
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    ok, (kind, why) = wire.decode_reply(msgpack.packb([0, deep]))
    assert (False, "BadReply") == (ok, kind) and "deeper than 32" in why
    async with nodes(nats_server, b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        info = n["b"].cluster_info()
        assert info is not None
        async with open_client(nats_server.url) as nc:
            reply = await nc.request(f"otpy.{info['cluster']}.node.b", flood, timeout=5)
            assert reply.payload.startswith(b"\x92\x01")  # [1, ["BadRequest", ...]]
        assert 1 == await n["b"].call("kv", "incr")
    assert any(e["event"] == "cluster_message_dropped" and "65536" in str(e) for e in logs)


# -- failover ----------------------------------------------------------------------------


def service() -> otpy.Supervisor:
    """A cluster supervisor whose counter runs once in the cluster."""
    return otpy.Supervisor([otpy.Child("kv", Counter, scope="cluster")], name="svc",
                           scope="cluster")


async def test_a_cluster_supervisors_child_stands_by_and_takes_over(
        nats_server: NatsServer) -> None:
    """Under a cluster supervisor, a cluster-scoped child runs on the first node that
    registers it and stands by on the others; when its node goes, exactly one standby
    takes it over, and calls by name reach it there."""
    cluster = f"f{next(_clusters)}"

    def node(name: str) -> Any:
        return otpy.open_node(otpy.Supervisor([service()]), cluster=nats_server.url,
                              cluster_name=cluster, node_name=name)

    stop_a = trio.Event()

    async def run_a(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with node("a") as a:
            task_status.started(a)
            await stop_a.wait()

    async with trio.open_nursery() as nursery:
        a = await nursery.start(run_a)
        async with node("b") as b, node("c") as c:
            await settle({"a": a, "b": b, "c": c})
            assert ["kv"] == a.servers() and [] == b.servers() == c.servers()
            assert "standby" == c.which_children("svc")[0].status
            assert 1 == await c.call("kv", "incr")
            stop_a.set()  # a stops (in order: it gives its names up)
            with trio.fail_after(5):
                while not (b.servers() or c.servers()):
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            runs = [n for n in (b, c) if n.servers()]
            assert 1 == len(runs)
            stands = c if runs[0] is b else b
            assert "standby" == stands.which_children("svc")[0].status
            assert 1 == await stands.call("kv", "incr")  # a new incarnation, from init


class DurableCounter(Counter):
    durable = True


def pool() -> otpy.Supervisor:
    """An empty cluster supervisor, for children added with start_child."""
    return otpy.Supervisor([otpy.Supervisor([], name="pool", scope="cluster")],
                           max_restarts=100)


@asynccontextmanager
async def two_nodes_a_stoppable(server: NatsServer, cluster: str) -> AsyncIterator[
        tuple[otpy.Node, otpy.Node, trio.Event]]:
    """Nodes a and b with a pool each; setting the event stops a (in order)."""
    stop_a = trio.Event()

    async def run_a(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with otpy.open_node(pool(), cluster=server.url, cluster_name=cluster,
                                  node_name="a") as a:
            task_status.started(a)
            await stop_a.wait()

    async with trio.open_nursery() as nursery:
        a = await nursery.start(run_a)
        async with otpy.open_node(pool(), cluster=server.url, cluster_name=cluster,
                                  node_name="b") as b:
            await settle({"a": a, "b": b})
            yield a, b, stop_a
        stop_a.set()


async def until_status(node: otpy.Node, id: str, status: str | None) -> None:
    """Until child ``id`` of the pool has ``status`` on ``node`` (None: is gone)."""
    with trio.fail_after(5):
        while {c.id: c.status for c in node.which_children("pool")}.get(id) != status:
            await trio.sleep(0.01)


async def test_a_child_added_to_a_cluster_supervisor_fails_over(
        nats_server: NatsServer) -> None:
    """start_child under a cluster supervisor gives the child's spec to the other
    nodes: they stand by for it, and when its node goes, one of them runs it (from
    init: it is not durable)."""
    async with two_nodes_a_stoppable(nats_server, f"d{next(_clusters)}") as (a, b, stop_a):
        await a.start_child("pool", otpy.Child("w", Counter, 10, scope="cluster"))
        assert ["w"] == a.servers()
        await until_status(b, "w", "standby")
        assert [1, 2] == [await b.call("w", "incr"), await b.call("w", "incr")]
        stop_a.set()
        with trio.fail_after(5):
            while "w" not in b.servers():
                await trio.sleep(0.01)
        assert 1 == await b.call("w", "incr")


async def test_a_durable_child_added_to_a_cluster_supervisor_moves_with_its_state(
        nats_server: NatsServer) -> None:
    """A durable child added with start_child keeps its state in the cluster's store:
    the node that takes it over resumes it."""
    async with two_nodes_a_stoppable(nats_server, f"d{next(_clusters)}") as (a, b, stop_a):
        await a.start_child("pool", otpy.Child("w", DurableCounter, scope="cluster"))
        await until_status(b, "w", "standby")
        assert [1, 2, 3] == [await b.call("w", "incr") for _ in range(3)]
        stop_a.set()
        with trio.fail_after(5):
            while "w" not in b.servers():
                await trio.sleep(0.01)
        assert 4 == await b.call("w", "incr")


async def test_deleting_an_added_child_deletes_it_everywhere(
        nats_server: NatsServer) -> None:
    """delete_child of a child added under a cluster supervisor drops the standbys'
    specs and frees its name: another node may then start a child of that name."""
    async with two_nodes_a_stoppable(nats_server, f"d{next(_clusters)}") as (a, b, _):
        await a.start_child("pool", otpy.Child("w", Counter, scope="cluster"))
        await until_status(b, "w", "standby")
        await a.terminate_child("pool", "w")
        await a.delete_child("pool", "w")
        await until_status(b, "w", None)
        with trio.fail_after(5):
            while "w" in (b.cluster_info() or {})["names"]:
                await trio.sleep(0.01)
        await b.start_child("pool", otpy.Child("w", Counter, scope="cluster"))
        assert ["w"] == b.servers()
        await until_status(a, "w", "standby")


async def test_a_node_that_joins_later_stands_by_for_added_children(
        nats_server: NatsServer) -> None:
    """The specs already shared reach a node that joins after them, once its tree
    runs."""
    async with nodes(nats_server, a=pool()) as opened:
        a = opened["a"]
        await a.start_child("pool", otpy.Child("w", Counter, scope="cluster"))
        cluster = a.cluster_info()["cluster"]  # type: ignore[index]
        async with otpy.open_node(pool(), cluster=nats_server.url, cluster_name=cluster,
                                  node_name="c") as c:
            await until_status(c, "w", "standby")
            assert 1 == await c.call("w", "incr")


async def test_an_added_child_nobody_runs_is_started_by_the_next_node(
        nats_server: NatsServer) -> None:
    """A permanent child added under a cluster supervisor outlives the node that
    started it: when that node stops and another comes up later, the newcomer finds
    the spec with nobody running it, and starts it."""
    cluster = f"d{next(_clusters)}"
    async with otpy.open_node(pool(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="a") as a:
        await a.start_child("pool", otpy.Child("w", Counter, scope="cluster"))
    async with otpy.open_node(pool(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="c") as c:
        with trio.fail_after(5):
            while "w" not in c.servers():
                await trio.sleep(0.01)
        assert 1 == await c.call("w", "incr")


async def test_hostile_specs_are_refused_and_the_node_goes_on(
        nats_server: NatsServer, logs: list[dict[str, Any]]) -> None:
    """What another NATS client puts in the specs bucket is bounded like any message
    from another node: a million empty maps are refused before they are built, a class
    path that imports nothing and a spec of the wrong shape are refused; the node logs
    each and goes on serving."""
    from otpy._cluster.jetstream import JetStream

    async with nodes(nats_server, a=pool()) as opened:
        a = opened["a"]
        cluster = a.cluster_info()["cluster"]  # type: ignore[index]
        maps = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x80" * 1_000_000
        async with open_client(nats_server.url) as nc:
            specs = await JetStream(nc).key_value(f"otpy-{cluster}-specs", create=False)
            await specs.put("maps", maps)
            await specs.put("nomodule", msgpack.packb(
                (1, "pool", "no_such_module_here:Thing", None, "permanent", 5.0, None,
                 None, None)))
            await specs.put("shape", msgpack.packb(["not", "a", "spec"]))
            with trio.fail_after(5):
                while len([e for e in logs if e["event"] == "cluster_spec_refused"]) < 3:
                    await trio.sleep(0.01)
        refused = {e["name"]: e["reason"] for e in logs
                   if e["event"] == "cluster_spec_refused"}
        assert "refused before decoding" in refused["maps"]
        assert "no_such_module_here" in refused["nomodule"]
        assert "not an otpy child spec" in refused["shape"]
        await a.start_child("pool", otpy.Child("ok", Counter, scope="cluster"))
        assert 1 == await a.call("ok", "incr")
        assert ["ok"] == [c.id for c in a.which_children("pool")]


async def test_deleting_an_added_child_where_it_only_stands_by_keeps_it_elsewhere(
        nats_server: NatsServer) -> None:
    """delete_child on a node that only stands by for an added child drops that node's
    standby alone: the child goes on running where it runs, and the other standbys keep
    standing by for it."""
    async with nodes(nats_server, a=pool(), b=pool(), c=pool()) as opened:
        a, b, c = opened["a"], opened["b"], opened["c"]
        await a.start_child("pool", otpy.Child("w", Counter, scope="cluster"))
        await until_status(b, "w", "standby")
        await until_status(c, "w", "standby")
        await b.delete_child("pool", "w")
        await trio.sleep(0.3)
        assert ["w"] == a.servers()
        assert [] == b.which_children("pool")
        assert "standby" == {x.id: x.status for x in c.which_children("pool")}["w"]


async def test_a_refused_spec_changes_nothing_of_a_local_server_of_that_name(
        nats_server: NatsServer, tmp_path: Any) -> None:
    """A spec whose name a node uses for a local (durable) server is refused there,
    and that server's states stay in the node's own store."""
    cluster = f"r{next(_clusters)}"
    b_tree = otpy.Supervisor([otpy.Supervisor([], name="pool", scope="cluster"),
                              otpy.Child("cache", DurableCounter)], max_restarts=100)
    async with otpy.open_node(pool(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="a") as a, \
            otpy.open_node(b_tree, cluster=nats_server.url, cluster_name=cluster,
                           node_name="b", store=str(tmp_path / "b")) as b:
        assert 1 == await b.call("cache", "incr")
        await a.start_child("pool", otpy.Child("cache", DurableCounter, scope="cluster"))
        assert 1 == await a.call("cache", "incr")  # a's own: a reaches its local one
        await trio.sleep(0.3)  # b has seen the spec, and refused it
        assert b._cluster is not None and "cache" not in b._cluster.state_names
        assert [2, 3] == [await b.call("cache", "incr"), await b.call("cache", "incr")]
        assert "cache" in b.servers()


async def test_a_hostile_entry_in_the_names_bucket_is_ignored(
        nats_server: NatsServer) -> None:
    """A million empty maps (1 MB) written as a name's registration by another NATS
    client are refused before they are built; the node goes on serving its names."""
    from otpy._cluster.jetstream import JetStream

    async with nodes(nats_server, a=tree(otpy.Child("kv", Counter, scope="cluster"))
                     ) as opened:
        a = opened["a"]
        cluster = a.cluster_info()["cluster"]  # type: ignore[index]
        maps = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x80" * 1_000_000
        async with open_client(nats_server.url) as nc:
            names = await JetStream(nc).key_value(f"otpy-{cluster}-names", create=False)
            await names.put("evil", maps)
            await names.put("kv2", maps)
        await trio.sleep(0.2)
        assert {"kv": "a"} == a.cluster_info()["names"]  # type: ignore[index]
        assert 1 == await a.call("kv", "incr")
    from otpy._cluster.node import _unpack_pair

    with pytest.raises(ValueError, match="refused before decoding"):
        _unpack_pair(maps)  # counted, not built


async def test_a_child_the_other_nodes_cannot_rebuild_is_refused(
        nats_server: NatsServer) -> None:
    """A child whose class the other nodes cannot import by its path, or whose arg
    msgpack cannot carry, is refused before anything starts, saying why."""

    class Local(Counter):
        pass

    async with nodes(nats_server, a=pool()) as opened:
        a = opened["a"]
        with pytest.raises(TypeError, match="top level of a module"):
            await a.start_child("pool", otpy.Child("x", Local, scope="cluster"))
        with pytest.raises(TypeError, match="msgpack carries"):
            await a.start_child("pool", otpy.Child("y", Counter, object(), scope="cluster"))
        assert [] == a.servers() and [] == a.which_children("pool")
        assert {} == a.cluster_info()["names"]  # type: ignore[index]


# -- failure detection -------------------------------------------------------------------


@asynccontextmanager
async def fake_member(server: NatsServer, cluster: str, node: str) -> AsyncIterator[Any]:
    """A member ``node`` of ``cluster`` played by a bare NATS client: it takes its
    place in the members bucket and subscribes to its subject, and answers nothing."""
    from otpy._cluster.jetstream import JetStream

    async with open_client(server.url) as nc:
        nodes = await JetStream(nc).key_value(f"otpy-{cluster}-nodes")
        await nodes.put(node, msgpack.packb((node, 1)))
        sub = nc.subscribe(f"otpy.{cluster}.node.{node}", lambda msg: None)
        await nc.flush()
        yield sub


async def test_a_node_that_dies_with_a_probe_unanswered_is_down_at_once(
        nats_server: NatsServer) -> None:
    """A node that dies while a probe to it is on its way (it will never answer that
    one) is down at the next probe's "no responders", not after cut_after; the calls
    it held fail then with noconnection."""
    cluster = f"t{next(_clusters)}"
    async with otpy.open_node(tree(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="a") as a, \
            fake_member(nats_server, cluster, "b") as b:
        with trio.fail_after(5):
            while "b" not in a.cluster_info()["members"]:  # type: ignore[index]
                await trio.sleep(0.01)
        failures: list[BaseException] = []

        async def held() -> None:
            try:
                await a.call("kv@b", "incr", timeout=30)
            except otpy.OtpyError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held)
            await trio.sleep(0.2)  # a few probes are out, unanswered
            b.unsubscribe()  # its process is gone
            with trio.fail_after(2):  # cut_after is 5 s
                while a.cluster_info()["members"]["b"] != "down":  # type: ignore[index]
                    await trio.sleep(0.01)
        [failure] = failures
        assert isinstance(failure, otpy.ServerStopped) and "noconnection" == failure.reason
        assert "process is gone" in str(failure)


async def test_a_node_silent_for_cut_after_is_down(nats_server: NatsServer) -> None:
    """A node that keeps its subscription but answers no probe (frozen, or cut off
    without NATS noticing) is down once a probe has gone unanswered for cut_after."""
    cluster = f"t{next(_clusters)}"
    async with otpy.open_node(tree(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="a", cluster_options={"cut_after": 0.3}) as a, \
            fake_member(nats_server, cluster, "b"):
        with trio.fail_after(5):
            while "b" not in a.cluster_info()["members"]:  # type: ignore[index]
                await trio.sleep(0.01)
        start = trio.current_time()
        with trio.fail_after(3):  # NATS itself would drop a frozen client after 4 s
            while a.cluster_info()["members"]["b"] != "down":  # type: ignore[index]
                await trio.sleep(0.01)
        assert trio.current_time() - start >= 0.2


async def test_a_member_down_for_forget_after_is_forgotten(nats_server: NatsServer) -> None:
    """A member whose process is gone is down at once and, after forget_after, removed
    from the members bucket (so a node restarted under a new name is not probed for
    ever); a second node sees it go too."""
    from otpy._cluster.jetstream import JetStream

    cluster = f"t{next(_clusters)}"
    options = {"forget_after": 0.3}
    async with otpy.open_node(tree(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="a", cluster_options=options) as a, \
            otpy.open_node(tree(), cluster=nats_server.url, cluster_name=cluster,
                           node_name="c") as c:
        async with fake_member(nats_server, cluster, "b") as b:
            with trio.fail_after(5):
                while "b" not in a.cluster_info()["members"] or \
                        "b" not in c.cluster_info()["members"]:  # type: ignore[index]
                    await trio.sleep(0.01)
            b.unsubscribe()  # its process is gone
            with trio.fail_after(2):
                while a.cluster_info()["members"].get("b") != "down":  # type: ignore[index]
                    await trio.sleep(0.01)
            down_at = trio.current_time()
            with trio.fail_after(5):
                while "b" in a.cluster_info()["members"] or \
                        "b" in c.cluster_info()["members"]:  # type: ignore[index]
                    await trio.sleep(0.01)
            assert trio.current_time() - down_at >= 0.25
            async with open_client(nats_server.url) as nc:
                nodes = await JetStream(nc).key_value(f"otpy-{cluster}-nodes", create=False)
                assert await nodes.get("b") is None
                assert await nodes.get("a") is not None  # the living stay
        assert {"a", "c"} == set(c.cluster_info()["members"])  # type: ignore[index]


async def test_a_member_back_before_its_forget_runs_is_not_forgotten(
        nats_server: NatsServer) -> None:
    """The decision to forget a member and the delete are a task apart: a member whose
    new entry arrives between them (it came back) keeps it. Driven through the
    membership's own hooks, in the order the race takes."""
    from otpy._cluster.jetstream import JetStream, KvChange

    cluster = f"t{next(_clusters)}"
    async with otpy.open_node(tree(), cluster=nats_server.url, cluster_name=cluster,
                              node_name="a", cluster_options={"forget_after": 1000}) as a, \
            fake_member(nats_server, cluster, "b") as b:
        membership = a._cluster
        assert membership is not None
        with trio.fail_after(5):
            while membership.members.get("b") != "up":
                await trio.sleep(0.01)
        first = membership._member_revs["b"]
        b.unsubscribe()
        with trio.fail_after(5):
            while membership.members.get("b") != "down":
                await trio.sleep(0.01)
        async with open_client(nats_server.url) as nc:
            kv = await JetStream(nc).key_value(f"otpy-{cluster}-nodes", create=False)
            value = msgpack.packb(("b", 2))
            second = await kv.update("b", value, first)  # a new run of b
            membership._down_since["b"] = trio.current_time() - 5000
            membership._forget_down(trio.current_time())  # the probe loop: forget b
            membership._member_changed(KvChange("b", value, second, "PUT", 0))
            assert "up" == membership.members["b"]
            await trio.sleep(0.3)
            assert await kv.get("b") is not None, "b's new entry was deleted"


async def test_names_nats_could_not_take_after_a_reconnect_are_asserted_again(
        nats_server: NatsServer) -> None:
    """After a reconnect, a name whose assertion fails for want of NATS (JetStream not
    ready yet) is tried again, with a growing pause, until it is taken; it stays
    subscribed meanwhile."""
    from otpy._cluster.nats_client import NatsError

    async with nodes(nats_server, a=tree(otpy.Child("kv", Counter, scope="cluster")),
                     b=tree()) as opened:
        a, b = opened["a"], opened["b"]
        membership = a._cluster
        assert membership is not None
        register = membership.register
        tries: list[str] = []

        async def flaky(name: str, supervisor: str | None = None) -> None:
            tries.append(name)
            if len(tries) <= 2:
                raise NatsError("JetStream is not ready")
            await register(name, supervisor)

        membership.register = flaky  # type: ignore[method-assign]
        membership._on_reconnect()
        with trio.fail_after(5):
            while len(tries) < 3:
                assert 1 <= await b.call("kv", "incr")  # served throughout
                await trio.sleep(0.05)
        assert ["kv", "kv", "kv"] == tries
        await trio.sleep(1.0)
        assert 3 == len(tries)  # taken: no more tries


async def test_a_node_forgotten_while_alive_takes_its_place_again(
        nats_server: NatsServer) -> None:
    """A node whose entry the others removed while it lived (it was cut off for longer
    than forget_after) puts it back as soon as it sees it go, and the others see it up
    again."""
    from otpy._cluster.jetstream import JetStream

    async with nodes(nats_server, a=tree(otpy.Child("kv", Counter)), c=tree()) as opened:
        a, c = opened["a"], opened["c"]
        cluster = a.cluster_info()["cluster"]  # type: ignore[index]
        async with open_client(nats_server.url) as nc:
            kv = await JetStream(nc).key_value(f"otpy-{cluster}-nodes", create=False)
            entry = await kv.get("a")
            assert entry is not None
            await kv.delete("a", last_revision=entry.revision)
            with trio.fail_after(5):
                while True:
                    again = await kv.get("a")
                    if again is not None and again.revision > entry.revision:
                        break
                    await trio.sleep(0.02)
        with trio.fail_after(5):
            while c.cluster_info()["members"].get("a") != "up":  # type: ignore[index]
                await trio.sleep(0.01)
        assert 1 == await c.call("kv@a", "incr")


async def test_cluster_options_are_checked() -> None:
    """Unknown cluster options, durations that are not positive, a cut shorter than a
    probe, and options without a cluster are refused, saying which."""
    for options, error, match in (
            ({"cut": 1.0}, TypeError, r"unknown cluster option\(s\) \['cut'\]"),
            ({"cut_after": 0}, ValueError, "positive number"),
            ({"cut_after": "1"}, ValueError, "positive number"),
            ({"cut_after": 0.01}, ValueError, "longer than probe_interval")):
        with pytest.raises(error, match=match):
            async with otpy.open_node(tree(), cluster="nats://127.0.0.1:1",
                                      cluster_options=options):
                pass  # pragma: no cover
    with pytest.raises(TypeError, match="needs a cluster"):
        async with otpy.open_node(tree(), cluster_options={"cut_after": 1.0}):
            pass  # pragma: no cover


async def test_nodes_taking_over_a_dead_nodes_name_name_the_winner(
        nats_server: NatsServer) -> None:
    """A cluster name whose node is dead is taken over by one of the nodes that start
    it at once; the others' starts fail naming that node (not the dead one)."""
    from otpy._cluster.jetstream import JetStream

    cluster = f"race{next(_clusters)}"
    async with open_client(nats_server.url) as nc:
        names = await JetStream(nc).key_value(f"otpy-{cluster}-names")
        await names.put("kv", msgpack.packb(("dead", 1)))
    outcomes: dict[str, str] = {}

    async def start(name: str) -> None:
        try:
            async with otpy.open_node(tree(otpy.Child("kv", Counter, scope="cluster")),
                                      cluster=nats_server.url, cluster_name=cluster,
                                      node_name=name):
                outcomes[name] = "runs kv"
                await trio.sleep(0.5)
        except otpy.StartFailed as exc:
            outcomes[name] = str(exc)

    async with trio.open_nursery() as nursery:
        for name in ("x", "y", "z"):
            nursery.start_soon(start, name)
    [winner] = [name for name, outcome in outcomes.items() if outcome == "runs kv"]
    assert 2 * [f"the cluster-scoped name 'kv' is registered by node {winner!r} of "
                f"cluster {cluster!r}; it runs once in the cluster"] == [
        outcome for outcome in outcomes.values() if outcome != "runs kv"]


# -- what operators see ------------------------------------------------------------------


async def test_statistics_and_the_admin_table_show_the_cluster(
        nats_server: NatsServer) -> None:
    """A node in a cluster shows it in its statistics (members, where each name runs,
    calls in flight) and answers the admin operation "cluster"; a node in none does
    not, and answers None."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("kv", Counter, scope="cluster"))) as n:
        cluster = n["a"].cluster_info()["cluster"]  # type: ignore[index]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(n["a"].call, "kv", "later", timeout=0.5))
            await trio.sleep(0.1)
            expected = {"cluster": cluster, "node": "a", "members": {"a": "up", "b": "up"},
                        "names": {"kv": "b"}, "calls_in_flight": 1}
            assert expected == n["a"].statistics()["cluster"]
            assert expected == n["a"]._rt.admin("cluster", ())
            nursery.cancel_scope.cancel()
    async with otpy.open_node(tree()) as alone:
        assert "cluster" not in alone.statistics()
        assert alone._rt.admin("cluster", ()) is None


async def test_the_otpy_command_shows_the_cluster(
        nats_server: NatsServer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]) -> None:
    """``otpy cluster`` prints the members and whether each answers, and the node each
    cluster-scoped name runs on; ``otpy stats`` includes the cluster."""
    from otpy._cli import main

    monkeypatch.setenv("OTPY_COOKIE", "cluster-cookie")
    cluster = f"t{next(_clusters)}"
    opened = [otpy.open_node(tree(otpy.Child(f"s{i}", Counter, scope="cluster")),
                             cluster=nats_server.url, cluster_name=cluster,
                             node_name=name, admin=("127.0.0.1", 0))
              for i, name in enumerate(["alpha", "b"])]
    async with opened[0] as alpha, opened[1] as b:
        await settle({"alpha": alpha, "b": b})
        with trio.fail_after(5):
            while len(alpha.cluster_info()["names"]) < 2:  # type: ignore[index]
                await trio.sleep(0.01)
        where = ["--node", f"127.0.0.1:{alpha.admin_address[1]}"]  # type: ignore[index]
        capsys.readouterr()
        assert 0 == await trio.to_thread.run_sync(main, ["cluster", *where])
        assert [f"cluster {cluster}, as node alpha sees it",
                "members:",
                "  alpha  this node",
                "  b      answers",
                "cluster-scoped names: 2",
                "  s0  on alpha",
                "  s1  on b",
                "calls in flight to other nodes: 0"] == capsys.readouterr().out.splitlines()
        assert 0 == await trio.to_thread.run_sync(main, ["stats", *where])
        assert any(line.startswith('cluster: {"cluster": ')
                   for line in capsys.readouterr().out.splitlines())


async def test_monitoring_a_server_of_a_node_that_just_died_is_noconnection(
        nats_server: NatsServer) -> None:
    """A monitor set on a server of a node whose process is gone (before this node's
    probes noticed) fires noconnection, not noproc: the node, not the server, is
    missing."""
    cluster = f"t{next(_clusters)}"
    async with otpy.open_node(tree(otpy.Child("w", Watcher)), cluster=nats_server.url,
                              cluster_name=cluster, node_name="a") as a, \
            fake_member(nats_server, cluster, "b") as b:
        with trio.fail_after(5):
            while "b" not in a.cluster_info()["members"]:  # type: ignore[index]
                await trio.sleep(0.01)
        b.unsubscribe()  # its process is gone
        await b._client.flush()
        ref = await a.call("w", ("monitor", "kv@b"))
        with trio.fail_after(5):
            while not await a.call("w", ("downs", None)):
                await trio.sleep(0.01)
        [down] = await a.call("w", ("downs", None))
        assert (ref, "noconnection") == (down.ref, down.reason)


class Log(otpy.GenServer[list[Any]]):
    """Keeps every cast and call it gets, in the order it handles them."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        return otpy.Reply(len(state), [*state, request])

    def handle_cast(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, message]


async def test_one_senders_messages_to_a_remote_server_keep_their_order(
        nats_server: NatsServer) -> None:
    """Casts and calls from one node to a server of another are handled in the order
    sent (a call does not overtake the casts before it), each once."""
    async with nodes(nats_server, a=tree(otpy.Child("w", Watcher)),
                     b=tree(otpy.Child("log", Log, scope="cluster"))) as n:
        sent: list[Any] = []
        for i in range(300):
            if i % 50 == 49:
                sent.append(("call", i))
                await n["a"].call("log", ("call", i))
            else:
                sent.append(i)
                n["a"].cast("log", i)
        sent.append("last")
        assert 300 == await n["a"].call("log", "last")
        assert sent == n["b"].get_state("log")

"""Durable states the cluster shares (otpy._cluster.states): a JetStream KV bucket as an
``otpy.Store``, with its claim and fencing, against a real nats-server.

The store's writers here are ClusterStates objects (two of them play two nodes) or
whole nodes in the test's trio loop; failover with real processes killed and cut off
is in tests/test_cluster_faults.py.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio

import otpy
from otpy._cluster.jetstream import JetStream
from otpy._cluster.nats_client import Client, open_client
from otpy._cluster.server import NatsServer
from otpy._cluster.states import ClusterStates, key_of

_clusters = itertools.count()


def cluster_name() -> str:
    return f"st{next(_clusters)}"


@asynccontextmanager
async def writer(nc: Client, cluster: str, node: str, **options: Any
                 ) -> AsyncIterator[tuple[ClusterStates, list[tuple[int, Any]],
                                          list[str]]]:
    """A ClusterStates of ``node`` with its flusher running; yields it, the syncs it
    reported and the names it fenced."""
    states = await ClusterStates.open(nc, cluster, node=node, creation=1)
    for key, value in options.items():
        setattr(states, key, value)
    synced: list[tuple[int, Any]] = []
    fenced: list[str] = []
    states.on_synced(lambda seq, err: synced.append((seq, err)), lambda *a: None)
    states.on_fenced(lambda name, err: fenced.append(name))
    async with trio.open_nursery() as nursery:
        await nursery.start(states.run)
        yield states, synced, fenced
        nursery.cancel_scope.cancel()


async def synced_to(states: ClusterStates, seq: int) -> None:
    with trio.fail_after(10):
        while states.synced_seq < seq:
            await trio.sleep(0.005)


async def test_a_record_is_synced_once_jetstream_has_it_and_reads_back(
        nats_server: NatsServer) -> None:
    """put returns at once with a seq above synced_seq (the reply waits); once the
    publish is acknowledged synced_seq reaches it and the callback says so; another
    writer's claim reads the state back as recorded."""
    cluster = cluster_name()
    async with open_client(nats_server.url) as nc, writer(nc, cluster, "a") as (w, synced, _):
        assert await w.claim("counter") is None
        seqs = [w.put("counter", "m:C 1", {"n": i}) for i in range(100)]
        assert seqs == sorted(seqs) and w.synced_seq < seqs[-1]
        await synced_to(w, seqs[-1])
        assert synced and synced[-1] == (seqs[-1], None)
        assert 100 > w.statistics()["batches"]  # later states of a key replace earlier
        async with writer(nc, cluster, "b") as (other, _, _):
            stored = await other.claim("counter")
    assert stored is not None and ("m:C 1", {"n": 99}) == (stored.vsn, stored.state())


async def test_a_node_cut_off_is_fenced_when_another_claimed_its_server(
        nats_server: NatsServer) -> None:
    """Writer a records a server's state; writer b claims the server (a takeover);
    a's next state is refused by JetStream on the key's revision: a's key is fenced
    (its callback names the server), a later record of it raises StoreError, and the
    stored state is b's, not a's. A record a had queued for another server is synced
    all the same."""
    cluster = cluster_name()
    async with open_client(nats_server.url) as nc, \
            writer(nc, cluster, "a") as (a, _, a_fenced), \
            writer(nc, cluster, "b") as (b, _, _):
        await a.claim("x")
        await a.claim("y")
        await synced_to(a, a.put("x", "m:C 1", 1))
        assert 1 == (await b.claim("x")).state()  # type: ignore[union-attr]
        await synced_to(b, b.put("x", "m:C 1", 2))
        stale = a.put("x", "m:C 1", 100)
        other = a.put("y", "m:C 1", "kept")
        await synced_to(a, other)
        assert a.synced_seq >= stale
        assert ["x"] == a_fenced
        with pytest.raises(otpy.StoreError, match="another node runs 'x' now"):
            a.put("x", "m:C 1", 101)
        async with writer(nc, cluster, "c") as (c, _, _):
            assert 2 == (await c.claim("x")).state()  # type: ignore[union-attr]
            assert "kept" == (await c.claim("y")).state()  # type: ignore[union-attr]


async def test_a_publish_applied_but_not_acknowledged_is_not_a_fence(
        nats_server: NatsServer) -> None:
    """If a publish was applied but its ack lost (here: the writer forgets the
    revision it got), the next publish fails on the revision; the last value being
    this writer's own, it takes that revision and sends again, without fencing."""
    cluster = cluster_name()
    async with open_client(nats_server.url) as nc, \
            writer(nc, cluster, "a") as (a, _, fenced):
        await a.claim("x")
        await synced_to(a, a.put("x", "m:C 1", 1))
        a._rev[key_of("x")] -= 1  # as if the ack of that publish had never come
        await synced_to(a, a.put("x", "m:C 1", 2))
        assert [] == fenced
        async with writer(nc, cluster, "b") as (b, _, _):
            assert 2 == (await b.claim("x")).state()  # type: ignore[union-attr]


async def test_bounds_of_the_cluster_store(nats_server: NatsServer) -> None:
    """A state larger than the server's max_payload allows, or records beyond
    max_pending waiting for JetStream, are refused with a StoreError that says what to
    do, and nothing is recorded."""
    cluster = cluster_name()
    async with open_client(nats_server.url) as nc, \
            writer(nc, cluster, "a", max_pending=3) as (a, _, _):
        await a.claim("x")
        with pytest.raises(otpy.StoreError, match=r"max_payload"):
            a.put("x", "m:C 1", b"x" * (2 << 20))
        seq = a.put("x", "m:C 1", 1)
        a.put("x", "m:C 1", 2)
        a.put("x", "m:C 1", 3)
        if a.synced_seq < seq:  # the flusher has not run yet: 3 records wait
            with pytest.raises(otpy.StoreError, match="records wait"):
                a.put("x", "m:C 1", 4)
        await synced_to(a, a._seq)
        assert 3 == a.get("x").state()  # type: ignore[union-attr]


async def test_a_value_otpy_did_not_write_is_refused_at_start_and_left(
        nats_server: NatsServer, logs: list[dict[str, Any]]) -> None:
    """A hostile or foreign value under a server's key (not otpy's format) is given
    back as an error, not unpickled: the server does not start (one
    durable_state_refused event naming the key to delete), the value stays, and the
    node runs its other servers."""
    cluster = cluster_name()
    async with open_client(nats_server.url) as nc:
        kv = await JetStream(nc).key_value(f"otpy-{cluster}-states")
        await kv.put(key_of("kv"), msgpack.packb([1, "x/1", 1, "t", pickle.dumps(0)]) +
                     b"\xc1garbage")
    root = otpy.Supervisor([
        otpy.Supervisor([otpy.Child("kv", Counter, scope="cluster")], name="svc",
                        scope="cluster"),
        otpy.Child("plain", Counter, durable=False)])
    async with otpy.open_node(root, cluster=nats_server.url, cluster_name=cluster,
                              node_name="a") as node:
        assert ["plain"] == node.servers()
    [refused] = [e for e in logs if e["event"] == "durable_state_refused"]
    assert "kv" == refused["server"] and key_of("kv") in refused["error"]


class Counter(otpy.GenServer[int]):
    vsn = "1"
    durable = True

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        return otpy.Reply(state, state)


def service() -> otpy.Supervisor:
    return otpy.Supervisor([
        otpy.Supervisor([otpy.Child("kv", Counter, scope="cluster")], name="svc",
                        scope="cluster"),
        otpy.Child("local", Counter)])


async def test_a_durable_cluster_server_moves_with_its_state(
        nats_server: NatsServer, tmp_path: Any) -> None:
    """A durable cluster-scoped counter under a cluster supervisor keeps its state in
    the cluster's bucket: when its node stops, the standby that takes it over resumes
    from the last count; the nodes' local durable servers keep theirs in their own
    local stores."""
    cluster = cluster_name()

    def node(name: str) -> Any:
        return otpy.open_node(service(), cluster=nats_server.url, cluster_name=cluster,
                              node_name=name, store=tmp_path / name)

    stop_a = trio.Event()

    async def run_a(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with node("a") as a:
            task_status.started(a)
            await stop_a.wait()

    async with trio.open_nursery() as nursery:
        a = await nursery.start(run_a)
        async with node("b") as b:
            with trio.fail_after(10):
                while (b.cluster_info() or {}).get("names", {}).get("kv") != "a":
                    await trio.sleep(0.01)
            for i in range(1, 51):
                assert i == await b.call("kv", "incr")
            assert 1 == await b.call("local", "incr")
            assert a.statistics()["store"]["cluster"]["records"] >= 50
            stop_a.set()
            with trio.fail_after(10):
                while "kv" not in b.servers():
                    await trio.sleep(0.01)
            assert 51 == await b.call("kv", "incr")
            assert 2 == await b.call("local", "incr")

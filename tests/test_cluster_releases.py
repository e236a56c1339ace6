"""Cluster-wide releases: one upgrade or downgrade for every node, all or none.

Three nodes in one trio loop, in one cluster on a real nats-server (the ``nats_server``
fixture), run counters from examples/releases; the releases are the example's release
files (their code travels through JetStream's object store) or ones the tests write.
Faults with real processes (a node killed mid-prepare or mid-commit) are in
tests/test_cluster_faults.py.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio

import otpy
from otpy._cli import main as otpy_main
from otpy._cluster.nats_client import open_client
from otpy._cluster.server import NatsServer

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
sys.path.insert(0, str(RELEASES))

from counter_v1 import Counter  # noqa: E402

_clusters = itertools.count()


def tree(node: str) -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child(f"c1{node}", Counter),
                            otpy.Child(f"c2{node}", Counter)], max_restarts=100)


@asynccontextmanager
async def cluster(server: NatsServer, *names: str) -> AsyncIterator[dict[str, otpy.Node]]:
    name = f"r{next(_clusters)}"
    async with AsyncExitStack() as stack:
        nodes = {n: await stack.enter_async_context(otpy.open_node(
            tree(n), cluster=server.url, cluster_name=name, node_name=n)) for n in names}
        with trio.fail_after(5):
            while any(len(node.cluster_info()["members"]) < len(nodes)  # type: ignore[index]
                      for node in nodes.values()):
                await trio.sleep(0.01)
        yield nodes


def vsns(nodes: dict[str, otpy.Node]) -> set[str]:
    return {n.vsn_of(s) for n in nodes.values() for s in n.servers()}


async def test_a_release_and_its_downgrade_reach_every_node_under_load(
        nats_server: NatsServer) -> None:
    """Clients on every node call counters on every node while the cluster upgrades and
    downgrades: every node moves, no call fails or is lost, every count is kept."""
    async with cluster(nats_server, "a", "b", "c") as nodes:
        acked: dict[str, int] = {}
        stop = trio.Event()

        async def client(node: otpy.Node, target: str) -> None:
            while not stop.is_set():
                assert "ok" == await node.call(target, "incr")
                acked[target] = acked.get(target, 0) + 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for here in nodes.values():
                for there in nodes:
                    nursery.start_soon(client, here, f"c1{there}@{there}")
            await trio.sleep(0.2)
            report = await nodes["a"].upgrade(otpy.Release.load(RELEASES / "v2.toml"),
                                              cluster=True)
            assert {"a", "b", "c"} == set(report["nodes"])
            assert {"2"} == vsns(nodes)
            await trio.sleep(0.2)
            await nodes["b"].downgrade(cluster=True)
            assert {"1"} == vsns(nodes)
            await trio.sleep(0.2)
            stop.set()
        for target, count in acked.items():
            name, _, node = target.partition("@")
            assert count == nodes[node].get_state(name)
        assert [] == nodes["c"].releases()  # upgraded, then taken back


FUSSY = textwrap.dedent(
    """
    from typing import Any
    import otpy

    class Counter(otpy.GenServer[tuple[int, int]]):
        vsn = "2f"

        def init(self, arg: Any) -> tuple[int, int]:
            return (0, 0)

        def handle_call(self, request, caller, state):
            return otpy.Reply("ok", (state[0], state[1] + 1))

        def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
            if self.name == "c2b":
                raise ValueError("c2b will not move")
            return (state, state)
    """
)


def fussy_release(directory: Path) -> otpy.Release:
    (directory / "fussy_v2.py").write_text(FUSSY)
    (directory / "fussy.toml").write_text(
        'vsn = "2f"\ncode = "."\n[[updates]]\ntarget = "counter_v1:Counter"\n'
        'new = "fussy_v2:Counter"\n')
    return otpy.Release.load(directory / "fussy.toml")


async def test_one_failing_server_on_one_node_changes_nothing_anywhere(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """A code_change that fails on one server of one node: the release aborts on every
    node, every server keeps its code and state, and the error names the node and the
    server."""
    async with cluster(nats_server, "a", "b", "c") as nodes:
        for node in nodes.values():
            for s in node.servers():
                await node.call(s, "incr")
        with pytest.raises(otpy.UpgradeFailed, match=r"node b.*c2b.*will not move") as info:
            await nodes["c"].upgrade(fussy_release(tmp_path), cluster=True)
        assert "node b" in info.value.failures
        assert {"1"} == vsns(nodes)
        assert {1} == {n.get_state(s) for n in nodes.values() for s in n.servers()}
        assert [] == nodes["a"].releases()


async def test_a_node_that_starts_later_comes_up_on_the_clusters_release(
        nats_server: NatsServer) -> None:
    """A node that joins after a release was installed applies it before it serves."""
    async with cluster(nats_server, "a", "b") as nodes:
        await nodes["a"].upgrade(otpy.Release.load(RELEASES / "v2.toml"), cluster=True)
        name = nodes["a"].cluster_info()["cluster"]  # type: ignore[index]
        async with otpy.open_node(tree("d"), cluster=nats_server.url, cluster_name=name,
                                  node_name="d") as d:
            assert "2" == d.vsn_of("c1d")
            assert ["2"] == [r.vsn for r in d.releases()]


async def test_a_release_made_in_python_cannot_travel(nats_server: NatsServer) -> None:
    """A cluster-wide release needs its files (its code travels): one built from
    classes in Python is refused, saying so."""
    from counter_v2 import Counter as CounterV2

    async with cluster(nats_server, "a") as nodes:
        with pytest.raises(otpy.UpgradeFailed, match="must be loaded from its files"):
            await nodes["a"].upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]),
                                     cluster=True)


async def test_a_call_from_a_node_a_release_ahead_waits_for_the_commit(
        nats_server: NatsServer) -> None:
    """A call that says its sender already applied a release this node has not is held
    until this node commits that release too (no call meets a peer one release
    behind)."""
    async with cluster(nats_server, "a", "b") as nodes:
        info = nodes["b"].cluster_info()
        assert info is not None
        call = msgpack.packb(["otpy/1", info["cluster"], "call", "c1b", "count", None, 5.0,
                              1], use_bin_type=True)
        async with open_client(nats_server.url) as nc:
            replies: list[bytes] = []

            async def ask() -> None:
                replies.append((await nc.request(f"otpy.{info['cluster']}.node.b", call,
                                                 timeout=10)).payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(0.3)
                assert [] == replies  # held: b is at level 0
                await nodes["a"].upgrade(otpy.Release.load(RELEASES / "v2.toml"),
                                         cluster=True)
            assert [msgpack.packb([0, 0])] == replies


def test_the_command_upgrades_and_downgrades_a_cluster(
        nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    """``otpy upgrade FILE --cluster URL`` and ``otpy downgrade --cluster URL`` act on
    every node, from outside the cluster."""

    async def scenario() -> None:
        async with cluster(nats_server, "a", "b") as nodes:
            name = nodes["a"].cluster_info()["cluster"]  # type: ignore[index]
            args = ["--cluster", nats_server.url, "--cluster-name", name]
            code = await trio.to_thread.run_sync(
                otpy_main, ["upgrade", str(RELEASES / "v2.toml"), *args])
            assert 0 == code
            await trio.sleep(0.1)
            assert {"2"} == vsns(nodes)
            assert 0 == await trio.to_thread.run_sync(otpy_main, ["downgrade", *args])
            await trio.sleep(0.1)
            assert {"1"} == vsns(nodes)

    trio.run(scenario)
    out = capsys.readouterr().out
    assert "release 2 installed on 2 nodes" in out
    assert "release 2 taken back on 2 nodes" in out

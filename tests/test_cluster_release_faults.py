"""Cluster-wide releases when a node dies: killed while it prepares, the release aborts
everywhere; killed after it voted (mid-commit), the others commit and the killed node,
started again, comes up on the committed release.

Nodes b and c are real processes (``otpy.run`` with ``cluster=``), signalled and
stopped by their pids; node a runs in the test and coordinates; the nats-server is the
real one of the ``nats_server`` fixture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import otpy
from otpy._cluster.server import NatsServer

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
sys.path.insert(0, str(RELEASES))

from counter_v1 import Counter  # noqa: E402

NODE = textwrap.dedent(
    """
    import logging, sys
    import structlog, trio, otpy
    sys.path.insert(0, sys.argv[1])
    from counter_v1 import Counter

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    url, cluster, name = sys.argv[2:5]

    async def main(node):
        print("READY", flush=True)
        await trio.sleep_forever()

    otpy.run(otpy.Supervisor([otpy.Child(f"c1{name}", Counter)]), main, cluster=url,
             cluster_name=cluster, node_name=name)
    """
)

# A release whose code_change takes its time on node c (the test stops or kills c
# while it prepares), and is otherwise counter_v2's.
SLOW = textwrap.dedent(
    """
    import time
    from typing import Any
    import otpy

    class Counter(otpy.GenServer[tuple[int, int]]):
        vsn = "2s"
        step_timeout = 30.0

        def init(self, arg: Any) -> tuple[int, int]:
            return (0, 0)

        def handle_call(self, request, caller, state):
            if request == "reset":
                return otpy.Reply("ok", (state[0], 0))
            return otpy.Reply("ok", (state[0], state[1] + 1))

        def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
            if self.name == "c1c":
                time.sleep(1.0)
            return (state, state)

        def upgrade_request(self, client_vsn: str, request: Any) -> Any:
            return request

        def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
            return reply
    """
)


@contextmanager
def node_process(server: NatsServer, cluster: str, name: str) -> Iterator[
        subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", NODE, str(RELEASES), server.url,
                             cluster, name], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(100):
            if proc.stdout.readline().strip() == "READY":
                break
        else:  # pragma: no cover
            raise AssertionError(f"node {name} never said READY")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def slow_release(directory: Path) -> otpy.Release:
    (directory / "slow_v2.py").write_text(SLOW)
    (directory / "slow.toml").write_text('vsn = "2s"\ncode = "."\n[[updates]]\n'
                                         'target = "counter_v1:Counter"\n'
                                         'new = "slow_v2:Counter"\n')
    return otpy.Release.load(directory / "slow.toml")


async def members(node: otpy.Node, count: int) -> None:
    with trio.fail_after(10):
        while len([s for s in node.cluster_info()["members"].values()  # type: ignore[index]
                   if s == "up"]) < count:
            await trio.sleep(0.02)


async def runs_v2(node: otpy.Node, address: str) -> bool:
    """Version 2s answers "reset"; version 1 crashes on it."""
    try:
        return "ok" == await node.call(address, "reset")
    except otpy.ServerCrashed:
        return False


@pytest.mark.parametrize("when", ["prepare", "commit"])
async def test_a_node_killed_during_a_cluster_release(
        nats_server: NatsServer, tmp_path: Path, when: str) -> None:
    """Killed while it prepares: the release aborts on every node. Killed after it
    voted: the others commit, and the node, started again, comes up on the release."""
    cluster = f"k{when}"
    root = otpy.Supervisor([otpy.Child("c1a", Counter)])
    release = slow_release(tmp_path)
    async with otpy.open_node(root, cluster=nats_server.url, cluster_name=cluster,
                              node_name="a") as a:
        with node_process(nats_server, cluster, "b"), \
                node_process(nats_server, cluster, "c") as c:
            await members(a, 3)
            state = a._cluster.releases.state
            outcome: list[Any] = []

            async def upgrade() -> None:
                try:
                    outcome.append(await a.upgrade(release, cluster=True))
                except otpy.UpgradeFailed as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upgrade)
                with trio.fail_after(20):
                    if when == "prepare":
                        # b has voted; c is in its slow code_change: kill it there.
                        while len(state.votes.get(state.next_number() - 1, {})) < 1:
                            await trio.sleep(0.01)
                        os.kill(c.pid, signal.SIGKILL)
                    else:
                        # c has voted: stop it before it can commit, then kill it.
                        while "c" not in state.votes.get(state.next_number() - 1, {}):
                            await trio.sleep(0.01)
                        os.kill(c.pid, signal.SIGSTOP)
                        while not outcome:
                            await trio.sleep(0.01)
                        os.kill(c.pid, signal.SIGKILL)
            [result] = outcome
            if when == "prepare":
                assert isinstance(result, otpy.UpgradeFailed)
                assert "node c" in str(result) and "down" in str(result)
                assert not await runs_v2(a, "c1a")
                assert not await runs_v2(a, "c1b@b")
            else:
                assert isinstance(result, dict), result
                assert await runs_v2(a, "c1a") and await runs_v2(a, "c1b@b")
        if when == "commit":
            with node_process(nats_server, cluster, "c"):
                await members(a, 2)
                with trio.fail_after(10):
                    while a.cluster_info()["members"].get("c") != "up":  # type: ignore[index]
                        await trio.sleep(0.02)
                assert await runs_v2(a, "c1c@c")  # it came up on the committed release

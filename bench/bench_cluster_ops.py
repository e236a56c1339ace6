"""Cluster operations: a cluster-wide upgrade of 3 nodes x N servers under load, and the
failover of K cluster-scoped servers after their node is killed.

Every node is a real process (``otpy.run`` with ``cluster=``) on a nats-server this
bench starts and stops by its pid. The upgrade is coordinated from this process, as the
``otpy`` command does (``--cluster URL``); clients inside every node call servers on
every node throughout and report their worst call latency (the stall) and their
failures. Prints JSON lines (see _common.py).

    python bench/bench_cluster_ops.py [servers per node] [failover servers]
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import trio
from _common import emit, python_info, quiet_logging

import otpy
from otpy._cluster.releases import release_from_outside
from otpy._cluster.server import start_server_blocking
from otpy._protocol.release_bundle import encode_bundle
from otpy._release_files import read_bundle

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"

NODE = textwrap.dedent(
    """
    import json, logging, random, signal, sys, time
    import structlog, trio, otpy
    sys.path.insert(0, sys.argv[1])
    from counter_v1 import Counter

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    url, cluster, name, n, peers = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), \\
        sys.argv[6].split(",")

    async def main(node):
        stats = {"calls": 0, "failed": 0, "stall_ms": 0.0, "errors": {}}
        with trio.fail_after(30):  # every peer is a member before the clients start
            while len(node.cluster_info()["members"]) < len(peers):
                await trio.sleep(0.01)
        print("READY", flush=True)
        async def client(k):
            rnd = random.Random(k)
            while True:
                peer = rnd.choice(peers)
                target = f"{peer}{rnd.randrange(n)}@{peer}"
                t0 = time.perf_counter()
                try:
                    assert "ok" == await node.call(target, "incr", timeout=10)
                    stats["calls"] += 1
                except otpy.OtpyError as exc:
                    stats["failed"] += 1
                    kind = type(exc).__name__
                    stats["errors"][kind] = stats["errors"].get(kind, 0) + 1
                stats["stall_ms"] = max(stats["stall_ms"], (time.perf_counter() - t0) * 1e3)
        # SIGUSR1: report what the clients saw since the last report, and go on.
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                for k in range(4):
                    nursery.start_soon(client, k)
                async for _ in signals:
                    print("STATS " + json.dumps(stats), flush=True)
                    stats.update(calls=0, failed=0, stall_ms=0.0, errors={})

    otpy.run(otpy.Supervisor([otpy.Child(f"{name}{i}", Counter) for i in range(n)]), main,
             cluster=url, cluster_name=cluster, node_name=name)
    """
)

STANDBY = textwrap.dedent(
    """
    import logging, sys, time
    import structlog, trio, otpy
    sys.path.insert(0, sys.argv[1])
    from counter_v1 import Counter

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    url, cluster, name, k = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    durable = sys.argv[6] == "durable"

    async def main(node):
        for server in node.servers():  # a state to resume from, recorded
            await node.call(server, "incr")
        print("READY", flush=True)
        while len(node.servers()) < k:
            await trio.sleep(0.002)
        # Every server runs here (CLOCK_MONOTONIC is the machine's: comparable).
        print(f"ALL {time.monotonic()}", flush=True)
        await trio.sleep_forever()

    svc = otpy.Supervisor([otpy.Child(f"s{i}", Counter, scope="cluster", durable=durable)
                           for i in range(k)],
                          name="svc", scope="cluster", max_restarts=10_000)
    otpy.run(otpy.Supervisor([svc]), main, cluster=url, cluster_name=cluster,
             node_name=name)
    """
)


def start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, str(RELEASES), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    assert proc.stdout is not None
    for _ in range(200):
        if proc.stdout.readline().strip() == "READY":
            return proc
    proc.kill()
    raise SystemExit(f"a node ({proc.args}) did not start")


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return ready(start(script, *args))


def report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop a node's clients and read what they saw."""
    proc.send_signal(signal.SIGUSR1)
    assert proc.stdout is not None
    for _ in range(1000):
        line = proc.stdout.readline()
        if line.startswith("STATS "):
            stats: dict[str, Any] = json.loads(line[6:])
            return stats
        if not line:
            break
    return {}


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)


def upgrade(url: str, per_node: int) -> None:
    nodes = ["a", "b", "c"]
    procs = [start(NODE, url, "up", n, str(per_node), ",".join(nodes)) for n in nodes]
    for proc in procs:
        ready(proc)
    try:
        time.sleep(0.5)  # clients warm
        [report(p) for p in procs]
        time.sleep(1.0)  # the same load, no release: the baseline stall
        base = [report(p) for p in procs]
        bundle = encode_bundle(read_bundle(RELEASES / "v2.toml"))

        async def run() -> tuple[float, float, list[dict[str, Any]], list[dict[str, Any]]]:
            t0 = time.perf_counter()
            report_ = await release_from_outside(url, "up", bundle)
            t1 = time.perf_counter()
            assert report_["servers"], report_
            up = [report(p) for p in procs]
            await trio.sleep(0.5)
            [report(p) for p in procs]
            t2 = time.perf_counter()
            await release_from_outside(url, "up", None)
            t3 = time.perf_counter()
            down = [report(p) for p in procs]
            return (t1 - t0) * 1e3, (t3 - t2) * 1e3, up, down

        up_ms, down_ms, up_stats, down_stats = trio.run(run)
    finally:
        for p in procs:
            stop(p)
    stats = up_stats + down_stats
    stall = max(s.get("stall_ms", float("nan")) for s in up_stats)
    down_stall = max(s.get("stall_ms", float("nan")) for s in down_stats)
    failed = sum(s.get("failed", 0) for s in stats)
    calls = sum(s.get("calls", 0) for s in stats)
    errors: dict[str, int] = {}
    for s in stats:
        for kind, n in s.get("errors", {}).items():
            errors[kind] = errors.get(kind, 0) + n
    emit(f"cluster_upgrade_3x{per_node}", up_ms, "ms", downgrade_ms=round(down_ms, 1),
         worst_stall_ms=round(stall, 1), downgrade_stall_ms=round(down_stall, 1),
         calls=calls, failed=failed, errors=errors,
         baseline_stall_ms=round(max(b.get("stall_ms", 0.0) for b in base), 1),
         what=f"upgrade then downgrade of 3 nodes x {per_node:,} servers, 4 clients per "
              f"node calling across nodes")


def line_within(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first line ``proc`` prints that starts with ``prefix``, within ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if line.startswith(prefix):
                    return line
                if not line:
                    break
    raise SystemExit(f"no {prefix!r} line from {proc.args!r} within {timeout} s")


def failover(url: str, count: int, durable: bool) -> None:
    """Two nodes of ``count`` cluster-scoped servers: x runs them, y stands by. x is
    killed: how long until every one of them runs on y (durable: each resumed from
    the state x recorded, claimed from the cluster's store)."""
    cluster = f"fo{'d' if durable else 'p'}{count}"
    mode = "durable" if durable else "plain"
    first = spawn(STANDBY, url, cluster, "x", str(count), mode)
    second = spawn(STANDBY, url, cluster, "y", str(count), mode)
    try:
        time.sleep(0.5)  # y has seen x's names
        t0 = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        took = (float(line_within(second, "ALL ", 60).split()[1]) - t0) * 1e3
    finally:
        first.kill()
        first.wait()
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=60)
    emit(f"cluster_failover{'_durable' if durable else ''}_{count}", took, "ms",
         what=f"{count:,} cluster-scoped{' durable' if durable else ''} servers running on "
              f"the survivor after SIGKILL of their node (bound: 2 s)")


def durable_calls(url: str, seconds: float = 2.0, callers: int = 64) -> None:
    """Calls per second to a cluster-scoped counter from ``callers`` concurrent callers
    on its own node: durable (each reply held until JetStream acknowledged the state)
    beside the same counter not durable, measured in the same run."""
    sys.path.insert(0, str(RELEASES))
    from counter_v1 import Counter  # type: ignore[import-not-found]

    async def rate(durable: bool) -> float:
        svc = otpy.Supervisor([otpy.Child("c", Counter, scope="cluster", durable=durable)],
                              name="svc", scope="cluster")
        async with otpy.open_node(otpy.Supervisor([svc]), cluster=url,
                                  cluster_name=f"dc{int(durable)}", node_name="n") as node:
            done = 0
            stop = time.perf_counter() + seconds

            async def caller() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    await node.call("c", "incr")
                    done += 1

            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(caller)
            return done / seconds

    plain = trio.run(rate, False)
    durable = trio.run(rate, True)
    emit("cluster_durable_call_ratio", durable / plain, "x", durable_per_s=round(durable),
         plain_per_s=round(plain),
         what=f"calls/s to a cluster-scoped counter, durable in the cluster's store vs "
              f"not, {callers} callers on its node")


def main() -> None:
    quiet_logging()
    per_node = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
    emit("cluster_ops_info", 0, "-", **python_info())
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server_blocking(workdir=Path(tmp) / "nats")
        try:
            upgrade(server.url, per_node)
            failover(server.url, count, durable=False)
            failover(server.url, count, durable=True)
            durable_calls(server.url)
        finally:
            server.stop()


if __name__ == "__main__":
    main()

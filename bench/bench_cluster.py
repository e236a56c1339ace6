"""The cluster's speed: remote calls against bare NATS request/reply, two nodes on two
cores against one, local calls of a clustered node against an unclustered one, and how
soon a monitor hears of a node killed with SIGKILL (issue #15).

Every measurement runs in fresh processes against one nats-server that this script
starts (JetStream on, 127.0.0.1, a temporary directory) and stops by its pid:

- ``remote_seq`` / ``remote_c64``: node A (the measuring process) calls ``echo`` on
  node B (a process of its own, started once), ``await node.call("echo", payload)``
  with a 16-byte payload, one at a time and from 64 tasks. Beside it ``bare_seq`` /
  ``bare_c64``: the same client and server with no otpy on either end, a requester
  ``await nc.request(subject, payload)`` against a responder process that publishes
  each payload back (bench_nats.py's ``otpy`` echo). Each process also reads the
  other end's CPU time from /proc, so CPU per call is reported for both ends.
- ``aggregate``: 64 counters and 64 client tasks. One node: an unclustered node in one
  process holds all 64 counters, and its 64 tasks call them in turn. Two nodes: two
  processes in one cluster, each holds 32 counters (``scope="cluster"``) and runs 32
  tasks that call the counters of its own shard by name (as a sharded service does: a
  client is routed to the node that owns its key). The figure is calls/s summed over
  the nodes, all started together by a "go" and each measuring the same window. With
  it, the CPU seconds the nodes used per second of the window (``cores_used``: 2.0
  when both had a core of their own) and calls per CPU second, whose ratio says what
  the cluster costs each call whatever the machine's other load. Also measured, as
  information: ``any`` - each task calls any of the 64 counters, so half of the calls
  cross to the other node.
- ``local``: ``await node.call`` (sequential) and ``self.call`` (from inside a
  callback) of a node in a cluster whose other member (node B) it probes every 50 ms
  and whose KV buckets it watches, against an unclustered node: bench_node.py's
  ``call_rate`` and ``self_call_rate``, each variant in a fresh process per round;
  also per CPU second of the node's process (the loops are CPU-bound: that figure
  leaves out the time other processes took the core, and keeps the cluster's
  background work, which runs on the same loop).
- ``monitor``: node A monitors a server of node B (a fresh process per sample); B is
  killed with SIGKILL at a random point of A's probe cycle; the time from the kill to
  A's ``ServerDown(..., "noconnection")`` and to the failure of a call B held.

Rates are the best round (rounds are interleaved), ratios best over best with the
median of per-round pairs beside. The machine is small and shared: read ranges.

    python bench/bench_cluster.py            # JSON lines, about 90 s
    python bench/bench_cluster.py --remote   # remote calls against bare NATS only
    python bench/bench_cluster.py --profile [CONCURRENCY]   # cProfile of both ends
"""

from __future__ import annotations

import cProfile
import io
import itertools
import json
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import clock, emit, percentile, python_info, quiet_logging
from bench_nats import PAYLOAD, SUBJECT, drive_trio, otpy_responder

import otpy
from otpy._cluster.nats_client import open_client
from otpy._cluster.server import start_server_blocking

ROUNDS = 3
LOCAL_ROUNDS = 6
CONCURRENCY = 64
AGG_SERVERS = 64
AGG_CLIENTS = 64
AGG_SECONDS = 1.5
AGG_WARMUP = 0.3
MONITOR_SAMPLES = 8
HERE = Path(__file__).resolve()
TICKS = os.sysconf("SC_CLK_TCK")


class Echo(otpy.GenServer[None]):
    vsn = "1"

    def init(self, arg: Any) -> None:
        return None

    def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
        if request == "later":
            return otpy.NoReply(state)
        return otpy.Reply(request, state)


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state + 1)


class Watcher(otpy.GenServer[list[Any]]):
    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        return otpy.Reply(self.monitor(request), state)

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, (clock(), message)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_stdin() -> None:
    sys.stdin.read()


async def until(check: Any, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


def has_names(node: otpy.Node, names: int, members: int = 0) -> bool:
    info = node.cluster_info() or {}
    up = [s for s in info.get("members", {}).values() if s == "up"]
    return len(info.get("names", {})) >= names and len(up) >= members


# -- the long-lived other ends ----------------------------------------------------------------


def serve(url: str, cluster: str, name: str) -> None:
    """Node B: ``echo`` (cluster-scoped) and ``local``, until stdin closes."""
    root = otpy.Supervisor([otpy.Child("echo", Echo, scope="cluster"),
                            otpy.Child("local", Echo)])

    async def main(node: otpy.Node) -> None:
        print("READY", flush=True)
        await trio.to_thread.run_sync(wait_stdin, abandon_on_cancel=True)

    otpy.run(root, main, cluster=url, cluster_name=cluster, node_name=name)


def bare_serve(url: str) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(otpy_responder, url)
            print("READY", flush=True)
            await trio.to_thread.run_sync(wait_stdin, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- measurements, each in a process of its own ------------------------------------------------


def measure_remote(url: str, cluster: str, conc: int, peer: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with otpy.open_node(otpy.Supervisor([]), cluster=url, cluster_name=cluster,
                                  node_name=f"a{os.getpid()}") as node:
            await until(lambda: has_names(node, 1, 2))
            call = node.call

            async def one() -> None:
                await call("echo", PAYLOAD)

            return await measured(one, conc, peer)

    result: dict[str, float] = trio.run(main)
    return result


def measure_bare(url: str, conc: int, peer: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with open_client(url) as nc:
            request = nc.request

            async def one() -> None:
                await request(SUBJECT, PAYLOAD)

            return await measured(one, conc, peer)

    result: dict[str, float] = trio.run(main)
    return result


async def measured(one: Any, conc: int, peer: int) -> dict[str, float]:
    """drive_trio's rate, with both ends' CPU per call over the same stretch (the
    warm-up included in both)."""
    mine0, peer0, t0 = time.process_time(), cpu_seconds(peer), clock()
    rate = await drive_trio(one, conc)
    mine, theirs, wall = time.process_time() - mine0, cpu_seconds(peer) - peer0, clock() - t0
    calls = rate * wall  # approximately: the warm-up ran at about the same rate
    return {"rate": rate, "caller_cpu_us": mine / calls * 1e6,
            "callee_cpu_us": theirs / calls * 1e6}


def measure_local(clustered: bool, url: str, cluster: str) -> dict[str, float]:
    """bench_node.py's sequential node.call and self.call, best of 3 in this process;
    also per CPU second of this process (the loop is CPU-bound, so that figure does
    not count the time other processes of a busy machine took the core; the cluster's
    background tasks, which run on this loop meanwhile, are in both)."""
    from bench_node import N_CALL, N_SELF_CALL, _tree, call_rate, self_call_rate

    async def main() -> dict[str, float]:
        options: dict[str, Any] = ({"cluster": url, "cluster_name": cluster,
                                    "node_name": f"l{os.getpid()}"} if clustered else {})
        async with otpy.open_node(_tree(), **options) as node:
            if clustered:
                await until(lambda: has_names(node, 1, 2))
            await call_rate(node)
            await self_call_rate(node)
            out = {"call": 0.0, "self_call": 0.0, "call_cpu": 0.0, "self_call_cpu": 0.0}
            for _ in range(3):
                for op, run, n in (("call", call_rate, N_CALL),
                                   ("self_call", self_call_rate, N_SELF_CALL)):
                    cpu = time.process_time()
                    out[op] = max(out[op], await run(node))
                    out[f"{op}_cpu"] = max(out[f"{op}_cpu"], n / (time.process_time() - cpu))
            return out

    result: dict[str, float] = trio.run(main)
    return result


def shard(url: str, cluster: str, name: str, first: int, count: int, total: int,
          clients: int, mode: str) -> None:
    """One node of the aggregate bench: counters c<first>..c<first+count-1>; after
    "go" on stdin, ``clients`` tasks call (mode "own": its own shard in turn; "any":
    any of the ``total``) for AGG_SECONDS after AGG_WARMUP; prints the count, then
    stays until stdin closes (the other nodes may still be calling its counters)."""
    clustered = url != "none"
    scope = "cluster" if clustered else "local"
    root = otpy.Supervisor([otpy.Child(f"c{i}", Counter, scope=scope)
                            for i in range(first, first + count)])
    options: dict[str, Any] = ({"cluster": url, "cluster_name": cluster,
                                "node_name": name} if clustered else {})

    async def main() -> None:
        async with otpy.open_node(root, **options) as node:
            if clustered:
                await until(lambda: has_names(node, total))
            print("READY", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            mine = [f"c{i}" for i in range(first, first + count)]
            every = [f"c{i}" for i in range(total)]
            counts = [0] * clients
            start = clock()
            warm, end = start + AGG_WARMUP, start + AGG_WARMUP + AGG_SECONDS
            at_warm: list[int] = []
            call = node.call

            async def client(k: int) -> None:
                names = itertools.cycle(mine[k % len(mine):] + mine[:k % len(mine)])
                rng = random.Random(k)
                n = 0
                while True:
                    now = clock()
                    if now >= end:
                        return
                    if now >= warm and not at_warm:
                        at_warm.append(sum(counts))
                    target = next(names) if mode == "own" else rng.choice(every)
                    await call(target, "incr")
                    n += 1
                    counts[k] = n

            cpu: list[float] = []

            async def cpu_at_warm() -> None:
                await trio.sleep_until(trio.current_time() + (warm - clock()))
                cpu.append(time.process_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cpu_at_warm)
                for k in range(clients):
                    nursery.start_soon(client, k)
            result = {"calls": sum(counts) - at_warm[0], "seconds": clock() - warm,
                      "cpu": time.process_time() - cpu[0]}
            print(f"RESULT {json.dumps(result)}", flush=True)
            await trio.to_thread.run_sync(wait_stdin, abandon_on_cancel=True)

    trio.run(main)


def monitor_latency(url: str, cluster: str, samples: int) -> dict[str, list[float]]:
    """Node A here; per sample a fresh node B process, killed with SIGKILL."""
    async def sample(a: otpy.Node, name: str) -> tuple[float, float]:
        proc = subprocess.Popen([sys.executable, str(HERE), "--serve", url, cluster, name],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line.strip() == "READY", line
            await until(lambda: (a.cluster_info() or {})["members"].get(name) == "up")
            await a.call("w", f"local@{name}")
            failed: list[float] = []

            async def held(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                task_status.started()
                try:
                    await a.call(f"local@{name}", "later", timeout=30)
                except otpy.OtpyError:
                    failed.append(clock())

            async with trio.open_nursery() as nursery:
                await nursery.start(held)
                await trio.sleep(0.05 + random.random() * 0.05)  # any phase of a probe
                t_kill = clock()
                os.kill(proc.pid, signal.SIGKILL)
                before = len(a.get_state("w"))
                await until(lambda: len(a.get_state("w")) > before and bool(failed),
                            timeout=10)
            t_down, down = a.get_state("w")[-1]
            assert down.reason == "noconnection", down
            return (t_down - t_kill) * 1e3, (failed[0] - t_kill) * 1e3
        finally:
            proc.kill()
            proc.wait(10)

    async def main() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"down_ms": [], "call_ms": []}
        async with otpy.open_node(otpy.Supervisor([otpy.Child("w", Watcher)]),
                                  cluster=url, cluster_name=cluster, node_name="a") as a:
            for k in range(samples):
                down_ms, call_ms = await sample(a, f"b{k}")
                out["down_ms"].append(down_ms)
                out["call_ms"].append(call_ms)
        return out

    result: dict[str, list[float]] = trio.run(main)
    return result


# -- the coordinator ---------------------------------------------------------------------------


class Peer:
    """A long-lived process of this script (``--serve``, ``--bare-serve``), by pid."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.stop()
            raise RuntimeError(f"{args[0]} printed {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def one(*args: str) -> Any:
    """Run ``--one ARGS`` in a fresh process; its RESULT."""
    proc = subprocess.run([sys.executable, str(HERE), "--one", *args], capture_output=True,
                          text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"--one {' '.join(args)} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-2000:]}")


def aggregate(url: str, cluster: str, nodes: int, mode: str) -> tuple[float, float, float]:
    """Calls/s summed over ``nodes`` shard processes started together; the CPU seconds
    they used per second of the window (summed: at most ``nodes`` on an idle machine);
    and calls per CPU second."""
    per = AGG_SERVERS // nodes
    procs = []
    try:
        for k in range(nodes):
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE), "--shard", url if nodes > 1 else "none", cluster,
                 f"s{k}", str(k * per), str(per), str(AGG_SERVERS if nodes > 1 else per),
                 str(AGG_CLIENTS // nodes), mode],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"a shard printed {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        total = share = calls = cpu = 0.0
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("RESULT "):
                raise RuntimeError(f"a shard printed {line!r}")
            result = json.loads(line[7:])
            total += result["calls"] / result["seconds"]
            share += result["cpu"] / result["seconds"]
            calls += result["calls"]
            cpu += result["cpu"]
        return total, share, calls / cpu
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def best_and_pairs(name: str, ours: list[float], theirs: list[float], what: str
                   ) -> dict[str, Any]:
    paired = [a / b for a, b in zip(ours, theirs, strict=True)]
    return emit(name, max(ours) / max(theirs), "x", what=what,
                paired=[round(p, 3) for p in paired], paired_median=statistics.median(paired))


def main(remote_only: bool = False) -> None:
    quiet_logging()
    emit("cluster_info", 0, "-", what="otpy cluster on one nats-server, 127.0.0.1",
         **python_info())
    workdir = Path(tempfile.mkdtemp(prefix="otpy-bench-cluster-"))
    server = start_server_blocking(workdir=workdir)
    url, cluster = server.url, f"bench{os.getpid()}"
    peers: list[Peer] = []
    try:
        b = Peer("--serve", url, cluster, "b")
        peers.append(b)
        bare = Peer("--bare-serve", url)
        peers.append(bare)
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(ROUNDS):
            for load, conc in (("seq", 1), ("c64", CONCURRENCY)):
                runs.setdefault(f"bare_{load}", []).append(
                    one("bare", url, str(conc), str(bare.pid)))
                runs.setdefault(f"remote_{load}", []).append(
                    one("remote", url, cluster, str(conc), str(b.pid)))
        for key, values in runs.items():
            rates = [v["rate"] for v in values]
            emit(f"cluster_{key}", max(rates), "calls/s", rounds=[round(r) for r in rates],
                 caller_cpu_us=statistics.median(v["caller_cpu_us"] for v in values),
                 callee_cpu_us=statistics.median(v["callee_cpu_us"] for v in values))
        for load in ("seq", "c64"):
            best_and_pairs(f"cluster_remote_vs_bare_{load}",
                           [v["rate"] for v in runs[f"remote_{load}"]],
                           [v["rate"] for v in runs[f"bare_{load}"]],
                           "remote node.call / bare NATS request, same client and server")
        if remote_only:
            return

        local: dict[str, list[dict[str, float]]] = {"plain": [], "clustered": []}
        for _ in range(LOCAL_ROUNDS):
            for variant in local:
                local[variant].append(one("local", variant, url, cluster))
        for op in ("call", "self_call"):
            for variant, values in local.items():
                emit(f"cluster_local_{op}_{variant}", max(v[op] for v in values), "calls/s",
                     rounds=[round(v[op]) for v in values],
                     per_cpu_second=max(v[f"{op}_cpu"] for v in values))
            best_and_pairs(f"cluster_local_{op}_ratio",
                           [v[op] for v in local["clustered"]],
                           [v[op] for v in local["plain"]],
                           f"a clustered node's local {op} / an unclustered node's")
            best_and_pairs(f"cluster_local_{op}_cpu_ratio",
                           [v[f"{op}_cpu"] for v in local["clustered"]],
                           [v[f"{op}_cpu"] for v in local["plain"]],
                           "the same per CPU second of the node's process")

        agg: dict[str, list[float]] = {"one": [], "two": [], "two_any": []}
        shares: dict[str, list[float]] = {key: [] for key in agg}
        per_cpu: dict[str, list[float]] = {key: [] for key in agg}
        for r in range(ROUNDS):
            for key, nodes, mode in (("one", 1, "own"), ("two", 2, "own"),
                                     ("two_any", 2, "any")):
                rate, share, calls_per_cpu = aggregate(url, f"{cluster}{key}{r}", nodes,
                                                       mode)
                agg[key].append(rate)
                shares[key].append(share)
                per_cpu[key].append(calls_per_cpu)
        for key, values in agg.items():
            emit(f"cluster_aggregate_{key}", max(values), "calls/s",
                 rounds=[round(v) for v in values],
                 cores_used=[round(v, 2) for v in shares[key]],
                 per_cpu_second=[round(v) for v in per_cpu[key]])
        best_and_pairs("cluster_aggregate_cpu_ratio", per_cpu["two"], per_cpu["one"],
                       "calls per CPU second: 2 nodes on their own shards / 1 node (what "
                       "the cluster costs each call; x2 is the ratio with 2 free cores)")
        best_and_pairs("cluster_aggregate_ratio", agg["two"], agg["one"],
                       f"2 nodes (2 processes, each {AGG_SERVERS // 2} counters and "
                       f"{AGG_CLIENTS // 2} tasks calling its own shard) / 1 node "
                       f"({AGG_SERVERS} counters, {AGG_CLIENTS} tasks)")
        best_and_pairs("cluster_aggregate_any_ratio", agg["two_any"], agg["one"],
                       "the same, each task calling any of the counters (half remote)")

        lat = one("monitor", url, f"{cluster}m", str(MONITOR_SAMPLES))
        for key, what in (("down_ms", "SIGKILL of a node -> ServerDown(noconnection)"),
                          ("call_ms", "SIGKILL of a node -> a call it held fails")):
            values = sorted(lat[key])
            emit(f"cluster_kill_{key}", statistics.median(values), "ms", what=what,
                 max=max(values), p90=percentile(values, 0.9),
                 samples=[round(v, 1) for v in values])
    finally:
        for peer in peers:
            peer.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def profile(conc: int) -> None:
    """cProfile of both ends of remote calls (``conc`` in flight): node A here, node B
    a process that profiles itself and prints its top functions when stdin closes."""
    quiet_logging()
    workdir = Path(tempfile.mkdtemp(prefix="otpy-prof-"))
    server = start_server_blocking(workdir=workdir)
    cluster = f"prof{os.getpid()}"
    try:
        b = Peer("--serve-profiled", server.url, cluster, "b")
        prof = cProfile.Profile()

        async def main() -> float:
            async with otpy.open_node(otpy.Supervisor([]), cluster=server.url,
                                      cluster_name=cluster, node_name="a") as node:
                await until(lambda: has_names(node, 1, 2))

                async def call() -> None:
                    await node.call("echo", PAYLOAD)

                prof.enable()
                rate = await drive_trio(call, conc)
                prof.disable()
                return rate

        rate = trio.run(main)
        print(f"== caller (node A): {rate:.0f} calls/s under cProfile", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        assert b.proc.stdin is not None
        b.proc.stdin.close()
        assert b.proc.stdout is not None
        print("== callee (node B)", file=sys.stderr)
        print(b.proc.stdout.read(), file=sys.stderr)
        b.proc.wait(10)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def serve_profiled(url: str, cluster: str, name: str) -> None:
    prof = cProfile.Profile()
    root = otpy.Supervisor([otpy.Child("echo", Echo, scope="cluster")])

    async def main(node: otpy.Node) -> None:
        print("READY", flush=True)
        prof.enable()
        await trio.to_thread.run_sync(wait_stdin, abandon_on_cancel=True)
        prof.disable()

    otpy.run(root, main, cluster=url, cluster_name=cluster, node_name=name)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue(), flush=True)


if __name__ == "__main__":
    quiet_logging()
    mode, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if mode == "--serve":
        serve(*args)
    elif mode == "--serve-profiled":
        serve_profiled(*args)
    elif mode == "--bare-serve":
        bare_serve(*args)
    elif mode == "--shard":
        shard(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]),
              int(args[6]), args[7])
    elif mode == "--one":
        kind, rest = args[0], args[1:]
        if kind == "remote":
            res: Any = measure_remote(rest[0], rest[1], int(rest[2]), int(rest[3]))
        elif kind == "bare":
            res = measure_bare(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "local":
            res = measure_local(rest[0] == "clustered", rest[1], rest[2])
        else:
            res = monitor_latency(rest[0], rest[1], int(rest[2]))
        print(f"RESULT {json.dumps(res)}", flush=True)
    elif mode == "--profile":
        profile(int(args[0]) if args else 1)
    else:
        t0 = clock()
        main(remote_only=mode == "--remote")
        emit("cluster_bench_seconds", clock() - t0, "s")

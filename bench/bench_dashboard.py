"""What the dashboard and its step statistics cost the node they watch.

- ``dashboard_call_ratio``: a node of 100k idle servers with its HTTP endpoint; a
  client calls one server in a loop (``await node.call``). The rate with a dashboard
  page open (a live stream read by a client in another process, so that the node
  rebuilds and pushes its views every second and samples and counts steps) divided by
  the rate with no page open, in interleaved rounds; the median of the rounds' pairs
  (target >= 0.95: the dashboard costs at most 5 % of node.call).
- ``dashboard_worst_stall_ms``: the longest the loop was held at once while the views
  were built (the views measure their own chunks: the survey of the servers, the tree
  and table, the JSON encoding), the worst of every round (target <= 20 ms); and
  ``dashboard_probe_stall_ms``: the worst lateness of a task sleeping 1 ms in a loop
  beside the caller, page open vs closed (the loop as any task sees it).
- ``step_stats_call_ratio``: the hot-path cost of the step statistics alone: a small
  node whose one server is called in a loop (so it is the busiest, counted in every
  window), statistics on (sampling + counting) over off, interleaved rounds, the
  median pair (target >= 0.97: at most 3 %).

    python bench/bench_dashboard.py          # JSON lines, about two minutes
    python bench/bench_dashboard.py --quick  # fewer, shorter rounds
"""

from __future__ import annotations

import functools
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

import trio
from _common import clock, emit, quiet_logging

import otpy
from otpy._serve import views as views_module
from otpy._serve.http import HttpLimits, HttpStats, NodeRouter, serve_router
from otpy._serve.views import NodeViews

SERVERS = 100_000
COOKIE = b"bench-dashboard-cookie"

READER = textwrap.dedent("""
    import socket, sys
    port, token = int(sys.argv[1]), sys.argv[2]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET /events HTTP/1.1\\r\\nHost: bench\\r\\nCookie: otpy_session={token}"
              f"\\r\\n\\r\\n".encode())
    print("connected", flush=True)
    while s.recv(1 << 16):
        pass
""")


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state + 1)


async def call_rate(node: otpy.Node, seconds: float) -> tuple[float, float, float]:
    """Calls per second to "target" over ``seconds``; the node thread's CPU time per
    call meanwhile (everything the loop did, the dashboard's work included, divided by
    the calls: less disturbed by other processes on the machine than the rate); and the
    worst lateness of a task sleeping 1 ms meanwhile."""
    worst = 0.0
    done = False

    async def probe() -> None:
        nonlocal worst
        while not done:
            due = trio.current_time() + 0.001
            await trio.sleep_until(due)
            worst = max(worst, trio.current_time() - due)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        call = node.call
        n = 0
        t0, cpu0 = clock(), time.thread_time()
        end = t0 + seconds
        while True:
            for _ in range(1000):
                await call("target", None)
            n += 1000
            if clock() >= end:
                break
        rate = n / (clock() - t0)
        cpu = (time.thread_time() - cpu0) / n
        done = True
    return rate, cpu, worst


async def log_in(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        body = b"cookie=" + COOKIE
        await stream.send_all(b"POST /login HTTP/1.1\r\nHost: bench\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
    head = data.split(b"\r\n\r\n")[0].decode()
    return head.split("otpy_session=", 1)[1].split(";", 1)[0]


@functools.cache
def reader_script() -> str:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"otpy-sse-reader-{os.getpid()}.py")
    with open(path, "w") as f:
        f.write(READER)
    return path


async def dashboard(rounds: int, seconds: float) -> None:
    views_module.DEMAND_SECONDS = 0.0  # statistics stop as soon as the page closes
    root = otpy.Supervisor([otpy.Child("target", Counter),
                            *(otpy.Child(f"s{i}", Counter) for i in range(SERVERS))])
    async with otpy.open_node(root) as node, trio.open_nursery() as nursery:
        stats = HttpStats()
        views = NodeViews(node._rt, connections=lambda: stats.connections)
        router = NodeRouter(node._rt, HttpLimits(), stats, COOKIE, views=views,
                            install=node._install, spawn=nursery.start_soon)
        nursery.start_soon(views.run)
        _, port = await nursery.start(functools.partial(
            serve_router, router, ("127.0.0.1", 0), stats=stats))
        token = await log_in(port)
        idle = {mode: await idle_cpu(views, port, token, mode == "open", seconds * 2)
                for mode in ("closed", "open")}
        pairs: list[float] = []
        cpu_pairs: list[float] = []
        stalls: list[float] = []
        probes: dict[str, list[float]] = {"open": [], "closed": []}
        builds: list[float] = []
        sizes: list[int] = []
        for r in range(rounds):
            result: dict[str, float] = {}
            for mode in (("open", "closed") if r % 2 else ("closed", "open")):
                reader = None
                if mode == "open":
                    views.worst_chunk = 0.0
                    reader = subprocess.Popen([sys.executable, reader_script(), str(port),
                                               token], stdout=subprocess.PIPE, text=True)
                    assert reader.stdout is not None
                    await trio.to_thread.run_sync(reader.stdout.readline)
                    seq = views.seq
                    while views.seq < seq + 2 or "target" not in views.rates:
                        for _ in range(1000):  # two rebuilds, the caller counted
                            await node.call("target", None)
                else:
                    while views.streams or views.sampler is not None:
                        await trio.sleep(0.05)
                rate, cpu, probe = await call_rate(node, seconds)
                result[mode] = rate
                result[mode + "_cpu"] = cpu
                probes[mode].append(probe * 1000)
                if reader is not None:
                    stalls.append(views.worst_chunk * 1000)
                    builds.append(views.build_seconds * 1000)
                    sizes.append(len(views.snapshot))
                    os.kill(reader.pid, signal.SIGKILL)
                    reader.wait()
            pairs.append(result["open"] / result["closed"])
            cpu_pairs.append(result["closed_cpu"] / result["open_cpu"])
            emit("dashboard_round", result["open"] / result["closed"], "x",
                 open=result["open"], closed=result["closed"],
                 cpu_us_open=result["open_cpu"] * 1e6,
                 cpu_us_closed=result["closed_cpu"] * 1e6)
        nursery.cancel_scope.cancel()
    emit("dashboard_idle_cpu_share", idle["open"] - idle["closed"], "share",
         what=f"CPU time the node spends per second with a page open, beyond what it "
              f"spends with none, no calls ({SERVERS:,} servers: the views, the stream)",
         open=idle["open"], closed=idle["closed"], target="<= 0.05")
    emit("dashboard_call_ratio", statistics.median(cpu_pairs), "x",
         what=f"node.call with a dashboard page open / with none, {SERVERS:,} servers: "
              f"the inverse ratio of the node thread's CPU time per call, median of "
              f"{rounds} interleaved pairs", pairs=cpu_pairs, target=">= 0.95")
    emit("dashboard_call_rate_ratio", statistics.median(pairs), "x",
         what="the same as a ratio of call rates (wall clock: noisier on a shared "
              "machine)", pairs=pairs)
    emit("dashboard_worst_stall_ms", max(stalls), "ms",
         what="longest the views held the loop at once while a page was open (worst of "
              "the rounds, each from its first rebuild)", each=stalls, target="<= 20 ms")
    emit("dashboard_build_ms", statistics.median(builds), "ms",
         what=f"loop time of one rebuild of the views ({SERVERS:,} servers), median",
         all=builds)
    emit("dashboard_snapshot_bytes", statistics.median(sizes), "B",
         what="the snapshot pushed to each page")
    emit("dashboard_probe_stall_ms", max(probes["open"]), "ms",
         what="worst lateness of a task sleeping 1 ms, page open", each=probes["open"])
    emit("dashboard_probe_stall_closed_ms", max(probes["closed"]), "ms",
         what="the same, no page open (baseline)", each=probes["closed"])


async def idle_cpu(views: NodeViews, port: int, token: str, page: bool,
                   seconds: float) -> float:
    """CPU seconds per second the node's process spends, doing nothing but serve its
    endpoint, with or without a page open."""
    reader = None
    if page:
        reader = subprocess.Popen([sys.executable, reader_script(), str(port), token],
                                  stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None
        await trio.to_thread.run_sync(reader.stdout.readline)
        seq = views.seq
        while views.seq < seq + 2:
            await trio.sleep(0.05)
    else:
        while views.streams or views.sampler is not None:
            await trio.sleep(0.05)
    cpu0, wall0 = time.process_time(), clock()
    await trio.sleep(seconds)
    share = (time.process_time() - cpu0) / (clock() - wall0)
    if reader is not None:
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait()
    return share


async def step_statistics(rounds: int, seconds: float) -> None:
    views_module.DEMAND_SECONDS = 0.0
    root = otpy.Supervisor([otpy.Child("target", Counter),
                            *(otpy.Child(f"s{i}", Counter) for i in range(10))])
    async with otpy.open_node(root) as node, trio.open_nursery() as nursery:
        views = NodeViews(node._rt)
        nursery.start_soon(views.run)
        pairs: list[float] = []
        rate_pairs: list[float] = []
        modes: list[str] = []
        for r in range(rounds):
            result: dict[str, float] = {}
            for mode in (("on", "off") if r % 2 else ("off", "on")):
                if mode == "on":
                    views.demand_until = trio.current_time() + 3600
                    views.touch()
                    views.demand_until = trio.current_time() + 3600
                    while views.sampler is None or "target" not in views.rates:
                        for _ in range(1000):  # busy, so sampled, then counted
                            await node.call("target", None)
                    modes.append(views.sampler.mode)
                else:
                    views.demand_until = 0.0
                    while views.sampler is not None:
                        await trio.sleep(0.05)
                rate, cpu, _ = await call_rate(node, seconds)
                result[mode], result[mode + "_cpu"] = rate, cpu
            pairs.append(result["off_cpu"] / result["on_cpu"])
            rate_pairs.append(result["on"] / result["off"])
            emit("step_stats_round", result["off_cpu"] / result["on_cpu"], "x",
                 on=result["on"], off=result["off"], cpu_us_on=result["on_cpu"] * 1e6,
                 cpu_us_off=result["off_cpu"] * 1e6)
        nursery.cancel_scope.cancel()
    emit("step_stats_call_ratio", statistics.median(pairs), "x",
         what="node.call with step statistics on (sampling + counted windows) / off, "
              "the called server the busiest: the inverse ratio of the node thread's "
              f"CPU time per call, median of {rounds} pairs", pairs=pairs,
         sampling=sorted(set(modes)), target=">= 0.97")
    emit("step_stats_call_rate_ratio", statistics.median(rate_pairs), "x",
         what="the same as a ratio of call rates (wall clock: noisier)", pairs=rate_pairs)


def main() -> None:
    quick = "--quick" in sys.argv
    quiet_logging()
    start = time.perf_counter()
    trio.run(step_statistics, 3 if quick else 9, 1.0 if quick else 2.0)
    trio.run(dashboard, 2 if quick else 6, 2.0 if quick else 4.0)
    emit("bench_dashboard_seconds", time.perf_counter() - start, "s")


if __name__ == "__main__":
    main()

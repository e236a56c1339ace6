"""Supervision speed: one_for_one restart latency, and starting a huge supervisor.

``python bench/bench_supervisor.py restart SIBLINGS SAMPLES`` crashes one child of a
one_for_one supervisor SAMPLES times, with SIBLINGS idle servers beside it under the
same supervisor, and prints the latency of each crash-to-restarted act (the act is
synchronous: when ``node.cast`` returns, the new incarnation holds the name).

``python bench/bench_supervisor.py start_sup N`` adds a supervisor with N children to a
running node with ``node.start_child`` and prints the µs per child.
"""

from __future__ import annotations

import gc
import statistics
import sys
from typing import Any

import trio
from _common import clock, clock_ns, emit, percentile, quiet_logging

import otpy


class Victim(otpy.GenServer[int]):
    """Crashes on the cast ``"crash"``."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_cast(self, message: Any, state: int) -> int:
        if message == "crash":
            raise RuntimeError("crash requested by the benchmark")
        return state + 1


class Idle(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0


def restart(siblings: int, samples: int) -> list[dict[str, Any]]:
    # The victim comes last, so that anything that scans its siblings would show.
    children = [otpy.Child(f"sibling{i}", Idle) for i in range(siblings)]
    children.append(otpy.Child("victim", Victim))
    root = otpy.Supervisor(children, strategy="one_for_one", max_restarts=10**9,
                           max_seconds=1.0, name="root")
    del children
    lat: list[int] = []

    async def main() -> None:
        async with otpy.open_node(root) as node:
            gc.collect()
            for i in range(samples):
                before = clock_ns()
                node.cast("victim", "crash")
                lat.append(clock_ns() - before)
                if i % 256 == 0:
                    await trio.lowlevel.checkpoint()
            # Each crash was followed by a restart, and nothing else was touched.
            info = node.which_children("root")
            assert info[-1].restarts == samples and info[-1].status == "running", info[-1]
            assert len(node.servers()) == siblings + 1

    trio.run(main)
    us = sorted(x / 1000 for x in lat[len(lat) // 10:])  # the first 10% warm up
    tag = f"{siblings // 1000}k" if siblings >= 1000 else str(siblings)
    extra = {"siblings": siblings, "samples": len(us), "mean": statistics.fmean(us),
             "p90": percentile(us, 0.90), "p999": percentile(us, 0.999), "max": us[-1]}
    return [
        emit(f"restart_median_{tag}", percentile(us, 0.5), "us",
             what=f"one_for_one crash -> restarted, median ({siblings:,} siblings)", **extra),
        emit(f"restart_p99_{tag}", percentile(us, 0.99), "us",
             what=f"one_for_one crash -> restarted, p99 ({siblings:,} siblings)", **extra),
    ]


def start_sup(n: int) -> list[dict[str, Any]]:
    t0 = clock()
    sup = otpy.Supervisor([otpy.Child(f"worker{i}", Idle) for i in range(n)], name="big")
    t_spec = clock() - t0
    out: dict[str, float] = {}

    async def main() -> None:
        async with otpy.open_node(otpy.Supervisor([], name="root")) as node:
            t1 = clock()
            await node.start_child("root", sup)
            out["start"] = clock() - t1
            assert node.count_children("big")["active"] == n
            t2 = clock()
            await node.terminate_child("root", "big")
            out["stop"] = clock() - t2

    trio.run(main)
    return [
        emit(f"sup_start_us_{n}", out["start"] / n * 1e6, "us",
             what=f"node.start_child(Supervisor with {n:,} children): µs per child", n=n),
        emit(f"sup_spec_us_{n}", t_spec / n * 1e6, "us",
             what=f"building those {n:,} Child specs + Supervisor: µs per child", n=n),
        emit(f"sup_stop_us_{n}", out["stop"] / n * 1e6, "us",
             what="node.terminate_child of that supervisor: µs per child", n=n),
    ]


def main(argv: list[str]) -> None:
    quiet_logging()
    if argv[1:2] == ["restart"]:
        restart(int(argv[2]), int(argv[3]))
    elif argv[1:2] == ["start_sup"]:
        start_sup(int(argv[2]))
    else:
        raise SystemExit(f"usage: {argv[0]} restart SIBLINGS SAMPLES | start_sup N")


if __name__ == "__main__":
    main(sys.argv)

"""The process model's costs: monitor + demonitor, the delivery of a ServerDown after a
crash, and a call by pid beside a call by name.

    python bench/bench_processes.py [rounds]

Prints JSON lines (see _common.py); rates are the best of the rounds.
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

from _common import clock, emit, quiet_logging, summary

import otpy

N_MONITOR = 50_000
N_CALL = 20_000
N_DOWN = 2_000


class Target(otpy.GenServer[int]):
    vsn = "1"
    step_timeout = math.inf

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "crash":
            raise RuntimeError("crash")
        return otpy.Reply(state, state + 1)


class Watcher(otpy.GenServer[list[float]]):
    """Monitors and demonitors in a loop; or records when each ServerDown arrives."""

    vsn = "1"
    step_timeout = math.inf

    def init(self, arg: Any) -> list[float]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[float]) -> Any:
        op, n = request
        if op == "churn":
            for _ in range(n):
                self.demonitor(self.monitor("target"))
            return otpy.Reply(None, state)
        if op == "watch":
            self.monitor("victim")
            return otpy.Reply(None, state)
        return otpy.Reply(list(state), [])

    def handle_info(self, message: Any, state: list[float]) -> list[float]:
        return [*state, clock()]


def rounds(count: int) -> list[dict[str, Any]]:
    results: dict[str, list[float]] = {}
    downs: list[float] = []

    async def main() -> None:
        root = otpy.Supervisor([otpy.Child("target", Target), otpy.Child("victim", Target),
                                otpy.Child("watcher", Watcher)], max_restarts=10**9)
        async with otpy.open_node(root) as node:
            pid = node.whereis("target")
            for _ in range(count + 1):
                t0 = clock()
                await node.call("watcher", ("churn", N_MONITOR))
                results.setdefault("monitor_demonitor", []).append(N_MONITOR / (clock() - t0))
                t0 = clock()
                for _ in range(N_CALL):
                    await node.call("target", "x")
                results.setdefault("call_by_name", []).append(N_CALL / (clock() - t0))
                t0 = clock()
                for _ in range(N_CALL):
                    await node.call(pid, "x")
                results.setdefault("call_by_pid", []).append(N_CALL / (clock() - t0))
            for _ in range(N_DOWN):
                await node.call("watcher", ("watch", None))
                t0 = clock()
                try:
                    await node.call("victim", "crash")
                except otpy.ServerCrashed:
                    pass
                await trio.testing.wait_all_tasks_blocked()
                [arrived] = await node.call("watcher", ("take", None))
                downs.append((arrived - t0) * 1e6)

    import trio.testing

    trio.run(main)
    out = []
    for name, what, unit in (
            ("monitor_demonitor", "self.monitor + self.demonitor in a callback", "pairs/s"),
            ("call_by_name", "await node.call by name", "calls/s"),
            ("call_by_pid", "await node.call by pid", "calls/s")):
        rates = results[name][1:]  # the first round warms up
        out.append(emit(name, max(rates), unit, what=what, **summary(rates)))
    out.append(emit("call_pid_vs_name", max(results["call_by_pid"][1:]) /
                    max(results["call_by_name"][1:]), "ratio",
                    what="call by pid / call by name, best over best"))
    downs.sort()
    out.append(emit("server_down_latency_median", statistics.median(downs), "us",
                    what="a crash to the watcher's handle_info(ServerDown), median",
                    p99=downs[int(len(downs) * 0.99)], samples=len(downs)))
    return out


def main() -> None:
    quiet_logging()
    rounds(int(sys.argv[1]) if len(sys.argv) > 1 else 5)


if __name__ == "__main__":
    main()

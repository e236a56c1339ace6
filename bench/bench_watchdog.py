"""The step watchdog: what it costs a node that never overruns, and how soon after its
budget a runaway callback is cut.

- ``watchdog_call_ratio`` / ``watchdog_cast_ratio``: node.call and node.cast rates with
  the watchdog on divided by the same with it off, interleaved rounds in one process
  (1.0 means free; the watchdog writes nothing per step, its thread only samples).
- ``watchdog_overshoot_*``: for a ``while True: pass`` callback with a budget of B
  seconds, how long past B the caller got its ServerCrashed (median and worst of N).

    python bench/bench_watchdog.py        # JSON lines, a few seconds
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
from _common import clock, emit, quiet_logging

import otpy
from otpy._watchdog import Watchdog

ROUNDS = 7
N_CALL = 20_000
N_CAST = 100_000
TRIALS = 10


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "spin":
            while True:
                pass
        return otpy.Reply(state, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + 1


@contextmanager
def watchdog_off() -> Iterator[None]:
    start = Watchdog.start
    Watchdog.start = lambda self: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        Watchdog.start = start  # type: ignore[method-assign]


async def rates() -> tuple[float, float]:
    root = otpy.Supervisor([otpy.Child("c", Counter)])
    async with otpy.open_node(root) as node:
        call = node.call
        t0 = clock()
        for _ in range(N_CALL):
            await call("c", None)
        call_rate = N_CALL / (clock() - t0)
        cast = node.cast
        t0 = clock()
        for _ in range(N_CAST):
            cast("c", None)
        return call_rate, N_CAST / (clock() - t0)


async def overshoot(budget: float) -> float:
    root = otpy.Supervisor([otpy.Child("c", Counter, step_timeout=budget)])
    async with otpy.open_node(root) as node:
        t0 = clock()
        try:
            await node.call("c", "spin")
        except otpy.ServerCrashed:
            return clock() - t0 - budget
    raise AssertionError("the spin was not interrupted")


def main() -> None:
    quiet_logging()
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for _ in range(ROUNDS):
        on.append(trio.run(rates))
        with watchdog_off():
            off.append(trio.run(rates))
    for i, what in enumerate(("call", "cast")):
        best_on = max(r[i] for r in on)
        best_off = max(r[i] for r in off)
        emit(f"watchdog_{what}_on", round(best_on), f"{what}s/s")
        emit(f"watchdog_{what}_off", round(best_off), f"{what}s/s")
        emit(f"watchdog_{what}_ratio", round(best_on / best_off, 3), "on/off",
             paired_median=round(statistics.median(a[i] / b[i] for a, b in zip(
                 on, off, strict=True)), 3), rounds=ROUNDS)
    for budget in (0.02, 0.2):
        late = sorted(trio.run(overshoot, budget) for _ in range(TRIALS))
        emit(f"watchdog_overshoot_{int(budget * 1000)}ms", round(
            statistics.median(late) * 1e3, 2), "ms", worst_ms=round(late[-1] * 1e3, 2),
            budget_ms=budget * 1e3, trials=TRIALS)


if __name__ == "__main__":
    main()

"""Node speed: checkpoint baseline, calls, calls from callbacks, casts, concurrent
clients, and the memory and start cost of many idle servers.

``rates(rounds)`` runs the rate benchmarks interleaved in one trio run (each round runs
every benchmark once, so a noisy second hits all of them alike) and yields JSON
records. ``python bench/bench_node.py memory N [--tracemalloc]`` starts N idle servers
in a fresh process and prints their memory and start cost.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _common import clock, emit, quiet_logging, rss_bytes, summary

import otpy

# Sizes of one run of each rate benchmark: each takes roughly 0.05-0.15 s here. Many
# short interleaved rounds, best round kept, resist a noisy machine better than a few
# long ones.
N_CHECKPOINT = 20_000
N_CALL = 20_000
N_SELF_CALL = 100_000
N_CAST = 100_000
N_QUEUED = 50_000
CLIENTS = 100
PER_CLIENT = 200


class Counter(otpy.GenServer[int]):
    """Answers every call with its count and adds one; a cast adds one."""

    vsn = "1"
    max_mailbox = 10_000_000

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + 1


_OK = otpy.Reply("ok", 0)


class Echo(otpy.GenServer[int]):
    """Answers with one prebuilt Reply: the call path without building a Reply."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return _OK


class Driver(otpy.GenServer[int]):
    """Loops ``self.call`` (or ``self.cast``) to another server from inside one call."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        op, target, n = request
        if op == "call":
            for _ in range(n):
                self.call(target, "incr")
        else:
            for _ in range(n):
                self.cast(target, 1)
        return otpy.Reply(n, state + 1)


class Idle(otpy.GenServer[int]):
    """An idle server as a user would write it (no ``__slots__`` of its own)."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0


class IdleSlots(otpy.GenServer[int]):
    """The same, with ``__slots__ = ()``: no per-instance ``__dict__``."""

    __slots__ = ()
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0


def _tree() -> otpy.Supervisor:
    return otpy.Supervisor(
        [otpy.Child("counter", Counter), otpy.Child("sink", Counter),
         otpy.Child("target", Counter), otpy.Child("echo", Echo),
         otpy.Child("driver", Driver)],
        name="root",
    )


# -- the rate benchmarks: each returns operations per second --------------------------


async def checkpoint_rate() -> float:
    t0 = clock()
    for _ in range(N_CHECKPOINT):
        await trio.lowlevel.checkpoint()
    return N_CHECKPOINT / (clock() - t0)


async def call_rate(node: otpy.Node, target: str = "counter") -> float:
    t0 = clock()
    for _ in range(N_CALL):
        await node.call(target, "incr")
    return N_CALL / (clock() - t0)


async def self_call_rate(node: otpy.Node, target: str = "target") -> float:
    t0 = clock()
    await node.call("driver", ("call", target, N_SELF_CALL))
    return N_SELF_CALL / (clock() - t0)


async def cast_rate(node: otpy.Node) -> float:
    await trio.lowlevel.checkpoint()
    t0 = clock()
    for _ in range(N_CAST):
        node.cast("counter", 1)
    return N_CAST / (clock() - t0)


async def queued_cast_rates(node: otpy.Node) -> tuple[float, float, float]:
    """Casts to a suspended server: (enqueue rate, dispatcher drain rate, end to end)."""
    await trio.lowlevel.checkpoint()
    node.suspend("sink")
    t0 = clock()
    for _ in range(N_QUEUED):
        node.cast("sink", 1)
    t1 = clock()
    node.resume("sink")
    await node.call("sink", "sync", timeout=None)  # queued behind the casts
    t2 = clock()
    return N_QUEUED / (t1 - t0), N_QUEUED / (t2 - t1), N_QUEUED / (t2 - t0)


async def callback_cast_rates(node: otpy.Node) -> tuple[float, float, float]:
    """``self.cast`` from inside a callback (always queued): (enqueue, drain, total)."""
    await trio.lowlevel.checkpoint()
    t0 = clock()
    await node.call("driver", ("cast", "sink", N_QUEUED))
    t1 = clock()
    await node.call("sink", "sync", timeout=None)
    t2 = clock()
    return N_QUEUED / (t1 - t0), N_QUEUED / (t2 - t1), N_QUEUED / (t2 - t0)


async def _clients(body: Callable[[], Awaitable[None]]) -> float:
    t0 = clock()
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(body)
    return CLIENTS * PER_CLIENT / (clock() - t0)


async def concurrent_checkpoint_rate() -> float:
    async def client() -> None:
        for _ in range(PER_CLIENT):
            await trio.lowlevel.checkpoint()

    return await _clients(client)


async def concurrent_call_rate(node: otpy.Node) -> float:
    async def client() -> None:
        for _ in range(PER_CLIENT):
            await node.call("counter", "incr")

    return await _clients(client)


def rates(rounds: int) -> list[dict[str, Any]]:
    """Run every rate benchmark ``rounds`` times, interleaved, after one warm-up round."""
    runs: dict[str, list[float]] = {}

    async def one_round(node: otpy.Node) -> dict[str, float]:
        res: dict[str, float] = {}
        res["checkpoint"] = await checkpoint_rate()
        res["call"] = await call_rate(node)
        res["checkpoint_b"] = await checkpoint_rate()
        res["call_prebuilt"] = await call_rate(node, "echo")
        res["self_call"] = await self_call_rate(node)
        res["self_call_prebuilt"] = await self_call_rate(node, "echo")
        res["cast"] = await cast_rate(node)
        q = await queued_cast_rates(node)
        res.update(cast_suspended_enqueue=q[0], cast_suspended_drain=q[1],
                   cast_suspended_total=q[2])
        q = await callback_cast_rates(node)
        res.update(cast_callback_enqueue=q[0], cast_callback_drain=q[1],
                   cast_callback_total=q[2])
        res["concurrent_checkpoint"] = await concurrent_checkpoint_rate()
        res["concurrent_call"] = await concurrent_call_rate(node)
        # The call run sits between two baseline runs: pair it with their mean.
        base = (res.pop("checkpoint") + res.pop("checkpoint_b")) / 2
        res["checkpoint"] = base
        res["call_ratio_paired"] = res["call"] / base
        res["concurrent_ratio"] = res["concurrent_call"] / res["concurrent_checkpoint"]
        return res

    async def main() -> None:
        async with otpy.open_node(_tree()) as node:
            await one_round(node)  # warm-up
            for _ in range(rounds):
                for key, value in (await one_round(node)).items():
                    runs.setdefault(key, []).append(value)

    trio.run(main)
    records = [_rate_record(key, values) for key, values in runs.items()]
    best_call, best_base = max(runs["call"]), max(runs["checkpoint"])
    records.append(emit(
        "call_ratio", best_call / best_base, "ratio",
        what="best node.call rate / best checkpoint rate, same run",
        paired_median=statistics.median(runs["call_ratio_paired"])))
    records.append(emit(
        "call_prebuilt_ratio", max(runs["call_prebuilt"]) / best_base, "ratio",
        what="the same, handler returning a prebuilt Reply"))
    return records


_RATE_INFO = {
    "checkpoint": ("baseline: await trio.lowlevel.checkpoint()", "ops/s"),
    "call": ("sequential await node.call", "calls/s"),
    "call_ratio_paired": ("node.call rate / checkpoint rate (paired per round)", "ratio"),
    "call_prebuilt": ("await node.call, handler returns a prebuilt Reply", "calls/s"),
    "self_call": ("self.call from inside a callback", "calls/s"),
    "self_call_prebuilt": ("self.call, handler returns a prebuilt Reply", "calls/s"),
    "cast": ("node.cast to an idle server (stepped inline)", "casts/s"),
    "cast_suspended_enqueue": ("node.cast to a suspended server: enqueue", "casts/s"),
    "cast_suspended_drain": ("  ... dispatcher drains them after resume", "msgs/s"),
    "cast_suspended_total": ("  ... enqueue + drain, end to end", "casts/s"),
    "cast_callback_enqueue": ("self.cast from a callback: enqueue", "casts/s"),
    "cast_callback_drain": ("  ... dispatcher drains them", "msgs/s"),
    "cast_callback_total": ("  ... enqueue + drain, end to end", "casts/s"),
    "concurrent_checkpoint": (f"{CLIENTS} tasks doing checkpoints (baseline)", "ops/s"),
    "concurrent_call": (f"{CLIENTS} client tasks doing await node.call", "calls/s"),
    "concurrent_ratio": (f"{CLIENTS} clients: call rate / checkpoint rate", "ratio"),
}


def _rate_record(key: str, values: list[float]) -> dict[str, Any]:
    what, unit = _RATE_INFO[key]
    s = summary(values)
    # Ratios are paired within a round: their median is the robust figure.
    value = s["median"] if unit == "ratio" else s["best"]
    return emit(key, value, unit, what=what, best=s["best"], median=s["median"],
                runs=s["runs"], all=[round(v, 4 if unit == "ratio" else 0) for v in values])


# -- memory and start cost of many idle servers (run in a fresh process) -------------


def memory(n: int, *, trace: bool, slots: bool) -> list[dict[str, Any]]:
    """Start ``n`` idle servers under the root; measure bytes and µs per server."""
    quiet_logging()
    cls = IdleSlots if slots else Idle
    gc.collect()
    if trace:
        tracemalloc.start()

    def used() -> int:
        return tracemalloc.get_traced_memory()[0] if trace else rss_bytes()

    m0 = used()
    t0 = clock()
    children = [otpy.Child(f"server{i}", cls) for i in range(n)]
    root = otpy.Supervisor(children, name="root")
    t_spec = clock() - t0
    del children
    gc.collect()
    m_spec = used()
    out: dict[str, Any] = {}

    async def main() -> None:
        t1 = clock()
        async with otpy.open_node(root) as node:
            out["start"] = clock() - t1
            gc.collect()
            out["mem"] = used()
            out["running"] = len(node.servers())
            t2 = clock()
        out["stop"] = clock() - t2

    trio.run(main)
    if trace:
        tracemalloc.stop()
    assert out["running"] == n, out
    how = "tracemalloc" if trace else "rss"
    tag = f"{'slots' if slots else 'plain'}_{how}_{n}"
    records = [
        emit(f"mem_per_server_{tag}", (out["mem"] - m_spec) / n, "B",
             what=f"bytes per idle server, {n:,} servers ({how}), runtime only", n=n,
             method=how, slots=slots),
        emit(f"mem_per_server_with_spec_{tag}", (out["mem"] - m0) / n, "B",
             what=f"bytes per idle server, {n:,} servers ({how}), incl. its Child spec",
             n=n, method=how, slots=slots),
    ]
    if not trace:
        records += [
            emit(f"start_us_{tag}", out["start"] / n * 1e6, "us",
                 what=f"µs per server start, {n:,} servers in one node (open_node)", n=n),
            emit(f"spec_us_{tag}", t_spec / n * 1e6, "us",
                 what=f"µs per otpy.Child(...) spec built, {n:,} specs", n=n),
            emit(f"stop_us_{tag}", out["stop"] / n * 1e6, "us",
                 what=f"µs per server stopped at node shutdown, {n:,} servers", n=n),
        ]
    return records


def main(argv: list[str]) -> None:
    quiet_logging()
    if argv[1:2] == ["memory"]:
        memory(int(argv[2]), trace="--tracemalloc" in argv, slots="--slots" in argv)
    elif argv[1:2] == ["rates"]:
        rates(int(argv[2]) if len(argv) > 2 else 5)
    else:
        raise SystemExit(f"usage: {argv[0]} rates [ROUNDS] | memory N [--tracemalloc] "
                         f"[--slots]")


if __name__ == "__main__":
    main(sys.argv)

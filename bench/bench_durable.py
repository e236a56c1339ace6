"""Durable servers on a node, beside the raw figures of the store they are built on, all
measured in the same run on the same disk (a temporary directory):

- ``rates ROUNDS``: ``await node.call`` to a durable counter (small state, fsync
  "never") against the same server not durable (issue #13: floor 0.25x, aim 0.5x);
  a 10,000-key dict changing one key per call with ``self.changed`` (floor 20k
  calls/s), and without it (the whole state recorded, for contrast); fsync "group"
  with 64 concurrent clients (floor 20k acknowledged calls/s); beside them, from
  bench_store.py in the same round: a bare 54-byte ``os.write``, ``SqliteStore.put`` of
  a small state, SQLite WAL NORMAL with one transaction per row, and 64 writes + 1
  ``fdatasync`` (the group-commit ceiling of the disk);
- ``start N``: opening a node whose store holds N durable servers' states (issue #13:
  100k in <= 2 s), its first start (N inits, N records), and beside them the store's
  own open + load of N states from SQLite and a node of N servers that are not durable;
- ``profile``: where the time of one durable call goes (the general path, the record,
  the store's put), by difference and by cProfile.

Every rate is the best of the interleaved rounds, with the median and each round's
value; each ratio is paired within a round. The machine is shared and noisy.

    python bench/bench_durable.py rates 5
    python bench/bench_durable.py start 100000
    python bench/bench_durable.py profile
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from _common import clock, emit, python_info, quiet_logging
from bench_store import load_100k, raw_append, raw_append_sync, sqlite_rows, store_put_small

import otpy
from otpy._core.scheduler import OBSERVED

N_CALL = 20_000
N_BIG = 20_000
N_BIG_WHOLE = 300
GROUP_SECONDS = 1.0
CLIENTS = 64
BIG = 10_000


class Counter(otpy.GenServer[int]):
    """A counter: the small state."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state + 1)


class Big(otpy.GenServer[dict[str, int]]):
    """A 10,000-key dict, one key changed in place per call (named with self.changed,
    unless the request says "whole")."""

    vsn = "1"
    durable = True

    def init(self, arg: Any) -> dict[str, int]:
        return {f"key{i}": i for i in range(BIG)}

    def handle_call(self, request: Any, caller: otpy.Caller, state: dict[str, int]) -> Any:
        n, whole = request
        key = f"key{n % BIG}"
        state[key] = n
        if not whole:
            self.changed(key)
        return otpy.Reply(n, state)


def tree() -> otpy.Supervisor:
    return otpy.Supervisor([
        otpy.Child("plain", Counter), otpy.Child("durable", Counter, durable=True),
        otpy.Child("big", Big)])


async def call_rate(node: otpy.Node, name: str, n: int, make: Any = None) -> float:
    call = node.call
    t0 = clock()
    if make is None:
        for _ in range(n):
            await call(name, "x")
    else:
        for i in range(n):
            await call(name, make(i))
    return n / (clock() - t0)


async def group_rate(path: Path) -> tuple[float, dict[str, Any]]:
    """Acknowledged calls/s: CLIENTS tasks each calling a durable counter of its own
    (fsync "group": each reply waits for its record's fdatasync), for GROUP_SECONDS."""
    root = otpy.Supervisor([otpy.Child(f"c{i}", Counter, durable=True)
                            for i in range(CLIENTS)])
    async with otpy.open_node(root, store=path, fsync="group") as node:
        done = 0
        deadline = trio.current_time() + GROUP_SECONDS

        async def client(i: int) -> None:
            nonlocal done
            name = f"c{i}"
            while trio.current_time() < deadline:
                await node.call(name, "x")
                done += 1

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(CLIENTS):
                nursery.start_soon(client, i)
        rate = done / (trio.current_time() - t0)
        stats = node.statistics()["store"]
    return rate, stats


def rates(rounds: int) -> None:
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    batches: list[float] = []
    for _ in range(rounds):
        d = Path(tempfile.mkdtemp(prefix="otpy-bench-durable-"))
        try:
            add("raw_append_54", raw_append(d))
            add("raw_store_put_small", store_put_small(d))
            add("raw_sqlite_wal_normal_txn", sqlite_rows(d, "NORMAL", 1))
            add("raw_append_fdatasync_64", raw_append_sync(d, 64))

            async def main(d: Path = d) -> None:
                async with otpy.open_node(tree(), store=d / "node") as node:
                    plain = await call_rate(node, "plain", N_CALL)
                    durable = await call_rate(node, "durable", N_CALL)
                    add("durable_call_plain", plain)
                    add("durable_call", durable)
                    add("durable_call_ratio", durable / plain)
                    add("durable_big_patch", await call_rate(
                        node, "big", N_BIG, lambda i: (i, False)))
                    add("durable_big_whole", await call_rate(
                        node, "big", N_BIG_WHOLE, lambda i: (i, True)))
                rate, stats = await group_rate(d / "group")
                add("durable_group_64", rate)
                add("durable_group_64_vs_ceiling",
                    rate / (1e6 / figures["raw_append_fdatasync_64"][-1]))
                batches.append(stats["records"] / max(stats["syncs"], 1))

            trio.run(main)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def out(name: str, unit: str, what: str, higher: bool = True, **extra: Any) -> None:
        values = figures[name]
        best = max(values) if higher else min(values)
        emit(name, best, unit, median=statistics.median(values), all=values, what=what,
             **extra)

    out("durable_call", "calls/s", "await node.call, durable counter, fsync never")
    out("durable_call_plain", "calls/s", "the same counter, not durable (same round)")
    out("durable_call_ratio", "x", "durable / not durable, paired per round (floor "
        "0.25x, aim 0.5x)")
    out("durable_big_patch", "calls/s", "10,000-key dict, one key changed per call, "
        "self.changed(key) (floor 20k/s)")
    out("durable_big_whole", "calls/s", "the same without self.changed: the whole state "
        "recorded each call")
    out("durable_group_64", "acks/s", f"fsync group, {CLIENTS} concurrent clients, each "
        f"waiting for its reply (floor 20k/s)",
        records_per_sync=[round(b, 1) for b in batches])
    out("durable_group_64_vs_ceiling", "x", "group rate / (1 / per-record time of 64 "
        "writes + 1 fdatasync, same round): 1.0 is the disk's ceiling")
    out("raw_append_54", "us", "baseline: os.write of 54 bytes, O_APPEND", higher=False)
    out("raw_store_put_small", "us", "baseline: SqliteStore.put of a small state",
        higher=False)
    out("raw_sqlite_wal_normal_txn", "us", "baseline: SQLite WAL NORMAL, 1 txn per row",
        higher=False)
    out("raw_append_fdatasync_64", "us", "baseline: 64 writes + 1 fdatasync, per record",
        higher=False)


# -- starting many durable servers ----------------------------------------------------------


def start(n: int) -> None:
    """Seconds to open a node of ``n`` durable servers: first with an empty store (n
    inits, each recorded), then with the n states stored (the figure of issue #13);
    beside them a node of n servers that are not durable, and the store's own open and
    load of n states, in the same process."""
    d = Path(tempfile.mkdtemp(prefix="otpy-bench-durable-start-"))
    figures: dict[str, float] = {}

    def root(durable: bool) -> otpy.Supervisor:
        return otpy.Supervisor([otpy.Child(f"c{i}", Counter, durable=durable)
                                for i in range(n)])

    async def timed(name: str, durable: bool, path: Path | None) -> None:
        spec = root(durable)
        gc.collect()
        t0 = clock()
        async with otpy.open_node(spec, store=path) as node:
            figures[name] = clock() - t0
            assert len(node.servers()) == n
        del spec

    try:
        trio.run(timed, "plain", False, None)
        trio.run(timed, "first", True, d / "node")
        trio.run(timed, "resume", True, d / "node")
        trio.run(timed, "resume_again", True, d / "node")
        load = load_100k(d, True) if n == 100_000 else None
    finally:
        shutil.rmtree(d, ignore_errors=True)
    tag = f"{n // 1000}k" if n >= 1000 else str(n)
    best = min(figures["resume"], figures["resume_again"])
    emit(f"durable_start_{tag}", best, "s", what=f"open_node of {n:,} durable servers "
         f"whose states are stored (resume; best of 2 starts; target <= 2 s)",
         all=[figures["resume"], figures["resume_again"]])
    emit(f"durable_first_start_{tag}", figures["first"], "s",
         what=f"open_node of {n:,} durable servers, empty store (init, each recorded)")
    emit(f"durable_plain_start_{tag}", figures["plain"], "s",
         what=f"open_node of {n:,} servers that are not durable (baseline)")
    if load is not None:
        emit("raw_store_load_100k", load["total"], "s",
             what="baseline: SqliteStore open + load + unpickle of 100,000 small states "
                  "(compacted into SQLite)")


# -- where a durable call's time goes ---------------------------------------------------------


def nowait_us(node: otpy.Node, name: str, n: int) -> float:
    """µs per ``call_nowait``: the step itself, without trio's part of a call."""
    call = node.call_nowait
    t0 = clock()
    for _ in range(n):
        call(name, "x")
    return (clock() - t0) / n * 1e6


def profile() -> None:
    """Where one durable call's time goes, by difference of synchronous calls
    (``call_nowait``: the step without trio's part): the general path (a server that
    something observes, with no store), the store's put, and the rest (the glue:
    Durability.record and commit), best of 7 rounds each; and a cProfile of durable
    ``await node.call``."""
    d = Path(tempfile.mkdtemp(prefix="otpy-bench-durable-profile-"))
    parts: dict[str, list[float]] = {}
    try:
        async def main() -> None:
            async with otpy.open_node(tree(), store=d / "node") as node:
                slow_root = otpy.Supervisor([otpy.Child("slow", Counter)])
                async with otpy.open_node(slow_root) as other:
                    # A server that takes the general path with nothing recording it.
                    other._sched.procs["slow"]._otpy_flags |= OBSERVED
                    store = node.store
                    for _ in range(7):
                        t0 = clock()
                        for i in range(N_CALL):
                            store.put("durable-put", "bench:Counter 1", i)
                        put = (clock() - t0) / N_CALL * 1e6
                        for k, v in (("step_plain", nowait_us(node, "plain", N_CALL)),
                                     ("step_general", nowait_us(other, "slow", N_CALL)),
                                     ("step_durable", nowait_us(node, "durable", N_CALL)),
                                     ("store_put", put),
                                     ("await_call_plain", 1e6 / await call_rate(
                                         node, "plain", N_CALL)),
                                     ("await_call_durable", 1e6 / await call_rate(
                                         node, "durable", N_CALL))):
                            parts.setdefault(k, []).append(v)
                    prof = cProfile.Profile()
                    prof.enable()
                    await call_rate(node, "durable", N_CALL)
                    prof.disable()
                    out = io.StringIO()
                    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(16)
                    print(out.getvalue(), file=sys.stderr)

        trio.run(main)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    best = {k: min(v) for k, v in parts.items()}
    best["general_path"] = best["step_general"] - best["step_plain"]
    best["glue"] = best["step_durable"] - best["step_general"] - best["store_put"]
    emit("durable_call_profile", best["await_call_durable"], "us",
         what="one durable await node.call, and its parts (best of 7 rounds each; "
              "general_path and glue by difference of call_nowait steps)",
         **{k: round(v, 3) for k, v in best.items()})


def main(argv: list[str]) -> None:
    quiet_logging()
    emit("durable_info", 0, "-", **python_info(), tmp=tempfile.gettempdir())
    if len(argv) >= 2 and argv[1] == "rates":
        rates(int(argv[2]) if len(argv) > 2 else 5)
    elif len(argv) >= 2 and argv[1] == "start":
        start(int(argv[2]) if len(argv) > 2 else 100_000)
    elif len(argv) >= 2 and argv[1] == "profile":
        profile()
    else:
        raise SystemExit(f"usage: {argv[0]} rates [ROUNDS] | start [N] | profile")


if __name__ == "__main__":
    main(sys.argv)

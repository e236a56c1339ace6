"""The durable store (``otpy.SqliteStore``) beside the raw figures it is built on, all
measured in the same run on the same disk (a temporary directory):

- baselines (the anchors of issue #13): ``os.write`` of a 54-byte record to an
  append-only file; SQLite WAL ``synchronous=NORMAL`` with one transaction per record;
  ``FULL`` with 100 rows per transaction; ``write`` + ``fdatasync`` per record; 64
  writes then one ``fdatasync`` (the group-commit ceiling);
- the engine: ``put`` of a small state (fsync never), and what its time is made of
  (pickle, framing, the write, the rest); ``put`` of a 10,000-key dict against
  ``patch`` of one key of it; put while the compactor absorbs segments (does its thread
  slow the loop?); group commit with 64 writers under trio, each waiting for its record
  to be synced before the next; ``fsync="always"``; opening and loading 100,000 small
  states from SQLite and from the log.

Every rate is the best of ``ROUNDS`` interleaved rounds, with the median beside it, and
each engine figure is divided by its baseline of the same round (``*_ratio``). The
machine is shared and noisy: read ranges, not digits.

    python bench/bench_store.py            # JSON lines, about a minute
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from _common import clock, emit, python_info, quiet_logging

from otpy._protocol.store_records import PUT, encode_record
from otpy._store import SqliteStore

ROUNDS = 5
N_SMALL = 50_000
N_SQLITE = 3_000
N_BIG = 200
N_PATCH = 20_000
N_SYNC = 200
GROUP_SECONDS = 1.0
WRITERS = 64
N_LOAD = 100_000
RECORD = b"r" * 54
SMALL_STATE = {"count": 41, "name": "counter"}

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def us_per(n: int, f: Callable[[], None]) -> float:
    t0 = clock()
    f()
    return (clock() - t0) / n * 1e6


# -- baselines ------------------------------------------------------------------------


def raw_append(d: Path) -> float:
    fd = os.open(d / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    write = os.write

    def run() -> None:
        for _ in range(N_SMALL):
            write(fd, RECORD)
    try:
        return us_per(N_SMALL, run)
    finally:
        os.close(fd)


def raw_append_sync(d: Path, per_sync: int) -> float:
    """µs per record: ``per_sync`` writes, then one fdatasync."""
    fd = os.open(d / f"sync{per_sync}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    n = N_SYNC * per_sync if per_sync > 1 else N_SYNC

    def run() -> None:
        for i in range(n):
            os.write(fd, RECORD)
            if (i + 1) % per_sync == 0:
                _fdatasync(fd)
    try:
        return us_per(n, run)
    finally:
        os.close(fd)


def sqlite_rows(d: Path, synchronous: str, per_txn: int) -> float:
    """µs per row of a key/blob upsert, ``per_txn`` rows per transaction."""
    path = d / f"sq-{synchronous}-{per_txn}.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
    n = N_SQLITE

    def run() -> None:
        for i in range(0, n, per_txn):
            conn.execute("BEGIN")
            for j in range(i, i + per_txn):
                conn.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (f"k{j % 100}", RECORD))
            conn.execute("COMMIT")
    try:
        return us_per(n, run)
    finally:
        conn.close()


# -- the engine -----------------------------------------------------------------------


def store_put_small(d: Path) -> float:
    with SqliteStore(d / "put", segment_bytes=64 << 20) as store:
        put = store.put

        def run() -> None:
            for i in range(N_SMALL):
                put(f"c{i % 100}", "1", SMALL_STATE)
        return us_per(N_SMALL, run)


def put_parts(d: Path) -> dict[str, float]:
    """What a small put is made of, each part timed alone in a loop."""
    data = pickle.dumps(SMALL_STATE, 5)
    rec = encode_record(PUT, 1, "c42", "1", data)
    fd = os.open(d / "parts.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    n = N_SMALL
    try:
        parts = {
            "pickle": us_per(n, lambda: [pickle.dumps(SMALL_STATE, 5) for _ in range(n)]
                             and None),
            "frame": us_per(n, lambda: [encode_record(PUT, i, "c42", "1", data)
                                        for i in range(n)] and None),
            "write": us_per(n, lambda: [os.write(fd, rec) for _ in range(n)] and None),
            "loop": us_per(n, lambda: [None for _ in range(n)] and None),
        }
    finally:
        os.close(fd)
    parts["record_bytes"] = len(rec)
    return parts


def big_dict_put_and_patch(d: Path) -> tuple[float, float]:
    state = {f"key{i}": i for i in range(10_000)}
    with SqliteStore(d / "big", segment_bytes=64 << 20) as store:
        store.put("kv", "1", state)

        def puts() -> None:
            for i in range(N_BIG):
                state["key1"] = i
                store.put("kv", "1", state)

        def patches() -> None:
            for i in range(N_PATCH):
                k = f"key{i % 10_000}"
                state[k] = -i
                store.patch("kv", "1", state, (k,))
        return us_per(N_BIG, puts), us_per(N_PATCH, patches)


def put_while_compacting(d: Path) -> tuple[float, int]:
    """µs per small put with segments sealed every ~4k records (the compactor busy
    absorbing 1,000 distinct keys each time), and how many compactions ran meanwhile."""
    with SqliteStore(d / "compacting", segment_bytes=256 << 10) as store:
        put = store.put

        def run() -> None:
            for i in range(N_SMALL):
                put(f"c{i % 1000}", "1", SMALL_STATE)
        us = us_per(N_SMALL, run)
        return us, store.statistics()["compactions"]


def always_put(d: Path) -> float:
    with SqliteStore(d / "always", fsync="always") as store:
        def run() -> None:
            for i in range(N_SYNC):
                store.put("c", "1", i)
        return us_per(N_SYNC, run)


async def group_commit(d: Path, writers: int) -> tuple[float, dict[str, Any]]:
    """Acknowledged puts per second: ``writers`` tasks each put, wait until the syncer
    covered the record, and put again, for GROUP_SECONDS."""
    store = SqliteStore(d / f"group{writers}", fsync="group")
    waiting: dict[int, trio.Event] = {}

    def on_synced(seq: int, error: object) -> None:
        for s in [s for s in waiting if s <= seq]:
            waiting.pop(s).set()

    store.on_synced(on_synced, trio.lowlevel.current_trio_token().run_sync_soon)
    acked = 0
    deadline = trio.current_time() + GROUP_SECONDS

    async def writer(w: int) -> None:
        nonlocal acked
        key = f"w{w}"
        i = 0
        while trio.current_time() < deadline:
            i += 1
            seq = store.put(key, "1", i)
            if seq > store.synced_seq:
                waiting[seq] = event = trio.Event()
                await event.wait()
            acked += 1

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, w)
    elapsed = trio.current_time() - t0
    stats = store.statistics()
    store.close()
    return acked / elapsed, stats


def load_100k(d: Path, compacted: bool) -> dict[str, float]:
    """Open a store holding 100k small states (compacted into SQLite, or all in the log)
    and load them: seconds to open, to list, and to unpickle every state."""
    path = d / f"load-{compacted}"
    store = SqliteStore(path, segment_bytes=64 << 20)
    for i in range(N_LOAD):
        store.put(f"server{i}", "1", {"count": i})
    store.close(compact=compacted)
    t0 = clock()
    store = SqliteStore(path, segment_bytes=64 << 20)
    t1 = clock()
    stored = store.load()
    states = [s.state() for s in stored]
    t2 = clock()
    store.close(compact=False)
    assert len(states) == N_LOAD
    return {"open": t1 - t0, "states": t2 - t1, "total": t2 - t0}


# -- driver ---------------------------------------------------------------------------


def best_median(values: list[float], lower_is_better: bool = True) -> dict[str, Any]:
    best = min(values) if lower_is_better else max(values)
    return {"best": best, "median": statistics.median(values), "all": values}


def main() -> None:
    quiet_logging()
    emit("store_info", 0, "-", **python_info(), tmp=tempfile.gettempdir())
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    parts: list[dict[str, float]] = []
    group_stats: list[dict[str, Any]] = []
    for _ in range(ROUNDS):
        d = Path(tempfile.mkdtemp(prefix="otpy-bench-store-"))
        try:
            raw = raw_append(d)
            add("append_raw_54", raw)
            put = store_put_small(d)
            add("store_put_small", put)
            add("store_put_small_ratio", put / raw)
            parts.append(put_parts(d))
            add("sqlite_wal_normal_txn", sqlite_rows(d, "NORMAL", 1))
            add("sqlite_wal_full_100", sqlite_rows(d, "FULL", 100))
            add("append_fdatasync_each", raw_append_sync(d, 1))
            add("append_fdatasync_64", raw_append_sync(d, 64))
            big_put, patch = big_dict_put_and_patch(d)
            add("store_put_10k_dict", big_put)
            add("store_patch_10k_dict", patch)
            add("store_patch_vs_put_10k", big_put / patch)
            add("store_patch_10k_vs_put_small", patch / put)
            busy, compactions = put_while_compacting(d)
            add("store_put_while_compacting", busy)
            add("store_put_while_compacting_ratio", busy / put)
            add("store_compactions_during", compactions)
            add("store_put_always", always_put(d))
            rate, stats = trio.run(group_commit, d, WRITERS)
            add("store_group_64_rate", rate)
            # The ceiling of 64 writers on this disk: 64 records per fdatasync, measured
            # just before (the baseline "64 writes + 1 fdatasync").
            add("store_group_64_vs_ceiling",
                rate / (1e6 / figures["append_fdatasync_64"][-1]))
            group_stats.append(stats)
            rate1, _ = trio.run(group_commit, d, 1)
            add("store_group_1_rate", rate1)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def out(name: str, unit: str, what: str, lower: bool = True, **extra: Any) -> None:
        bm = best_median(figures[name], lower)
        emit(name, bm["best"], unit, median=bm["median"], all=bm["all"], what=what,
             **extra)

    out("append_raw_54", "us", "baseline: os.write of a 54-byte record, O_APPEND")
    out("store_put_small", "us", "SqliteStore.put of a small dict, fsync never")
    out("store_put_small_ratio", "x", "put small / raw 54-byte append, paired per round")
    out("sqlite_wal_normal_txn", "us", "baseline: SQLite WAL NORMAL, 1 txn per row")
    out("sqlite_wal_full_100", "us", "baseline: SQLite WAL FULL, 100 rows per txn, per row")
    out("append_fdatasync_each", "us", "baseline: write + fdatasync per record")
    out("append_fdatasync_64", "us", "baseline: 64 writes + 1 fdatasync, per record")
    out("store_put_10k_dict", "us", "put of a 10,000-key dict (whole state)")
    out("store_patch_10k_dict", "us", "patch of one key of a 10,000-key dict (amortized, "
        "including the whole-state images it writes when patches outweigh the state)")
    out("store_patch_vs_put_10k", "x", "put 10k dict / patch one key of it", lower=False)
    out("store_patch_10k_vs_put_small", "x", "patch of a 10k dict / put of a small state")
    out("store_put_while_compacting", "us", "small put, segments of 256 KiB sealed and "
        "compacted (1,000 keys each) meanwhile")
    out("store_put_while_compacting_ratio", "x", "put while compacting / put small")
    out("store_compactions_during", "-", "compactions during that run", lower=False)
    out("store_put_always", "us", "put with fsync='always' (fdatasync on the loop)")
    out("store_group_64_rate", "acks/s", "fsync='group', 64 trio writers each waiting "
        "for its sync (floor of issue #13: 20k/s)", lower=False,
        batches=[round(s["records"] / max(s["syncs"], 1), 1) for s in group_stats])
    out("store_group_64_vs_ceiling", "x", "group rate / (1 / the per-record time of 64 "
        "writes + 1 fdatasync), paired per round: 1.0 is the disk's ceiling", lower=False)
    out("store_group_1_rate", "acks/s", "fsync='group', one writer: 1 / sync latency",
        lower=False)
    keys = ("pickle", "frame", "write", "loop")
    best_parts = {k: min(p[k] for p in parts) for k in keys}
    put_best = min(figures["store_put_small"])
    emit("store_put_profile", put_best, "us", what="where a small put's time goes (best "
         "of rounds, each part timed alone)", record_bytes=parts[0]["record_bytes"],
         pickle=best_parts["pickle"], frame=best_parts["frame"],
         write=best_parts["write"],
         rest=put_best - best_parts["pickle"] - best_parts["frame"] - best_parts["write"])
    for compacted in (True, False):
        runs = []
        for _ in range(2):
            d = Path(tempfile.mkdtemp(prefix="otpy-bench-load-"))
            try:
                runs.append(load_100k(d, compacted))
            finally:
                shutil.rmtree(d, ignore_errors=True)
        where = "sqlite" if compacted else "log"
        emit(f"store_load_100k_{where}", min(r["total"] for r in runs), "s",
             what=f"open + load + unpickle 100,000 small states, all in the {where}",
             open=min(r["open"] for r in runs), states=min(r["states"] for r in runs),
             all=[r["total"] for r in runs])
    sys.stdout.flush()


if __name__ == "__main__":
    main()

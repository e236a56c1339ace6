"""A process that writes to a store, for tests/test_store.py to kill, starve or confine.

    python store_child.py OTPY_DIR workload STORE     append the workload, print acks
    python store_child.py OTPY_DIR fsize STORE BYTES  the same under RLIMIT_FSIZE
    python store_child.py OTPY_DIR open STORE         open a store, print the outcome

It loads ``otpy._store`` without ``otpy/__init__.py`` (which imports trio and the whole
node), as tests/test_package.py does: the kill test starts this process several times
and a fifth of a second of imports each time would be most of its budget.

The workload is deterministic: op ``i`` depends on ``i`` alone, and every op writes
exactly one record, so the store's seq after op ``i`` is ``i`` and the states after any
seq can be recomputed by :func:`replay`.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

KEYS = 7


def step(states: dict[str, dict[str, Any]], i: int) -> tuple[str, str, str]:
    """Apply op ``i`` to ``states``; return (kind, key, entry changed)."""
    key = f"k{i % KEYS}"
    state = states.get(key)
    if i % 17 == 0 and state is not None:
        del states[key]
        return "delete", key, ""
    if state is None or i % 5 == 0:
        states[key] = {"i": i, "pad": "x" * (i % 64)}
        return "put", key, ""
    entry = f"e{i % 4}"
    if i % 13 == 0 and entry in state:
        del state[entry]
    else:
        state[entry] = i
    return "patch", key, entry


def replay(seq: int) -> dict[str, dict[str, Any]]:
    """The states after ops 1..seq."""
    states: dict[str, dict[str, Any]] = {}
    for i in range(1, seq + 1):
        step(states, i)
    return states


def run_workload(store: Any, limit: int | None = None) -> None:
    """Append ops after the store's seq, printing each acknowledged seq."""
    states = {s.key: s.state() for s in store.load()}
    i = store.seq
    os.write(1, b"ready\n")
    while limit is None or i < limit:
        i += 1
        kind, key, entry = step(states, i)
        if kind == "delete":
            seq = store.delete(key)
        elif kind == "put":
            seq = store.put(key, "1", states[key])
        else:
            seq = store.patch(key, "1", states[key], [entry])
        if seq != i:
            raise AssertionError(f"op {i} got seq {seq}")
        os.write(1, b"%d\n" % seq)


def main() -> None:
    otpy_dir, command, path, *rest = sys.argv[1:]
    package = types.ModuleType("otpy")
    package.__path__ = [otpy_dir]
    sys.modules["otpy"] = package
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from otpy._exceptions import StoreError
    from otpy._store.engine import SqliteStore

    if command == "workload":
        run_workload(SqliteStore(path, segment_bytes=4096))
    elif command == "fsize":
        import resource
        import signal

        # Past the limit the kernel sends SIGXFSZ, which kills by default; ignored, the
        # write fails with EFBIG as it fails with ENOSPC on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(rest[0])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        store = SqliteStore(path, segment_bytes=limit * 4)
        try:
            run_workload(store)
        except StoreError as exc:
            print(f"StoreError: {exc}", flush=True)
            print(f"stats: {store.statistics()}", flush=True)
            try:
                store.put("k1", "1", {"after": "the failure"})
            except StoreError as again:
                print(f"again: {again}", flush=True)
    elif command == "open":
        try:
            SqliteStore(path).close()
        except StoreError as exc:
            print(f"StoreError: {exc}", flush=True)
        else:
            print("opened", flush=True)


if __name__ == "__main__":
    main()

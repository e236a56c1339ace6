"""``MemoryStore``: an :class:`otpy.Store` held in memory, for tests and the simulation.

It keeps what a real store keeps (each key's last whole state, pickled, the patches
recorded after it, and its vsn) and gives it back the same way, so that a server resumes
from a copy of what was recorded, never from a live object. Every record is as durable
as it will be when its call returns (``synced_seq`` is always the latest seq), and
:meth:`MemoryStore.load` can be called again and again: a new Simulation (or node) on
the same MemoryStore is the node restarted after a kill -9. No file, no thread, no trio.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .._exceptions import StoreError
from .._store.base import StoredState, SyncedCallback, make_patch


class MemoryStore:
    """A store in memory (see the module doc), with a switch to make it fail.

    ::

        store = otpy.testing.MemoryStore()
        store.put("c", "1", 41)
        [stored] = store.load()
        assert (stored.key, stored.vsn, stored.state()) == ("c", "1", 41)

    ``store.failing = True`` makes every record raise :class:`otpy.StoreError` (as a
    full disk would), until it is set back to False."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[str, int, bytes, list[bytes]]] = {}
        self._seq = 0
        self._records = 0
        self._bytes = 0
        self.failing = False
        """Whether every record raises :class:`otpy.StoreError` (nothing recorded)."""
        self.path = "memory"
        """What error messages call this store."""

    @property
    def synced_seq(self) -> int:
        """The latest seq: every record is as durable as it gets when its call returns."""
        return self._seq

    @property
    def seq(self) -> int:
        """The seq of the latest record."""
        return self._seq

    def _pickle(self, key: str, value: Any) -> bytes:
        if self.failing:
            raise StoreError(f"the memory store is failing (store.failing is True): "
                             f"nothing recorded for {key!r}", path=self.path)
        try:
            return pickle.dumps(value, 5)
        except Exception as exc:
            raise StoreError(f"the state of {key!r} cannot be pickled ({type(exc).__name__}:"
                             f" {exc})", path=self.path) from exc

    def _next(self, size: int) -> int:
        self._seq += 1
        self._records += 1
        self._bytes += size
        return self._seq

    def put(self, key: str, vsn: str, state: Any) -> int:
        """Record ``state`` whole as ``key``'s; return its seq."""
        data = self._pickle(key, state)
        seq = self._next(len(data))
        self._states[key] = (vsn, seq, data, [])
        return seq

    def patch(self, key: str, vsn: str, state: Any, changed: Iterable[Hashable]) -> int:
        """Record the entries ``changed`` of the mapping ``state``; return the seq (the
        whole state for a key with no record, or of another vsn)."""
        held = self._states.get(key)
        if held is None or held[0] != vsn:
            return self.put(key, vsn, state)
        change = make_patch(state, changed)
        if not change[0] and not change[1]:
            return self._seq
        data = self._pickle(key, change)
        seq = self._next(len(data))
        self._states[key] = (vsn, seq, held[2], [*held[3], data])
        return seq

    def put_many(self, items: Iterable[tuple[str, str, Any]]) -> int:
        """Record each ``(key, vsn, state)`` whole, all or none; return the last seq."""
        datas = [(key, vsn, self._pickle(key, state)) for key, vsn, state in items]
        for key, vsn, data in datas:
            self._states[key] = (vsn, self._next(len(data)), data, [])
        return self._seq

    def delete(self, key: str) -> int:
        """Record that ``key`` has no state any more."""
        self._pickle(key, None)
        self._states.pop(key, None)
        return self._next(0)

    def get(self, key: str) -> StoredState | None:
        """What is recorded for ``key`` now, or None."""
        held = self._states.get(key)
        if held is None:
            return None
        vsn, seq, image, patches = held
        return StoredState(key, vsn, seq, image, tuple(patches), self.path)

    def load(self) -> list[StoredState]:
        """Every key's state as held now (any number of times)."""
        return [s for s in map(self.get, sorted(self._states)) if s is not None]

    def on_synced(self, callback: SyncedCallback, call_soon: Callable[..., object]) -> None:
        """Never calls back: every record is synced when its call returns."""

    def statistics(self) -> dict[str, Any]:
        """``records``, ``bytes``, ``seq``, ``synced_seq``, ``pending`` (always 0) and
        ``keys``."""
        return {"path": self.path, "records": self._records, "bytes": self._bytes,
                "seq": self._seq, "synced_seq": self._seq, "pending": 0,
                "keys": len(self._states)}

    def close(self) -> None:
        """Nothing to release: a closed MemoryStore can be loaded again."""

    def states(self) -> dict[str, Any]:
        """Every key's state, unpickled: what a node started on this store resumes."""
        return {s.key: s.state() for s in self.load()}

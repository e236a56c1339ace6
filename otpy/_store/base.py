"""What every store promises (:class:`Store`), and what it gives back at start
(:class:`StoredState`).

The runtime calls a store from the node's loop thread, inline in a server's step, so
each call must be cheap and must not wait for the disk. A store records *states*: for
each key (a durable server's name) the latest whole state, its code version (``vsn``),
and the sequence number of its latest record. Patches are an optimisation a store may
ignore (writing the whole state instead); deletions are records too.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Hashable, Iterable, MutableMapping
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from .._exceptions import StoreError

FsyncMode = Literal["never", "group", "always"]
FSYNC_MODES: tuple[FsyncMode, ...] = ("never", "group", "always")

SyncedCallback = Callable[[int, "StoreError | None"], None]
"""``callback(synced_seq, error)``, run on the loop thread (see :meth:`Store.on_synced`)."""


class StoredState(NamedTuple):
    """One key's stored state, as a store gives it back at start: ``key`` (the server's
    name), ``vsn`` (the code version that recorded it), ``seq`` (its latest record),
    ``image`` (the pickled last whole state), ``patches`` (pickled ``(set, removed)``
    pairs recorded after it, oldest first), ``origin`` (the store's path, for messages)
    and ``error`` (why it cannot be given back without reading it, e.g. it exceeds the
    store's bound on a record; empty when all is well).

    Nothing is unpickled until :meth:`state` is called, so a state whose classes the
    running code no longer has fails only its own server's start, with a
    :class:`~otpy.StoreError` naming the key and the store, and stays on disk untouched.

    ::

        import pickle
        stored = StoredState("kv", "1", 7, pickle.dumps({"a": 1}),
                             (pickle.dumps(({"b": 2}, ("a",))),), "demo")
        assert stored.state() == {"b": 2}
    """

    key: str
    vsn: str
    seq: int
    image: bytes
    patches: tuple[bytes, ...]
    origin: str
    error: str = ""

    def state(self) -> Any:
        """Unpickle the image and apply the patches; raises :class:`~otpy.StoreError`
        (its ``__cause__`` the unpickling error) when that fails."""
        if self.error:
            raise StoreError(f"the stored state of {self.key!r} in {self.origin} cannot "
                             f"be read: {self.error}", path=self.origin)
        try:
            state = pickle.loads(self.image)
        except Exception as exc:
            raise StoreError(
                f"the stored state of {self.key!r} (vsn {self.vsn!r}, seq {self.seq}) in "
                f"{self.origin} cannot be unpickled: {type(exc).__name__}: {exc}. The "
                f"state was pickled by code that this program may no longer have (a "
                f"renamed or removed class); restore that class, or delete the key",
                path=self.origin) from exc
        for raw in self.patches:
            try:
                apply_patch(state, pickle.loads(raw))
            except Exception as exc:
                raise StoreError(
                    f"a stored patch of {self.key!r} (vsn {self.vsn!r}) in {self.origin} "
                    f"cannot be applied to its state of type {type(state).__name__}: "
                    f"{type(exc).__name__}: {exc}", path=self.origin) from exc
        return state


def make_patch(state: Any, changed: Iterable[Hashable]) -> tuple[dict[Any, Any], tuple[Any, ...]]:
    """The patch that brings a copy of the state's previous version to ``state``:
    ``(entries set, keys removed)`` for the entries named in ``changed``."""
    set_: dict[Any, Any] = {}
    removed: list[Any] = []
    for k in changed:
        # ``in`` first: indexing a defaultdict would insert into the live state.
        if k in state:
            set_[k] = state[k]
        else:
            removed.append(k)
    return set_, tuple(removed)


def apply_patch(state: Any, patch: tuple[dict[Any, Any], tuple[Any, ...]]) -> None:
    """Apply ``(set, removed)`` to a mapping state, in place."""
    set_, removed = patch
    if not isinstance(state, MutableMapping):
        raise TypeError(f"a patch applies to a mutable mapping, not to {type(state).__name__}")
    state.update(set_)
    for k in removed:
        state.pop(k, None)


@runtime_checkable
class Store(Protocol):
    """A node's durable store: where durable servers' states are recorded, so that they
    survive a kill -9 of the node (and, as its fsync mode says, a power loss).

    The node calls every method from its one loop thread. Recording methods
    (:meth:`put`, :meth:`patch`, :meth:`delete`) run inline in a server's step: they
    return as soon as the record is safe from a crash of the process (written to the
    kernel), without waiting for the disk unless the store was asked to
    (``fsync="always"``), and return the record's sequence number. A reply that depends
    on a record is shown to anyone only once ``seq <= synced_seq``; with group commit the
    runtime holds it until :meth:`on_synced`'s callback says so.

    ``otpy.SqliteStore`` is the embedded implementation (an append-only log compacted into
    SQLite); a store for a cluster (JetStream KV) implements the same methods.

    The promises, method by method:

    - ``put(key, vsn, state) -> seq``: records the whole ``state`` (pickled at once, so
      the caller may mutate it afterwards) as ``key``'s state of code version ``vsn``.
      Seqs grow by one per record. Raises :class:`~otpy.StoreError` and records nothing
      when it cannot (the disk is full, the state cannot be pickled or is too large).
    - ``patch(key, vsn, state, changed) -> seq``: records that the entries of the mapping
      ``state`` named in ``changed`` were set (or removed, if absent) since the last
      record of ``key``. The store may record the whole state instead (for the first
      record of a key, a new ``vsn``, or when patches outgrow the last whole state), so
      its cost stays that of the change, not of the state. An empty ``changed`` records
      nothing and returns the latest seq.
    - ``put_many(items) -> seq``: records the whole state of each ``(key, vsn, state)``
      as one atomic batch: after a crash at any instant the store holds all of them or
      none. Returns the last record's seq (the latest seq for no items). A release
      commits the states of its durable servers with it.
    - ``delete(key) -> seq``: records that ``key`` has no state any more.
    - ``get(key) -> StoredState | None``: what is recorded for ``key`` now (what
      :meth:`load` would give for it after a kill -9 at this instant), None if nothing
      is. The node calls it to restart a server after a crash (its live state may hold
      changes that were never recorded), never in a step, so it may read the disk.
    - ``synced_seq``: every record with a seq at or below it is as durable as the fsync
      mode promises ("never" and "always": every record a call returned).
    - ``on_synced(callback, call_soon)``: from now on, each time ``synced_seq`` advances
      in another thread, ``call_soon(callback, synced_seq, None)`` is called from that
      thread (``call_soon`` is trio's ``TrioToken.run_sync_soon``, or anything else safe
      to call from another thread); if syncing fails,
      ``call_soon(callback, synced_seq, error)`` once, after which recording raises.
    - ``load() -> list[StoredState]``: every key's state as the store held it when it
      was opened (after recovering a damaged log tail). Called once, before recording.
    - ``statistics() -> dict``: figures for ``otpy stats``; no I/O.
    - ``close()``: waits for pending syncs and for compaction, and releases the store;
      recording afterwards raises. Safe to call twice.
    """

    @property
    def synced_seq(self) -> int:
        """Records up to this seq are as durable as the store's fsync mode promises."""
        ...

    def put(self, key: str, vsn: str, state: Any) -> int:
        """Record ``state`` as ``key``'s whole state; return its seq."""
        ...

    def patch(self, key: str, vsn: str, state: Any, changed: Iterable[Hashable]) -> int:
        """Record that the entries ``changed`` of ``state`` changed; return its seq."""
        ...

    def put_many(self, items: Iterable[tuple[str, str, Any]]) -> int:
        """Record each ``(key, vsn, state)`` whole, all or none; return the last seq."""
        ...

    def delete(self, key: str) -> int:
        """Record that ``key`` has no state any more; return the record's seq."""
        ...

    def get(self, key: str) -> StoredState | None:
        """What is recorded for ``key`` now, or None."""
        ...

    def on_synced(self, callback: SyncedCallback, call_soon: Callable[..., object]) -> None:
        """Have ``call_soon(callback, synced_seq, error)`` called as syncs complete."""
        ...

    def load(self) -> list[StoredState]:
        """Every key's state as the store held it when it was opened."""
        ...

    def statistics(self) -> dict[str, Any]:
        """The store's figures, without I/O."""
        ...

    def close(self) -> None:
        """Finish pending work and release the store."""
        ...

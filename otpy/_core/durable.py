"""Durable servers: what ties the scheduler's commit point to the node's store.

A server is durable when its class says ``durable = True`` or its child spec
``durable=True``. The scheduler starts it with the ``OBSERVED`` flag, so that its steps
take the general path, where :meth:`Scheduler.commit` hands every new state to
:meth:`Durability.record` *before* it becomes the server's state, and a release hands
its states to :meth:`Durability.record_all`. The store itself (``otpy.Store``; the
embedded one is ``otpy.SqliteStore``) is given by the edge, as the clock is: it does the
I/O behind its methods, and nothing here imports trio or touches a file.

What must stay true:

- **Recorded before visible.** A state is recorded (the store's ``put`` or ``patch``
  returned) before the step's reply reaches its caller and before the state becomes the
  server's. If recording raises, the step crashes (the caller gets ``ServerCrashed``
  whose ``__cause__`` is the error), nothing of it is acknowledged, and the server
  keeps the last state that was recorded.
- **Held until durable.** When the store says a record is not yet as durable as its
  fsync mode promises (``seq > store.synced_seq``: group commit), the reply is held in
  a FIFO, in seq order, and released when the store's callback reports the sync
  (:meth:`synced`); if the sync fails, every held reply fails instead. Only a caller
  outside the node is held: one stepped inline (``self.call``) needs its answer within
  the step.
- **Resume from what is recorded.** A durable server that starts with a stored state
  runs ``resume(state, arg)`` instead of ``init``: the state the store gave back at
  open (first start), or what it holds now (``store.get``) for any later start, so that
  a server restarted after a crash resumes from its last recorded state, never from a
  live state that its crashed step may have changed in place. The state is migrated
  through ``code_change`` to the running ``vsn`` and checked against the state type;
  one that cannot be read, migrated or checked is *refused*: that server does not
  start (one ``durable_state_refused`` error event), the others do, and the stored
  state stays as it is.
- **Each record names its code.** The store's ``vsn`` field holds ``"<module:Class>
  <vsn>"`` (:func:`tag`), so that a state is never handed to another class by accident
  (see :meth:`take`) and a state of a newer version is refused rather than misread.
- **Gone for good, deleted.** A child that stops for good (a temporary child ends, a
  transient child stops normally, ``delete_child``) has its stored state deleted
  (:meth:`forget`); ``terminate_child`` keeps it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._exceptions import Overrun, StateTypeError, StoreError
from .release import _class_key
from .server import NOTHING, Caller, GenServer, runs_callbacks
from .typecheck import check_state

if TYPE_CHECKING:
    from .._store.base import Store, StoredState
    from .scheduler import Scheduler


def tag(cls: type[GenServer[Any]]) -> str:
    """What a durable server's records carry in the store's ``vsn`` field: its class
    (``module:Class``, as releases name classes) and its ``vsn``."""
    return f"{_class_key(cls)} {cls.vsn}"


def split_tag(stored: str) -> tuple[str, str]:
    """``(class, vsn)`` of a stored tag; the class is ``""`` for a state recorded
    without one (by the store's own API)."""
    klass, sep, vsn = stored.partition(" ")
    return (klass, vsn) if sep else ("", stored)


def _numbers(vsn: str) -> tuple[int, ...] | None:
    parts = vsn.split(".")
    if all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return None


def newer(stored: str, running: str) -> bool:
    """Whether version ``stored`` is known to come after ``running``: both are dotted
    numbers (``"2"``, ``"1.10"``) and ``stored`` is the greater. Other versions (a
    derived vsn, ``"2024-01-beta"``) have no order otpy can tell."""
    a, b = _numbers(stored), _numbers(running)
    return a is not None and b is not None and a > b


def _migrates(cls: type[GenServer[Any]]) -> bool:
    """Whether ``cls`` has a code_change of its own (not GenServer's, which returns the
    state unchanged)."""
    return any("code_change" in vars(c) for c in cls.__mro__ if c is not GenServer)


class Durability:
    """The durable servers of one node and its store (see the module doc).

    Made by ``Runtime.use_store(store)``, which calls ``store.load()`` (once) and hooks
    :meth:`record` and :meth:`record_all` to the scheduler's commits. The edge passes
    :meth:`synced` to the store's ``on_synced`` (group commit), and calls :meth:`closed`
    after closing the store."""

    def __init__(self, sched: Scheduler, store: Store) -> None:
        self.sched = sched
        self.store = store
        self.origin = str(getattr(store, "path", type(store).__name__))
        # What the store held at open, by name, until each server's first start.
        self.loaded: dict[str, StoredState] = {s.key: s for s in store.load()}
        # Names started since open: the store may hold a state for them (it recorded
        # their first one), so a later start asks it (store.get).
        self.recorded: set[str] = set()
        # Keys of a mapping state that a step named with self.changed, per server.
        self.changes: dict[GenServer[Any], list[Any]] = {}
        # Replies waiting for their record to be synced: (seq, caller, reply, server
        # name), in order.
        self.held: deque[tuple[int, Caller, Any, str]] = deque()
        # Why a name's stored state was refused at its last start (until one works).
        self.refusals: dict[str, StoreError] = {}
        self.failure: StoreError | None = None
        self.resumed = 0
        self.migrated = 0
        self._tags: dict[type[GenServer[Any]], str] = {}
        # A state given back exactly as stored: its first commit records nothing.
        self._skip: tuple[GenServer[Any], Any] | None = None
        self._put = store.put
        self._patch = store.patch
        sched.durable = self
        sched.on_commit = self.record
        sched.on_commit_all = self.record_all

    # -- recording -------------------------------------------------------------------

    def _tag(self, cls: type[GenServer[Any]]) -> str:
        t = self._tags[cls] = tag(cls)
        return t

    def record(self, proc: GenServer[Any], state: Any) -> int:
        """Record ``state`` as ``proc``'s (Scheduler.on_commit): a patch of the keys the
        step named with ``self.changed``, else the whole state. Returns the seq the
        step's reply must wait for, or 0 when it need not wait. Raises what the store
        raised (nothing was recorded)."""
        skip = self._skip
        if skip is not None:
            self._skip = None
            if skip[0] is proc and skip[1] is state and proc not in self.changes:
                return 0
        cls = proc.__class__
        t = self._tags.get(cls) or self._tag(cls)
        keys = self.changes.pop(proc, None) if self.changes else None
        if keys is None:
            seq = self._put(proc._otpy_name, t, state)
        else:
            seq = self._patch(proc._otpy_name, t, state, keys)
        return seq if seq > self.store.synced_seq else 0

    def record_all(self, changes: list[tuple[GenServer[Any], type[GenServer[Any]], Any]]
                   ) -> None:
        """Record a release's new states, each with its new class, in one atomic
        record (Scheduler.on_commit_all). Raises what the store raised (nothing was
        recorded, and the release changes nothing)."""
        for proc, _, _ in changes:
            self.changes.pop(proc, None)
        self.store.put_many([(proc._otpy_name, self._tags.get(cls) or self._tag(cls), state)
                             for proc, cls, state in changes])

    def changed(self, proc: GenServer[Any], keys: Iterable[Any]) -> None:
        """``self.changed(*keys)`` of a durable server: its next commit records those
        keys of its mapping state (a patch)."""
        mine = self.changes.get(proc)
        if mine is None:
            self.changes[proc] = list(keys)
        else:
            mine.extend(keys)

    # -- group commit ----------------------------------------------------------------

    def hold(self, seq: int, caller: Caller, reply: Any, name: str) -> None:
        """Give ``reply`` (of server ``name``) to ``caller`` once the record ``seq`` is
        synced."""
        self.held.append((seq, caller, reply, name))

    def synced(self, seq: int, error: StoreError | None) -> None:
        """The store synced every record up to ``seq`` (its ``on_synced`` callback, run
        on the loop): release the replies held for them, in order. With ``error``, the
        store could not sync what came after: those replies fail with it."""
        held = self.held
        while held and held[0][0] <= seq:
            _, caller, reply, _ = held.popleft()
            try:
                caller.reply(reply)
            except Exception as exc:  # a caller's own hook failing must not stop the rest
                self.sched.log.error("held_reply_failed", error=repr(exc))
        if error is not None:
            self.failure = error
            while held:
                _, caller, _, _ = held.popleft()
                err = StoreError(f"the state this call recorded could not be made durable, "
                                 f"so the call is not acknowledged: {error}",
                                 path=self.origin)
                err.__cause__ = error
                caller._fail(err)

    def fenced(self, name: str, error: StoreError) -> None:
        """Server ``name``'s records can no longer be made durable here: another node
        owns its stored state now (a cluster store fenced it). The replies held for
        it fail with ``error``; the others wait as before."""
        keep: deque[tuple[int, Caller, Any, str]] = deque()
        for entry in self.held:
            if entry[3] == name:
                err = StoreError(f"the state this call recorded was not made durable, so "
                                 f"the call is not acknowledged: {error}", path=self.origin)
                err.__cause__ = error
                entry[1]._fail(err)
            else:
                keep.append(entry)
        self.held = keep

    def offer(self, name: str, stored: StoredState | None) -> None:
        """The state server ``name`` starts from at its next start here, read from a
        store the cluster shares when this node takes the server over (None: none,
        so it starts from ``init``)."""
        self.recorded.discard(name)
        self.refusals.pop(name, None)
        if stored is None:
            self.loaded.pop(name, None)
        else:
            self.loaded[name] = stored

    def closed(self) -> None:
        """The store was closed (it synced what was pending): release what is held."""
        self.synced(self.store.synced_seq, self.failure)

    # -- starting, and stopping for good ---------------------------------------------

    @runs_callbacks("proc")
    def take(self, proc: GenServer[Any], cls: type[GenServer[Any]]) -> Any:
        """The state durable server ``proc`` (of class ``cls``, being started) resumes
        from, or NOTHING when none is stored: migrated through ``code_change`` if it was
        recorded by another vsn, and checked against the state type. Raises StoreError
        (its message names the store and says how to fix it) when the state cannot be
        read back, was recorded by another class (a child id reused: see below), is of
        a newer vsn than ``cls`` (older code cannot read it), or fails its migration or
        its check. Nothing is consumed: a refused state stays, for the next start.

        Another class takes over a stored state only through a migration: a class that
        has a ``code_change`` of its own and a vsn other than the stored one (a new
        version of the same server, renamed). Otherwise the start is refused, so that a
        child id given to an unrelated class never hands it another class's state."""
        name = proc._otpy_name
        stored = self.loaded.get(name)
        if stored is None:
            if name not in self.recorded:
                return NOTHING
            stored = self.store.get(name)
            if stored is None:
                return NOTHING
        state = stored.state()
        if stored.vsn == (self._tags.get(cls) or self._tag(cls)):
            # Recorded by this very code (the common case, and the start of a node of
            # 100k servers): nothing to migrate; checked as init's state would be.
            try:
                check_state(cls, state, server=name, when=f"stored in {stored.origin}")
            except StateTypeError as exc:
                raise StoreError(f"{exc} The stored state is left as it is",
                                 path=stored.origin) from exc
            self._skip = (proc, state)  # already recorded as it is: not again
            self.resumed += 1
            return state
        klass, vsn = split_tag(stored.vsn)
        origin = stored.origin
        running = _class_key(cls)
        keep = "The stored state is left as it is"
        if vsn != cls.vsn and newer(vsn, cls.vsn):
            raise StoreError(
                f"the stored state of {name!r} in {origin} is of vsn {vsn}, newer than the "
                f"vsn {cls.vsn} of {running} that this node runs: older code cannot read "
                f"it. Start the node with the code of vsn {vsn} (to go back to older code, "
                f"downgrade the release before stopping the node). {keep}", path=origin)
        if klass and klass != running and (vsn == cls.vsn or not _migrates(cls)):
            raise StoreError(
                f"the stored state of {name!r} in {origin} was recorded by {klass} (vsn "
                f"{vsn}), but the child now runs {running} (vsn {cls.vsn}); a child id "
                f"given to another class does not take over its state. If "
                f"{cls.__qualname__} is meant to, give it a new vsn and a code_change that "
                f"migrates from vsn {vsn!r}; if not, drop the old state first "
                f"(delete_child, or otpy.SqliteStore(path).delete({name!r}) while the node "
                f"is stopped). {keep}", path=origin)
        migrated = vsn != cls.vsn
        if migrated:
            try:
                state = proc.code_change(vsn, state, None)
            except (Exception, Overrun) as exc:
                err = exc.timeout() if isinstance(exc, Overrun) else exc
                raise StoreError(
                    f"the stored state of {name!r} (vsn {vsn}) in {origin} could not be "
                    f"migrated to vsn {cls.vsn}: {cls.__qualname__}.code_change raised "
                    f"{type(err).__name__}: {err}. {keep}", path=origin) from err
        try:
            check_state(cls, state, server=name,
                        when=f"stored in {origin}" + (f" and migrated from vsn {vsn}"
                                                      if migrated else ""))
        except StateTypeError as exc:
            raise StoreError(f"{exc} {keep}", path=origin) from exc
        if migrated:
            self.migrated += 1
        else:
            self._skip = (proc, state)  # already recorded as it is: not again
        self.resumed += 1
        return state

    def started(self, proc: GenServer[Any]) -> None:
        """Durable server ``proc`` started (its first state committed)."""
        name = proc._otpy_name
        if self.loaded:
            self.loaded.pop(name, None)
        if self.refusals:
            self.refusals.pop(name, None)
        self.recorded.add(name)

    def refuse(self, name: str, error: StoreError) -> None:
        """The stored state of ``name`` could not be used: its server does not start."""
        self.refusals[name] = error
        self.sched.log.error("durable_state_refused", server=name, store=self.origin,
                             error=str(error))

    def forget(self, name: str) -> None:
        """Server ``name`` stopped for good: delete its stored state."""
        self.loaded.pop(name, None)
        self.recorded.discard(name)
        self.refusals.pop(name, None)
        try:
            self.store.delete(name)
        except Exception as exc:
            self.sched.log.error("durable_state_not_deleted", server=name, store=self.origin,
                                 error=f"{type(exc).__name__}: {exc}")
        else:
            self.sched.log.debug("durable_state_deleted", server=name)

    def opened(self) -> None:
        """The tree started: say what was resumed, migrated, refused and left."""
        self.sched.log.info("durable_servers_resumed", store=self.origin,
                            resumed=self.resumed, migrated=self.migrated,
                            refused=len(self.refusals), not_started=len(self.loaded))

    def statistics(self) -> dict[str, Any]:
        """The store's figures, with ``held_replies`` (replies waiting for a sync),
        ``refused`` (servers whose stored state could not be used) and
        ``stored_not_started`` (states stored for servers that have not started)."""
        stats = dict(self.store.statistics())
        stats["held_replies"] = len(self.held)
        stats["refused"] = len(self.refusals)
        stats["stored_not_started"] = len(self.loaded)
        return stats

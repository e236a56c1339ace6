"""Releases: live code upgrades and downgrades with typed, atomic state migration.

An upgrade is planned against the live registry (never against declared metadata),
then carried out in two phases:

1. Migrate, in chunks, yielding to the loop between them: each new state is computed
   by ``code_change`` and checked against the new class's declared state type. The
   servers keep serving on their old code meanwhile; one that is stepped after its
   migration was computed is marked (``TOUCHED``).
2. Commit, in one synchronous act -- this is the instant the servers are suspended:
   the marked servers are migrated again from their current state, and only if every
   server succeeded are code and state swapped for all of them at once; otherwise
   nothing changes. Messages that were waiting are then served by the new code.

So the upgrade is atomic and loses nothing, and a client stalls only for the commit,
not for the whole migration. The price: ``code_change`` may run more than once for a
server that was busy during the migration, so it must be a pure function of its
arguments (as OTP's, in practice, always is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .._exceptions import Overrun, UpgradeFailed
from .scheduler import BUSY, DEAD, TOUCHED, WATCHED
from .server import GenServer, check_server_class, runs_callbacks
from .typecheck import check_state, checker

if TYPE_CHECKING:
    from .scheduler import Scheduler


class _PathLike(Protocol):
    """``os.PathLike[str]``, spelled here so that the core does not import ``os``."""

    def __fspath__(self) -> str: ...


class Down(NamedTuple):
    """The ``old_vsn`` that ``code_change`` gets on a downgrade: ``Down("1")`` means
    "return a state for version 1". As in OTP, the newer code does the downgrade."""

    vsn: str


class ClassRef(NamedTuple):
    """A running class named as ``"module:Class"`` (how release files name targets)."""

    ref: str


def _class_key(cls: type) -> str:
    origin = getattr(cls, "_otpy_origin", None) or f"{cls.__module__}:{cls.__qualname__}"
    module, _, qualname = origin.partition(":")
    return f"{module.rsplit('.', 1)[-1]}:{qualname}"


def _ref_key(ref: str) -> str:
    module, _, qualname = ref.partition(":")
    return f"{module.rsplit('.', 1)[-1]}:{qualname}"


class Update:
    """One step of a release: move ``target`` to ``new_class``.

    ``target`` is a server class (every live server running exactly that class), a
    server name, or a :class:`ClassRef`. ``extra`` goes to ``code_change``. For a name
    target, ``from_vsn`` pins the version the server must run (without it, any version
    other than ``new_class.vsn`` is accepted)."""

    __slots__ = ("extra", "from_vsn", "new_class", "target")

    def __init__(
        self, target: type[GenServer[Any]] | str | ClassRef, new_class: type[GenServer[Any]],
        *, extra: Any = None, from_vsn: str | None = None,
    ) -> None:
        if not (isinstance(target, str | ClassRef) or (
                isinstance(target, type) and issubclass(target, GenServer))):
            raise TypeError(
                f"Update target must be a GenServer subclass or a server name, got {target!r}")
        self.target = target
        self.new_class = check_server_class(new_class, "Update new_class")
        checker(new_class)  # built now, not during the migration
        self.extra = extra
        self.from_vsn = from_vsn

    def __repr__(self) -> str:
        target = self.target.__qualname__ if isinstance(self.target, type) else self.target
        return f"Update({target!r} -> {self.new_class.__qualname__} vsn {self.new_class.vsn})"


class Release:
    """A release: a version name and the updates that install it.

    ``otpy.Release("2", [otpy.Update(CounterV1, CounterV2)])``, then
    ``await node.upgrade(release)``; or describe it in a TOML file and
    ``otpy.Release.load(path)``. ``digest`` names the content of a release loaded from
    files (None for one made in Python): a vsn installed already can only be installed
    again with the same code. ``bundle`` is that content, encoded (what a cluster-wide
    release ships to the nodes that do not have it)."""

    __slots__ = ("bundle", "description", "digest", "updates", "vsn")

    def __init__(self, vsn: str, updates: Iterable[Update], *, description: str = "",
                 digest: str | None = None, bundle: bytes | None = None) -> None:
        if not isinstance(vsn, str) or not vsn:
            raise TypeError(f"Release vsn must be a non-empty string, got {vsn!r}")
        self.vsn = vsn
        self.updates = list(updates)
        for u in self.updates:
            if not isinstance(u, Update):
                raise TypeError(f"Release {vsn!r}: each update must be an otpy.Update, got {u!r}")
        if not self.updates:
            raise TypeError(f"Release {vsn!r} has no updates")
        self.description = description
        self.digest = digest
        self.bundle = bundle

    def __repr__(self) -> str:
        return f"Release({self.vsn!r}, {self.updates!r})"

    @classmethod
    def load(cls, path: str | _PathLike) -> Release:
        """Read a release file (TOML) and import its code::

            vsn = "2"
            code = "."                    # where the new modules are, from this file
            [[updates]]
            target = "counter_v1:Counter" # the running class, or: server = "c0"
            new = "counter_v2:Counter"    # module file in `code`, and the class in it
            extra = 0                     # optional, passed to code_change
            from_vsn = "1"                # optional, with server =

        The modules of the code directory are imported as one package of their own,
        named after the digest of the release's content, so old and new code live side
        by side, a changed file is loaded anew, and a module imports its siblings
        (``import helpers``, ``from . import helpers``). A file, module or class that
        cannot be loaded, a file that is not a regular file, or a release larger than
        the documented bounds raises :class:`otpy.UpgradeFailed` before anything is
        touched. This reads files and runs the modules' code: from async code, call it
        in a thread (``await trio.to_thread.run_sync(otpy.Release.load, path)``)."""
        from .._release_files import load_path  # the file I/O lives outside the core

        release = load_path(path)
        if cls is not Release:  # pragma: no cover - a subclass gets its own instance
            release = cls(release.vsn, release.updates, description=release.description,
                          digest=release.digest)
        return release


class ReleaseInfo(NamedTuple):
    """One installed release in ``node.releases()``."""

    vsn: str
    servers: tuple[str, ...]
    description: str


class _Move:
    __slots__ = ("by_class", "error", "extra", "from_cls", "name", "new_state", "old_vsn",
                 "proc", "to_cls")

    def __init__(self, proc: GenServer[Any], to_cls: type[GenServer[Any]], old_vsn: Any,
                 extra: Any, *, by_class: bool = False) -> None:
        self.by_class = by_class  # its update targets a class: later starts of it too
        self.proc = proc
        self.name = proc._otpy_name
        self.from_cls = type(proc)
        self.to_cls = to_cls
        self.old_vsn = old_vsn
        self.extra = extra
        self.new_state: Any = None
        self.error: str | None = None


class _Record(NamedTuple):
    release: Release
    moves: list[tuple[str, type[GenServer[Any]], type[GenServer[Any]], Any]]
    # The classes it upgraded for later starts, with what they started as before it.
    classes: list[tuple[type[GenServer[Any]], type[GenServer[Any]] | None]]


class Migration:
    """One upgrade or downgrade in flight: watch, migrate in chunks, then commit or
    roll back as a whole."""

    def __init__(self, handler: ReleaseHandler, moves: list[_Move], release: Release,
                 downgrade: bool, started: float | None = None) -> None:
        self.handler = handler
        self.sched = handler.sched
        self.moves = moves
        self.release = release
        self.downgrade = downgrade
        self._next = 0
        # When its planning began (the node's clock): its events report how long the
        # release took, planning included.
        self.started = handler.sched.clock() if started is None else started

    @property
    def migrated(self) -> int:
        """Servers migrated so far (of ``len(moves)``)."""
        return self._next

    def watch(self) -> None:
        """Watch the servers: a step from now on marks its server for re-migration."""
        for m in self.moves:
            m.proc._otpy_flags |= WATCHED

    def migrate(self, budget: int = 256) -> bool:
        """Migrate up to ``budget`` servers; True when all are done."""
        moves = self.moves
        end = min(self._next + budget, len(moves))
        for i in range(self._next, end):
            self._migrate_one(moves[i])
        self._next = end
        return end == len(moves)

    def _migrate_one(self, m: _Move) -> None:
        proc = m.proc
        proc._otpy_flags &= ~TOUCHED
        m.error = None
        if proc._otpy_flags & DEAD:
            m.error = "it stopped or restarted during the upgrade; try again"
            return
        # As in OTP, the newer code migrates in both directions.
        impl = m.from_cls if self.downgrade else m.to_cls
        fault = self.handler.fault(m.name) if self.handler.fault is not None else None
        try:
            if fault is not None:
                raise fault
            new_state = self._code_change(proc, impl, m)
            check_state(m.to_cls, new_state, server=m.name,
                        when=f"returned by {impl.__qualname__}.code_change")
        except (Exception, Overrun) as exc:  # an overrunning code_change is abandoned
            err = exc.timeout() if isinstance(exc, Overrun) else exc
            m.error = f"{type(err).__name__}: {err}"
        else:
            m.new_state = new_state

    @runs_callbacks("proc")
    def _code_change(self, proc: GenServer[Any], impl: type[GenServer[Any]], m: _Move) -> Any:
        proc._otpy_flags |= BUSY
        try:
            if impl is not m.from_cls:
                proc.__class__ = impl  # so that code_change sees a proper self
            try:
                return impl.code_change(proc, m.old_vsn, proc._otpy_state, m.extra)
            finally:
                proc.__class__ = m.from_cls
        finally:
            proc._otpy_flags &= ~BUSY

    def failures(self) -> dict[str, str]:
        """The servers whose migration failed so far, with why (a cluster-wide release
        votes with this, once every server has migrated)."""
        procs = self.sched.procs
        out = {}
        for m in self.moves:
            if m.proc._otpy_flags & TOUCHED:
                self._migrate_one(m)
            if m.error is None and (m.proc._otpy_flags & DEAD
                                    or procs.get(m.name) is not m.proc):
                m.error = "it stopped or restarted during the upgrade; try again"
            if m.error is not None:
                out[m.name] = m.error
        return out

    def finish(self, *, force: bool = False) -> dict[str, Any]:
        """Commit if every server migrated (and is still the one held); else roll back
        and raise UpgradeFailed listing every failure.

        ``force`` (a cluster-wide release that every node already voted for): commit
        whatever happens; a server whose state cannot be migrated now (a step since the
        vote changed it) is restarted on the new code instead, with an
        ``upgrade_forced_restart`` event."""
        # This is the synchronous commit: the node's stall during a release is its
        # length, so each server is visited once to check it and once to swap it.
        procs = self.sched.procs
        failures = {}
        for m in self.moves:
            proc = m.proc
            if proc._otpy_flags & TOUCHED:
                self._migrate_one(m)  # it was stepped since: migrate its current state
            if m.error is None and (proc._otpy_flags & DEAD or procs.get(m.name) is not proc):
                m.error = "it stopped or restarted during the upgrade; try again"
            if m.error is not None:
                failures[m.name] = m.error
        if failures and force:
            return self._force(failures)
        what = "downgrade from" if self.downgrade else "upgrade to"
        if failures:
            self.abort()
            self.sched.log.error("upgrade_rolled_back", release=self.release.vsn,
                                 downgrade=self.downgrade, failures=failures,
                                 seconds=self.sched.clock() - self.started)
            shown = "; ".join(f"{k!r}: {v}" for k, v in list(failures.items())[:5])
            more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise UpgradeFailed(
                f"{what} release {self.release.vsn!r} rolled back, nothing changed: "
                f"{len(failures)} of {len(self.moves)} servers failed: {shown}{more}",
                failures)
        try:
            self.sched.commit_all([(m.proc, m.to_cls, m.new_state) for m in self.moves])
        except Exception as exc:
            # The store could not record the durable servers' new states (all of them
            # go in one atomic record): nothing was swapped, so nothing changes.
            self.abort()
            reason = f"the store could not record the new states: {type(exc).__name__}: {exc}"
            self.sched.log.error("upgrade_rolled_back", release=self.release.vsn,
                                 downgrade=self.downgrade, failures={"store": reason})
            raise UpgradeFailed(f"{what} release {self.release.vsn!r} rolled back, nothing "
                                f"changed: {reason}", {"store": reason}) from exc
        self._swap()
        # A new max_mailbox may make room for calls waiting in line (few names, if
        # any: a server without a line or still full is left as it is).
        for name in list(self.sched.waiting):
            waiter = procs.get(name)
            if waiter is not None:
                self.sched.room_for(waiter)
        self.handler.committed(self)
        self.sched.log.info("upgrade_committed", release=self.release.vsn,
                            downgrade=self.downgrade, servers=len(self.moves),
                            seconds=self.sched.clock() - self.started)
        return {"release": self.release.vsn, "downgrade": self.downgrade,
                "servers": [m.name for m in self.moves]}

    def _force(self, failures: dict[str, str]) -> dict[str, Any]:
        failed = [m for m in self.moves if m.error is not None]
        self.moves = [m for m in self.moves if m.error is None]
        report = self.finish()
        for m in failed:
            # Its next start runs the new code; the incarnation running the old one now
            # (if any) is restarted onto it.
            spec = m.proc._otpy_spec
            self.sched.class_by_name[m.name] = (spec.server_class, m.to_cls)
            proc = self.sched.procs.get(m.name)
            self.sched.log.error("upgrade_forced_restart", server=m.name,
                                 release=self.release.vsn, reason=failures[m.name])
            if proc is not None and type(proc) is not m.to_cls:
                self.sched.crashed(proc, UpgradeFailed(
                    f"server {m.name!r} could not migrate to the release the cluster "
                    f"committed ({failures[m.name]}); it restarts on the new code"))
        report["restarted"] = [m.name for m in failed]
        return report

    def _swap(self) -> None:
        # What goes with each server's new code (commit_all swapped code and state).
        for m in self.moves:
            proc, to_cls, spec = m.proc, m.to_cls, m.proc._otpy_spec
            proc._otpy_flags &= ~(WATCHED | TOUCHED)
            if spec.max_mailbox is None:
                proc._otpy_max_mailbox = to_cls.max_mailbox
            if to_cls is spec.server_class:
                self.sched.class_by_name.pop(m.name, None)
            else:
                self.sched.class_by_name[m.name] = (spec.server_class, to_cls)

    def abort(self) -> None:
        """Give up: every server keeps its old code and old state."""
        self._release_all()
        self.handler.active = None

    def _release_all(self) -> None:
        for m in self.moves:
            m.proc._otpy_flags &= ~(WATCHED | TOUCHED)


class Planner:
    """A release being planned: its target servers checked in chunks. Nothing is held
    or changed while it plans; :meth:`finish` gives the Migration, or raises
    UpgradeFailed (refused, nothing changed) naming every server that cannot move."""

    def __init__(self, handler: ReleaseHandler, release: Release,
                 items: Iterator[_Move | tuple[str, str, bool]], downgrade: bool, *,
                 lenient: bool = False) -> None:
        self.handler = handler
        self.release = release
        self.downgrade = downgrade
        # A node of a cluster-wide release may run none of a target: not a failure.
        self.lenient = lenient
        self._items = items
        self.moves: list[_Move] = []
        self.failures: dict[str, str] = {}
        self.started = handler.sched.clock()

    def plan(self, budget: int) -> bool:
        """Check up to ``budget`` more servers; True when all are checked."""
        moves, failures = self.moves, self.failures
        n = 0
        for item in self._items:
            if isinstance(item, _Move):
                moves.append(item)
            elif not (self.lenient and item[2]):
                failures[item[0]] = item[1]
            n += 1
            if n >= budget:
                return False  # the next call finds out whether any are left
        return True

    def finish(self) -> Migration:
        while not self.plan(1 << 20):  # whatever is left (all of it, one-shot)
            pass
        failures = self.failures
        if failures:
            self.abort()
            shown = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5])
            what = (f"downgrade from release {self.release.vsn!r}" if self.downgrade
                    else f"release {self.release.vsn!r}")
            raise UpgradeFailed(f"{what} refused, nothing changed: {shown}", failures)
        migration = Migration(self.handler, self.moves, self.release, self.downgrade,
                              self.started)
        self.handler.active = migration
        return migration

    def abort(self) -> None:
        """Give up planning: nothing was held."""
        self.handler.active = None


def _installed_already(installed: Release, release: Release) -> str:
    old, new = installed.digest, release.digest
    if old is not None and new is not None and old != new:
        return (f"release {release.vsn!r} is already installed with different code "
                f"(installed: digest {old[:12]}, this one: {new[:12]}); give the "
                f"changed release a new vsn")
    return f"release {release.vsn!r} is already installed; give the new release a new vsn"


class ReleaseHandler:
    """The release history of a node and the planning of upgrades against it."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.history: list[_Record] = []
        self.active: Migration | Planner | None = None
        # Asked, for each server a migration computes, for an error to fail it with as
        # if its code_change had raised (otpy.testing injects faults with it).
        self.fault: Callable[[str], BaseException | None] | None = None

    def releases(self) -> list[ReleaseInfo]:
        return [ReleaseInfo(r.release.vsn, tuple(m[0] for m in r.moves),
                            r.release.description) for r in self.history]

    def _refuse_if_busy(self) -> None:
        if self.active is not None:
            raise UpgradeFailed(
                f"release {self.active.release.vsn!r} is being installed; wait for it to "
                f"finish")

    def plan_upgrade(self, release: Release) -> Migration:
        """Check the release against the live servers; raise UpgradeFailed (nothing
        held, nothing changed) if any update cannot apply. (The node plans in chunks,
        with :meth:`planner`.)"""
        return self.planner(release).finish()

    def planner(self, release: Release | None, *, lenient: bool = False) -> Planner:
        """Start planning ``release`` (None: a downgrade from the newest one); the
        planner checks each target server in chunks (:meth:`Planner.plan`), so that a
        release of many servers does not stall the node while it is planned.
        ``lenient``: a target that runs nowhere on this node is not a failure (one node's
        part of a cluster-wide release)."""
        self._refuse_if_busy()
        if release is None:
            if not self.history:
                raise UpgradeFailed("there is no installed release to downgrade from")
            record = self.history[-1]
            planner = Planner(self, record.release, self._downgrade_moves(record), True,
                              lenient=lenient)
        else:
            if not isinstance(release, Release):
                raise TypeError(f"upgrade needs an otpy.Release, got {release!r}")
            for r in self.history:
                if r.release.vsn == release.vsn:
                    raise UpgradeFailed(_installed_already(r.release, release))
            planner = Planner(self, release, self._upgrade_moves(release), False,
                              lenient=lenient)
        self.active = planner
        return planner

    def _upgrade_moves(self, release: Release) -> Iterator[_Move | tuple[str, str, bool]]:
        """Each server the release moves, or (key, problem, absent) for each that it
        cannot (``absent``: nothing here runs the target)."""
        seen: set[str] = set()
        for upd in release.updates:
            for proc, problem in self._targets(upd):
                key = proc._otpy_name if proc is not None else repr(upd)
                if problem is None and proc is not None and proc._otpy_name in seen:
                    problem = "two updates of this release target it"
                if problem is not None:
                    yield key, problem, proc is None
                    continue
                assert proc is not None
                seen.add(proc._otpy_name)
                yield _Move(proc, upd.new_class, type(proc).vsn, upd.extra,
                            by_class=not isinstance(upd.target, str))

    def _targets(self, upd: Update) -> Iterator[tuple[GenServer[Any] | None, str | None]]:
        procs = self.sched.procs
        new = upd.new_class
        target = upd.target
        if isinstance(target, str):
            proc = procs.get(target)
            if proc is None:
                yield None, f"no server named {target!r} is running"
                return
            running = type(proc).vsn
            if upd.from_vsn is not None and running != upd.from_vsn:
                yield proc, (f"server {target!r} runs version {running}; this update "
                             f"expects version {upd.from_vsn}")
            elif running == new.vsn:
                yield proc, f"server {target!r} already runs version {new.vsn}"
            else:
                yield proc, None
            return
        if isinstance(target, type):
            if target.vsn == new.vsn:
                yield None, (f"{target.__qualname__} and {new.__qualname__} are both "
                             f"version {new.vsn}; give the new class a new vsn")
                return
            found = [p for p in procs.values() if type(p) is target]
            key = _class_key(target)
        else:
            key = _ref_key(target.ref)
            found = [p for p in procs.values() if _class_key(type(p)) == key]
        if found:
            for p in found:
                yield p, (None if type(p).vsn != new.vsn else
                          f"server {p._otpy_name!r} already runs version {new.vsn}")
            return
        # Nothing runs the target: say what runs instead, if we replaced it earlier.
        former = self._former(target, key)
        for p, vsn in former:
            yield p, (f"server {p._otpy_name!r} runs version {type(p).vsn}; this update "
                      f"expects version {vsn}")
        if not former:
            name = target.__qualname__ if isinstance(target, type) else target.ref
            yield None, f"no running server runs {name} (vsn {getattr(target, 'vsn', '?')})"

    def _former(self, target: Any, key: str) -> list[tuple[GenServer[Any], str]]:
        out = []
        for record in self.history:
            for name, from_cls, _to, _extra in record.moves:
                if from_cls is target or _class_key(from_cls) == key:
                    proc = self.sched.procs.get(name)
                    if proc is not None:
                        out.append((proc, from_cls.vsn))
        return out

    def plan_downgrade(self) -> Migration:
        """Plan going back to the release before the newest (see plan_upgrade)."""
        return self.planner(None).finish()

    def _downgrade_moves(self, record: _Record) -> Iterator[_Move | tuple[str, str, bool]]:
        procs = self.sched.procs
        for name, old_cls, new_cls, extra in record.moves:
            proc = procs.get(name)
            if proc is None:
                yield name, f"no server named {name!r} is running", True
            elif type(proc) is not new_cls:
                yield name, (f"server {name!r} runs version {type(proc).vsn}; the "
                             f"downgrade expects version {new_cls.vsn}"), False
            else:
                yield _Move(proc, old_cls, Down(old_cls.vsn), extra)

    def _target_classes(self, upd: Update) -> list[type[GenServer[Any]]]:
        """The classes an update of a class targets among the children this node
        knows (their specs, running or not)."""
        if isinstance(upd.target, type):
            return [upd.target]
        if not isinstance(upd.target, ClassRef):
            return []
        key = _ref_key(upd.target.ref)
        found: list[type[GenServer[Any]]] = []
        for sup in self.sched.sups.values():
            for spec in sup.specs.values():
                cls = getattr(spec, "server_class", None)
                if cls is not None and _class_key(cls) == key and cls not in found:
                    found.append(cls)
        return found

    def committed(self, migration: Migration) -> None:
        self.active = None
        upgrades = self.sched.class_upgrades
        if migration.downgrade:
            # The classes this release upgraded start as they did before it again.
            for cls, before in reversed(self.history.pop().classes):
                if before is None:
                    upgrades.pop(cls, None)
                else:
                    upgrades[cls] = before
            return
        classes: list[tuple[type[GenServer[Any]], type[GenServer[Any]] | None]] = []

        def upgrade(old: type[GenServer[Any]], new: type[GenServer[Any]]) -> None:
            if all(old is not c for c, _ in classes):
                classes.append((old, upgrades.get(old)))
                upgrades[old] = new

        for m in migration.moves:
            if m.by_class:
                upgrade(m.from_cls, m.to_cls)
        # A class this node runs nowhere now (one node's part of a cluster-wide
        # release) still starts as the new one from now on.
        for upd in migration.release.updates:
            for cls in self._target_classes(upd):
                upgrade(cls, upd.new_class)
        self.history.append(_Record(migration.release, [
            (m.name, m.from_cls, m.to_cls, m.extra) for m in migration.moves], classes))

"""Child specs, supervisors, restart strategies and restart intensity.

A supervisor's decisions are synchronous acts of the node: when a child exits, the
terminations, restarts and any escalation are carried out before the step that caused
the exit returns, so a server's name is never missing between a crash and its restart.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .._exceptions import RestartIntensityExceeded, StartFailed, SupervisorError
from .names import check_server_name
from .server import (
    GenServer,
    check_max_mailbox,
    check_server_class,
    check_step_timeout,
    is_normal_reason,
)

if TYPE_CHECKING:
    from .monitors import Links
    from .names import Pid
    from .scheduler import Scheduler


class Strategy(enum.StrEnum):
    """What a supervisor restarts when a child fails."""

    ONE_FOR_ONE = "one_for_one"
    """Only the failed child."""
    REST_FOR_ONE = "rest_for_one"
    """The failed child and every child started after it."""
    ONE_FOR_ALL = "one_for_all"
    """All children."""


class Restart(enum.StrEnum):
    """When a child is restarted."""

    PERMANENT = "permanent"
    """Always."""
    TRANSIENT = "transient"
    """Only after an abnormal exit (a reason other than "normal" or "shutdown")."""
    TEMPORARY = "temporary"
    """Never; its spec is removed when it exits."""


def _enum(cls: type[enum.StrEnum], value: object, what: str) -> Any:
    try:
        return cls(value)  # type: ignore[arg-type]
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise SupervisorError(f"{what} must be one of {choices}, got {value!r}") from None


def _check_id(value: object, what: str) -> str:
    problem = check_server_name(value, what)
    if problem is not None:
        raise SupervisorError(problem)
    assert isinstance(value, str)
    return value


class Child:
    """A worker child spec: run ``server_class`` under the name ``id``.

    ``otpy.Child("kv1", KVStore, arg={"x": 1}, restart="transient", shutdown=5.0)``.
    ``id`` is the server's name in the node; ``arg`` goes to ``init``; ``restart`` is
    ``"permanent"`` (default), ``"transient"`` or ``"temporary"``; ``shutdown`` is how
    many seconds the server's own tasks get to finish after an orderly stop.
    ``step_timeout``, ``max_mailbox`` and ``durable``, when given, override the server
    class's attributes of the same names for this child (``durable=True``: its state is
    kept in the node's store, see docs/durability.md). ``scope="cluster"`` registers the
    name cluster-wide when the node is in a cluster (once: a second start anywhere
    fails), so that a call by name reaches it from any node."""

    __slots__ = ("arg", "durable", "id", "max_mailbox", "restart", "scope", "server_class",
                 "shutdown", "step_timeout")

    def __init__(
        self,
        id: str,
        server_class: type[GenServer[Any]],
        arg: Any = None,
        *,
        restart: str = "permanent",
        shutdown: float = 5.0,
        step_timeout: float | None = None,
        max_mailbox: int | None = None,
        scope: str = "local",
        durable: bool | None = None,
    ) -> None:
        self.id = _check_id(id, "Child id")
        self.server_class = check_server_class(server_class, f"Child {id!r} server_class")
        self.arg = arg
        self.restart: Restart = _enum(Restart, restart, f"Child {id!r} restart")
        if not isinstance(shutdown, int | float) or shutdown < 0:
            raise SupervisorError(
                f"Child {id!r} shutdown must be seconds >= 0, got {shutdown!r}")
        self.shutdown = float(shutdown)
        if step_timeout is not None:
            step_timeout = check_step_timeout(step_timeout, f"Child {id!r} step_timeout",
                                              SupervisorError)
        self.step_timeout = step_timeout
        if max_mailbox is not None:
            max_mailbox = check_max_mailbox(max_mailbox, f"Child {id!r} max_mailbox",
                                            SupervisorError)
        self.max_mailbox = max_mailbox
        if scope not in ("local", "cluster"):
            raise SupervisorError(f"Child {id!r} scope must be 'local' or 'cluster', got "
                                  f"{scope!r}")
        self.scope = scope
        if durable is not None and not isinstance(durable, bool):
            raise SupervisorError(f"Child {id!r} durable must be True or False, got "
                                  f"{durable!r}")
        self.durable = durable

    def __repr__(self) -> str:
        return (f"Child({self.id!r}, {self.server_class.__qualname__}, arg={self.arg!r}, "
                f"restart={self.restart.value!r})")


class Supervisor:
    """A supervisor spec: children started in order, restarted by ``strategy``.

    ``otpy.Supervisor([otpy.Child("a", A), otpy.Child("b", B)], strategy="rest_for_one",
    max_restarts=3, max_seconds=5.0, name="sub")``. More than ``max_restarts`` restarts
    within ``max_seconds`` make it stop its children and fail; its parent treats that as
    a child failure (``("shutdown", RestartIntensityExceeded)``, so a ``transient``
    supervisor is not restarted). The root's default name is ``"root"``.

    ``scope="cluster"`` makes it a *cluster supervisor* (on a node in a cluster): of its
    children with ``Child(..., scope="cluster")``, each runs once in the cluster, on
    the first node that registers it; on every other node running this supervisor it
    stands by (status ``"standby"``), and takes over when the node running it dies.
    (Under a plain supervisor, a second start of a cluster-scoped name fails.)"""

    __slots__ = ("children", "id", "max_restarts", "max_seconds", "name", "restart",
                 "scope", "shutdown", "strategy")

    def __init__(
        self,
        children: Sequence[Child | Supervisor],
        *,
        strategy: str = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        name: str | None = None,
        restart: str = "permanent",
        scope: str = "local",
    ) -> None:
        self.name = self.id = _check_id("root" if name is None else name, "Supervisor name")
        if isinstance(children, Child | Supervisor) or not isinstance(children, Iterable):
            raise SupervisorError(
                f"Supervisor {self.name!r} children must be a list of otpy.Child / "
                f"otpy.Supervisor, got {children!r}")
        self.children = list(children)
        seen: set[str] = set()
        for child in self.children:
            if not isinstance(child, Child | Supervisor):
                raise SupervisorError(
                    f"Supervisor {self.name!r}: each child must be an otpy.Child or "
                    f"otpy.Supervisor, got {child!r}")
            if child.id in seen:
                raise SupervisorError(
                    f"Supervisor {self.name!r} has two children with id {child.id!r}; "
                    f"ids must be unique within a supervisor")
            seen.add(child.id)
        self.strategy: Strategy = _enum(Strategy, strategy, f"Supervisor {self.name!r} strategy")
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise SupervisorError(
                f"Supervisor {self.name!r} max_restarts must be an int >= 0, "
                f"got {max_restarts!r}")
        if not isinstance(max_seconds, int | float) or max_seconds <= 0:
            raise SupervisorError(
                f"Supervisor {self.name!r} max_seconds must be > 0, got {max_seconds!r}")
        self.max_restarts = max_restarts
        self.max_seconds = float(max_seconds)
        self.restart: Restart = _enum(Restart, restart, f"Supervisor {self.name!r} restart")
        if scope not in ("local", "cluster"):
            raise SupervisorError(f"Supervisor {self.name!r} scope must be 'local' or "
                                  f"'cluster', got {scope!r}")
        self.scope = scope
        self.shutdown = float("inf")

    def __repr__(self) -> str:
        return (f"Supervisor(<{len(self.children)} children>, strategy="
                f"{self.strategy.value!r}, name={self.name!r})")

    def walk(self) -> Iterator[Child | Supervisor]:
        """Every spec in the tree, depth-first, this one first."""
        yield self
        for child in self.children:
            if isinstance(child, Supervisor):
                yield from child.walk()
            else:
                yield child


class ChildInfo(NamedTuple):
    """One row of ``node.which_children(sup)``."""

    id: str
    kind: str  # "worker" or "supervisor"
    status: str  # "running", "not running" or "restarting"
    vsn: str | None
    restarts: int


def check_unique_names(spec: Supervisor, taken: Any) -> None:
    seen: set[str] = set()
    for s in spec.walk():
        if s.id in seen or s.id in taken:
            raise SupervisorError(
                f"the name {s.id!r} is used twice in the node; every server and "
                f"supervisor name must be unique within a node")
        seen.add(s.id)


class SupervisorRuntime:
    """A running supervisor: its children in start order and its restart history."""

    __slots__ = ("alive", "child_restarts", "links", "name", "parent", "pending", "pid",
                 "sched", "spec", "specs", "window")

    def __init__(self, spec: Supervisor, sched: Scheduler, parent: SupervisorRuntime | None):
        self.spec = spec
        self.name = spec.name
        self.sched = sched
        self.parent = parent
        self.specs: dict[str, Child | Supervisor] = {}
        self.window: deque[float] = deque()
        self.child_restarts: dict[str, int] = {}
        self.pending: set[str] = set()  # ids whose restart failed and will be retried
        self.alive = False
        self.pid: Pid | None = None  # made when first asked for (whereis, a monitor)
        self.links: Links | None = None  # monitors on it

    # -- start and stop --------------------------------------------------------------

    def start(self) -> None:
        """Start every child depth-first in list order; on a failure stop those already
        started (reverse order) and raise StartFailed naming the child."""
        sched = self.sched
        sched.sups[self.name] = self
        self.alive = True
        for child in self.spec.children:
            self.specs[child.id] = child
            try:
                if self._start(child):
                    sched.log.debug("child_started", supervisor=self.name, child=child.id)
            except StartFailed as exc:
                self.specs.pop(child.id)
                self.shutdown("shutdown")
                if isinstance(child, Supervisor):
                    raise  # already names the child that failed, deeper down
                raise StartFailed(
                    f"supervisor {self.name!r} could not start child {child.id!r}: {exc}",
                    child=exc.child, reason=exc.reason) from (exc.__cause__ or exc)
        sched.log.debug("supervisor_started", supervisor=self.name, children=len(self.specs))

    def _start(self, child: Child | Supervisor) -> bool:
        """Start one child; False when its init returned Ignore."""
        restarts = self.child_restarts.get(child.id, 0)
        sched = self.sched
        if child.id in sched.procs or child.id in sched.sups:
            # Another server took the name while this child was stopped (start_child
            # elsewhere); starting would steal its registry entry. OTP: already_started.
            raise StartFailed(
                f"child {child.id!r} of supervisor {self.name!r} cannot start: the name "
                f"{child.id!r} is already used by another server in the node",
                child=child.id, reason="already_started")
        if isinstance(child, Supervisor):
            sub = SupervisorRuntime(child, self.sched, self)
            sub.start()
            return True
        if child.id in sched.standby:
            return False  # it runs on another node of the cluster; this one stands by
        cls = self.sched.code_for(child)
        proc = self.sched.start_server(cls, child, self, restarts)
        if proc is None and child.restart is Restart.TEMPORARY:
            del self.specs[child.id]
        return proc is not None

    def running(self, id: str) -> Any:
        """The running server or supervisor runtime for child ``id``, or None."""
        spec = self.specs.get(id)
        if spec is None:
            return None
        if isinstance(spec, Supervisor):
            sub = self.sched.sups.get(id)
            return sub if sub is not None and sub.parent is self else None
        proc = self.sched.procs.get(id)
        return proc if proc is not None and proc._otpy_sup is self else None

    def _stop_child(self, id: str, reason: Any) -> None:
        thing = self.running(id)
        if thing is None:
            return
        if isinstance(thing, SupervisorRuntime):
            thing.shutdown(reason)
        else:
            self.sched.terminate_server(thing, reason, grace=self.specs[id].shutdown)
        self.sched.log.debug("child_terminated", supervisor=self.name, child=id,
                             reason=repr(reason))

    def shutdown(self, reason: Any = "shutdown") -> None:
        """Stop every child in reverse start order, then this supervisor (its monitors
        get ``reason``)."""
        self.alive = False
        self.pending.clear()
        for id in reversed(list(self.specs)):
            self._stop_child(id, "shutdown")
        if self.sched.sups.get(self.name) is self:
            del self.sched.sups[self.name]
        if self.links is not None:
            self.sched._down(self, reason)

    # -- exits and restarts ----------------------------------------------------------

    def child_exited(self, id: str, reason: Any) -> None:
        """A child stopped on its own (crash, Stop, or a sub-supervisor gave up)."""
        spec = self.specs.get(id)
        if not self.alive or spec is None:
            return
        log = self.sched.log
        if spec.restart is Restart.TEMPORARY or (
            spec.restart is Restart.TRANSIENT and is_normal_reason(reason)
        ):
            if spec.restart is Restart.TEMPORARY:
                del self.specs[id]
            log.debug("child_terminated", supervisor=self.name, child=id, reason=repr(reason))
            if isinstance(spec, Child):  # a subtree that gave up keeps its servers' states
                self._ended(spec)
            return
        if not self._count_restart():
            self.give_up(id, reason)
            return
        strategy = self.spec.strategy
        if strategy is Strategy.ONE_FOR_ONE:
            group = [id]
        else:
            ids = list(self.specs)
            group = ids[ids.index(id):] if strategy is Strategy.REST_FOR_ONE else ids
            for other in reversed(group):
                if other != id:
                    self._stop_child(other, "shutdown")
            # Temporary bystanders are not restarted, and their specs go.
            for other in group:
                if other != id and self.specs[other].restart is Restart.TEMPORARY:
                    ended = self.specs.pop(other)
                    if isinstance(ended, Child):
                        self._ended(ended)
            group = [other for other in group if other in self.specs]
        self._restart_group(group, cause=id)

    def _restart_group(self, group: list[str], cause: str) -> None:
        log = self.sched.log
        for n, other in enumerate(group):
            if not self.alive:
                return
            spec = self.specs.get(other)
            # A child restarted here is no longer pending: a stale entry would show it
            # as "restarting" after it stops again, and a queued retry would restart it.
            self.pending.discard(other)
            if spec is None or self.running(other) is not None:
                continue
            self.child_restarts[other] = self.child_restarts.get(other, 0) + 1
            try:
                self._start(spec)
            except StartFailed as exc:
                log.error("child_restart_failed", supervisor=self.name, child=other,
                          reason=repr(exc.reason))
                # Retried from the dispatcher, each attempt counting against the
                # intensity, so a child that cannot start never wedges the node.
                self.pending.update(g for g in group[n:] if g in self.specs)
                self.sched.defer(self._retry)
                return
            log.info("child_restarted", supervisor=self.name, child=other,
                     restarts=self.child_restarts.get(other, 0), cause=cause,
                     in_window=len(self.window))

    def _retry(self) -> None:
        if not self.alive or not self.pending:
            return
        group = [id for id in self.specs if id in self.pending]
        self.pending.clear()
        if not group:
            return
        with self.sched.supervision_act():
            if not self._count_restart():
                self.give_up(group[0], "restart failed")
                return
            self._restart_group(group, cause=group[0])

    def _count_restart(self) -> bool:
        """Record a restart; False when it would exceed the intensity."""
        now = self.sched.clock()
        window = self.window
        window.append(now)
        horizon = now - self.spec.max_seconds
        while window and window[0] <= horizon:
            window.popleft()
        return len(window) <= self.spec.max_restarts

    def give_up(self, id: str, reason: Any) -> None:
        spec = self.spec
        err = RestartIntensityExceeded(
            f"supervisor {self.name!r} gave up: more than {spec.max_restarts} restarts "
            f"within {spec.max_seconds:g} s (last failure: child {id!r}: {reason!r:.200}). "
            f"Fix the failing child, or raise max_restarts / max_seconds",
            supervisor=self.name, last_failure=reason)
        self.sched.log.error("supervisor_gave_up", supervisor=self.name, child=id,
                             reason=repr(reason), max_restarts=spec.max_restarts,
                             max_seconds=spec.max_seconds)
        self.shutdown(("shutdown", err))
        if self.parent is not None:
            self.parent.child_exited(self.name, ("shutdown", err))
        else:
            self.sched.set_fatal(err)

    # -- inspection and dynamic control ----------------------------------------------

    def _spec_of(self, id: str) -> Child | Supervisor:
        spec = self.specs.get(id)
        if spec is None:
            raise SupervisorError(
                f"supervisor {self.name!r} has no child {id!r}; its children are "
                f"{list(self.specs)[:20]!r}")
        return spec

    def info(self, id: str) -> ChildInfo:
        spec = self.specs[id]
        thing = self.running(id)
        if isinstance(spec, Supervisor):
            kind, vsn = "supervisor", None
        else:
            kind = "worker"
            vsn = (type(thing) if thing is not None else
                   self.sched.code_for(spec)).vsn
        status = ("running" if thing is not None else
                  "restarting" if id in self.pending else
                  "standby" if id in self.sched.standby else "not running")
        return ChildInfo(id, kind, status, vsn, self.child_restarts.get(id, 0))

    def which_children(self) -> list[ChildInfo]:
        return [self.info(id) for id in self.specs]

    def count_children(self) -> dict[str, int]:
        sups = sum(isinstance(s, Supervisor) for s in self.specs.values())
        active = sum(self.running(id) is not None for id in self.specs)
        return {"specs": len(self.specs), "active": active, "supervisors": sups,
                "workers": len(self.specs) - sups}

    def start_child(self, child: Child | Supervisor) -> ChildInfo:
        if not isinstance(child, Child | Supervisor):
            raise SupervisorError(
                f"start_child needs an otpy.Child or otpy.Supervisor, got {child!r}")
        if child.id in self.specs:
            state = "running" if self.running(child.id) is not None else "not running"
            raise SupervisorError(
                f"supervisor {self.name!r} already has a child {child.id!r} ({state}); "
                f"use restart_child, or delete_child first")
        taken = self.sched.procs.keys() | self.sched.sups.keys()
        if isinstance(child, Supervisor):
            check_unique_names(child, taken)
        elif child.id in taken:
            raise SupervisorError(
                f"the name {child.id!r} is already used in the node; server names must be "
                f"unique within a node")
        self.specs[child.id] = child
        with self.sched.supervision_act():
            try:
                self._start(child)
                self._refused(child.id)
            except StartFailed:
                self.specs.pop(child.id, None)
                raise
        self.sched.log.debug("child_started", supervisor=self.name, child=child.id)
        return (self.info(child.id) if child.id in self.specs else
                ChildInfo(child.id, "worker", "not running", None, 0))

    def terminate_child(self, id: str) -> None:
        spec = self._spec_of(id)
        self.pending.discard(id)
        with self.sched.supervision_act():
            self._stop_child(id, "shutdown")
        if spec.restart is Restart.TEMPORARY:
            del self.specs[id]
            if isinstance(spec, Child):
                self._ended(spec)

    def restart_child(self, id: str) -> ChildInfo:
        spec = self._spec_of(id)
        if self.running(id) is not None:
            raise SupervisorError(
                f"child {id!r} of supervisor {self.name!r} is running; terminate_child it "
                f"first")
        self.pending.discard(id)
        with self.sched.supervision_act():
            self._start(spec)
        self._refused(id)
        return self.info(id)

    def _refused(self, id: str) -> None:
        """An operator's start (start_child, restart_child) of a durable server whose
        stored state cannot be used fails, saying why (at the tree's start or a restart,
        that server is left not running and the others go on)."""
        if self.running(id) is None:
            refused = self.sched.refusal(id)
            if refused is not None:
                raise StartFailed(f"child {id!r} of supervisor {self.name!r} did not start: "
                                  f"{refused}", child=id, reason=refused) from refused

    def delete_child(self, id: str) -> None:
        self._spec_of(id)
        if self.running(id) is not None:
            raise SupervisorError(
                f"child {id!r} of supervisor {self.name!r} is running; terminate_child it "
                f"before delete_child")
        self.pending.discard(id)
        spec = self.specs.pop(id)
        self.child_restarts.pop(id, None)
        self._ended(spec)
        self.sched.class_by_name.pop(id, None)

    def drop_spec(self, id: str) -> None:
        """Forget the spec of child ``id``, which is not running here, without what
        delete_child does when a child ends for good (its stored state stays: the node
        that ran it deleted it, or runs it): a cluster standby whose child was deleted
        on its own node."""
        if self.running(id) is None:
            self.pending.discard(id)
            self.specs.pop(id, None)
            self.child_restarts.pop(id, None)

    def _ended(self, spec: Child | Supervisor) -> None:
        """A child stopped for good (its spec goes, or a server ended and is never
        restarted): a durable server's stored state goes with it (on delete_child of a
        subtree, each of its servers'; a subtree that merely stopped keeps them)."""
        for child in ([spec] if isinstance(spec, Child) else spec.walk()):
            if isinstance(child, Child):
                self.sched.forget_state(child)

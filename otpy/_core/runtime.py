"""The Runtime: one node's scheduler, supervision tree and releases, with no transport.

A :class:`Runtime` is everything a node does that does not need a loop: it starts and
stops the tree, delivers calls, casts and sends, answers introspection and supervisor
control, plans releases, and serves the admin operations as one table. Two drivers
share it and add no semantics of their own: ``otpy.Node`` (``_node``) adds trio (the
dispatcher task, awaitable calls, tasks, the clock), and ``otpy.testing.Simulation``
adds virtual time and a seeded choice of what runs next.

Admin operations (:data:`ADMIN_OPS`) are what any operator's edge may ask a node:
the admin MessagePack-RPC endpoint, the dashboard and the ``otpy`` command reach the
same table, with the same parameter checks and the same plain-data results (lists,
dicts, strings), so that every transport can encode them.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .._exceptions import BadRequest, SupervisorError
from .durable import Durability
from .release import Migration, Planner, Release, ReleaseHandler, ReleaseInfo
from .scheduler import CAST, COUNTED, DEAD, INFO, SUSPENDED, Scheduler
from .server import GenServer
from .supervisor import Child, ChildInfo, Supervisor, SupervisorRuntime, check_unique_names

if TYPE_CHECKING:
    from .._store.base import Store


class Runtime:
    """A node's tree, scheduler and releases, driven by an edge (see the module doc)."""

    def __init__(self, root: Supervisor, sched: Scheduler) -> None:
        if not isinstance(root, Supervisor):
            raise SupervisorError(
                f"a node needs an otpy.Supervisor as the root of the tree, got {root!r}; "
                f"wrap servers as otpy.Supervisor([otpy.Child('name', Server)])")
        check_unique_names(root, ())
        self.root_spec = root
        self.sched = sched
        self.release_handler = ReleaseHandler(sched)
        self.root: SupervisorRuntime | None = None
        # The one call path, bound once: every edge delivers calls through it.
        self.start_call = sched.start_call
        # The cluster as this node sees it, while the node is in one (set by the edge
        # that joined it): a plain dict, for statistics and the admin table.
        self.cluster_info: Callable[[], dict[str, Any]] | None = None

    # -- the tree --------------------------------------------------------------------

    def has_durable(self, but: Container[str] = ()) -> bool:
        """Whether the tree has a durable child (the node then needs a store), leaving
        out the ids in ``but`` (kept elsewhere: a cluster's store)."""
        return any(isinstance(spec, Child) and spec.id not in but and (
            spec.durable if spec.durable is not None else spec.server_class.durable)
            for spec in self.root_spec.walk())

    def use_store(self, store: Store) -> Durability:
        """Keep durable servers' states in ``store`` (before :meth:`start`): it gives back
        what it holds (``store.load()``) and records every commit of a durable server."""
        return Durability(self.sched, store)

    def start(self) -> None:
        """Start the tree depth-first (StartFailed, after stopping what started)."""
        root = SupervisorRuntime(self.root_spec, self.sched, None)
        self.root = self.sched.root = root
        with self.sched.supervision_act():
            root.start()
        if self.sched.durable is not None:
            self.sched.durable.opened()

    def shutdown(self) -> None:
        """Stop the tree in reverse start order (every ``terminate`` runs)."""
        root = self.root
        if root is not None and root.alive:
            with self.sched.supervision_act():
                root.shutdown("shutdown")

    # -- messages --------------------------------------------------------------------

    def cast(self, address: Any, message: Any) -> None:
        """A cast from outside any step (an idle server is stepped at once)."""
        self.sched.cast_now(CAST, address, message)

    def send(self, address: Any, message: Any) -> None:
        """A message for ``handle_info``, from outside any step."""
        self.sched.cast_now(INFO, address, message)

    def call_nowait(self, address: Any, request: Any) -> Any:
        """Answer now or raise WouldBlock."""
        return self.sched.call_nowait(address, request, True)

    # -- introspection and control ---------------------------------------------------

    def get_state(self, address: Any) -> Any:
        return self.sched.lookup(address)._otpy_state

    def vsn_of(self, address: Any) -> str:
        return type(self.sched.lookup(address)).vsn

    def suspend(self, address: Any) -> None:
        self.sched.suspend(address)

    def resume(self, address: Any) -> None:
        self.sched.resume(address)

    def servers(self) -> list[str]:
        return list(self.sched.procs)

    def server(self, address: Any) -> GenServer[Any]:
        return self.sched.lookup(address)

    def statistics(self, address: Any = None) -> dict[str, Any]:
        stats = self.sched.statistics(address)
        if address is None and self.cluster_info is not None:
            stats["cluster"] = self.cluster_info()
        return stats

    def survey(self, chunk: int = 5000, top: int = 50) -> Iterator[Survey]:
        """Look at every running server, ``chunk`` at a time: a generator that yields
        the same :class:`Survey` after each chunk, complete after the last, so that an
        edge can let its loop run between chunks (a node of 100k servers is never
        stalled by it). Servers that stop meanwhile are left out; ones started meanwhile
        are not seen."""
        procs = list(self.sched.procs.values())
        survey = Survey(top)
        for i in range(0, len(procs), chunk):
            survey.add(procs[i:i + chunk])
            yield survey
        survey.finish()
        yield survey

    def count_steps(self, names: Iterable[str], cap: int = 64
                    ) -> Callable[[], dict[str, tuple[int, float]]]:
        """Count the steps of the servers ``names`` run now, from now until the
        returned function is called, which returns for each server counted its steps
        and the seconds they were counted in. Meanwhile their steps take the general
        path (a little slower), so a server stops being counted after ``cap`` steps:
        counting costs at most ``cap`` slower steps per server, however busy it is.
        One count at a time (RuntimeError otherwise)."""
        sched = self.sched
        if sched.on_step is not None:
            raise RuntimeError("steps are being counted already; one count at a time")
        clock = sched.clock
        counts: dict[str, int] = {}
        capped: dict[str, float] = {}  # name -> when it reached the cap
        procs = [p for p in map(sched.procs.get, names) if p is not None]

        def stepped(proc: GenServer[Any]) -> None:
            name = proc._otpy_name
            n = counts[name] = counts.get(name, 0) + 1
            if n >= cap:
                proc._otpy_flags &= ~COUNTED
                capped[name] = clock()

        for proc in procs:
            proc._otpy_flags |= COUNTED
        sched.on_step = stepped
        begin = clock()

        def stop() -> dict[str, tuple[int, float]]:
            end = clock()
            for proc in procs:
                proc._otpy_flags &= ~COUNTED
            if sched.on_step is stepped:
                sched.on_step = None
            return {p._otpy_name: (counts.get(p._otpy_name, 0),
                                   capped.get(p._otpy_name, end) - begin) for p in procs}

        return stop

    # -- supervisors -----------------------------------------------------------------

    def supervisor(self, sup: str) -> SupervisorRuntime:
        return self.sched.supervisor(sup)

    def which_children(self, sup: str = "root") -> list[ChildInfo]:
        return self.supervisor(sup).which_children()

    def count_children(self, sup: str = "root") -> dict[str, int]:
        return self.supervisor(sup).count_children()

    def start_child(self, sup: str, child: Child | Supervisor) -> ChildInfo:
        return self.supervisor(sup).start_child(child)

    def terminate_child(self, sup: str, id: str) -> None:
        self.supervisor(sup).terminate_child(id)

    def restart_child(self, sup: str, id: str) -> ChildInfo:
        return self.supervisor(sup).restart_child(id)

    def delete_child(self, sup: str, id: str) -> None:
        self.supervisor(sup).delete_child(id)

    # -- releases --------------------------------------------------------------------

    def releases(self) -> list[ReleaseInfo]:
        return self.release_handler.releases()

    def planner(self, release: Release | None) -> Planner:
        """Start planning ``release`` (None: a downgrade); the edge drives the planner
        and the migration it gives in chunks (``Planner.plan``, ``Migration.migrate``)
        and commits with ``Migration.finish``."""
        return self.release_handler.planner(release)

    @property
    def installing(self) -> bool:
        """Whether a release is being planned or migrated now."""
        return self.release_handler.active is not None

    def install_progress(self) -> dict[str, Any] | None:
        """The release being installed now (None if none): its ``release`` vsn,
        ``downgrade``, ``phase`` ("planning" or "migrating"), servers ``done`` so far of
        ``total`` (None while planning), and ``started`` (the node's clock)."""
        active = self.release_handler.active
        if active is None:
            return None
        if isinstance(active, Migration):
            phase, done, total = "migrating", active.migrated, len(active.moves)
        else:
            phase, done, total = "planning", len(active.moves) + len(active.failures), None
        return {"release": active.release.vsn, "downgrade": active.downgrade,
                "phase": phase, "done": done, "total": total, "started": active.started}

    # -- the admin table -------------------------------------------------------------

    def admin(self, method: str, params: tuple[Any, ...]) -> Any:
        """Serve admin operation ``method`` with ``params`` (a transport's decoded
        array): plain data, or a :class:`Planner` for an upgrade or downgrade, which
        the edge installs. Raises BadRequest for an unknown method or bad params, and
        the operation's own errors (NoSuchServer, SupervisorError, UpgradeFailed)."""
        op = ADMIN_OPS.get(method)
        if op is None:
            raise BadRequest(f"no admin method {method!r}; the admin methods are "
                             f"{sorted(ADMIN_OPS)}")
        return op(self, params)


class Survey:
    """What :meth:`Runtime.survey` saw of the running servers: ``servers`` seen,
    ``queued`` messages in all mailboxes, the ``top`` longest mailboxes as ``(length,
    name)`` (longest first once finished), ``suspended`` servers (count, and the first
    ``top`` names), and ``running`` servers by supervisor name."""

    __slots__ = ("busiest", "queued", "running", "servers", "suspended", "suspended_names",
                 "top")

    def __init__(self, top: int) -> None:
        self.top = top
        self.servers = 0
        self.queued = 0
        self.busiest: list[tuple[int, str]] = []
        self.suspended = 0
        self.suspended_names: list[str] = []
        self.running: dict[str, int] = {}

    def add(self, procs: Sequence[GenServer[Any]]) -> None:
        sups: list[SupervisorRuntime] = []
        keep = sups.append
        busiest = self.busiest
        dead = queued = 0
        for proc in procs:
            flags = proc._otpy_flags
            if flags:
                if flags & DEAD:
                    dead += 1
                    continue
                if flags & SUSPENDED:
                    self.suspended += 1
                    if len(self.suspended_names) < self.top:
                        self.suspended_names.append(proc._otpy_name)
            keep(proc._otpy_sup)
            mb = proc._otpy_mbox
            if mb:
                queued += len(mb)
                busiest.append((len(mb), proc._otpy_name))
        running = self.running
        for sup, n in Counter(sups).items():
            running[sup.name] = running.get(sup.name, 0) + n
        self.servers += len(procs) - dead
        self.queued += queued
        if len(busiest) > 4 * self.top:
            self.busiest = heapq.nlargest(self.top, busiest)

    def finish(self) -> None:
        self.busiest = heapq.nlargest(self.top, self.busiest)


# -- the admin operations ----------------------------------------------------------------


def _text(params: tuple[Any, ...], n: int, what: str, default: str | None = None) -> str:
    if len(params) <= n:
        if default is not None:
            return default
        raise BadRequest(f"expected {what} (a string) as params[{n}], got {len(params)} "
                         f"params")
    value = params[n]
    if not isinstance(value, str):
        raise BadRequest(f"expected {what} (a string) as params[{n}], got "
                         f"{type(value).__name__} {value!r:.80}")
    return value


def _arity(method: str, params: tuple[Any, ...], low: int, high: int) -> None:
    if not low <= len(params) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise BadRequest(f"{method} takes {want} params, got {len(params)}")


def _which_children(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("which_children", params, 0, 1)
    return [info._asdict() for info in rt.which_children(_text(params, 0, "a supervisor",
                                                                "root"))]


def _count_children(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("count_children", params, 0, 1)
    return rt.count_children(_text(params, 0, "a supervisor", "root"))


def _get_state(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("get_state", params, 1, 1)
    return rt.get_state(_text(params, 0, "a server name"))


def _statistics(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("statistics", params, 0, 1)
    return rt.statistics(_text(params, 0, "a server name") if params else None)


def _cluster(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("cluster", params, 0, 0)
    return None if rt.cluster_info is None else rt.cluster_info()


def _suspend(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("suspend", params, 1, 1)
    rt.suspend(_text(params, 0, "a server name"))


def _resume(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("resume", params, 1, 1)
    rt.resume(_text(params, 0, "a server name"))


def _releases(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("releases", params, 0, 0)
    return [r._asdict() for r in rt.releases()]


def _child_op(method: str, act: Callable[[Runtime, str, str], Any]) -> Callable[..., Any]:
    def op(rt: Runtime, params: tuple[Any, ...]) -> Any:
        _arity(method, params, 2, 2)
        result = act(rt, _text(params, 0, "a supervisor"), _text(params, 1, "a child id"))
        return result._asdict() if isinstance(result, ChildInfo) else result

    return op


def _upgrade(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("upgrade", params, 1, 1)
    if not isinstance(params[0], Release):
        raise BadRequest(f"upgrade takes a loaded release, got {params[0]!r:.80}")
    return rt.planner(params[0])


def _downgrade(rt: Runtime, params: tuple[Any, ...]) -> Any:
    _arity("downgrade", params, 0, 0)
    return rt.planner(None)


ADMIN_OPS: dict[str, Callable[[Runtime, tuple[Any, ...]], Any]] = {
    "which_children": _which_children,
    "count_children": _count_children,
    "get_state": _get_state,
    "statistics": _statistics,
    "cluster": _cluster,
    "suspend": _suspend,
    "resume": _resume,
    "releases": _releases,
    "terminate_child": _child_op("terminate_child", Runtime.terminate_child),
    "restart_child": _child_op("restart_child", Runtime.restart_child),
    "upgrade": _upgrade,
    "downgrade": _downgrade,
}

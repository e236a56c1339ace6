"""The trio edge of a node: the one dispatcher, awaitable calls, timers, server tasks.

Everything a server does happens in synchronous steps run by the core's
:class:`~otpy._core.runtime.Runtime`; this module only connects it to trio: a client's
``await node.call`` hands its request to the core's one call path (``start_call``)
with a caller that parks the task until the reply comes, one dispatcher task drains the
run queue and fires timers and call deadlines, ``start_task`` runs a server's I/O in a
nursery, and releases are installed in chunks between checkpoints.

The endpoints (MessagePack-RPC, HTTP) are not known here: ``otpy._open`` assembles a
node with them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import structlog
import trio

from ._core.names import Pid
from ._core.release import Planner, Release, ReleaseInfo
from ._core.runtime import Runtime
from ._core.scheduler import CAST, INFO, Scheduler, TaskRef
from ._core.server import WAITING, Caller, GenServer, TaskDone, TaskFailed
from ._core.supervisor import Child, ChildInfo, Supervisor
from ._exceptions import OtpyError, UpgradeFailed
from ._install import commit, heap_frozen, migrate_in_chunks
from ._watchdog import Watchdog

DEFAULT_NODE_NAME = "nonode"

class TaskCaller(Caller):
    """A trio task waiting for a reply: answered at once, or parked until rescheduled."""

    __slots__ = ("_error", "_task", "_value")

    def __init__(self) -> None:
        self._status = WAITING
        self._task: Any = None
        self._error: BaseException | None = None

    def _resolve(self, value: Any) -> None:
        if self._task is None:
            self._value = value
        else:
            trio.lowlevel.reschedule(self._task, outcome.Value(value))

    def _reject(self, exc: BaseException) -> None:
        if self._task is None:
            self._error = exc
        else:
            trio.lowlevel.reschedule(self._task, outcome.Error(exc))

    async def wait(self) -> Any:
        """Park the calling task until the reply (or error) comes; cancellable, and a
        cancelled caller has given up (a late reply is dropped)."""
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._give_up()
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Node:
    """A running node: one trio loop stepping every server of one supervision tree.

    Get one from :func:`otpy.open_node`::

        async with otpy.open_node(otpy.Supervisor([otpy.Child("c", Counter)])) as node:
            await node.call("c", "incr")

    Calls wait (up to ``timeout`` seconds, default 5) for servers that are busy or
    suspended; ``cast``, ``send`` and every inspection method return at once.
    """

    def __init__(self, root: Supervisor, *, node_name: str = DEFAULT_NODE_NAME) -> None:
        if not isinstance(node_name, str) or not node_name:
            raise TypeError(f"node_name must be a non-empty string, got {node_name!r}")
        # A fresh creation each run: pids of an earlier run of this node name nothing.
        log = structlog.get_logger("otpy")
        # Events name their node where it has a name of its own (a cluster's members).
        log = log.bind(node=node_name) if node_name != DEFAULT_NODE_NAME else log.bind()
        sched = Scheduler(log=log,
                          clock=trio.current_time, wakeup=self._wakeup, spawn=self._spawn,
                          node=node_name, creation=secrets.randbits(32))
        self._rt = Runtime(root, sched)
        self._sched = sched
        sched.on_fatal = self._on_fatal
        self._watchdog = Watchdog(sched, root)
        self._parked: Any = None
        self._tasks: trio.Nursery | None = None
        self._body: trio.CancelScope | None = None
        self.name = node_name
        """This node's name: what its pids carry, and what ``"server@node"`` names."""
        self._cluster: Any = None  # its ClusterNode, while the node is in a cluster
        self.address: tuple[str, int] | None = None
        """The bound ``(host, port)`` of the client endpoint (``listen=``), else None."""
        self.admin_address: tuple[str, int] | None = None
        """The bound ``(host, port)`` of the admin endpoint (``admin=``), else None."""
        self.store: Any = None
        """The :class:`otpy.Store` durable servers keep their states in, else None."""
        self.http_address: tuple[str, int] | None = None
        """The bound ``(host, port)`` of the HTTP endpoint (``http=``), else None."""

    # -- calls and messages ----------------------------------------------------------

    async def call(
        self, name: str | Pid, request: Any, *, timeout: float | None = 5.0,
        vsn: str | None = None,
    ) -> Any:
        """Call server ``name`` (a name, an :class:`otpy.Pid` or ``"name@node"``) and
        return its reply.

        An idle server is stepped at once; a busy or suspended one answers in turn.
        Raises :class:`otpy.NoSuchServer`, :class:`otpy.CallTimeout` (after ``timeout``
        seconds; ``None`` waits for ever; the request may still be served, its reply is
        dropped) or :class:`otpy.ServerCrashed` (``__cause__`` is the original error).
        ``vsn`` names the protocol version the caller speaks (see releases)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        caller = TaskCaller()
        self._sched.start_call(name, request, caller, vsn=vsn, timeout=timeout)
        if caller._status == WAITING:
            return await caller.wait()
        await trio.lowlevel.cancel_shielded_checkpoint()
        if caller._error is not None:
            raise caller._error
        return caller._value

    def call_nowait(self, name: str, request: Any) -> Any:
        """Call ``name`` synchronously: answer now or raise :class:`otpy.WouldBlock`
        (the server is suspended, busy in the current chain, or defers its reply, or
        is durable on a store with fsync="group", whose replies wait for the sync)."""
        return self._sched.call_nowait(name, request, True)

    def cast(self, name: str | Pid, message: Any) -> None:
        """Send ``message`` to ``name``'s ``handle_cast``; never blocks.

        Raises :class:`otpy.NoSuchServer` for an unknown name and
        :class:`otpy.MailboxFull` when the server's mailbox is full; to a pid whose
        incarnation is gone the message is dropped, as in Erlang."""
        self._sched.cast_now(CAST, name, message)

    def send(self, name: str | Pid, message: Any) -> None:
        """Send ``message`` to ``name``'s ``handle_info``; never blocks."""
        self._sched.cast_now(INFO, name, message)

    # -- introspection ---------------------------------------------------------------

    def get_state(self, name: str) -> Any:
        """The current state of server ``name`` (also while it is suspended)."""
        return self._rt.get_state(name)

    def vsn_of(self, name: str) -> str:
        """The code version server ``name`` runs."""
        return self._rt.vsn_of(name)

    def suspend(self, name: str) -> None:
        """Hold server ``name``: its messages wait in its mailbox, none is lost."""
        self._rt.suspend(name)

    def resume(self, name: str) -> None:
        """Let a suspended server serve its waiting messages, in order."""
        self._rt.resume(name)

    def whereis(self, name: str) -> Pid | None:
        """The :class:`otpy.Pid` of the incarnation that runs as ``name`` now (a server
        or a supervisor), or None."""
        return self._sched.whereis(name)

    def servers(self) -> list[str]:
        """The names of every running server."""
        return self._rt.servers()

    def statistics(self, name: str | None = None) -> dict[str, Any]:
        """Counters of the node, or of server ``name``.

        For a server: ``mailbox`` (queued messages), ``max_mailbox``, ``refused``
        (messages refused because its mailbox was full, counted per name across
        restarts), ``waiting`` (calls waiting for room in its mailbox), ``restarts``,
        ``vsn``, ``step_timeout``, ``durable``, ``status`` and ``supervisor``. For the
        node: ``servers``,
        ``supervisors``, ``run_queue``, ``timers``, ``queued`` (messages in all
        mailboxes), ``refused`` (total), ``refused_by_server`` and ``waiting``; with a
        store, ``store``: its figures (``records`` and ``bytes`` written since it
        opened, ``pending`` records not yet synced, ``last_sync``, ``held_replies``,
        ... see docs/durability.md); in a cluster, ``cluster`` too (what
        :meth:`cluster_info` returns)."""
        return self._rt.statistics(name)

    # -- supervisors -----------------------------------------------------------------

    def which_children(self, sup: str = "root") -> list[ChildInfo]:
        """The children of supervisor ``sup`` in start order."""
        return self._rt.which_children(sup)

    def count_children(self, sup: str = "root") -> dict[str, int]:
        """Counts of ``specs``, ``active``, ``supervisors`` and ``workers``, as in OTP."""
        return self._rt.count_children(sup)

    async def start_child(self, sup: str, child: Child | Supervisor) -> ChildInfo:
        """Add ``child`` to supervisor ``sup`` and start it (a child with
        ``scope="cluster"`` is registered cluster-wide first: StartFailed if another
        node runs that name). Under a cluster supervisor, such a child's spec is also
        given to the other nodes, which stand by for it and take it over if this node
        dies, as for a child of the tree (its class must be importable by its module
        path there, and its arg msgpack-able: TypeError before anything starts)."""
        await trio.lowlevel.checkpoint()
        cluster = self._cluster
        if cluster is None:
            return self._rt.start_child(sup, child)
        from ._cluster.node import cluster_specs, encode_spec

        scope = self._rt.supervisor(sup).spec.scope
        # A worker of a cluster supervisor that is restarted at all: its spec is shared.
        spread = child if (isinstance(child, Child) and child.scope == "cluster" and
                           scope == "cluster" and child.restart.value != "temporary") \
            else None
        shared = None if spread is None else encode_spec(sup, spread)
        wrapped = child if isinstance(child, Supervisor) else Supervisor(
            [child], name=f"{child.id}.spec", scope=scope)
        for name, failover in cluster_specs(wrapped):
            await cluster.register(name, sup if failover == wrapped.name else failover)
        if spread is not None and (spread.durable if spread.durable is not None
                                   else spread.server_class.durable):
            await cluster.claim_dynamic(spread.id)
        info = self._rt.start_child(sup, child)
        if shared is not None and child.id not in self._sched.standby:
            # Started here: the others stand by for it. (Found running elsewhere, this
            # node stands by for that one, whose spec is in the bucket already.)
            await cluster.share_spec(child.id, shared)
        return info

    def cluster_info(self) -> dict[str, Any] | None:
        """The cluster as this node sees it (its name, this node, the members and
        whether each answers, and which node runs each cluster-scoped name), or None
        when the node is in no cluster."""
        return None if self._cluster is None else self._cluster.info()

    async def terminate_child(self, sup: str, id: str) -> None:
        """Stop child ``id`` (its spec stays, except for a temporary child)."""
        await trio.lowlevel.checkpoint()
        self._rt.terminate_child(sup, id)

    async def restart_child(self, sup: str, id: str) -> ChildInfo:
        """Start again a child that is not running."""
        await trio.lowlevel.checkpoint()
        return self._rt.restart_child(sup, id)

    async def delete_child(self, sup: str, id: str) -> None:
        """Remove the spec of a child that is not running (a child that start_child
        gave to the cluster: on every node, and its cluster-wide name is given up)."""
        await trio.lowlevel.checkpoint()
        self._rt.delete_child(sup, id)
        if self._cluster is not None:
            await self._cluster.forget_spec(id)

    # -- releases --------------------------------------------------------------------

    async def upgrade(self, release: Release, *, cluster: bool = False) -> dict[str, Any]:
        """Install ``release``: migrate every affected server's state with the new
        class's ``code_change``, check it against the new state type, and swap code and
        state for all of them at once. The migration runs in chunks while every server
        keeps serving; the swap is one synchronous act (servers that were stepped
        meanwhile are migrated again from their current state), after which every
        message is served by the new code. On any failure nothing changes and
        :class:`otpy.UpgradeFailed` lists every failed server with its reason. Returns a
        short report. ``code_change`` must be a pure function of its arguments: it may
        run more than once for a busy server.

        ``cluster=True`` (a node in a cluster): install the release on every node that
        runs a target, all or none: its code (the release must be loaded from its
        files) travels to the nodes that do not have it, every node migrates while
        serving and votes, and one compare-and-swap decides (see docs/cluster.md)."""
        await trio.lowlevel.checkpoint()
        if cluster:
            report: dict[str, Any] = await self._cluster_releases().upgrade(release)
            return report
        return await self._install(self._rt.planner(release))

    async def downgrade(self, *, cluster: bool = False) -> dict[str, Any]:
        """Go back to the release before the newest: the running (newer) class's
        ``code_change(otpy.Down(old_vsn), state, extra)`` computes each older state.
        ``cluster=True``: take back the cluster's newest release on every node."""
        await trio.lowlevel.checkpoint()
        if cluster:
            report: dict[str, Any] = await self._cluster_releases().upgrade(None)
            return report
        return await self._install(self._rt.planner(None))

    def _cluster_releases(self) -> Any:
        if self._cluster is None:
            raise UpgradeFailed("cluster=True needs a node in a cluster "
                                "(open_node(..., cluster=...))")
        return self._cluster.releases

    def releases(self) -> list[ReleaseInfo]:
        """The installed releases, oldest first (the newest last)."""
        return self._rt.releases()

    async def _install(self, planner: Planner) -> dict[str, Any]:
        """Drive a planned release to its commit (or its rollback), in chunks: servers
        outside the release keep serving throughout; only the commit at the end is one
        synchronous act."""
        with heap_frozen():
            return commit(await migrate_in_chunks(planner))

    # -- the loop --------------------------------------------------------------------

    def _wakeup(self) -> None:
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def _unpark(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _dispatch(self) -> None:
        sched = self._sched
        while True:
            if sched.has_work:
                sched.run_batch()
                sched.fire_timers()
                await trio.lowlevel.checkpoint()
                continue
            sched.fire_timers()
            if sched.has_work:
                continue
            deadline = sched.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline):
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._unpark)

    def _spawn(
        self, proc: GenServer[Any], ref: TaskRef, fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
    ) -> None:
        if self._tasks is None:
            raise OtpyError("start_task needs a running node")
        scope = trio.CancelScope()

        def cancel(grace: float | None) -> None:
            if grace is None or grace <= 0:
                scope.cancel()
            else:
                scope.deadline = min(scope.deadline, trio.current_time() + grace)

        ref._cancel = cancel
        self._tasks.start_soon(self._run_task, proc, ref, scope, fn, args)

    async def _run_task(
        self, proc: GenServer[Any], ref: TaskRef, scope: trio.CancelScope,
        fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
    ) -> None:
        message: Any = None
        with scope:
            try:
                message = TaskDone(ref.tag, await fn(*args))
            except Exception as exc:
                message = TaskFailed(ref.tag, exc)
        if message is None:  # cancelled with its server
            ref.done = True
            return
        self._sched.task_finished(proc, ref, message)

    def _on_fatal(self, exc: BaseException) -> None:
        if self._body is not None:
            self._body.cancel()

    def _start_tree(self) -> None:
        # The watchdog runs from before the first init to after the last terminate.
        self._watchdog.start()
        try:
            self._rt.start()
        except BaseException:
            self._watchdog.stop()
            raise

    def _shutdown_tree(self) -> None:
        try:
            self._rt.shutdown()
        finally:
            self._watchdog.stop()

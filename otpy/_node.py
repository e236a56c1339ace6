"""The trio edge: open_node, the one dispatcher, timers, and tasks owned by servers.

Everything a server does happens in synchronous steps run by the scheduler; this module
only connects it to trio: a client's ``await node.call`` either gets its answer from an
inline step or parks its task until the reply comes, one dispatcher task drains the run
queue and fires timers, and ``start_task`` runs a server's I/O in a nursery.
"""

from __future__ import annotations

import gc
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import outcome
import structlog
import trio

from ._core.release import Migration, Planner, Release, ReleaseHandler, ReleaseInfo
from ._core.scheduler import CALL, CAST, INFO, Scheduler, TaskRef
from ._core.server import Caller, GenServer, TaskDone, TaskFailed
from ._core.supervisor import (
    Child,
    ChildInfo,
    Supervisor,
    SupervisorRuntime,
    check_unique_names,
)
from ._exceptions import CallTimeout, OtpyError, SupervisorError
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from ._serve.rpc import EndpointLimits

T = TypeVar("T")

# Servers migrated, and planned (a cheaper check), between two yields to the loop
# during an upgrade: each chunk is well under a millisecond.
_MIGRATION_CHUNK = 200
_PLAN_CHUNK = 1000


class _TaskCaller(Caller):
    """A trio task waiting for a reply: answered at once, or parked until rescheduled."""

    __slots__ = ("_error", "_task", "_value")

    def __init__(self) -> None:
        self._status = 0
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

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._status = 2  # the caller gave up: a late reply is dropped
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

    def __init__(self, root: Supervisor) -> None:
        if not isinstance(root, Supervisor):
            raise SupervisorError(
                f"open_node needs an otpy.Supervisor as the root of the tree, got {root!r}; "
                f"wrap servers as otpy.Supervisor([otpy.Child('name', Server)])")
        check_unique_names(root, ())
        self._root_spec = root
        self._sched = Scheduler(
            log=structlog.get_logger("otpy").bind(),
            clock=trio.current_time,
            wakeup=self._wakeup,
            spawn=self._spawn,
        )
        self._sched.on_fatal = self._on_fatal
        self._watchdog = Watchdog(self._sched, root)
        self._parked: Any = None
        self._tasks: trio.Nursery | None = None
        self._body: trio.CancelScope | None = None
        self._root: SupervisorRuntime | None = None
        self._releases = ReleaseHandler(self._sched)
        self.address: tuple[str, int] | None = None
        """The bound ``(host, port)`` of the client endpoint (``listen=``), else None."""
        self.admin_address: tuple[str, int] | None = None
        """The bound ``(host, port)`` of the admin endpoint (``admin=``), else None."""

    # -- calls and messages ----------------------------------------------------------

    async def call(
        self, name: str, request: Any, *, timeout: float | None = 5.0, vsn: str | None = None
    ) -> Any:
        """Call server ``name`` and return its reply.

        An idle server is stepped at once; a busy or suspended one answers in turn.
        Raises :class:`otpy.NoSuchServer`, :class:`otpy.CallTimeout` (after ``timeout``
        seconds; ``None`` waits for ever; the request may still be served, its reply is
        dropped) or :class:`otpy.ServerCrashed` (``__cause__`` is the original error)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if vsn is None:
            # The hot path, kept inline (each Python call here costs ~5% of the rate):
            # an idle server answers within this step.
            sched = self._sched
            proc = sched.procs.get(name)
            if proc is not None and not proc._flags and proc._mbox is None:
                caller = _TaskCaller()
                sched.step(proc, CALL, request, caller)
                if caller._status == 0:
                    return await self._wait(caller, name, timeout)
                await trio.lowlevel.cancel_shielded_checkpoint()
                if caller._error is not None:
                    raise caller._error
                return caller._value
        caller, served_by = self._start_call(name, request, vsn)
        if caller._status == 0:
            result = await self._wait(caller, name, timeout)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            if caller._error is not None:
                raise caller._error
            result = caller._value
        if vsn is not None:
            result = self._adapt_reply(served_by, vsn, result)
        return result

    def _start_call(
        self, name: str, request: Any, vsn: str | None
    ) -> tuple[_TaskCaller, type[GenServer[Any]]]:
        """Step an idle server now, or queue the call (behind the calls waiting for
        room, if its mailbox is full); the caller holds the answer (``_status`` 1) or
        waits for it (0). Shared by ``call`` and the endpoint."""
        sched = self._sched
        proc = sched.procs.get(name)
        if proc is None:
            raise sched._no_such(name)
        served_by = type(proc)
        if vsn is not None:
            request = self._adapt_request(proc, vsn, request)
        caller = _TaskCaller()
        if not proc._flags and proc._mbox is None:
            sched.step(proc, CALL, request, caller)
        else:
            sched.enqueue_call(proc, (CALL, request, caller))
        return caller, served_by

    async def _wait(self, caller: _TaskCaller, name: str, timeout: float | None) -> Any:
        caller._task = trio.lowlevel.current_task()
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            return await trio.lowlevel.wait_task_rescheduled(caller._abort)
        if scope.cancelled_caught:
            if self._sched.is_waiting(name, caller):  # dropped from the line: never sent
                raise CallTimeout(
                    f"server {name!r} kept a full mailbox for {timeout:g} s, so this call "
                    f"never got into it; the request was not sent. Slow the callers down, "
                    f"or raise the server's max_mailbox")
            raise CallTimeout(
                f"server {name!r} did not reply within {timeout:g} s; the request may still "
                f"be served, its reply will be dropped. Pass a larger timeout= if it is "
                f"expected to take longer")
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _adapt_request(proc: GenServer[Any], vsn: str, request: Any) -> Any:
        adapt = getattr(proc, "upgrade_request", None)
        if adapt is None or type(proc).vsn == vsn:
            return request
        return adapt(vsn, request)

    @staticmethod
    def _adapt_reply(cls: type[GenServer[Any]], vsn: str, reply: Any) -> Any:
        # The class that served the request adapts its reply, even if an upgrade
        # swapped the code while the caller waited.
        adapt = getattr(cls, "downgrade_reply", None)
        if adapt is None or cls.vsn == vsn:
            return reply
        return adapt(cls.__new__(cls), vsn, reply)

    def call_nowait(self, name: str, request: Any) -> Any:
        """Call ``name`` synchronously: answer now or raise :class:`otpy.WouldBlock`
        (the server is suspended, busy in the current chain, or defers its reply)."""
        return self._sched.call_nowait(name, request)

    def cast(self, name: str, message: Any) -> None:
        """Send ``message`` to ``name``'s ``handle_cast``; never blocks.

        Raises :class:`otpy.NoSuchServer` for an unknown name and
        :class:`otpy.MailboxFull` when the server's mailbox is full."""
        self._sched.cast_now(CAST, name, message)

    def send(self, name: str, message: Any) -> None:
        """Send ``message`` to ``name``'s ``handle_info``; never blocks."""
        self._sched.cast_now(INFO, name, message)

    # -- introspection ---------------------------------------------------------------

    def get_state(self, name: str) -> Any:
        """The current state of server ``name`` (also while it is suspended)."""
        return self._sched.lookup(name)._state

    def vsn_of(self, name: str) -> str:
        """The code version server ``name`` runs."""
        return type(self._sched.lookup(name)).vsn

    def suspend(self, name: str) -> None:
        """Hold server ``name``: its messages wait in its mailbox, none is lost."""
        self._sched.suspend(name)

    def resume(self, name: str) -> None:
        """Let a suspended server serve its waiting messages, in order."""
        self._sched.resume(name)

    def servers(self) -> list[str]:
        """The names of every running server."""
        return list(self._sched.procs)

    def statistics(self, name: str | None = None) -> dict[str, Any]:
        """Counters of the node, or of server ``name``.

        For a server: ``mailbox`` (queued messages), ``max_mailbox``, ``refused``
        (messages refused because its mailbox was full, counted per name across
        restarts), ``waiting`` (calls waiting for room in its mailbox), ``restarts``,
        ``vsn``, ``step_timeout`` and ``status``. For the node: ``servers``,
        ``supervisors``, ``run_queue``, ``timers``, ``queued`` (messages in all
        mailboxes), ``refused`` (total), ``refused_by_server`` and ``waiting``."""
        return self._sched.statistics(name)

    # -- supervisors -----------------------------------------------------------------

    def _sup(self, sup: str) -> SupervisorRuntime:
        return self._sched.supervisor(sup)

    def which_children(self, sup: str = "root") -> list[ChildInfo]:
        """The children of supervisor ``sup`` in start order."""
        return self._sup(sup).which_children()

    def count_children(self, sup: str = "root") -> dict[str, int]:
        """Counts of ``specs``, ``active``, ``supervisors`` and ``workers``, as in OTP."""
        return self._sup(sup).count_children()

    async def start_child(self, sup: str, child: Child | Supervisor) -> ChildInfo:
        """Add ``child`` to supervisor ``sup`` and start it."""
        await trio.lowlevel.checkpoint()
        return self._sup(sup).start_child(child)

    async def terminate_child(self, sup: str, id: str) -> None:
        """Stop child ``id`` (its spec stays, except for a temporary child)."""
        await trio.lowlevel.checkpoint()
        self._sup(sup).terminate_child(id)

    async def restart_child(self, sup: str, id: str) -> ChildInfo:
        """Start again a child that is not running."""
        await trio.lowlevel.checkpoint()
        return self._sup(sup).restart_child(id)

    async def delete_child(self, sup: str, id: str) -> None:
        """Remove the spec of a child that is not running."""
        await trio.lowlevel.checkpoint()
        self._sup(sup).delete_child(id)

    # -- releases --------------------------------------------------------------------

    async def upgrade(self, release: Release) -> dict[str, Any]:
        """Install ``release``: migrate every affected server's state with the new
        class's ``code_change``, check it against the new state type, and swap code and
        state for all of them at once. The migration runs in chunks while every server
        keeps serving; the swap is one synchronous act (servers that were stepped
        meanwhile are migrated again from their current state), after which every
        message is served by the new code. On any failure nothing changes and
        :class:`otpy.UpgradeFailed` lists every failed server with its reason. Returns a
        short report. ``code_change`` must be a pure function of its arguments: it may
        run more than once for a busy server."""
        await trio.lowlevel.checkpoint()
        with _heap_frozen():
            return await self._install(self._releases.planner(release))

    async def downgrade(self) -> dict[str, Any]:
        """Go back to the release before the newest: the running (newer) class's
        ``code_change(otpy.Down(old_vsn), state, extra)`` computes each older state."""
        await trio.lowlevel.checkpoint()
        with _heap_frozen():
            return await self._install(self._releases.planner(None))

    def releases(self) -> list[ReleaseInfo]:
        """The installed releases, oldest first (the newest last)."""
        return self._releases.releases()

    async def _install(self, planner: Planner) -> dict[str, Any]:
        # Plan, then migrate, in chunks, yielding to the loop between them, so that
        # servers outside the release keep serving throughout; only the commit at the
        # end is one synchronous act.
        try:
            while not planner.plan(_PLAN_CHUNK):
                await trio.lowlevel.checkpoint()
        except BaseException:
            planner.abort()
            raise
        migration = planner.finish()
        migration.watch()
        try:
            while not migration.migrate(_MIGRATION_CHUNK):
                await trio.lowlevel.checkpoint()
        except BaseException:
            migration.abort()
            raise
        return _commit(migration)

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
        root = SupervisorRuntime(self._root_spec, self._sched, None)
        self._root = self._sched.root = root
        try:
            with self._sched.supervision_act():
                root.start()
        except BaseException:
            self._watchdog.stop()
            raise

    def _shutdown_tree(self) -> None:
        root = self._root
        try:
            if root is not None and root.alive:
                with self._sched.supervision_act():
                    root.shutdown("shutdown")
        finally:
            self._watchdog.stop()


@trio.lowlevel.enable_ki_protection
def _commit(migration: Migration) -> dict[str, Any]:
    """The commit, shielded from Ctrl-C: trio delivers a KeyboardInterrupt that
    arrives meanwhile at the next checkpoint, so it never leaves a release half
    swapped."""
    return migration.finish()


@contextmanager
def _heap_frozen() -> Iterator[None]:
    """Keep the collector out of the way while a release installs.

    A migration allocates a few objects per server, enough to trigger CPython's full
    collection, which walks every object of the node in one pause (~50 ms for 10k
    servers) in the middle of the upgrade. Frozen, the existing (long-lived) objects are
    skipped; unfrozen after, they count as long-lived again. And automatic collection
    is off until the release is installed: at 100k servers the young collections set
    off by the commit's own allocations were a third of it (the objects an install
    makes are few per server and live on; garbage made meanwhile waits until after).
    An application that freezes objects itself (gc.get_freeze_count() > 0), or has
    turned the collector off, is left to do so."""
    frozen = not gc.get_freeze_count()
    enabled = gc.isenabled()
    if frozen:
        gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if frozen:
            gc.unfreeze()


def _unwrap(exc: BaseException) -> BaseException:
    """otpy's errors and the body's reach the user bare, not in an ExceptionGroup."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)] or list(
            exc.exceptions)
        if len(leaves) != 1:
            return exc
        exc = leaves[0]
    return exc


@asynccontextmanager
async def open_node(
    root: Supervisor, *, listen: tuple[str, int] | None = None,
    admin: tuple[str, int] | None = None, limits: EndpointLimits | None = None,
) -> AsyncIterator[Node]:
    """Start the supervision tree ``root`` on the current trio loop.

    ::

        async with otpy.open_node(root) as node:
            await node.call("kv1", ("store", "x", 1))

    The tree starts depth-first before the body runs (:class:`otpy.StartFailed` if a
    child's ``init`` fails, after stopping the children already started) and is shut
    down in reverse order when the body ends. If the root supervisor gives up, the body
    is cancelled and :class:`otpy.RestartIntensityExceeded` is raised.

    ``listen=(host, port)`` serves MessagePack-RPC ``call``/``cast`` to clients and
    ``admin=(host, port)`` the cookie-authenticated admin endpoint (port 0 picks a free
    port; the bound addresses are ``node.address`` and ``node.admin_address``).
    ``limits=otpy.EndpointLimits(...)`` bounds each of their connections (frame size,
    nesting, requests in flight, unsent replies, call timeout)."""
    if limits is not None:
        from ._serve.rpc import EndpointLimits

        if not isinstance(limits, EndpointLimits):
            raise TypeError(f"open_node(limits=...) takes an otpy.EndpointLimits, got "
                            f"{limits!r}; e.g. limits=otpy.EndpointLimits(max_frame=65536)")
    node = Node(root)
    sched = node._sched
    try:
        async with trio.open_nursery() as system:
            system.start_soon(node._dispatch)
            async with trio.open_nursery() as tasks:
                node._tasks = tasks
                node._start_tree()
                try:
                    if listen is not None or admin is not None:
                        from ._serve.rpc import serve_admin, serve_client

                        if listen is not None:
                            node.address = await system.start(
                                partial(serve_client, node, listen, limits=limits))
                        if admin is not None:
                            node.admin_address = await system.start(
                                partial(serve_admin, node, admin, limits=limits))
                    with trio.CancelScope() as body:
                        node._body = body
                        if sched.fatal is not None:
                            body.cancel()
                        yield node
                finally:
                    node._body = None
                    node._shutdown_tree()
            system.cancel_scope.cancel()
    except BaseException as exc:
        if sched.fatal is not None:
            raise sched.fatal from _unwrap(exc)
        bare = _unwrap(exc)
        if bare is exc:
            raise
        raise bare from bare.__cause__
    if sched.fatal is not None:
        raise sched.fatal


def run(
    root: Supervisor, main: Callable[[Node], Awaitable[T]] | None = None, *,
    listen: tuple[str, int] | None = None, admin: tuple[str, int] | None = None,
    limits: EndpointLimits | None = None,
) -> T | None:
    """Run a node from synchronous code: start ``root``, run ``await main(node)`` (or
    serve until interrupted when ``main`` is None), shut down, return main's result.
    ``listen``, ``admin`` and ``limits`` are as for :func:`open_node`."""

    async def _amain() -> T | None:
        async with open_node(root, listen=listen, admin=admin, limits=limits) as node:
            if main is None:
                await trio.sleep_forever()
                return None
            return await main(node)

    return trio.run(_amain)

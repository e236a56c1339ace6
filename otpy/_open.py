"""Assembling a node: ``open_node`` and ``run`` start the tree on a trio loop and the
endpoints around it.

This is the one module that knows every part: the node (``_node``), and the transports
of ``_serve`` it starts on request. Each transport gets what it needs explicitly (the
node's Runtime, its installer of releases, its limits), never the node itself, so the
transports do not import the node and the node does not import them.
"""

from __future__ import annotations

import os
import signal
import ssl as _ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio

from ._cluster.join import check_cluster_options, default_node_name, open_cluster
from ._cluster.node import durable_cluster_names
from ._cluster.states import SplitStore
from ._core.supervisor import Supervisor
from ._exceptions import StoreError
from ._node import DEFAULT_NODE_NAME, Node
from ._serve.http import serve_http
from ._serve.limits import EndpointLimits, HttpLimits
from ._serve.rpc import serve_admin, serve_client
from ._store import FSYNC_MODES, FsyncMode, SqliteStore, Store

DEFAULT_STORE_DIR = "otpy-store"

T = TypeVar("T")

_log = structlog.get_logger("otpy")


def _unwrap(exc: BaseException) -> BaseException:
    """otpy's errors and the body's reach the user bare, not in an ExceptionGroup."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)] or list(
            exc.exceptions)
        if len(leaves) != 1:
            return exc
        exc = leaves[0]
    return exc


async def _open_store(node: Node, store: str | os.PathLike[str] | Store | None,
                      fsync: FsyncMode | None, named: bool = True,
                      elsewhere: set[str] | frozenset[str] = frozenset()
                      ) -> tuple[Store | None, Store | None]:
    """The store the node's durable servers use: opened here (in a thread: it reads
    SQLite and replays the log) from a path, or the default path when the tree has a
    durable child (other than those in ``elsewhere``: the cluster keeps theirs) and no
    store was named; or the Store given. Returns it and the store to close at shutdown
    (the one opened here, else None)."""
    if fsync is not None and fsync not in FSYNC_MODES:
        raise ValueError(f"open_node(fsync=...) must be one of "
                         f"{', '.join(map(repr, FSYNC_MODES))}, got {fsync!r}")
    rt = node._rt
    if store is None:
        if not rt.has_durable(but=elsewhere):
            return None, None
        if not named:
            raise TypeError(
                f"the tree has durable servers, whose states go by default in "
                f"./{DEFAULT_STORE_DIR}/<node name>/, but this node's name "
                f"({node.name!r}) is made afresh each run in a cluster: pass node_name= "
                f"(the same each run), or store=PATH")
        store = Path(DEFAULT_STORE_DIR) / node.name
    if isinstance(store, str | os.PathLike):
        path = Path(store).absolute()
        log = node._sched.log.log.bind(store=str(path))
        opened = await trio.to_thread.run_sync(partial(
            SqliteStore, path, fsync=fsync or "never", log=log))
        return opened, opened
    if not isinstance(store, Store):
        raise TypeError(f"open_node(store=...) takes a directory (a str or a path) or an "
                        f"otpy.Store, got {store!r}")
    if fsync is not None:
        raise TypeError("open_node(fsync=...) applies to a store the node opens from a "
                        "path; a store given as an object was opened with its own mode")
    return store, None


def _use_store(node: Node, store: Store | None) -> None:
    """Record the durable servers' states in ``store`` (and, in a cluster whose tree
    has durable cluster-scoped children, theirs in the cluster's store): before the
    tree starts."""
    membership = node._cluster
    if membership is not None and membership.states is not None:
        store = SplitStore(store, membership.states, membership.state_names)
    if store is None:
        return
    durability = node._rt.use_store(store)
    durability_token = trio.lowlevel.current_trio_token()
    store.on_synced(durability.synced, durability_token.run_sync_soon)
    if membership is not None and isinstance(store, SplitStore):
        lost = membership.lost

        def fenced(name: str, error: StoreError) -> None:
            durability.fenced(name, error)
            lost(name)

        store.on_fenced(fenced)
    node.store = store


async def _close_store(node: Node, opened: Store | None) -> None:
    """Close the store the node opened (in a thread: it waits for the last sync and a
    compaction), then release the replies it held."""
    durability = node._sched.durable
    if durability is None:
        return
    with trio.CancelScope(shield=True):
        if opened is not None:
            await trio.to_thread.run_sync(opened.close)
        durability.closed()


@asynccontextmanager
async def open_node(
    root: Supervisor, *, listen: tuple[str, int] | None = None,
    admin: tuple[str, int] | None = None, limits: EndpointLimits | None = None,
    node_name: str | None = None, cluster: str | bool | None = None,
    cluster_name: str = "otpy", cluster_options: Mapping[str, float] | None = None,
    ssl: _ssl.SSLContext | None = None,
    store: str | os.PathLike[str] | Store | None = None, fsync: FsyncMode | None = None,
    http: tuple[str, int] | None = None, http_limits: HttpLimits | None = None,
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
    nesting, objects, requests in flight, unsent replies, call timeout, connections,
    idle timeout). ``ssl=`` a server-side ``ssl.SSLContext`` makes both endpoints speak
    TLS (``otpy.connect(..., ssl=...)`` on the other side). ``node_name`` is the
    name the node's pids carry (default ``"nonode"``, or ``<host>-<pid>`` in a
    cluster).

    ``cluster=True`` joins the cluster ``cluster_name`` through this machine's shared
    nats-server (started by the first node that needs it); ``cluster="nats://host:port"``
    through that server. Names stay local unless a child has ``scope="cluster"``; a
    call by name reaches a local server first, else the cluster-registered one;
    ``"name@node"`` reaches one node's server, and pids route to their node.
    ``cluster_options={"cut_after": 5.0, "probe_interval": 0.05}`` tunes how the node
    watches the others: each is probed every ``probe_interval`` seconds, and one that
    stays silent for ``cut_after`` seconds is taken as cut off (its monitors get
    ``ServerDown(..., "noconnection")``); one down for ``forget_after`` seconds (60 by
    default) is removed from the cluster's members (it joins again when it comes
    back). See docs/cluster.md.

    ``http=(host, port)`` serves HTTP/1.1 (``node.http_address``): calls and casts in
    JSON, ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard, for holders of the
    node's cookie (see docs/http.md); ``http_limits=otpy.HttpLimits(...)`` bounds it.
    It speaks plain HTTP (``ssl=`` is not applied to it): bind it to loopback, or put a
    TLS-terminating proxy in front of it.
    When the body ends, the HTTP endpoint drains first (it stops accepting and lets the
    requests in progress finish, within ``drain_grace``), then the tree shuts down.

    ``store=PATH`` is the directory where durable servers keep their states (an
    :class:`otpy.SqliteStore`, opened before the tree starts and closed after it stops;
    :class:`otpy.StoreError` if it cannot be opened); a tree with a durable child and no
    ``store=`` uses ``./otpy-store/<node name>/``. ``store=`` also takes an
    :class:`otpy.Store` object, which the caller opens and closes. ``fsync`` is what a
    power loss may take: ``"never"`` (the default), ``"group"`` or ``"always"``; a kill -9
    of the node takes no acknowledged write in any mode (see docs/durability.md)."""
    if limits is not None and not isinstance(limits, EndpointLimits):
        raise TypeError(f"open_node(limits=...) takes an otpy.EndpointLimits, got "
                        f"{limits!r}; e.g. limits=otpy.EndpointLimits(max_frame=65536)")
    if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"open_node(ssl=...) takes a server-side ssl.SSLContext, got "
                        f"{ssl!r}; e.g. ctx = ssl.create_default_context("
                        f"ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)")
    if http_limits is not None and not isinstance(http_limits, HttpLimits):
        raise TypeError(f"open_node(http_limits=...) takes an otpy.HttpLimits, got "
                        f"{http_limits!r}; e.g. http_limits=otpy.HttpLimits(max_body=65536)")
    named = node_name is not None or not cluster
    if node_name is None:
        node_name = default_node_name() if cluster else DEFAULT_NODE_NAME
    node = Node(root, node_name=node_name)
    http_shutdown = trio.Event()
    http_done: trio.Event | None = None
    sched = node._sched
    elsewhere = durable_cluster_names(root) if cluster else set()
    chosen, opened = await _open_store(node, store, fsync, named, elsewhere)
    try:
        async with trio.open_nursery() as system:
            system.start_soon(node._dispatch)
            async with _cluster(node, root, cluster, cluster_name, cluster_options), \
                    trio.open_nursery() as tasks:
                node._tasks = tasks
                _use_store(node, chosen)
                node._start_tree()
                try:
                    if node._cluster is not None:
                        # Up on the cluster's releases before serving anyone.
                        await node._cluster.releases.catch_up()
                        node._cluster.serve()
                    if listen is not None:
                        node.address = await system.start(
                            partial(serve_client, node._rt, listen, limits=limits,
                                    ssl_context=ssl))
                    if admin is not None:
                        node.admin_address = await system.start(
                            partial(serve_admin, node._rt, node._install, admin,
                                    limits=limits, ssl_context=ssl))
                    if http is not None:
                        http_done = trio.Event()
                        node.http_address = await system.start(
                            _serve_http, node, http, http_limits, http_shutdown, http_done)
                    with trio.CancelScope() as body:
                        node._body = body
                        if sched.fatal is not None:
                            body.cancel()
                        yield node
                finally:
                    node._body = None
                    if http_done is not None:
                        await _drain(http_shutdown, http_done, http_limits or HttpLimits())
                    node._shutdown_tree()
            system.cancel_scope.cancel()
    except BaseException as exc:
        await _close_store(node, opened)
        if sched.fatal is not None:
            raise sched.fatal from _unwrap(exc)
        bare = _unwrap(exc)
        if bare is exc:
            raise
        raise bare from bare.__cause__
    await _close_store(node, opened)
    if sched.fatal is not None:
        raise sched.fatal


def _cluster(node: Node, root: Supervisor, cluster: str | bool | None,
             cluster_name: str, options: Mapping[str, float] | None
             ) -> AbstractAsyncContextManager[Any]:
    """The node's membership of its cluster, around its tree (none without one)."""
    if cluster is None or cluster is False:
        if options:
            raise TypeError(f"open_node(cluster_options=...) needs a cluster: pass "
                            f"cluster=True or cluster='nats://host:port' too (got "
                            f"cluster={cluster!r})")
        return nullcontext()
    checked = check_cluster_options(options)

    @asynccontextmanager
    async def joined() -> AsyncIterator[Any]:
        async with open_cluster(node._rt, cluster, cluster_name, root,
                                **checked) as membership:
            node._cluster = membership
            node._rt.cluster_info = membership.info
            try:
                yield membership
            finally:
                node._cluster = None
                node._rt.cluster_info = None

    return joined()


async def _serve_http(node: Node, address: tuple[str, int], limits: HttpLimits | None,
                      shutdown: trio.Event, done: trio.Event,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await serve_http(node._rt, address, limits=limits, shutdown=shutdown,
                         install=node._install, task_status=task_status)
    finally:
        done.set()


async def _drain(shutdown: trio.Event, done: trio.Event, limits: HttpLimits) -> None:
    """Stop the HTTP endpoint and let its requests in progress finish (bounded by its
    drain_grace), before the tree they call shuts down; shielded, so that it runs
    also when the body was cancelled."""
    shutdown.set()
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + limits.drain_grace + 1.0
        await done.wait()


def run(
    root: Supervisor, main: Callable[[Node], Awaitable[T]] | None = None, **options: Any,
) -> T | None:
    """Run a node from synchronous code: start ``root``, run ``await main(node)`` (or
    serve until stopped when ``main`` is None), shut down, return main's result.
    ``options`` are the keyword options of :func:`open_node` (``listen``, ``admin``,
    ``limits``, ``node_name``, ``http``, ``store``, ``fsync``, ...).

    Stopping
        SIGTERM (what docker, systemd and Kubernetes send) and SIGINT (Ctrl-C) stop the
        node in order: the body is cancelled, the tree shuts down as when ``main``
        returns (every ``terminate`` runs, the servers' tasks get their ``shutdown``
        grace), one ``node_stopping`` event names the signal, and ``run`` returns None:
        the program goes on, and exits with status 0 if that was its end. A second
        signal while the node stops ends the process at once with status 128 + the
        signal number (143 for SIGTERM, 130 for SIGINT), after a ``node_forced_exit``
        event. (Run off the main thread, where Python cannot handle signals, ``run``
        leaves them alone.)"""

    async def _amain() -> T | None:
        if threading.current_thread() is not threading.main_thread():
            return await _serve(root, main, options, trio.CancelScope())
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as watcher:
                    body = trio.CancelScope()
                    watcher.start_soon(_stop_on_signal, signals, body)
                    try:
                        return await _serve(root, main, options, body)
                    finally:
                        watcher.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # What main or the node raised reaches run's caller bare, as without
                # the signal watcher beside it.
                bare = _unwrap(group)
                if bare is group:
                    raise
                raise bare from bare.__cause__

    return trio.run(_amain)


async def _serve(root: Supervisor, main: Callable[[Node], Awaitable[T]] | None,
                 options: dict[str, Any], body: trio.CancelScope) -> T | None:
    async with open_node(root, **options) as node:
        with body:
            if main is None:
                await trio.sleep_forever()
            return await main(node)
    return None


async def _stop_on_signal(signals: Any, body: trio.CancelScope) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        _log.info("node_stopping", signal=name)
        # From now on a signal ends the process at once, even while the tree's stop
        # runs synchronously (a Python signal handler runs between two bytecodes).
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _force_exit)
        body.cancel()
        return


def _force_exit(signum: int, frame: Any) -> None:
    _log.warning("node_forced_exit", signal=signal.Signals(signum).name,
                 status=128 + signum)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)

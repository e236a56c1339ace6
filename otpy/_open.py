"""Assembling a node: ``open_node`` and ``run`` start the tree on a trio loop and the
endpoints around it.

This is the one module that knows every part: the node (``_node``), and the transports
of ``_serve`` it starts on request. Each transport gets what it needs explicitly (the
node's Runtime, its installer of releases, its limits), never the node itself, so the
transports do not import the node and the node does not import them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import trio

from ._core.supervisor import Supervisor
from ._node import DEFAULT_NODE_NAME, Node
from ._serve.http import serve_http
from ._serve.limits import EndpointLimits, HttpLimits
from ._serve.rpc import serve_admin, serve_client

T = TypeVar("T")


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
    node_name: str = DEFAULT_NODE_NAME, http: tuple[str, int] | None = None,
    http_limits: HttpLimits | None = None,
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
    nesting, requests in flight, unsent replies, call timeout). ``node_name`` is the
    name the node's pids carry (default ``"nonode"``).

    ``http=(host, port)`` serves HTTP/1.1 (``node.http_address``): calls and casts in
    JSON, ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard, for holders of the
    node's cookie (see docs/http.md); ``http_limits=otpy.HttpLimits(...)`` bounds it.
    When the body ends, the HTTP endpoint drains first (it stops accepting and lets the
    requests in progress finish, within ``drain_grace``), then the tree shuts down."""
    if limits is not None and not isinstance(limits, EndpointLimits):
        raise TypeError(f"open_node(limits=...) takes an otpy.EndpointLimits, got "
                        f"{limits!r}; e.g. limits=otpy.EndpointLimits(max_frame=65536)")
    if http_limits is not None and not isinstance(http_limits, HttpLimits):
        raise TypeError(f"open_node(http_limits=...) takes an otpy.HttpLimits, got "
                        f"{http_limits!r}; e.g. http_limits=otpy.HttpLimits(max_body=65536)")
    node = Node(root, node_name=node_name)
    http_shutdown = trio.Event()
    http_done: trio.Event | None = None
    sched = node._sched
    try:
        async with trio.open_nursery() as system:
            system.start_soon(node._dispatch)
            async with trio.open_nursery() as tasks:
                node._tasks = tasks
                node._start_tree()
                try:
                    if listen is not None:
                        node.address = await system.start(
                            partial(serve_client, node._rt, listen, limits=limits))
                    if admin is not None:
                        node.admin_address = await system.start(
                            partial(serve_admin, node._rt, node._install, admin,
                                    limits=limits))
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
        if sched.fatal is not None:
            raise sched.fatal from _unwrap(exc)
        bare = _unwrap(exc)
        if bare is exc:
            raise
        raise bare from bare.__cause__
    if sched.fatal is not None:
        raise sched.fatal


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
    serve until interrupted when ``main`` is None), shut down, return main's result.
    ``options`` are the keyword options of :func:`open_node` (``listen``, ``admin``,
    ``limits``, ``node_name``, ``http``, ``http_limits``, ...)."""

    async def _amain() -> T | None:
        async with open_node(root, **options) as node:
            if main is None:
                await trio.sleep_forever()
                return None
            return await main(node)

    return trio.run(_amain)

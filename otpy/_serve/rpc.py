"""The network edge: the MessagePack-RPC client endpoint and the authenticated admin
endpoint of a node (``open_node(root, listen=..., admin=...)``).

One task reads each connection and hands every call to the core's one call path,
``Runtime.start_call``, with a caller (:class:`_WireCaller`) that encodes the reply
into the connection's output: a call answered at once is written with its batch, and a
call whose server defers its reply (``NoReply``, busy, suspended) needs no task at all:
its reply is encoded when it comes (its deadline is in the node's timer heap), so
replies go out as they complete, out of order. The reader writes the replies of its
own batch (see ``_Connection._serve``); one writer task per connection sends the rest.

Where the time goes, per request answered inline (about 1.2 us on the reference
machine): msgpack decoding 0.1, the shape checks 0.15, the server's step with its
``handle_call`` 0.4-0.5 (of which the callback itself, building its ``Reply``, about
half), the caller object 0.07, encoding the reply 0.1, dispatch 0.3; then per batch
read one receive and one or two writes.

Bounds that must stay true, so that no client can make the node buffer without limit:
a connection stops serving and reading while it has ``max_inflight`` requests waiting
or more than ``max_send_buffer`` bytes of replies unsent (checked after each request,
so one reply may overshoot), and a frame is never buffered beyond ``max_frame`` bytes
plus one read (see ``_wire``).

The admin endpoint runs nothing before the client proves it holds the node's cookie:
the node sends a fresh nonce, the client answers HMAC-SHA256(cookie, nonce). The cookie
comes from ``OTPY_COOKIE`` or from a file (``OTPY_COOKIE_FILE``, by default
``~/.otpy_cookie``) created with mode 0600 on first start, as Erlang's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from .._core.release import Planner, Release
from .._core.runtime import ADMIN_OPS, Runtime
from .._core.server import WAITING, Caller
from .._exceptions import BadRequest
from .._protocol.msgpack_rpc import (
    ENCODE_ERRORS,
    READ_SIZE,
    Decoder,
    Fatal,
    Invalid,
    Notification,
    auth_ok,
    encode_error,
    encode_notification,
    encode_result,
    error_of,
    new_nonce,
    result_packer,
)
from .cookie import COOKIE_ENV as COOKIE_ENV
from .cookie import COOKIE_FILE_ENV as COOKIE_FILE_ENV
from .cookie import CookieError as CookieError
from .cookie import cookie_path as cookie_path
from .cookie import read_cookie as read_cookie
from .limits import EndpointLimits

Install = Callable[[Planner], Awaitable[dict[str, Any]]]

AUTH_MAX_FRAME = 1024
AUTH_TIMEOUT = 10.0
DIRECT_IO = os.name == "posix"

_log = structlog.get_logger("otpy")


def _name(params: tuple[Any, ...], n: int = 0) -> str:
    if len(params) <= n or not isinstance(params[n], str):
        raise BadRequest(f"expected a server name (a string) as params[{n}], got "
                         f"{params!r:.80}")
    name: str = params[n]
    return name


class _WireCaller(Caller):
    """A call made over a connection: its answer is encoded into the connection's
    output as soon as it comes. ``later`` is set when the call was not answered within
    its own step: the connection then counts it in flight until it is."""

    __slots__ = ("conn", "later", "msgid")

    def __init__(self, conn: _Connection, msgid: int) -> None:
        self._status = WAITING
        self.conn = conn
        self.msgid = msgid
        self.later = False

    def _resolve(self, value: Any) -> None:
        conn = self.conn
        if conn.closed:
            return
        try:
            conn.out += conn.pack((1, self.msgid, None, value))
        except ENCODE_ERRORS as exc:
            conn._unencodable(self.msgid, value, exc)
        if self.later:
            conn._completed()

    def _reject(self, exc: BaseException) -> None:
        conn = self.conn
        if conn.closed:
            return
        conn.out += encode_error(self.msgid, *error_of(exc))
        if self.later:
            conn._completed()


class _Connection:
    __slots__ = ("admin", "authenticated", "closed", "cookie", "decoder", "fd", "in_send",
                 "install", "limits", "log", "methods", "nursery", "out", "pack",
                 "pending", "room", "rt", "stream", "wake")

    def __init__(self, rt: Runtime, install: Install | None, stream: trio.SocketStream,
                 cookie: bytes | None, limits: EndpointLimits) -> None:
        self.rt = rt
        self.install = install
        self.stream = stream
        self.cookie = cookie
        self.admin = cookie is not None
        self.authenticated = cookie is None
        self.closed = False
        self.limits = limits
        self.decoder = Decoder(max_frame=limits.max_frame, max_depth=limits.max_depth)
        self.out = bytearray()  # replies not handed to the stream yet
        self.in_send = 0  # bytes of the send in progress; 0 when none is
        # Read and written directly (_receive, _write_now) where a socket is a file
        # descriptor; -1 elsewhere, where trio's stream does it all.
        self.fd = stream.socket.fileno() if DIRECT_IO else -1
        self.pack = result_packer(lenient=self.admin)
        self.pending = 0  # calls answered later, and admin operations, in flight
        self.wake = trio.lowlevel.ParkingLot()  # the writer waits here for bytes
        self.room = trio.lowlevel.ParkingLot()  # the reader waits here for room
        try:
            peer = stream.socket.getpeername()
        except OSError:  # pragma: no cover - the peer left already
            peer = None
        self.log = _log.bind(endpoint="admin" if self.admin else "client", peer=peer)
        self.nursery: trio.Nursery | None = None
        self.methods: dict[str, Any] = {"call": self._call, "cast": self._cast}

    # -- the connection's life -------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                try:
                    clean = await self._read()
                    # Let the replies still owed go out: all of them after an orderly
                    # end, only those already made after a protocol error.
                    with trio.move_on_after(self.limits.call_timeout + 1.0):
                        await self._flush()
                        while (clean and self.pending) or self.out or self.in_send:
                            await self.room.park()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Calls still deferred may be answered later: their replies are dropped.
            self.closed = True

    async def _writer(self) -> None:
        # Sends the replies that come outside the reader's batches; the reader sends
        # its own batch's replies itself (see _flush), saving a task switch per
        # packet. ``in_send`` keeps the two from ever writing at once.
        while True:
            while not self.out or self.in_send:
                await self.wake.park()
            await self._flush()

    async def _flush(self) -> None:
        while self.out and not self.in_send:
            data, self.out = self.out, bytearray()
            self.in_send = len(data)
            try:
                await self.stream.send_all(data)
            finally:
                self.in_send = 0
            if self.room:
                self.room.unpark_all()

    def _write_now(self) -> None:
        """Give the socket what it takes of the unsent replies now, without waiting and
        without a trip through trio's scheduler (which costs as much as the write);
        what it does not take is left for _flush. Only while no send is in progress,
        so that bytes never interleave. An error (the peer went) is left for _flush
        and _receive to meet, through trio's stream: the batch being served is served
        to its end first, as every message received is."""
        if self.fd < 0:
            return
        try:
            sent = os.write(self.fd, self.out)
        except BlockingIOError:
            return
        except OSError:
            self.fd = -1  # from now on trio's stream does the I/O, and reports the error
            return
        del self.out[:sent]

    def _send(self, data: bytes) -> None:
        self.out += data
        if self.wake and not self.in_send:
            self.wake.unpark()

    def _completed(self) -> None:
        """A reply that came outside the reader's batch is in ``out``: send it, and let
        the reader go on if it waited for room."""
        self.pending -= 1
        if self.wake and not self.in_send:
            self.wake.unpark()
        if self.room:
            self.room.unpark_all()

    async def _read(self) -> bool:
        """Serve requests until the peer closes (True) or breaks the protocol (False)."""
        messages: list[Any] = []
        if not self.authenticated:
            authed = await self._handshake()
            if authed is None:
                return False
            messages = authed
        decoder = self.decoder
        while True:
            # One receive per batch read, as a bare echo server does, and the batch's
            # replies sent together (see _serve and _write_now).
            start = 0
            while start < len(messages):
                start = self._serve(messages, start)
                if start < 0:
                    return False
                if self.out and not self.in_send:
                    self._write_now()
                await self._flush()
                await self._room()
            data = await self._receive()
            if not data:
                self.log.debug("wire_connection_closed", pending=self.pending)
                return True
            messages = decoder.feed(data)

    async def _receive(self) -> bytes:
        """``stream.receive_some``, as trio does it (one trip through the scheduler,
        cancellable), without its layers of wrappers, which cost a few percent of the
        pipelined rate; where the socket is not a file descriptor, trio's own."""
        if self.fd < 0:
            return await self.stream.receive_some(READ_SIZE)
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    return os.read(self.fd, READ_SIZE)
                except BlockingIOError:  # pragma: no cover - a spurious wakeup
                    pass
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def _full(self) -> bool:
        limits = self.limits
        return (self.pending >= limits.max_inflight
                or len(self.out) + self.in_send > limits.max_send_buffer)

    async def _room(self) -> None:
        while self._full():
            await self.room.park()

    def _serve(self, messages: list[Any], start: int) -> int:
        """Serve messages from ``start`` until the end or until the connection's bounds
        are reached; the index to go on from, or -1 when the connection must close."""
        # The reply bytes that may be added before the reader waits for the writer.
        room = self.limits.max_send_buffer - self.in_send
        # The replies to the first half of a batch are written as soon as they are
        # made: a pipelining client then refills its window while the node serves the
        # second half, instead of both taking turns (+10-15% pipelined on 2 cores). One
        # write more per batch, so only for batches worth it.
        half = (start + len(messages)) // 2 if len(messages) - start >= 16 else -1
        start_call, timeout = self.rt.start_call, self.limits.call_timeout
        for i in range(start, len(messages)):
            msg = messages[i]
            if type(msg) is tuple:  # a well-formed request (see msgpack_rpc.Request)
                _, msgid, method, params = msg
                if method == "call" and len(params) == 2 and type(params[0]) is str:
                    # The hot path: what _call does, without its checks of params.
                    caller = _WireCaller(self, msgid)
                    start_call(params[0], params[1], caller, timeout=timeout)
                    if caller._status == WAITING:
                        caller.later = True
                        self.pending += 1
                        if self._full():
                            return i + 1
                        continue
                    if len(self.out) > room:
                        return i + 1
                    if i == half and not self.in_send:
                        self._write_now()
                    continue
                self._request(msgid, method, params)
                if self._full():
                    return i + 1
            elif type(msg) is Notification:
                self._notify(msg)
            elif type(msg) is Invalid:
                self.log.warning("wire_bad_request", msgid=msg.msgid, kind=msg.kind,
                                 reason=msg.message)
                self._send(encode_error(msg.msgid, msg.kind, msg.message))
            else:
                assert type(msg) is Fatal
                self.log.warning("wire_protocol_error", reason=msg.reason)
                return -1
        return len(messages)

    def _request(self, msgid: int, name: str, params: tuple[Any, ...]) -> None:
        """Serve any request by the method table (then, on the admin endpoint, the
        runtime's admin table); errors become error replies."""
        method = self.methods.get(name)
        try:
            if method is not None:
                method(msgid, params)
            elif self.admin and name == "upgrade":
                self._upgrade(msgid, params)
            elif self.admin and name in ADMIN_OPS:
                self._admin(msgid, name, params)
            else:
                methods = sorted(self.methods) + (sorted(ADMIN_OPS) if self.admin else [])
                raise NoSuchMethod(f"no method {name!r}; this endpoint serves {methods}")
        except Exception as exc:
            if isinstance(exc, BadRequest | NoSuchMethod):
                self.log.warning("wire_bad_request", msgid=msgid, kind=type(exc).__name__,
                                 reason=str(exc))
            self._send(encode_error(msgid, *error_of(exc)))

    def _notify(self, msg: Notification) -> None:
        if msg.method != "cast":
            self.log.warning("wire_bad_request", kind="NoSuchMethod", method=msg.method)
            return
        try:
            self._cast(None, msg.params)
        except Exception as exc:
            self.log.warning("wire_notification_failed", method=msg.method,
                             error=error_of(exc))

    async def _handshake(self) -> list[Any] | None:
        """Challenge the peer; the messages that followed its answer, or None."""
        assert self.cookie is not None
        nonce = new_nonce()
        self._send(encode_notification("challenge", (nonce,)))
        decoder = self.decoder
        decoder.max_frame = AUTH_MAX_FRAME
        messages: list[Any] = []
        with trio.move_on_after(AUTH_TIMEOUT):
            while not messages:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    self.log.warning("admin_auth_failed", reason="closed before answering")
                    return None
                messages = decoder.feed(data)
        decoder.max_frame = self.limits.max_frame
        if not messages:
            self.log.warning("admin_auth_failed", reason="no answer in time")
            return None
        first = messages[0]
        if type(first) is tuple:  # a request
            _, msgid, method, params = first
        elif type(first) is Invalid:
            msgid, method, params = first.msgid, None, ()
        else:
            self.log.warning("admin_auth_failed", reason="no auth request")
            return None
        if method != "auth":
            self.log.warning("admin_auth_failed", reason="a request before authenticating")
            self._send(encode_error(msgid, "AuthRequired",
                                    "authenticate first: answer the challenge with "
                                    "[0, msgid, 'auth', [HMAC-SHA256(cookie, nonce)]]"))
            return None
        if len(params) != 1 or not auth_ok(self.cookie, nonce, params[0]):
            self.log.warning("admin_auth_failed", reason="wrong answer to the challenge")
            self._send(encode_error(msgid, "AuthFailed",
                                    "authentication failed: the answer does not match the "
                                    "node's cookie"))
            return None
        self.authenticated = True
        self.log.info("admin_authenticated")
        self._send(encode_result(msgid, True))
        return messages[1:]

    # -- replies ---------------------------------------------------------------------

    def _reply(self, msgid: int, result: Any) -> None:
        try:
            data = encode_result(msgid, result, lenient=self.admin)
        except ENCODE_ERRORS as exc:
            self._unencodable(msgid, result, exc)
        else:
            self._send(data)

    def _unencodable(self, msgid: int, result: Any, exc: Exception) -> None:
        self.log.warning("wire_reply_unencodable", msgid=msgid, error=str(exc),
                         reply=repr(result)[:200])
        self._send(encode_error(
            msgid, "UnencodableReply",
            f"the reply cannot be encoded as msgpack ({exc}): {repr(result)[:80]}; "
            f"reply with None, bool, int, float, str, bytes, lists/tuples and dicts"))

    def _spawn(self, msgid: int, fn: Any, *args: Any) -> None:
        assert self.nursery is not None
        self.pending += 1
        self.nursery.start_soon(self._finish, msgid, fn, *args)

    async def _finish(self, msgid: int, fn: Any, *args: Any) -> None:
        try:
            try:
                result = await fn(*args)
            except Exception as exc:
                self._send(encode_error(msgid, *error_of(exc)))
            else:
                self._reply(msgid, result)
        finally:
            self.pending -= 1
            self.room.unpark_all()

    # -- methods ---------------------------------------------------------------------

    def _call(self, msgid: int, params: tuple[Any, ...]) -> None:
        """``call(name, request[, vsn])``, through the runtime's one call path."""
        if len(params) not in (2, 3):
            raise BadRequest(f"call takes (name, request[, vsn]), got {len(params)} params")
        name = _name(params)
        vsn = params[2] if len(params) == 3 else None
        if vsn is not None and not isinstance(vsn, str):
            raise BadRequest(f"call's vsn must be a string or nil, got {vsn!r:.80}")
        caller = _WireCaller(self, msgid)
        self.rt.start_call(name, params[1], caller, vsn=vsn, timeout=self.limits.call_timeout)
        if caller._status == WAITING:
            caller.later = True
            self.pending += 1

    def _cast(self, msgid: int | None, params: tuple[Any, ...]) -> None:
        if len(params) != 2:
            raise BadRequest(f"cast takes (name, message), got {len(params)} params")
        self.rt.cast(_name(params), params[1])
        if msgid is not None:
            self._reply(msgid, None)

    def _admin(self, msgid: int, method: str, params: tuple[Any, ...]) -> None:
        result = self.rt.admin(method, params)
        if isinstance(result, Planner):
            self.log.info("admin_downgrade" if result.downgrade else "admin_upgrade",
                          vsn=result.release.vsn)
            assert self.install is not None
            self._spawn(msgid, self.install, result)
        else:
            self._reply(msgid, result)

    def _upgrade(self, msgid: int, params: tuple[Any, ...]) -> None:
        if len(params) != 1 or not isinstance(params[0], str):
            raise BadRequest(f"upgrade takes (release_file,), a path on the node's host; "
                             f"got {params!r:.80}")
        release = Release.load(params[0])
        self.log.info("admin_release_loaded", release_file=params[0], vsn=release.vsn)
        self._admin(msgid, "upgrade", (release,))


class NoSuchMethod(Exception):
    """A request named a method the endpoint does not serve (the kind of its error
    reply)."""


def _vanished(exc: BaseException) -> bool:
    """Whether ``exc`` (maybe a group of them) only says that the peer went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_vanished(e) for e in exc.exceptions)
    # OSError: the connection's own reads and writes (_receive, _write_now) raise what
    # the socket reports (a reset, a timeout), which trio's stream would have turned
    # into BrokenResourceError.
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError)


async def _handle(rt: Runtime, install: Install | None, cookie: bytes | None,
                  limits: EndpointLimits, stream: trio.SocketStream) -> None:
    conn = _Connection(rt, install, stream, cookie, limits)
    try:
        await conn.run()
    except Exception as exc:
        if _vanished(exc):
            conn.log.info("wire_client_vanished", pending=conn.pending, error=repr(exc))
        else:  # a bug here must not take the node down
            conn.log.exception("wire_connection_failed", error=repr(exc))
    finally:
        await trio.aclose_forcefully(stream)


async def _serve(rt: Runtime, install: Install | None, address: tuple[str, int],
                 cookie: bytes | None, limits: EndpointLimits, task_status: Any) -> None:
    host, port = address
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    _log.info("endpoint_listening", endpoint="admin" if cookie else "client",
              address=f"{bound[0]}:{bound[1]}")
    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(functools.partial(_handle, rt, install, cookie, limits),
                               listeners)


async def serve_client(rt: Runtime, address: tuple[str, int], *,
                       limits: EndpointLimits | None = None,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the client endpoint of runtime ``rt`` on ``address`` until cancelled;
    reports the bound ``(host, port)`` through ``nursery.start``."""
    await _serve(rt, None, address, None, limits or EndpointLimits(), task_status)


async def serve_admin(rt: Runtime, install: Install, address: tuple[str, int], *,
                      limits: EndpointLimits | None = None, cookie: bytes | None = None,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin endpoint of runtime ``rt`` on ``address`` until cancelled (the
    cookie is read, or its file created, first); ``install`` drives a release to its
    commit. Reports the bound ``(host, port)``."""
    secret = cookie if cookie is not None else read_cookie(create=True)
    await _serve(rt, install, address, secret, limits or EndpointLimits(), task_status)

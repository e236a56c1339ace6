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

Bounds that must stay true, so that no client can make the node buffer, wait or
work without limit (each set in ``EndpointLimits``):

- memory: a connection stops serving and reading while it has ``max_inflight``
  requests waiting or more than ``max_send_buffer`` bytes of replies unsent (checked
  after each request, so one reply may overshoot); its decoder holds at most one
  unfinished frame's bytes and no object of it (see ``msgpack_rpc``); a closed
  connection holds no reference cycle, so its memory comes back at once;
- time: at most MAX_BATCH requests of one read are served in a row before the
  connection checkpoints, so one packet cannot hold the loop;
- descriptors: each endpoint has its own cap (``max_connections``, lowered to fit
  ``ulimit -n`` with room kept for the admin endpoint; ``max_admin_connections``); at
  the cap a new connection closes the one idle the longest, or is refused when none
  is idle; a connection that completes no message for ``idle_timeout`` while nothing
  is owed either way is closed; accept() out of descriptors is retried with a
  backoff, logged once per interval;
- logs: refusals (bad requests, protocol errors, failed authentications, refused
  connections) are logged once per peer and kind per interval, with a count.

The admin endpoint runs nothing before the client proves it holds the node's cookie,
and proves it holds it too; every message after that is sealed to the session (see
``handshake``). The cookie comes from ``OTPY_COOKIE`` or from a file
(``OTPY_COOKIE_FILE``, by default ``~/.otpy_cookie``) created with mode 0600 on first
start, as Erlang's. Either endpoint can speak TLS (``ssl_context``).
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from .._cookie import read_cookie
from .._core.names import Pid
from .._core.release import Planner
from .._core.runtime import ADMIN_OPS, Runtime
from .._core.server import WAITING, Caller
from .._exceptions import BadRequest
from .._protocol.handshake import (
    SEAL_OVERHEAD,
    Session,
    client_proof,
    is_nonce,
    new_nonce,
    node_proof,
    proves,
)
from .._protocol.msgpack_rpc import (
    ENCODE_ERRORS,
    READ_SIZE,
    Decoder,
    Fatal,
    Invalid,
    Notification,
    encode_error,
    encode_notification,
    encode_result,
    error_of,
    result_packer,
)
from .._release_files import ReleaseSource, load_in_thread
from ._ratelimit import Refusals
from .limits import CAPACITY_ERRNOS, EndpointLimits

Install = Callable[[Planner], Awaitable[dict[str, Any]]]

AUTH_MAX_FRAME = 1024  # bytes of the one message a client may send before authenticating
AUTH_TIMEOUT = 10.0  # seconds to authenticate (and to finish a TLS handshake)
DIRECT_IO = os.name == "posix"
# Requests of one read served in a row before the connection lets the others run.
MAX_BATCH = 128
# Descriptors the client endpoint leaves free under the process's limit, beside the
# admin endpoint's connections (see _client_cap).
FD_RESERVE = 64
# accept() out of descriptors or memory (CAPACITY_ERRNOS): wait, from ACCEPT_BACKOFF
# doubling to the max.
ACCEPT_BACKOFF, ACCEPT_BACKOFF_MAX = 0.01, 1.0

_log = structlog.get_logger("otpy")


def _address(params: tuple[Any, ...]) -> str | Pid:
    """params[0] as a server address: a name (a string) or a pid (extension type 1)."""
    if not params or not (isinstance(params[0], str) or type(params[0]) is Pid):
        raise BadRequest(f"expected a server name (a string) or a pid as params[0], got "
                         f"{params!r:.80}")
    address: str | Pid = params[0]
    return address


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
        data = encode_error(self.msgid, *error_of(exc))
        if conn.session is not None:
            data = conn.session.seal(data)
        conn.out += data
        if self.later:
            conn._completed()


class _Connection:
    __slots__ = ("activity", "authenticated", "closed", "decoder", "endpoint", "fd",
                 "host", "idle_since", "in_send", "limits", "log", "nursery", "out", "pack",
                 "pending", "room", "rt", "scope", "seen", "session", "stream", "wake")

    def __init__(self, endpoint: _Endpoint, stream: trio.SocketStream) -> None:
        self.endpoint = endpoint
        self.rt = endpoint.rt
        # The TCP stream, or the TLS stream over it once _Endpoint._handle made one.
        self.stream: trio.abc.Stream = stream
        self.authenticated = not endpoint.admin
        self.session: Session | None = None
        self.closed = False
        limits = self.limits = endpoint.limits
        self.decoder = Decoder(max_frame=limits.max_frame, max_depth=limits.max_depth,
                               max_objects=limits.max_objects)
        self.out = bytearray()  # replies not handed to the stream yet
        self.in_send = 0  # bytes of the send in progress; 0 when none is
        # Read and written directly (_receive, _write_now) where a socket is a file
        # descriptor (set by _Endpoint._handle); -1 elsewhere and under TLS, where
        # trio's stream does it all.
        self.fd = -1
        self.pack = result_packer(lenient=endpoint.admin)
        self.pending = 0  # calls answered later, and admin operations, in flight
        self.wake = trio.lowlevel.ParkingLot()  # the writer waits here for bytes
        self.room = trio.lowlevel.ParkingLot()  # the reader waits here for room
        try:
            peer = stream.socket.getpeername()
        except OSError:  # pragma: no cover - the peer left already
            peer = None
        self.host: str | None = peer[0] if peer else None
        self.log = _log.bind(endpoint="admin" if endpoint.admin else "client", peer=peer)
        self.nursery: trio.Nursery | None = None
        self.scope = trio.CancelScope()  # cancelled to close the connection from outside
        # Idle tracking (see _Endpoint._sweep): reads that completed a message, the
        # count the last sweep saw, and since when the connection is seen idle.
        self.activity = 0
        self.seen = 0
        self.idle_since = trio.current_time()

    def refuse(self, event: str, *, what: str = "", level: str = "warning",
               **fields: Any) -> None:
        """Log a refusal of this peer's, at most once per interval and kind (the repeats
        are counted; see _ratelimit)."""
        self.endpoint.refusals.note(event, self.host, what=what, level=level, **fields)

    def idle(self) -> bool:
        """No message completed since the last sweep, and nothing owed either way."""
        return (self.activity == self.seen and not self.pending and not self.out
                and not self.in_send)

    def close(self) -> None:
        """Close the connection from outside its task (an idle timeout, an eviction)."""
        self.scope.cancel()

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
            # Calls still deferred may be answered later: their replies are dropped,
            # and what the connection held is let go now (a deferred call's caller
            # keeps the connection object until its deadline).
            self.closed = True
            self.nursery = None
            self.out = bytearray()
            self.decoder = _CLOSED_DECODER
            self.session = None

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
        if self.session is not None:
            data = self.session.seal(data)
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
                if start < len(messages):
                    # MAX_BATCH served in a row: let other connections and the
                    # dispatcher run before the rest of this read.
                    await trio.lowlevel.checkpoint()
            data = await self._receive()
            if not data:
                self.log.debug("wire_connection_closed", pending=self.pending)
                return True
            messages = decoder.feed(data)
            if messages:
                self.activity += 1
                if self.session is not None:
                    messages = self.session.open_all(messages)

    async def _receive(self) -> bytes:
        """``stream.receive_some``, as trio does it (one trip through the scheduler,
        cancellable), without its layers of wrappers, which cost a few percent of the
        pipelined rate; where the socket is not a file descriptor, trio's own."""
        if self.fd < 0:
            return bytes(await self.stream.receive_some(READ_SIZE))
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
        """Serve messages from ``start`` until the end, MAX_BATCH of them, or until the
        connection's bounds are reached; the index to go on from, or -1 when the
        connection must close."""
        # The reply bytes that may be added before the reader waits for the writer.
        room = self.limits.max_send_buffer - self.in_send
        stop = min(len(messages), start + MAX_BATCH)
        # The replies to the first half of a batch are written as soon as they are
        # made: a pipelining client then refills its window while the node serves the
        # second half, instead of both taking turns (+10-15% pipelined on 2 cores). One
        # write more per batch, so only for batches worth it.
        half = (start + stop) // 2 if stop - start >= 16 else -1
        start_call, timeout = self.rt.start_call, self.limits.call_timeout
        for i in range(start, stop):
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
                self.refuse("wire_bad_request", what=msg.kind, msgid=msg.msgid,
                            kind=msg.kind, reason=msg.message)
                self._send(encode_error(msg.msgid, msg.kind, msg.message))
            else:
                reason = (msg.reason if type(msg) is Fatal
                          else f"expected a request or a notification, got {msg!r:.80}")
                self.refuse("wire_protocol_error", reason=reason)
                return -1
        return stop

    def _request(self, msgid: int, name: str, params: tuple[Any, ...]) -> None:
        """Serve any request by the method table (then, on the admin endpoint, the
        runtime's admin table); errors become error replies."""
        admin = self.endpoint.admin
        method = _METHODS.get(name)
        try:
            if method is not None:
                method(self, msgid, params)
            elif admin and name == "upgrade":
                self._upgrade(msgid, params)
            elif admin and name in ADMIN_OPS:
                self._admin(msgid, name, params)
            else:
                methods = sorted(_METHODS) + (sorted(ADMIN_OPS) if admin else [])
                raise NoSuchMethod(f"no method {name!r}; this endpoint serves {methods}")
        except Exception as exc:
            if isinstance(exc, BadRequest | NoSuchMethod):
                kind = type(exc).__name__
                self.refuse("wire_bad_request", what=kind, msgid=msgid, kind=kind,
                            reason=str(exc))
            self._send(encode_error(msgid, *error_of(exc)))

    def _notify(self, msg: Notification) -> None:
        if msg.method != "cast":
            self.refuse("wire_bad_request", what="NoSuchMethod", kind="NoSuchMethod",
                        method=msg.method)
            return
        try:
            self._cast(None, msg.params)
        except Exception as exc:
            error = error_of(exc)
            self.refuse("wire_notification_failed", what=error[0], method=msg.method,
                        error=error)

    async def _handshake(self) -> list[Any] | None:
        """Authenticate both ways (see ``handshake``); the messages that followed the
        client's answer, opened, or None."""
        cookie = self.endpoint.cookie
        assert cookie is not None
        nonce = new_nonce()
        self._send(encode_notification("challenge", (nonce,)))
        decoder = self.decoder
        decoder.max_frame = AUTH_MAX_FRAME
        decoder.skip_oversized = False
        messages: list[Any] = []
        with trio.move_on_after(AUTH_TIMEOUT):
            while not messages:
                if self.out and not self.in_send:
                    await self._flush()
                data = await self._receive()
                if not data:
                    self.refuse("admin_auth_failed", reason="closed before answering")
                    return None
                messages = decoder.feed(data)
        # A sealed message wraps one of max_frame bytes (the session's own decoder
        # holds that to max_frame).
        decoder.max_frame = self.limits.max_frame + SEAL_OVERHEAD
        decoder.skip_oversized = True
        if not messages:
            self.refuse("admin_auth_failed", reason="no answer in time")
            return None
        first = messages[0]
        if type(first) is tuple:  # a request
            _, msgid, method, params = first
        elif type(first) is Invalid:
            msgid, method, params = first.msgid, None, ()
        else:
            self.refuse("admin_auth_failed", reason="no auth request")
            return None
        if method != "auth":
            self.refuse("admin_auth_failed", reason="a request before authenticating")
            self._send(encode_error(msgid, "AuthRequired",
                                    "authenticate first: answer the challenge with "
                                    "[0, msgid, 'auth', [client_nonce, proof]] (see "
                                    "docs/network.md)"))
            return None
        if len(params) != 2 or not is_nonce(params[0]):
            self.refuse("admin_auth_failed", reason="an answer of another shape")
            self._send(encode_error(msgid, "AuthFailed",
                                    "authentication failed: expected [client_nonce (32 "
                                    "bytes), proof]; this node proves the cookie too, so "
                                    "a client from before mutual authentication cannot "
                                    "talk to it: update it"))
            return None
        client_nonce = params[0]
        if not proves(client_proof(cookie, nonce, client_nonce), params[1]):
            self.refuse("admin_auth_failed", reason="wrong answer to the challenge")
            self._send(encode_error(msgid, "AuthFailed",
                                    "authentication failed: the answer does not match the "
                                    "node's cookie"))
            return None
        self._send(encode_result(msgid, node_proof(cookie, nonce, client_nonce)))
        limits = self.limits
        session = self.session = Session(
            cookie, nonce, client_nonce, node_side=True,
            decoder=Decoder(max_frame=limits.max_frame, max_depth=limits.max_depth,
                            max_objects=limits.max_objects))
        lenient = self.pack

        def sealed(obj: Any) -> bytes:
            return session.seal(lenient(obj))

        self.pack = sealed
        self.authenticated = True
        self.log.info("admin_authenticated")
        return session.open_all(messages[1:])

    # -- replies ---------------------------------------------------------------------

    def _reply(self, msgid: int, result: Any) -> None:
        try:
            data = encode_result(msgid, result, lenient=self.endpoint.admin)
        except ENCODE_ERRORS as exc:
            self._unencodable(msgid, result, exc)
        else:
            self._send(data)

    def _unencodable(self, msgid: int, result: Any, exc: Exception) -> None:
        self.refuse("wire_reply_unencodable", msgid=msgid, error=str(exc),
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
        name = _address(params)
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
        self.rt.cast(_address(params), params[1])
        if msgid is not None:
            self._reply(msgid, None)

    def _admin(self, msgid: int, method: str, params: tuple[Any, ...]) -> None:
        result = self.rt.admin(method, params)
        if isinstance(result, Planner):
            self.log.info("admin_downgrade" if result.downgrade else "admin_upgrade",
                          vsn=result.release.vsn)
            install = self.endpoint.install
            assert install is not None
            self._spawn(msgid, install, result)
        else:
            self._reply(msgid, result)

    def _upgrade(self, msgid: int, params: tuple[Any, ...]) -> None:
        source = ReleaseSource.from_params(params)
        self.log.info("admin_upgrade", **source.describe())
        self._spawn(msgid, self._load_and_upgrade, source)

    async def _load_and_upgrade(self, source: ReleaseSource) -> dict[str, Any]:
        # Read and imported in a worker thread, within a timeout: never on the loop.
        release = await load_in_thread(source)
        self.log.info("release_loaded", vsn=release.vsn, digest=release.digest)
        planner = self.rt.admin("upgrade", (release,))
        install = self.endpoint.install
        assert install is not None
        report: dict[str, Any] = await install(planner)
        return report



class NoSuchMethod(Exception):
    """A request named a method the endpoint does not serve (the kind of its error
    reply)."""


# The methods every endpoint serves; looked up on the class, so that a connection
# holds no bound method of itself (no reference cycle: its memory comes back when it
# closes, without waiting for the cycle collector).
_METHODS: dict[str, Callable[[_Connection, int, tuple[Any, ...]], None]] = {
    "call": _Connection._call,
    "cast": _Connection._cast,
}
_CLOSED_DECODER = Decoder(max_frame=1)


def _vanished(exc: BaseException) -> bool:
    """Whether ``exc`` (maybe a group of them) only says that the peer went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_vanished(e) for e in exc.exceptions)
    # OSError: the connection's own reads and writes (_receive, _write_now) raise what
    # the socket reports (a reset, a timeout), which trio's stream would have turned
    # into BrokenResourceError.
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError)


def _client_cap(limits: EndpointLimits) -> int:
    """The client endpoint's connection cap: ``max_connections``, lowered so that the
    process's descriptor limit (``ulimit -n``) keeps room for the admin endpoint's
    connections and FD_RESERVE more (files, the store, listeners)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:  # pragma: no cover
        return limits.max_connections
    return max(1, min(limits.max_connections,
                      soft - FD_RESERVE - limits.max_admin_connections))


class _Endpoint:
    """One listening endpoint: its accept loop, its connections under their cap and
    idle timeout, and the refusals it logs (rate-limited, see _ratelimit)."""

    def __init__(self, rt: Runtime, install: Install | None, cookie: bytes | None,
                 limits: EndpointLimits, ssl_context: ssl.SSLContext | None) -> None:
        self.rt = rt
        self.install = install
        self.cookie = cookie
        self.admin = cookie is not None
        self.limits = limits
        self.ssl_context = ssl_context
        self.max_connections = (limits.max_admin_connections if self.admin
                                else _client_cap(limits))
        self.conns: set[_Connection] = set()
        name = "admin" if self.admin else "client"
        self.log = _log.bind(endpoint=name)
        self.refusals = Refusals(self.log, trio.current_time)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep)
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        backoff = ACCEPT_BACKOFF
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors (or memory): give one back if an idle
                    # connection holds it, and retry a little later; the queue of
                    # connections waiting in the kernel is kept meanwhile.
                    self.refusals.note("endpoint_accept_failed", None,
                                       error=errno.errorcode.get(exc.errno or 0, "?"),
                                       reason=os.strerror(exc.errno or 0),
                                       connections=len(self.conns), retry_in=backoff)
                    self._evict()
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, ACCEPT_BACKOFF_MAX)
                    continue
                backoff = ACCEPT_BACKOFF
                if len(self.conns) >= self.max_connections and not self._evict():
                    host = _host(stream.socket)
                    self.refusals.note("wire_connection_refused", host,
                                       max_connections=self.max_connections)
                    stream.socket.close()
                    continue
                conn = _Connection(self, stream)
                self.conns.add(conn)
                nursery.start_soon(self._handle, conn, stream)
                del conn, stream  # this loop must not keep the last one alive

    def _evict(self) -> bool:
        """Close the connection idle the longest (one not authenticated yet first), to
        make room for a new one; False if none is idle."""
        victim = None
        for conn in self.conns:
            if conn.idle() and (victim is None or (conn.authenticated, conn.idle_since)
                                < (victim.authenticated, victim.idle_since)):
                victim = conn
        if victim is None:
            return False
        self.conns.discard(victim)
        victim.close()
        victim.refuse("wire_connection_evicted", level="info",
                      idle_for=round(trio.current_time() - victim.idle_since, 3),
                      max_connections=self.max_connections)
        return True

    async def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``, and log the refusals counted,
        about every quarter of the timeout (and every refusal interval)."""
        timeout = self.limits.idle_timeout
        period = min(self.refusals.interval,
                     self.refusals.interval if timeout is None else timeout / 4)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for conn in list(self.conns):
                if not conn.idle():
                    conn.seen = conn.activity
                    conn.idle_since = now
                elif timeout is not None and now - conn.idle_since >= timeout:
                    self.conns.discard(conn)
                    conn.close()
                    conn.refuse("wire_connection_idle", level="info", idle_timeout=timeout)
            self.refusals.flush()

    async def _handle(self, conn: _Connection, stream: trio.SocketStream) -> None:
        try:
            with conn.scope:
                if self.ssl_context is not None:
                    tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
                    conn.stream = tls
                    with trio.move_on_after(AUTH_TIMEOUT) as handshake:
                        await tls.do_handshake()
                    if handshake.cancelled_caught:
                        conn.refuse("wire_tls_failed", reason="no TLS handshake in time")
                        return
                else:
                    conn.stream = stream
                    conn.fd = stream.socket.fileno() if DIRECT_IO else -1
                await conn.run()
        except Exception as exc:
            if _vanished(exc):
                conn.refuse("wire_client_vanished", level="info", pending=conn.pending,
                            error=repr(exc)[:200])
            else:  # a bug here must not take the node down
                conn.log.exception("wire_connection_failed", error=repr(exc))
        finally:
            self.conns.discard(conn)
            conn.closed = True
            await trio.aclose_forcefully(conn.stream)


def _host(sock: trio.socket.SocketType) -> str | None:
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    return str(peer[0])


async def _serve(rt: Runtime, install: Install | None, address: tuple[str, int],
                 cookie: bytes | None, limits: EndpointLimits,
                 ssl_context: ssl.SSLContext | None, task_status: Any) -> None:
    host, port = address
    which = "admin" if cookie else "client"
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:  # say which endpoint, and where: "address already in use"...
        raise OSError(exc.errno, f"the {which} endpoint cannot listen on {host}:{port}: "
                                 f"{exc.strerror or exc}; is another node (or program) "
                                 f"using that port? Choose another, or port 0 for a free "
                                 f"one") from exc
    bound = listeners[0].socket.getsockname()[:2]
    endpoint = _Endpoint(rt, install, cookie, limits, ssl_context)
    endpoint.log.info("endpoint_listening", address=f"{bound[0]}:{bound[1]}",
                      max_connections=endpoint.max_connections,
                      idle_timeout=limits.idle_timeout, tls=ssl_context is not None)
    task_status.started((bound[0], bound[1]))
    await endpoint.serve(listeners)


async def serve_client(rt: Runtime, address: tuple[str, int], *,
                       limits: EndpointLimits | None = None,
                       ssl_context: ssl.SSLContext | None = None,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the client endpoint of runtime ``rt`` on ``address`` until cancelled;
    reports the bound ``(host, port)`` through ``nursery.start``. With
    ``ssl_context``, every connection speaks TLS."""
    await _serve(rt, None, address, None, limits or EndpointLimits(), ssl_context,
                 task_status)


async def serve_admin(rt: Runtime, install: Install, address: tuple[str, int], *,
                      limits: EndpointLimits | None = None, cookie: bytes | None = None,
                      ssl_context: ssl.SSLContext | None = None,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin endpoint of runtime ``rt`` on ``address`` until cancelled (the
    cookie is read, or its file created, first); ``install`` drives a release to its
    commit. Reports the bound ``(host, port)``."""
    secret = cookie if cookie is not None else read_cookie(create=True)
    await _serve(rt, install, address, secret, limits or EndpointLimits(), ssl_context,
                 task_status)

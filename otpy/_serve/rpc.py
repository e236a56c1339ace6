"""The network edge: the MessagePack-RPC client endpoint and the authenticated admin
endpoint of a node (``open_node(root, listen=..., admin=...)``).

One task reads each connection and serves every request it can answer at once inline,
in the step that decoded it; a request whose server defers its reply (``NoReply``,
busy, suspended) gets a task of its own that waits for it, so replies go out as they
complete, out of order. The reader writes the replies it made itself, per batch read
(see ``_Connection._serve``); one writer task per connection sends the others.

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
``~/.otpy_cookie``) created with mode 0600 on first start, as Erlang's (see ``_cookie``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

from .._cookie import read_cookie
from .._core.scheduler import CALL
from .._exceptions import BadRequest
from .._node import _TaskCaller
from .._protocol.msgpack_rpc import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
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
from .._release_files import ReleaseSource, load_in_thread

if TYPE_CHECKING:
    from .._node import Node

AUTH_MAX_FRAME = 1024
AUTH_TIMEOUT = 10.0
DIRECT_IO = os.name == "posix"

_log = structlog.get_logger("otpy")


@dataclass(frozen=True, kw_only=True, slots=True)
class EndpointLimits:
    """The bounds each connection to a node's endpoints keeps, so that no client can
    make the node buffer, or wait, without limit.

    ::

        limits = otpy.EndpointLimits(max_frame=64 * 1024, call_timeout=2.0)
        async with otpy.open_node(root, listen=("127.0.0.1", 0), limits=limits) as node:
            ...

    The same limits apply to the client endpoint (``listen=``) and the admin endpoint
    (``admin=``); ``otpy.run`` takes them too.

    Limits
    ------
    ``max_frame`` (bytes, default 1 MiB): the largest message a client may send. A
    larger request gets the error ``["FrameTooLarge", ...]``; a frame that cannot be
    told apart from garbage closes the connection. The node never buffers more than
    ``max_frame`` plus one read (64 KiB) of a message.

    ``max_depth`` (default 32): the deepest nesting of arrays and maps in a message,
    the message itself included; deeper requests get ``["TooDeep", ...]``.

    ``max_inflight`` (default 256): requests of one connection whose replies are still
    awaited (a server deferred them, or is busy). At the limit the connection stops
    reading until one completes.

    ``max_send_buffer`` (bytes, default 1 MiB): replies made but not yet taken by the
    client. Past it the connection stops reading until the client reads (a slow reader
    slows only itself). Checked after each request, so one reply may overshoot.

    ``call_timeout`` (seconds, default 5.0, as ``node.call``): how long a ``call`` made
    over the wire waits for a deferred or queued reply before it is answered with
    ``["CallTimeout", ...]``.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    max_depth: int = DEFAULT_MAX_DEPTH
    max_inflight: int = 256
    max_send_buffer: int = 1 << 20
    call_timeout: float = 5.0

    def __post_init__(self) -> None:
        for field in ("max_frame", "max_depth", "max_inflight", "max_send_buffer"):
            value = getattr(self, field)
            if type(value) is not int:
                raise TypeError(f"EndpointLimits({field}=...) takes an int, got {value!r}")
            if value < 1:
                raise ValueError(f"EndpointLimits({field}=...) must be at least 1, got "
                                 f"{value!r}")
        timeout = self.call_timeout
        if type(timeout) is not float and type(timeout) is not int:
            raise TypeError(f"EndpointLimits(call_timeout=...) takes seconds as a float, "
                            f"got {timeout!r}")
        if not timeout > 0:
            raise ValueError(f"EndpointLimits(call_timeout=...) must be more than 0 "
                             f"seconds, got {timeout!r}")


def _name(params: tuple[Any, ...], n: int = 0) -> str:
    if len(params) <= n or not isinstance(params[n], str):
        raise BadRequest(f"expected a server name (a string) as params[{n}], got "
                         f"{params!r:.80}")
    name: str = params[n]
    return name


def _sup_arg(params: tuple[Any, ...]) -> str:
    if not params:
        return "root"
    return _name(params)


class _Connection:
    __slots__ = ("admin", "authenticated", "cookie", "decoder", "fd", "in_send", "limits",
                 "log", "methods", "node", "nursery", "out", "pack", "pending", "room",
                 "stream", "wake")

    def __init__(self, node: Node, stream: trio.SocketStream, cookie: bytes | None,
                 limits: EndpointLimits) -> None:
        self.node = node
        self.stream = stream
        self.cookie = cookie
        self.admin = cookie is not None
        self.authenticated = cookie is None
        self.limits = limits
        self.decoder = Decoder(max_frame=limits.max_frame, max_depth=limits.max_depth)
        self.out = bytearray()  # replies not handed to the stream yet
        self.in_send = 0  # bytes of the send in progress; 0 when none is
        # Read and written directly (_receive, _write_now) where a socket is a file
        # descriptor; -1 elsewhere, where trio's stream does it all.
        self.fd = stream.socket.fileno() if DIRECT_IO else -1
        self.pack = result_packer(lenient=self.admin)
        self.pending = 0
        self.wake = trio.lowlevel.ParkingLot()  # the writer waits here for bytes
        self.room = trio.lowlevel.ParkingLot()  # the reader waits here for room
        try:
            peer = stream.socket.getpeername()
        except OSError:  # pragma: no cover - the peer left already
            peer = None
        self.log = _log.bind(endpoint="admin" if self.admin else "client", peer=peer)
        self.nursery: trio.Nursery | None = None
        self.methods: dict[str, Any] = {"call": self._call, "cast": self._cast}
        if self.admin:
            self.methods.update(
                which_children=self._which_children, count_children=self._count_children,
                get_state=self._get_state, statistics=self._statistics,
                suspend=self._suspend, resume=self._resume,
                releases=self._releases, upgrade=self._upgrade, downgrade=self._downgrade)

    # -- the connection's life -------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            try:
                clean = await self._read()
                # Let the replies still owed go out: all of them after an orderly end,
                # only those already made after a protocol error.
                with trio.move_on_after(self.limits.call_timeout + 1.0):
                    await self._flush()
                    while (clean and self.pending) or self.out or self.in_send:
                        await self.room.park()
            finally:
                nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        # Sends the replies of deferred requests; the reader sends its own inline
        # replies itself (see _flush), saving a task switch per packet. ``in_send``
        # keeps the two from ever writing at once.
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
        out = self.out  # no await below: nothing else touches it meanwhile
        # The reply bytes that may be added before the reader waits for the writer.
        room = self.limits.max_send_buffer - self.in_send
        # The replies to the first half of a batch are written as soon as they are
        # made: a pipelining client then refills its window while the node serves the
        # second half, instead of both taking turns (+10-15% pipelined on 2 cores). One
        # write more per batch, so only for batches worth it.
        half = (start + len(messages)) // 2 if len(messages) - start >= 16 else -1
        sched = self.node._sched
        procs, step, pack = sched.procs, sched.step, self.pack
        for i in range(start, len(messages)):
            msg = messages[i]
            if type(msg) is tuple:  # a well-formed request (see _wire.Request)
                # The hot path, flattened (each Python call here costs some 5% of the
                # rate): ``call(name, request)`` of an idle server, answered within the
                # step, as in Node.call. Everything else goes through _request.
                _, msgid, method, params = msg
                if method == "call" and len(params) == 2:
                    name, request = params
                    proc = procs.get(name) if type(name) is str else None
                    if proc is not None and not proc._flags and proc._mbox is None:
                        caller = _TaskCaller()
                        step(proc, CALL, request, caller)
                        if caller._status == 1 and caller._error is None:
                            try:
                                out += pack((1, msgid, None, caller._value))
                            except ENCODE_ERRORS as exc:
                                self._unencodable(msgid, caller._value, exc)
                            if len(out) > room:
                                return i + 1
                            if i == half and not self.in_send:
                                self._write_now()
                            continue
                        self._settle(msgid, caller, name, type(proc), None)
                        if self._full():
                            return i + 1
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
        """Serve any request by the method table; errors become error replies."""
        method = self.methods.get(name)
        if method is None:
            self.log.warning("wire_bad_request", msgid=msgid, kind="NoSuchMethod",
                             method=name)
            self._send(encode_error(msgid, "NoSuchMethod",
                                    f"no method {name!r}; this endpoint serves "
                                    f"{sorted(self.methods)}"))
            return
        try:
            method(msgid, params)
        except Exception as exc:
            if isinstance(exc, BadRequest):
                self.log.warning("wire_bad_request", msgid=msgid, kind="BadRequest",
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

    # -- client methods --------------------------------------------------------------

    def _call(self, msgid: int, params: tuple[Any, ...]) -> None:
        """``call(name, request[, vsn])``: served as ``node.call`` is, without a task
        unless the reply has to wait."""
        if len(params) not in (2, 3):
            raise BadRequest(f"call takes (name, request[, vsn]), got {len(params)} params")
        name = _name(params)
        vsn = params[2] if len(params) == 3 else None
        if vsn is not None and not isinstance(vsn, str):
            raise BadRequest(f"call's vsn must be a string or nil, got {vsn!r:.80}")
        node = self.node
        caller, served_by = node._start_call(name, params[1], vsn)
        self._settle(msgid, caller, name, served_by, vsn)

    def _settle(self, msgid: int, caller: _TaskCaller, name: str, served_by: Any,
                vsn: str | None) -> None:
        """Answer a call once its step is over: with its reply or error now, or from a
        task that waits for it. Raises what adapting a versioned reply raises."""
        if caller._status == 0:
            self._spawn(msgid, self._await_call, caller, name, served_by, vsn)
        elif caller._error is not None:
            self._send(encode_error(msgid, *error_of(caller._error)))
        else:
            result = caller._value
            if vsn is not None:
                result = self.node._adapt_reply(served_by, vsn, result)
            self._reply(msgid, result)

    async def _await_call(self, caller: _TaskCaller, name: str, served_by: Any,
                          vsn: str | None) -> Any:
        node = self.node
        if caller._status == 0:  # else it was answered before this task started
            result = await node._wait(caller, name, self.limits.call_timeout)
        elif caller._error is not None:
            raise caller._error
        else:
            result = caller._value
        if vsn is not None:
            result = node._adapt_reply(served_by, vsn, result)
        return result

    def _cast(self, msgid: int | None, params: tuple[Any, ...]) -> None:
        if len(params) != 2:
            raise BadRequest(f"cast takes (name, message), got {len(params)} params")
        self.node.cast(_name(params), params[1])
        if msgid is not None:
            self._reply(msgid, None)

    # -- admin methods ---------------------------------------------------------------

    def _which_children(self, msgid: int, params: tuple[Any, ...]) -> None:
        self._reply(msgid, [info._asdict() for info in self.node.which_children(
            _sup_arg(params))])

    def _count_children(self, msgid: int, params: tuple[Any, ...]) -> None:
        self._reply(msgid, self.node.count_children(_sup_arg(params)))

    def _statistics(self, msgid: int, params: tuple[Any, ...]) -> None:
        self._reply(msgid, self.node.statistics(_name(params) if params else None))

    def _get_state(self, msgid: int, params: tuple[Any, ...]) -> None:
        self._reply(msgid, self.node.get_state(_name(params)))

    def _suspend(self, msgid: int, params: tuple[Any, ...]) -> None:
        self.node.suspend(_name(params))
        self._reply(msgid, None)

    def _resume(self, msgid: int, params: tuple[Any, ...]) -> None:
        self.node.resume(_name(params))
        self._reply(msgid, None)

    def _releases(self, msgid: int, params: tuple[Any, ...]) -> None:
        self._reply(msgid, [r._asdict() for r in self.node.releases()])

    def _upgrade(self, msgid: int, params: tuple[Any, ...]) -> None:
        source = ReleaseSource.from_params(params)
        self.log.info("admin_upgrade", **source.describe())
        self._spawn(msgid, self._load_and_upgrade, source)

    async def _load_and_upgrade(self, source: ReleaseSource) -> dict[str, Any]:
        # Read and imported in a worker thread, within a timeout: never on the loop.
        release = await load_in_thread(source)
        self.log.info("release_loaded", vsn=release.vsn, digest=release.digest)
        return await self.node.upgrade(release)

    def _downgrade(self, msgid: int, params: tuple[Any, ...]) -> None:
        if params:
            raise BadRequest(f"downgrade takes no params, got {params!r:.80}")
        self.log.info("admin_downgrade")
        self._spawn(msgid, self.node.downgrade)


def _vanished(exc: BaseException) -> bool:
    """Whether ``exc`` (maybe a group of them) only says that the peer went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_vanished(e) for e in exc.exceptions)
    # OSError: the connection's own reads and writes (_receive, _write_now) raise what
    # the socket reports (a reset, a timeout), which trio's stream would have turned
    # into BrokenResourceError.
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError)


async def _handle(node: Node, cookie: bytes | None, limits: EndpointLimits,
                  stream: trio.SocketStream) -> None:
    conn = _Connection(node, stream, cookie, limits)
    try:
        await conn.run()
    except Exception as exc:
        if _vanished(exc):
            conn.log.info("wire_client_vanished", pending=conn.pending, error=repr(exc))
        else:  # a bug here must not take the node down
            conn.log.exception("wire_connection_failed", error=repr(exc))
    finally:
        await trio.aclose_forcefully(stream)


async def _serve(node: Node, address: tuple[str, int], cookie: bytes | None,
                 limits: EndpointLimits, task_status: Any) -> None:
    host, port = address
    endpoint = "admin" if cookie else "client"
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:  # say which endpoint, and where: "address already in use"...
        raise OSError(exc.errno, f"the {endpoint} endpoint cannot listen on {host}:{port}: "
                                 f"{exc.strerror or exc}; is another node (or program) "
                                 f"using that port? Choose another, or port 0 for a free "
                                 f"one") from exc
    bound = listeners[0].socket.getsockname()[:2]
    _log.info("endpoint_listening", endpoint=endpoint, address=f"{bound[0]}:{bound[1]}")
    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(functools.partial(_handle, node, cookie, limits), listeners)


async def serve_client(node: Node, address: tuple[str, int], *,
                       limits: EndpointLimits | None = None,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the client endpoint on ``address`` until cancelled; reports the bound
    ``(host, port)`` through ``nursery.start``."""
    await _serve(node, address, None, limits or EndpointLimits(), task_status)


async def serve_admin(node: Node, address: tuple[str, int], *,
                      limits: EndpointLimits | None = None, cookie: bytes | None = None,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin endpoint on ``address`` until cancelled (the cookie is read, or
    its file created, first); reports the bound ``(host, port)``."""
    secret = cookie if cookie is not None else read_cookie(create=True)
    await _serve(node, address, secret, limits or EndpointLimits(), task_status)

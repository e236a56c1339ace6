"""Python clients of a node's endpoints: :func:`otpy.connect` and the admin client the
``otpy`` command uses.

A client needs no task of its own: whichever caller is waiting reads the socket for
everyone, hands each reply to its caller, and passes the reading on; so many calls can
be in flight on one connection, answered in the order the node completes them.

What must stay true: whatever a node sends, the client holds at most one unfinished
reply's bytes (``max_frame``) and decodes a reply to at most ``max_objects`` objects
(the same decoder as the node's, see ``_protocol.msgpack_rpc``); a reply over either
limit fails only its own call (:class:`otpy.FrameTooLarge`); a connection that breaks
fails the calls in flight on it with :class:`otpy.ConnectionLost` (never one of trio's
errors), and :func:`connect` opens a new one on the next call. An admin client checks
that the node proves the cookie before it sends anything, and seals every message to
its session (see ``_protocol.handshake``).
"""

from __future__ import annotations

import collections
import itertools
import math
import ssl as _ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._exceptions import (
    AuthFailed,
    CallTimeout,
    ConnectionLost,
    FrameTooLarge,
    RemoteError,
    remote_error,
)
from ._protocol.handshake import Session, client_proof, new_nonce, node_proof, proves
from ._protocol.msgpack_rpc import (
    MAX_MSGID,
    READ_SIZE,
    Decoder,
    Fatal,
    Invalid,
    Notification,
    Response,
    encode_notification,
    encode_request,
)

# A client trusts its node more than a node trusts its clients, but not without bound:
# a reply may be up to 64 MiB and 4 Mi objects (a big state, a big tree), and nest as
# deep as msgpack packs.
CLIENT_MAX_FRAME = 64 << 20
CLIENT_MAX_OBJECTS = 4 << 20
CLIENT_MAX_DEPTH = 512
AUTH_TIMEOUT = 10.0

Opener = Callable[[], Awaitable[trio.abc.Stream]]


class Client:
    """A connection to a node's client endpoint, from :func:`otpy.connect`.

    ``await client.call(name, request)`` and ``await client.cast(name, message)``;
    calls from many tasks share the connection and are pipelined. When the connection
    breaks, the calls in flight on it raise :class:`otpy.ConnectionLost` (they may or
    may not have run on the node) and the next call connects again (``connect(...,
    reconnect=False)``: it raises ``ConnectionLost`` instead)."""

    def __init__(self, stream: trio.abc.Stream, *, where: str = "the node",
                 opener: Opener | None = None, max_frame: int = CLIENT_MAX_FRAME,
                 max_objects: int = CLIENT_MAX_OBJECTS) -> None:
        self._stream = stream
        self._where = where
        self._opener = opener
        self._limits = (max_frame, max_objects)
        self._decoder = self._new_decoder()
        self._session: Session | None = None
        self._ids = itertools.count(1)
        self._results: dict[int, tuple[Any, Any]] = {}
        self._waiting: set[int] = set()
        self._reading = False
        self._changed = trio.Event()
        self._send_lock = trio.Lock()
        self._reopen_lock = trio.Lock()
        self._generation = 0  # one per connection opened
        self._lost: BaseException | None = None  # why the current connection ended
        self._shut = False  # aclose() was called
        # What the node sent as notifications (its challenge); the latest 64.
        self.notifications: collections.deque[tuple[str, Any]] = collections.deque(
            maxlen=64)

    def _new_decoder(self) -> Decoder:
        max_frame, max_objects = self._limits
        return Decoder(max_frame=max_frame, max_objects=max_objects,
                       max_depth=CLIENT_MAX_DEPTH, replies=True)

    # -- the connection --------------------------------------------------------------

    def _lose(self, stream: trio.abc.Stream, why: BaseException) -> None:
        if stream is self._stream and self._lost is None:
            self._lost = why

    def _lost_error(self) -> ConnectionLost:
        why = self._lost
        reason = str(why) or type(why).__name__
        then = ("it is opened again on the next call" if self._opener is not None else
                "this client does not reconnect: open a new one")
        return ConnectionLost(f"the connection to {self._where} was lost ({reason}); a "
                              f"call in flight on it may or may not have run; {then}")

    async def _reopen(self) -> None:
        """Open a new connection after the last was lost (or say why not)."""
        if self._opener is None:
            raise self._lost_error()
        async with self._reopen_lock:
            if self._lost is None:
                return  # another task reopened it meanwhile
            reason = self._lost_error()
            await trio.aclose_forcefully(self._stream)
            try:
                stream = await self._opener()
            except (OSError, trio.BrokenResourceError, ConnectionLost) as exc:
                raise ConnectionLost(f"the connection to {self._where} was lost and "
                                     f"cannot be opened again: {exc}") from reason
            self._stream = stream
            self._decoder = self._new_decoder()
            self._generation += 1
            self._lost = None

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            stream = self._stream
            if self._session is not None:
                data = self._session.seal(data)
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._lose(stream, exc)
                raise self._lost_error() from exc

    async def request(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """Send ``[0, msgid, method, params]`` and return the result; raises
        :class:`RemoteError` for an error reply, :class:`otpy.FrameTooLarge` for a reply
        over this client's limits, :class:`otpy.ConnectionLost` if the connection
        breaks first."""
        if self._shut:
            raise ConnectionLost(f"this client of {self._where} was closed")
        if self._lost is not None:
            await self._reopen()
        msgid = next(self._ids) & MAX_MSGID
        generation = self._generation
        self._waiting.add(msgid)
        try:
            await self._send(encode_request(msgid, method, params))
            with trio.fail_after(math.inf if timeout is None else timeout):
                error, result = await self._reply(msgid, generation)
        except trio.TooSlowError:
            raise CallTimeout(f"no reply to {method!r} within {timeout:g} s") from None
        finally:
            self._waiting.discard(msgid)
            self._results.pop(msgid, None)
        if error is _TOO_LARGE:
            raise FrameTooLarge(f"{result}: the reply to {method!r} is over this client's "
                                f"limits; pass max_frame=/max_objects= to otpy.connect to "
                                f"accept it")
        if error is not None:
            if isinstance(error, tuple) and len(error) == 2:
                raise remote_error(str(error[0]), str(error[1]))
            raise RemoteError("Error", repr(error))
        return result

    async def _reply(self, msgid: int, generation: int) -> tuple[Any, Any]:
        while msgid not in self._results:
            if self._generation != generation or self._lost is not None:
                raise self._lost_error() if self._lost is not None else ConnectionLost(
                    f"the connection to {self._where} was lost while this call waited; "
                    f"it may or may not have run")
            await self._read_once()
        return self._results.pop(msgid)

    async def _read_once(self) -> None:
        """Read and dispatch one chunk, or wait while another caller does."""
        if self._reading:
            await self._changed.wait()
            return
        self._reading = True
        stream, decoder, session = self._stream, self._decoder, self._session
        try:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                self._lose(stream, EOFError("the node closed it"))
            else:
                messages = decoder.feed(data)
                if session is not None:
                    messages = session.open_all(messages)
                for msg in messages:
                    self._dispatch(stream, msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lose(stream, exc)
        finally:
            self._reading = False
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def _dispatch(self, stream: trio.abc.Stream, msg: Any) -> None:
        kind = type(msg)
        if kind is Response:
            if msg.msgid in self._waiting:
                self._results[msg.msgid] = (msg.error, msg.result)
        elif kind is Notification:
            self.notifications.append((msg.method, msg.params))
        elif kind is Invalid:  # a reply over the limits, or nested too deep
            if msg.msgid in self._waiting:
                self._results[msg.msgid] = (_TOO_LARGE, msg.message)
        elif kind is Fatal:
            self._lose(stream, _Broken(f"the node broke the protocol: {msg.reason}"))
        else:  # pragma: no cover - a request or an unopened seal: not for a client
            self._lose(stream, _Broken(f"the node sent a {kind.__name__}"))

    # -- the methods -----------------------------------------------------------------

    async def call(self, name: str, request: Any, *, vsn: str | None = None,
                   timeout: float | None = 5.0) -> Any:
        """Call server ``name`` on the node and return its reply (``vsn``: the protocol
        version this client speaks). Raises :class:`otpy.RemoteError` with the node's
        error kind, :class:`otpy.CallTimeout`, or :class:`otpy.ConnectionLost`."""
        params = (name, request) if vsn is None else (name, request, vsn)
        return await self.request("call", *params, timeout=timeout)

    async def cast(self, name: str, message: Any) -> None:
        """Send ``message`` to ``name``'s ``handle_cast`` as a notification: no reply,
        no error report (use :meth:`request` ``("cast", ...)`` to hear of errors)."""
        if self._shut:
            raise ConnectionLost(f"this client of {self._where} was closed")
        if self._lost is not None:
            await self._reopen()
        await self._send(encode_notification("cast", (name, message)))

    async def aclose(self) -> None:
        """Close the connection; later calls raise :class:`otpy.ConnectionLost`."""
        self._shut = True
        await trio.aclose_forcefully(self._stream)


class _Broken(Exception):
    """Why a connection was given up: the node broke the protocol."""


_TOO_LARGE = object()


async def _open(host: str, port: int, ssl: _ssl.SSLContext | None) -> trio.abc.Stream:
    stream = await trio.open_tcp_stream(host, port)
    if ssl is None:
        return stream
    tls = trio.SSLStream(stream, ssl, server_hostname=host)
    try:
        with trio.fail_after(AUTH_TIMEOUT):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__ or exc
        raise ConnectionLost(f"the TLS handshake with {host}:{port} failed: {cause}") \
            from exc
    return tls


def _check(ssl: object) -> _ssl.SSLContext | None:
    if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"ssl= takes an ssl.SSLContext (e.g. ssl.create_default_context("
                        f"cafile=...)), got {ssl!r}")
    return ssl


@asynccontextmanager
async def connect(host: str, port: int, *, ssl: _ssl.SSLContext | None = None,
                  reconnect: bool = True, max_frame: int = CLIENT_MAX_FRAME,
                  max_objects: int = CLIENT_MAX_OBJECTS) -> AsyncIterator[Client]:
    """Connect to a node's client endpoint (``open_node(root, listen=(host, port))``)::

        async with otpy.connect("127.0.0.1", port) as client:
            await client.call("c", "incr")
            await client.cast("c", "reset")

    Error replies raise :class:`otpy.RemoteError`, whose ``kind`` names the node's
    error (``"NoSuchServer"``, ``"ServerCrashed"``, ``"CallTimeout"``, ...).

    ``ssl``: an ``ssl.SSLContext`` to speak TLS (the node's ``open_node(...,
    ssl=...)``). ``reconnect``: after the connection breaks, the next call opens a new
    one (the calls in flight when it broke raise :class:`otpy.ConnectionLost`).
    ``max_frame`` and ``max_objects`` bound what one reply may be (64 MiB and 4 Mi
    objects by default); a reply over them raises :class:`otpy.FrameTooLarge` for its
    call only."""
    context = _check(ssl)

    async def opener() -> trio.abc.Stream:
        return await _open(host, port, context)

    client = Client(await opener(), where=f"{host}:{port}",
                    opener=opener if reconnect else None, max_frame=max_frame,
                    max_objects=max_objects)
    try:
        yield client
    finally:
        client._shut = True
        await trio.aclose_forcefully(client._stream)


@asynccontextmanager
async def connect_admin(host: str, port: int, cookie: bytes, *,
                        ssl: _ssl.SSLContext | None = None) -> AsyncIterator[Client]:
    """Connect to a node's admin endpoint and authenticate both ways with ``cookie``:
    raises :class:`AuthFailed` if the node refuses the cookie, or if it cannot prove it
    holds it too (then nothing else is sent to it). Every later message is sealed to
    the session; the connection is not reopened if it breaks."""
    where = f"{host}:{port}"
    client = Client(await _open(host, port, _check(ssl)), where=where)
    try:
        with trio.fail_after(AUTH_TIMEOUT):
            while not client.notifications:
                if client._lost is not None:
                    raise ConnectionLost("the node closed the connection before its "
                                         "challenge; is this its admin endpoint?")
                await client._read_once()
        method, params = client.notifications.popleft()
        if method != "challenge" or not params or not isinstance(params[0], bytes):
            raise ConnectionLost(f"expected the node's challenge, got {method!r}; is this "
                                 f"its admin endpoint?")
        node_nonce, my_nonce = params[0], new_nonce()
        try:
            answer = await client.request(
                "auth", my_nonce, client_proof(cookie, node_nonce, my_nonce),
                timeout=AUTH_TIMEOUT)
        except RemoteError as exc:
            raise AuthFailed(exc.message) from None
        except ConnectionLost as exc:
            raise AuthFailed("the node closed the connection during authentication") from exc
        if not proves(node_proof(cookie, node_nonce, my_nonce), answer):
            raise AuthFailed(f"the peer at {where} accepted the cookie but did not prove "
                             f"that it holds it: it is not that node (another program "
                             f"listening there, or a relay), or it runs an older otpy; "
                             f"nothing was sent to it")
        client._session = Session(cookie, node_nonce, my_nonce, node_side=False,
                                  decoder=client._new_decoder())
        yield client
    finally:
        client._shut = True
        await trio.aclose_forcefully(client._stream)

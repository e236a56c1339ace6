"""Python clients of a node's endpoints: :func:`otpy.connect` and the admin client the
``otpy`` command uses.

A client needs no task of its own: whichever caller is waiting reads the socket for
everyone, hands each reply to its caller, and passes the reading on; so many calls can
be in flight on one connection, answered in the order the node completes them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from ._exceptions import AuthFailed, CallTimeout, ConnectionLost, RemoteError, remote_error
from ._protocol.msgpack_rpc import (
    MAX_MSGID,
    NOTIFICATION,
    READ_SIZE,
    RESPONSE,
    auth_answer,
    decode_ext,
    encode_notification,
    encode_request,
)


class Client:
    """A connection to a node's client endpoint, from :func:`otpy.connect`.

    ``await client.call(name, request)`` and ``await client.cast(name, message)``;
    calls from many tasks share the connection and are pipelined."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._unpacker = msgpack.Unpacker(use_list=False, raw=False, strict_map_key=False,
                                          ext_hook=decode_ext)
        self._ids = itertools.count(1)
        self._results: dict[int, tuple[Any, Any]] = {}
        self._waiting: set[int] = set()
        self._reading = False
        self._changed = trio.Event()
        self._send_lock = trio.Lock()
        self._closed: BaseException | None = None
        self.notifications: list[tuple[str, Any]] = []

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def request(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """Send ``[0, msgid, method, params]`` and return the result; raises
        :class:`RemoteError` for an error reply."""
        msgid = next(self._ids) & MAX_MSGID
        self._waiting.add(msgid)
        try:
            await self._send(encode_request(msgid, method, params))
            with trio.fail_after(math.inf if timeout is None else timeout):
                error, result = await self._reply(msgid)
        except trio.TooSlowError:
            raise CallTimeout(f"no reply to {method!r} within {timeout:g} s") from None
        finally:
            self._waiting.discard(msgid)
            self._results.pop(msgid, None)
        if error is not None:
            if isinstance(error, tuple) and len(error) == 2:
                raise remote_error(str(error[0]), str(error[1]))
            raise RemoteError("Error", repr(error))
        return result

    async def _reply(self, msgid: int) -> tuple[Any, Any]:
        while msgid not in self._results:
            if self._closed is not None:
                raise ConnectionLost("the node closed the connection") from self._closed
            await self._read_once()
        return self._results.pop(msgid)

    async def _read_once(self) -> None:
        """Read and dispatch one chunk, or wait while another caller does."""
        if self._reading:
            await self._changed.wait()
            return
        self._reading = True
        try:
            data = await self._stream.receive_some(READ_SIZE)
            if not data:
                self._closed = EOFError("end of stream")
            self._unpacker.feed(data)
            for msg in self._unpacker:
                self._dispatch(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed = exc
        finally:
            self._reading = False
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, tuple) and len(msg) == 4 and msg[0] == RESPONSE:
            if msg[1] in self._waiting:
                self._results[msg[1]] = (msg[2], msg[3])
        elif isinstance(msg, tuple) and len(msg) == 3 and msg[0] == NOTIFICATION:
            self.notifications.append((msg[1], msg[2]))

    async def call(self, name: str, request: Any, *, vsn: str | None = None,
                   timeout: float | None = 5.0) -> Any:
        """Call server ``name`` on the node and return its reply (``vsn``: the protocol
        version this client speaks). Raises :class:`otpy.RemoteError` with the node's
        error kind, or :class:`otpy.CallTimeout`."""
        params = (name, request) if vsn is None else (name, request, vsn)
        return await self.request("call", *params, timeout=timeout)

    async def cast(self, name: str, message: Any) -> None:
        """Send ``message`` to ``name``'s ``handle_cast`` as a notification: no reply,
        no error report (use :meth:`request` ``("cast", ...)`` to hear of errors)."""
        await self._send(encode_notification("cast", (name, message)))

    async def aclose(self) -> None:
        """Close the connection."""
        await self._stream.aclose()


async def _open(host: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


@asynccontextmanager
async def connect(host: str, port: int) -> AsyncIterator[Client]:
    """Connect to a node's client endpoint (``open_node(root, listen=(host, port))``)::

        async with otpy.connect("127.0.0.1", port) as client:
            await client.call("c", "incr")
            await client.cast("c", "reset")

    Error replies raise :class:`otpy.RemoteError`, whose ``kind`` names the node's
    error (``"NoSuchServer"``, ``"ServerCrashed"``, ``"CallTimeout"``, ...)."""
    client = Client(await _open(host, port))
    try:
        yield client
    finally:
        await trio.aclose_forcefully(client._stream)


@asynccontextmanager
async def connect_admin(host: str, port: int, cookie: bytes) -> AsyncIterator[Client]:
    """Connect to a node's admin endpoint and answer its challenge with ``cookie``;
    raises :class:`AuthFailed` if the node refuses."""
    client = Client(await _open(host, port))
    try:
        with trio.fail_after(10.0):
            while not client.notifications:
                if client._closed is not None:
                    raise ConnectionLost("the node closed the connection before its "
                                         "challenge; is this its admin endpoint?")
                await client._read_once()
        method, params = client.notifications.pop(0)
        if method != "challenge" or not params or not isinstance(params[0], bytes):
            raise ConnectionLost(f"expected the node's challenge, got {method!r}; is this "
                                 f"its admin endpoint?")
        try:
            await client.request("auth", auth_answer(cookie, params[0]), timeout=10.0)
        except RemoteError as exc:
            raise AuthFailed(exc.message) from None
        except ConnectionLost as exc:
            raise AuthFailed("the node closed the connection during authentication") from exc
        yield client
    finally:
        await trio.aclose_forcefully(client._stream)

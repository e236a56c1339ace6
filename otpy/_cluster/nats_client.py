"""A small trio NATS client over the sans-io codec ``otpy._protocol.nats``.

::

    async with open_client("nats://127.0.0.1:4222") as nc:
        nc.subscribe("echo", lambda msg: nc.publish_nowait(msg.reply, msg.payload))
        reply = await nc.request("echo", b"hi", timeout=1.0)
        assert reply.payload == b"hi"

Tasks: one connection runs three tasks (reader, writer, pinger) in its own nursery; a
timer task (request deadlines) and the supervising task that reconnects live as long as
the client. Nothing else: no task per subscription, message or request.

Delivery: the reader parses what it receives and calls each subscription's callback
*synchronously*, in order, for every message (an ``async for`` form is offered too,
through a bounded queue). A callback must not block; an exception it raises is logged
(``nats_callback_failed``) and the next message is delivered. One read is at most
``READ_SIZE`` bytes, so one batch of callbacks is bounded by what fits in it.

Writes: the first message of a loop turn, when the writer task is idle, is sent at
once (a non-blocking send; a sequential request does not wait a loop turn for the
writer); every other send appends to one outgoing buffer and wakes the writer, which
sends all of it in one write when the loop next turns. So a burst of publishes in one
turn costs at most two syscalls. The buffer is bounded (``max_outgoing``):
``publish_nowait`` raises :class:`OutgoingFull` past it, ``await publish(...)`` waits
for room.

Requests: one wildcard subscription ``_INBOX.<random>.*`` carries every reply; a request
is one publish with a fresh reply subject and an entry in a dict. A ``NATS/1.0 503``
reply (nobody subscribes to the subject) raises :class:`NoResponders` at once; a
timeout raises :class:`RequestTimeout`; losing the connection fails every request in
flight with :class:`ConnectionLost` at once (its outcome is unknown: it may have been
served).

Dead connections: the client PINGs every ``ping_interval`` seconds; anything received
counts as an answer. A connection that stays silent through ``max_pings_out`` PINGs
is dropped, so a silent cut (no FIN, a frozen server) is noticed within
``ping_interval * (max_pings_out + 1)`` seconds: 4 s by default.

Reconnects: after a loss the client calls every ``on_disconnect(reason)`` listener,
then retries with exponential backoff (``reconnect_wait`` doubling up to
``reconnect_max_wait``, jittered); on success it restores every subscription (in the
handshake, before anything else is sent), then calls every ``on_reconnect()``
listener. While disconnected, sends raise :class:`NotConnected` at once: nothing is
buffered to be replayed later. After ``max_reconnect_attempts`` failures (None: never
give up) the client closes and calls ``on_close(error)``.

Bounds on what the server sends: the parser's (control line, payload against the
server's ``max_payload`` capped by ours, header bytes and lines; a violation closes the
connection with a ``nats_protocol_error`` event naming it, and the client reconnects),
one read at a time, and per ``async for`` subscription a queue of at most
``max_pending_msgs`` messages and ``max_pending_bytes`` bytes (beyond which messages
are dropped and counted, with a ``nats_slow_consumer`` event). The server's INFO is
only read for its limits: its ``connect_urls`` are ignored, so a server cannot make the
client connect elsewhere.

Errors are this module's own (:class:`NatsError` and below), not otpy's: the cluster
layer decides what each means to a node.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
import secrets
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import outcome
import structlog
import trio

from .._protocol import nats as proto
from .._protocol.nats import Err, Fatal, HeaderInput, Info, Msg

__all__ = [
    "Client", "ClientClosed", "ConnectError", "ConnectionLost", "Msg", "NatsError",
    "NoResponders", "NotConnected", "OutgoingFull", "PayloadTooLarge", "RequestTimeout",
    "Subscription", "open_client",
]

log = structlog.get_logger("otpy.cluster.nats")

READ_SIZE = 64 * 1024
DEFAULT_TIMEOUT = 5.0
TIMER_GRANULARITY = 0.01
MAX_UNANSWERED_PINGS = 64
LANG = "python-otpy"
VERSION = "0.1.0"


# -- errors ---------------------------------------------------------------------------------


class NatsError(Exception):
    """The root of this client's errors."""


class ConnectError(NatsError):
    """Could not connect (refused, timed out, TLS, or the server refused our CONNECT,
    e.g. ``Authorization Violation``)."""


class NotConnected(NatsError):
    """The client is reconnecting: nothing can be sent now (nothing is buffered to be
    replayed later)."""


class ConnectionLost(NatsError):
    """The connection dropped while this request or flush waited; a request's outcome is
    unknown (it may have been served)."""


class ClientClosed(NatsError):
    """The client is closed (by :meth:`Client.close`, or it gave up reconnecting)."""


class NoResponders(NatsError, LookupError):
    """Nothing subscribes to the request's subject (the server's ``503`` status)."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders: nothing subscribes to {subject!r}")
        self.subject = subject


class RequestTimeout(NatsError, TimeoutError):
    """No reply within the request's timeout."""


class OutgoingFull(NatsError):
    """The outgoing buffer holds ``max_outgoing`` bytes (or ``max_requests`` requests are
    in flight): ``*_nowait`` cannot send now; ``await publish(...)`` waits for room."""


class PayloadTooLarge(NatsError, ValueError):
    """A message larger than the server's ``max_payload``."""


# -- subscriptions ------------------------------------------------------------------------


class Subscription:
    """One subscription: a callback called by the reader for each message, or an async
    iterator over a bounded queue. :meth:`unsubscribe` ends it."""

    __slots__ = ("_client", "_lot", "_queue", "_slow", "closed", "deliver", "delivered",
                 "dropped", "max_pending_bytes", "max_pending_msgs", "pending_bytes",
                 "queue_group", "sid", "subject")

    def __init__(self, client: Client, sid: int, subject: str, queue_group: str | None,
                 callback: Callable[[Msg], object] | None, max_pending_msgs: int,
                 max_pending_bytes: int) -> None:
        self._client = client
        self.sid = sid
        self.subject = subject
        self.queue_group = queue_group
        self.closed = False
        self.delivered = 0
        self.dropped = 0
        self.pending_bytes = 0
        self.max_pending_msgs = max_pending_msgs
        self.max_pending_bytes = max_pending_bytes
        self._slow = False
        self._queue: deque[Msg] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        # The reader calls ``deliver(msg)``: the user's callback itself, or the queue.
        self.deliver: Callable[[Msg], object] = callback or self._enqueue

    def _enqueue(self, msg: Msg) -> None:
        size = len(msg.payload)
        if (len(self._queue) >= self.max_pending_msgs
                or self.pending_bytes + size > self.max_pending_bytes):
            self.dropped += 1
            if not self._slow:
                self._slow = True
                log.warning("nats_slow_consumer", subject=self.subject, sid=self.sid,
                            pending=len(self._queue), pending_bytes=self.pending_bytes)
            return
        self._slow = False
        self._queue.append(msg)
        self.pending_bytes += size
        self._lot.unpark()

    def unsubscribe(self) -> None:
        """Stop receiving (an ``async for`` over it ends after what is queued)."""
        self._client._unsubscribe(self)

    def _close(self) -> None:
        self.closed = True
        self._lot.unpark_all()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Msg:
        await trio.lowlevel.checkpoint()
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            await self._lot.park()
        msg = self._queue.popleft()
        self.pending_bytes -= len(msg.payload)
        self.delivered += 1
        return msg

    def __repr__(self) -> str:
        return f"<Subscription {self.sid} {self.subject!r}>"


# -- waiters of requests and flushes ------------------------------------------------------


class _TaskWaiter:
    __slots__ = ("key", "subject", "task")

    def __init__(self, task: trio.lowlevel.Task, subject: str) -> None:
        self.task = task
        self.subject = subject
        self.key = ""  # the reply subject, once sent

    def __call__(self, result: Msg | NatsError) -> None:
        if isinstance(result, BaseException):
            trio.lowlevel.reschedule(self.task, outcome.Error(result))
        else:
            trio.lowlevel.reschedule(self.task, outcome.Value(result))


class _CallbackWaiter:
    __slots__ = ("callback", "key", "subject")

    def __init__(self, callback: Callable[[Msg | NatsError], object], subject: str) -> None:
        self.callback = callback
        self.subject = subject
        self.key = ""

    def __call__(self, result: Msg | NatsError) -> None:
        try:
            self.callback(result)
        except Exception as exc:
            log.error("nats_callback_failed", subject=self.subject, what="request callback",
                      exc_info=exc)


class Waiter(Protocol):
    """What :meth:`Client.request_waiter` takes: called once with the outcome (never
    raising), ``key`` set to the request's inbox, ``subject`` naming the request."""

    key: str
    subject: str

    def __call__(self, result: Msg | NatsError) -> None: ...


_Waiter = _TaskWaiter | _CallbackWaiter | Waiter


class _Flush:
    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: NatsError | None = None


# -- connection setup -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    host: str
    port: int
    tls: bool
    user: str | None
    password: str | None
    token: str | None

    def __str__(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"


def _parse_server(url: str) -> _Server:
    if "://" not in url:
        url = "nats://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls"):
        raise ValueError(f"expected a nats:// or tls:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host in the NATS URL {url!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    token = None
    if user is not None and password is None:
        user, token = None, user  # nats://TOKEN@host
    return _Server(parts.hostname, parts.port or 4222, parts.scheme == "tls", user,
                   password, token)


class _Conn:
    """What one successful handshake leaves: the stream, its parser, the server's INFO
    and the events that arrived with the handshake's PONG."""

    __slots__ = ("info", "leftover", "parser", "sent_sids", "server", "stream")

    def __init__(self, server: _Server, stream: trio.abc.Stream, parser: proto.Parser,
                 info: dict[str, Any], leftover: list[proto.Event],
                 sent_sids: set[int]) -> None:
        self.server = server
        self.stream = stream
        self.parser = parser
        self.info = info
        self.leftover = leftover
        self.sent_sids = sent_sids


CONNECTING, CONNECTED, RECONNECTING, CLOSED = "connecting", "connected", "reconnecting", "closed"


class Client:
    """A NATS connection (see the module doc). Make one with :func:`open_client`, or
    ``await client.connect()`` and then ``await nursery.start(client.run)`` to run it in
    a nursery of your own; ``await client.close()`` ends it either way."""

    def __init__(
        self, servers: str | Sequence[str] = "nats://127.0.0.1:4222", *,
        name: str | None = None, user: str | None = None, password: str | None = None,
        token: str | None = None, tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None, connect_timeout: float = 2.0,
        ping_interval: float = 1.0, max_pings_out: int = 3,
        reconnect: bool = True, reconnect_wait: float = 0.05,
        reconnect_max_wait: float = 2.0, max_reconnect_attempts: int | None = None,
        max_outgoing: int = 8 * 1024 * 1024, max_requests: int = 100_000,
        max_payload: int = proto.DEFAULT_MAX_PAYLOAD,
        max_control_line: int = proto.DEFAULT_MAX_CONTROL_LINE,
        max_header_bytes: int = proto.DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = proto.DEFAULT_MAX_HEADERS, direct_send: bool = True,
        on_disconnect: Callable[[str], object] | None = None,
        on_reconnect: Callable[[], object] | None = None,
        on_close: Callable[[BaseException | None], object] | None = None,
    ) -> None:
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls:
            raise ValueError("expected at least one NATS server URL")
        self._servers = [_parse_server(u) for u in urls]
        self._name = name
        self._user, self._password, self._token = user, password, token
        self._tls = tls
        self._tls_hostname = tls_hostname
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.max_pings_out = max_pings_out
        self._reconnect_enabled = reconnect
        self.reconnect_wait = reconnect_wait
        self.reconnect_max_wait = reconnect_max_wait
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_outgoing = max_outgoing
        self.max_requests = max_requests
        self.direct_send = direct_send  # the immediate first send of a turn (plain TCP)
        self._limits = {"max_payload": max_payload, "max_control_line": max_control_line,
                        "max_header_bytes": max_header_bytes, "max_headers": max_headers}
        self._max_payload_cap = max_payload
        self._disconnect_listeners: list[Callable[[str], object]] = []
        self._reconnect_listeners: list[Callable[[], object]] = []
        self._close_listeners: list[Callable[[BaseException | None], object]] = []
        self.add_listener(on_disconnect=on_disconnect, on_reconnect=on_reconnect,
                          on_close=on_close)

        self.state = CONNECTING
        self.server_info: dict[str, Any] = {}
        self.max_payload = 1024 * 1024  # until the server's INFO says
        self.connected_url: str | None = None
        self._conn: _Conn | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._drop_reason: str | None = None
        self._closing = False
        self._close_error: BaseException | None = None
        self._closed_event = trio.Event()
        self._runner_scope: trio.CancelScope | None = None

        self._out = bytearray()
        self._sending = 0
        self._writer_parked: trio.lowlevel.Task | None = None
        self._direct: socket.socket | None = None
        self._direct_ok = False
        self._room = trio.lowlevel.ParkingLot()
        self._pongs: deque[_Flush | None] = deque()  # PONG waiters; None: the pinger's
        self._pings_out = 0  # PINGs sent since anything was received
        self._pings_unanswered = 0  # the pinger's PINGs in _pongs

        self._sids = itertools.count(1)
        self._subs: dict[int, Subscription] = {}
        self._valid_subjects: set[str] = set()
        self._valid_prefixes: set[str] = set()
        self._inbox_prefix = f"_INBOX.{secrets.token_hex(11)}."
        self._req_ids = itertools.count(1)
        self._pending: dict[str, _Waiter] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._timer_scope: trio.CancelScope | None = None
        inbox = Subscription(self, next(self._sids), self._inbox_prefix + "*", None,
                             self._on_reply, 0, 0)
        self._subs[inbox.sid] = inbox

        self.msgs_in = self.bytes_in = self.msgs_out = self.bytes_out = self.writes = 0
        self.reconnects = 0
        self.late_replies = 0
        self.dropped_on_disconnect = 0

    # -- listeners ----------------------------------------------------------------------

    def add_listener(self, *, on_disconnect: Callable[[str], object] | None = None,
                     on_reconnect: Callable[[], object] | None = None,
                     on_close: Callable[[BaseException | None], object] | None = None,
                     ) -> Callable[[], None]:
        """Add synchronous listeners: ``on_disconnect(reason)`` when the connection is
        lost (requests in flight have already failed), ``on_reconnect()`` once a new
        connection has every subscription back, ``on_close(error)`` when the client
        closes (``error`` None for :meth:`close`). Returns a function that removes them."""
        pairs: list[tuple[list[Any], Any]] = [
            (self._disconnect_listeners, on_disconnect),
            (self._reconnect_listeners, on_reconnect), (self._close_listeners, on_close)]
        for target, fn in pairs:
            if fn is not None:
                target.append(fn)

        def remove() -> None:
            for target, fn in pairs:
                if fn is not None and fn in target:
                    target.remove(fn)
        return remove

    def _notify(self, listeners: Iterable[Callable[..., object]], event: str,
                *args: Any) -> None:
        for fn in list(listeners):
            try:
                fn(*args)
            except Exception as exc:
                log.error("nats_callback_failed", what=event, exc_info=exc)

    # -- state ----------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Whether messages can be sent now."""
        return self.state == CONNECTED

    @property
    def is_closed(self) -> bool:
        """Whether the client has closed for good."""
        return self.state == CLOSED

    @property
    def outgoing(self) -> int:
        """Bytes accepted but not yet written to the socket."""
        return len(self._out) + self._sending

    def stats(self) -> dict[str, int]:
        """Counters: messages and bytes in and out, socket writes, reconnects, replies
        that came after their request ended, requests in flight, outgoing bytes,
        subscriptions."""
        return {"msgs_in": self.msgs_in, "bytes_in": self.bytes_in,
                "msgs_out": self.msgs_out, "bytes_out": self.bytes_out,
                "writes": self.writes,
                "reconnects": self.reconnects, "late_replies": self.late_replies,
                "requests_in_flight": len(self._pending), "outgoing": self.outgoing,
                "dropped_on_disconnect": self.dropped_on_disconnect,
                "subscriptions": len(self._subs) - 1}

    def new_inbox(self) -> str:
        """A fresh unique subject to receive on (``_INBOX.<random>``)."""
        return f"_INBOX.{secrets.token_hex(11)}"

    def _not_sendable(self) -> NatsError:
        if self.state == CLOSED:
            return ClientClosed("the NATS client is closed")
        if self._closing:
            return ClientClosed("the NATS client is closing")
        return NotConnected(f"not connected to NATS ({self._drop_reason or self.state}); "
                            f"reconnecting")

    # -- sending ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._direct_ok and not self._out:
            # The first message of a loop turn, with the writer idle: send it now,
            # without waiting for the writer's next turn (half a round trip of latency
            # on a sequential request). The rest of this turn's messages are buffered,
            # as the writer is woken to re-arm this only on its next turn.
            self._direct_ok = False
            self.writes += 1
            try:
                sent = self._direct.send(data)  # type: ignore[union-attr]
            except OSError:  # would block, or broken: the writer takes it from here
                sent = 0
            self.bytes_out += sent
            if sent < len(data):
                data = data[sent:]
            else:
                data = b""
        if data:
            self._out += data
        task = self._writer_parked
        if task is not None:
            self._writer_parked = None
            trio.lowlevel.reschedule(task)

    def _check_subject(self, subject: str) -> None:
        """proto.check_subject, remembered: whole subjects, and the prefixes of those
        whose last token is alphanumeric (reply inboxes, ``_INBOX.<id>.<n>``, differ
        only in it: each reply would otherwise be checked afresh). Both bounded."""
        if subject in self._valid_subjects:
            return
        prefix, dot, last = subject.rpartition(".")
        numbered = bool(dot) and last.isalnum()
        if numbered and prefix in self._valid_prefixes:
            return  # a valid prefix, a dot, and a token of letters and digits: valid
        proto.check_subject(subject)
        if numbered:
            if len(self._valid_prefixes) < 1024:
                self._valid_prefixes.add(prefix)
        elif len(self._valid_subjects) < 4096:
            self._valid_subjects.add(subject)

    def publish_nowait(self, subject: str, payload: bytes = b"", *, reply: str | None = None,
                       headers: HeaderInput | None = None) -> None:
        """Send a message now (it is written when the loop next turns). Raises
        :class:`NotConnected` while reconnecting, :class:`OutgoingFull` when the
        outgoing buffer is full, :class:`PayloadTooLarge`, ``ValueError`` for a bad
        subject or header."""
        if reply is not None:
            self._check_subject(reply)
        self._publish(subject, payload, reply, headers)

    def _publish(self, subject: str, payload: bytes, reply: str | None,
                 headers: HeaderInput | None) -> None:
        """publish_nowait, ``reply`` taken as valid (a request's own inbox)."""
        if self.state != CONNECTED or self._closing:
            raise self._not_sendable()
        self._check_subject(subject)
        if headers:
            block = proto.encode_headers(headers)
            size = len(block) + len(payload)
            if reply is None:
                line = b"HPUB %s %d %d\r\n" % (subject.encode(), len(block), size)
            else:
                line = b"HPUB %s %s %d %d\r\n" % (subject.encode(), reply.encode(),
                                                  len(block), size)
            data = line + block + payload + b"\r\n"
        else:
            size = len(payload)
            if reply is None:
                data = b"PUB %s %d\r\n%s\r\n" % (subject.encode(), size, payload)
            else:
                data = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size,
                                                    payload)
        if size > self.max_payload:
            raise PayloadTooLarge(f"a message of {size} bytes to {subject!r} exceeds the "
                                  f"server's max_payload of {self.max_payload} bytes")
        if len(self._out) + self._sending + len(data) > self.max_outgoing and (
                self._out or self._sending):
            raise OutgoingFull(f"the outgoing buffer holds {self.outgoing} bytes; its limit "
                               f"is max_outgoing={self.max_outgoing}")
        self.msgs_out += 1
        self._write(data)

    async def publish(self, subject: str, payload: bytes = b"", *, reply: str | None = None,
                      headers: HeaderInput | None = None) -> None:
        """:meth:`publish_nowait`, waiting for room in the outgoing buffer when it is
        full (back-pressure). A checkpoint."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self.publish_nowait(subject, payload, reply=reply, headers=headers)
                break
            except OutgoingFull:
                await self._room.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until the server has processed everything sent so far (a PING/PONG round
        trip). Raises :class:`RequestTimeout`, :class:`ConnectionLost`,
        :class:`NotConnected`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.state != CONNECTED or self._closing:
            raise self._not_sendable()
        waiter = _Flush()
        self._pongs.append(waiter)
        self._write(proto.PING_BYTES)
        with trio.move_on_after(timeout):
            await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        if not waiter.event.is_set():
            raise RequestTimeout(f"no PONG from the NATS server within {timeout} s")

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(self, subject: str, callback: Callable[[Msg], object] | None = None, *,
                  queue: str | None = None, max_pending_msgs: int = 10_000,
                  max_pending_bytes: int = 64 * 1024 * 1024) -> Subscription:
        """Subscribe to ``subject`` (wildcards allowed), in queue group ``queue`` if given.
        With a ``callback``, the reader calls it synchronously for each message; without,
        iterate the subscription (``async for msg in sub``), whose queue holds at most
        ``max_pending_msgs`` messages and ``max_pending_bytes`` bytes (more are dropped
        and counted in ``sub.dropped``). Takes effect on the server once this is sent:
        ``await flush()`` to be sure. Works while reconnecting: it is sent on
        reconnect."""
        if self.state == CLOSED or self._closing:
            raise self._not_sendable()
        proto.check_subject(subject)
        if queue is not None:
            proto.check_subject(queue, "queue group")
        sub = Subscription(self, next(self._sids), subject, queue, callback,
                           max_pending_msgs, max_pending_bytes)
        self._subs[sub.sid] = sub
        if self.state == CONNECTED:
            self._write(proto.encode_sub(subject, sub.sid, queue))
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is None:
            return
        sub._close()
        if self.state == CONNECTED and not self._closing:
            self._write(proto.encode_unsub(sub.sid))

    def unsubscribe(self, sub: Subscription) -> None:
        """End ``sub`` (also ``sub.unsubscribe()``); messages already on their way are
        dropped."""
        self._unsubscribe(sub)

    # -- requests ---------------------------------------------------------------------------

    def _start_request(self, subject: str, payload: bytes, headers: HeaderInput | None,
                       timeout: float, waiter: _Waiter) -> None:
        if len(self._pending) >= self.max_requests:
            raise OutgoingFull(f"{len(self._pending)} requests are in flight; the limit is "
                               f"max_requests={self.max_requests}")
        reply = self._inbox_prefix + str(next(self._req_ids))
        self._publish(subject, payload, reply, headers)
        waiter.key = reply
        self._pending[reply] = waiter
        deadline = trio.current_time() + timeout
        deadlines = self._deadlines
        heapq.heappush(deadlines, (deadline, reply))
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        if len(deadlines) > 2 * len(self._pending) + 1024:
            pending = self._pending
            self._deadlines = [d for d in deadlines if d[1] in pending]
            heapq.heapify(self._deadlines)

    async def request(self, subject: str, payload: bytes = b"", *,
                      headers: HeaderInput | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Msg:
        """Publish to ``subject`` with a reply subject and return the first reply.
        Raises :class:`NoResponders` at once if nothing subscribes to ``subject``,
        :class:`RequestTimeout`, :class:`ConnectionLost` (the connection dropped: the
        request may or may not have been served), :class:`NotConnected`,
        :class:`OutgoingFull`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waiter = _TaskWaiter(trio.lowlevel.current_task(), subject)
        self._start_request(subject, payload, headers, timeout, waiter)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._pending.pop(waiter.key, None)
            return trio.lowlevel.Abort.SUCCEEDED

        result: Msg = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def request_nowait(self, subject: str, payload: bytes,
                       callback: Callable[[Msg | NatsError], object], *,
                       headers: HeaderInput | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start a request whose outcome is passed to ``callback`` (synchronously, from
        the client's tasks): the reply :class:`Msg`, or the error
        (:class:`NoResponders`, :class:`RequestTimeout`, :class:`ConnectionLost`,
        :class:`ClientClosed`). Raises what :meth:`publish_nowait` raises if it cannot
        be sent at all; then the callback is never called."""
        self._start_request(subject, payload, headers, timeout,
                            _CallbackWaiter(callback, subject))

    def request_waiter(self, subject: str, payload: bytes, waiter: Waiter, *,
                       timeout: float = DEFAULT_TIMEOUT) -> None:
        """:meth:`request_nowait` for a caller that keeps its own record of the request:
        ``waiter`` is called with the outcome as the callback would be, and must never
        raise; its ``key`` is set to the request's inbox, and its ``subject`` (set by
        the caller: ``subject``) names it in errors. One object per request instead of
        two."""
        self._start_request(subject, payload, None, timeout, waiter)

    def _on_reply(self, msg: Msg) -> None:
        waiter = self._pending.pop(msg.subject, None)
        if waiter is None:
            self.late_replies += 1
            return
        h = msg.headers
        if h is not None and h.status == proto.STATUS_NO_RESPONDERS and not msg.payload:
            waiter(NoResponders(waiter.subject))
        else:
            waiter(msg)

    def _expire(self, now: float) -> None:
        deadlines, pending = self._deadlines, self._pending
        while deadlines and deadlines[0][0] <= now:
            _, reply = heapq.heappop(deadlines)
            waiter = pending.pop(reply, None)
            if waiter is not None:
                waiter(RequestTimeout(f"no reply to a request to {waiter.subject!r} in time"))

    async def _timer(self) -> None:
        # Deadlines of requests already answered stay in the heap until they pass; the
        # timer wakes at most once per TIMER_GRANULARITY to pop them (a timeout may be
        # that late), not once per request.
        now = trio.current_time()
        while True:
            with trio.CancelScope() as scope:
                next_deadline = self._deadlines[0][0] if self._deadlines else math.inf
                scope.deadline = max(next_deadline, now + TIMER_GRANULARITY)
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            self._expire(now)

    # -- receiving ----------------------------------------------------------------------------

    def _handle(self, events: list[proto.Event]) -> bool:
        """Act on parsed events; False once the connection has to go."""
        subs = self._subs
        for ev in events:
            if type(ev) is Msg:
                sub = subs.get(ev.sid)
                if sub is None:  # unsubscribed; it was on its way
                    continue
                self.msgs_in += 1
                try:
                    sub.deliver(ev)
                except Exception as exc:
                    log.error("nats_callback_failed", subject=ev.subject, sid=ev.sid,
                              what="subscription callback", exc_info=exc)
            elif ev is proto.PING:
                self._write(proto.PONG_BYTES)
            elif ev is proto.PONG:
                self._pings_out = 0
                if self._pongs:
                    waiter = self._pongs.popleft()
                    if waiter is not None:
                        waiter.event.set()
                    else:
                        self._pings_unanswered -= 1
            elif type(ev) is Info:
                self._on_info(ev.options)
            elif type(ev) is Err:
                if not self._on_err(ev.text):
                    return False
            elif type(ev) is Fatal:
                log.error("nats_protocol_error", reason=ev.reason, server=self.connected_url)
                self._drop(f"the server broke the protocol: {ev.reason}")
                return False
        return True

    def _on_info(self, info: dict[str, Any]) -> None:
        self.server_info = info
        mp = info.get("max_payload")
        if type(mp) is int and mp > 0:
            self.max_payload = min(mp, self._max_payload_cap)
            if self._conn is not None:
                self._conn.parser.max_payload = self.max_payload
        if info.get("ldm"):
            log.warning("nats_lame_duck", server=self.connected_url)

    def _on_err(self, text: str) -> bool:
        log.warning("nats_server_error", error=text, server=self.connected_url)
        if text.lower().startswith("permissions violation"):
            return True
        self._drop(f"the server reported: {text}")
        return False

    async def _reader(self, conn: _Conn) -> None:
        stream, parser = conn.stream, conn.parser
        try:
            if conn.leftover and not self._handle(conn.leftover):
                return
            while True:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    self._drop("the server closed the connection")
                    return
                self.bytes_in += len(data)
                self._pings_out = 0
                if not self._handle(parser.feed(data)):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._drop(f"reading from the server failed: {exc!r}")

    async def _writer(self, conn: _Conn) -> None:
        stream = conn.stream
        if self.direct_send and isinstance(stream, trio.SocketStream):
            # A second handle on the same socket for the synchronous first send of a
            # turn (see _write); used only while this task is parked, never during its
            # send_all, so the bytes keep their order.
            self._direct = socket.socket(fileno=os.dup(stream.socket.fileno()))
        try:
            while True:
                if not self._out:
                    self._writer_parked = trio.lowlevel.current_task()
                    self._direct_ok = self._direct is not None

                    def abort(_: Any) -> trio.lowlevel.Abort:
                        self._writer_parked = None
                        self._direct_ok = False
                        return trio.lowlevel.Abort.SUCCEEDED
                    await trio.lowlevel.wait_task_rescheduled(abort)
                    self._direct_ok = False
                    continue
                data, self._out = self._out, bytearray()
                self._sending = len(data)
                self.writes += 1
                await stream.send_all(data)
                self.bytes_out += len(data)
                self._sending = 0
                if self._room:
                    self._room.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._drop(f"writing to the server failed: {exc!r}")
        finally:
            self._direct_ok = False
            if self._direct is not None:
                self._direct.close()
                self._direct = None

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            if self._pings_out >= self.max_pings_out:
                self._drop(f"stale connection: nothing received through {self._pings_out} "
                           f"PINGs sent {self.ping_interval} s apart")
                return
            if self._pings_unanswered >= MAX_UNANSWERED_PINGS:
                # Data keeps coming (so _pings_out resets) but PONGs never do: a broken
                # server, which must not make the PONG queue grow without bound.
                self._drop(f"the server left {self._pings_unanswered} PINGs unanswered")
                return
            self._pings_out += 1
            self._pings_unanswered += 1
            self._pongs.append(None)
            self._write(proto.PING_BYTES)

    def _drop(self, reason: str) -> None:
        if self._drop_reason is None and self._conn_scope is not None:
            self._drop_reason = reason
            self._conn_scope.cancel()

    # -- connecting -----------------------------------------------------------------------------

    def _connect_options(self, server: _Server, tls: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": tls, "lang": LANG,
            "version": VERSION, "protocol": 1, "echo": True, "headers": True,
            "no_responders": True}
        if self._name:
            opts["name"] = self._name
        user = server.user or self._user
        password = server.password if server.user else self._password
        token = server.token or self._token
        if user is not None:
            opts["user"] = user
            opts["pass"] = password or ""
        if token is not None:
            opts["auth_token"] = token
        return opts

    async def _handshake(self, server: _Server) -> _Conn:
        parser = proto.Parser(**self._limits)
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(server.host, server.port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {server}: {exc}") from exc
        try:
            info_ev: Info | None = None
            events: list[proto.Event] = []
            while info_ev is None:
                if not events:
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        raise ConnectError(f"{server} closed the connection before INFO")
                    events = parser.feed(data)
                    continue
                ev = events.pop(0)
                if type(ev) is not Info:
                    raise ConnectError(f"expected INFO from {server}, got {ev!r}")
                info_ev = ev
            info = info_ev.options
            want_tls = server.tls or self._tls is not None
            if info.get("tls_required") and not want_tls:
                raise ConnectError(f"{server} requires TLS: pass tls=ssl.create_default_context"
                                   f"(cafile=...) or use a tls:// URL")
            if want_tls:
                if not (info.get("tls_required") or info.get("tls_available")):
                    raise ConnectError(f"TLS was asked for but {server} does not offer it")
                ctx = self._tls or ssl.create_default_context()
                stream = trio.SSLStream(stream, ctx,
                                        server_hostname=self._tls_hostname or server.host)
                await stream.do_handshake()
            if info.get("auth_required") and not (
                    server.user or server.token or self._user or self._token):
                raise ConnectError(f"{server} requires authentication: pass user= and "
                                   f"password=, token=, or put them in the URL")
            mp = info.get("max_payload")
            if type(mp) is int and mp > 0:
                parser.max_payload = min(mp, self._max_payload_cap)
            subs = [s for s in self._subs.values()]
            batch = [proto.encode_connect(self._connect_options(server, want_tls))]
            batch += [proto.encode_sub(s.subject, s.sid, s.queue_group) for s in subs]
            batch.append(proto.PING_BYTES)
            await stream.send_all(b"".join(batch))
            leftover: list[proto.Event] = []
            while True:
                if not events:
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        raise ConnectError(f"{server} closed the connection during the "
                                           f"handshake")
                    events = parser.feed(data)
                    continue
                ev = events.pop(0)
                if ev is proto.PONG:
                    break
                if type(ev) is Err:
                    raise ConnectError(f"{server} refused the connection: {ev.text}")
                if type(ev) is Fatal:
                    raise ConnectError(f"{server} broke the protocol: {ev.reason}")
                if type(ev) is Info:
                    info = ev.options
                leftover.append(ev)
            leftover += events
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise
        return _Conn(server, stream, parser, info, leftover, {s.sid for s in subs})

    async def _connect_any(self, attempt: int) -> _Conn:
        server = self._servers[attempt % len(self._servers)]
        try:
            with trio.fail_after(self.connect_timeout):
                return await self._handshake(server)
        except trio.TooSlowError:
            raise ConnectError(f"no answer from {server} within {self.connect_timeout} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                ssl.SSLError) as exc:
            raise ConnectError(f"the connection to {server} failed: {exc!r}") from exc

    def _connected(self, conn: _Conn) -> None:
        self._conn = conn
        self.state = CONNECTED
        self._drop_reason = None
        self._pings_out = 0
        self.connected_url = str(conn.server)
        self._on_info(conn.info)
        # Subscriptions made or ended while the handshake ran.
        for sid, sub in self._subs.items():
            if sid not in conn.sent_sids:
                self._write(proto.encode_sub(sub.subject, sid, sub.queue_group))
        for sid in conn.sent_sids:
            if sid not in self._subs:
                self._write(proto.encode_unsub(sid))

    async def connect(self) -> None:
        """Connect to the first server that answers (each is tried once, within
        ``connect_timeout``). Raises :class:`ConnectError` with every server's error."""
        errors = []
        for i in range(len(self._servers)):
            try:
                conn = await self._connect_any(i)
            except ConnectError as exc:
                errors.append(str(exc))
                continue
            self._connected(conn)
            log.info("nats_connected", server=self.connected_url,
                     server_id=conn.info.get("server_id"), version=conn.info.get("version"))
            return
        raise ConnectError("; ".join(errors))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the connected client until it closes: start it with ``nursery.start``
        after :meth:`connect`."""
        if self._conn is None:
            raise RuntimeError("call `await client.connect()` before running it")
        try:
            with trio.CancelScope() as runner:
                self._runner_scope = runner
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._timer)
                    task_status.started()
                    await self._supervise()
                    nursery.cancel_scope.cancel()
        finally:
            if self.state != CLOSED:  # cancelled from outside: still fail what waits
                self._closing = True
                self._finish(None)

    async def _supervise(self) -> None:
        conn: _Conn | None = self._conn
        while conn is not None:
            try:
                async with trio.open_nursery() as nursery:
                    self._conn_scope = nursery.cancel_scope
                    if self._drop_reason is not None:  # dropped before the tasks started
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(self._reader, conn)
                    nursery.start_soon(self._writer, conn)
                    nursery.start_soon(self._pinger)
            finally:
                self._conn_scope = None
                self._conn = None
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(conn.stream)
            reason = self._drop_reason or "closed"
            if self._closing:
                return
            self._lost(reason)
            conn = await self._reconnect(reason)

    def _lost(self, reason: str) -> None:
        self.state = RECONNECTING
        self.dropped_on_disconnect += len(self._out)
        self._out = bytearray()
        self._sending = 0
        self._fail_waiters(ConnectionLost(f"the connection to NATS was lost: {reason}"))
        log.warning("nats_disconnected", reason=reason, server=self.connected_url)
        self._notify(self._disconnect_listeners, "on_disconnect", reason)

    def _fail_waiters(self, error: NatsError) -> None:
        pending, self._pending = self._pending, {}
        self._deadlines = []
        for waiter in pending.values():
            waiter(error)
        pongs, self._pongs = self._pongs, deque()
        self._pings_unanswered = 0
        for flush in pongs:
            if flush is not None:
                flush.error = error
                flush.event.set()
        self._room.unpark_all()

    async def _reconnect(self, reason: str) -> _Conn | None:
        if not self._reconnect_enabled:
            self._finish(ConnectionLost(f"the connection to NATS was lost: {reason}"))
            return None
        started = trio.current_time()
        attempt = 0
        while not self._closing:
            if (self.max_reconnect_attempts is not None
                    and attempt >= self.max_reconnect_attempts):
                error = ConnectionLost(f"gave up reconnecting to NATS after {attempt} "
                                       f"attempts; the connection was lost: {reason}")
                log.error("nats_gave_up", attempts=attempt, reason=reason)
                self._finish(error)
                return None
            wait = min(self.reconnect_max_wait, self.reconnect_wait * 2 ** min(attempt, 30))
            await trio.sleep(wait * (0.5 + random.random() / 2))
            try:
                conn = await self._connect_any(attempt)
            except ConnectError as exc:
                log.debug("nats_reconnect_failed", attempt=attempt, error=str(exc))
                attempt += 1
                continue
            if self._closing:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(conn.stream)
                return None
            self._connected(conn)
            self.reconnects += 1
            log.info("nats_reconnected", server=self.connected_url, attempts=attempt + 1,
                     down_seconds=round(trio.current_time() - started, 3))
            self._notify(self._reconnect_listeners, "on_reconnect")
            return conn
        return None

    def _finish(self, error: BaseException | None) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._close_error = error
        self._out = bytearray()
        self._fail_waiters(ClientClosed("the NATS client is closed") if error is None
                           else ClientClosed(f"the NATS client closed: {error}"))
        for sub in list(self._subs.values()):
            sub._close()
        log.info("nats_closed", error=None if error is None else str(error))
        self._closed_event.set()
        self._notify(self._close_listeners, "on_close", error)
        if self._runner_scope is not None:
            self._runner_scope.cancel()

    async def close(self, timeout: float = 2.0) -> None:
        """Send what is buffered (a flush, for at most ``timeout`` seconds), close the
        connection, fail what still waits with :class:`ClientClosed`, end every
        ``async for`` over a subscription. Idempotent."""
        if self.state == CLOSED or self._closing:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):
            if self.state == CONNECTED:
                with trio.move_on_after(timeout):
                    try:
                        await self.flush(timeout)
                    except NatsError:
                        pass
            self._closing = True
            self._drop("closed by the client")
            self._finish(None)

    async def wait_closed(self) -> BaseException | None:
        """Wait until the client closes; the error it closed with, or None."""
        await self._closed_event.wait()
        return self._close_error


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_client(servers: str | Sequence[str] = "nats://127.0.0.1:4222",
                      **options: Any) -> AsyncIterator[Client]:
    """Connect (:class:`ConnectError` if no server answers), run the client for the
    body, close it after. ``options`` are :class:`Client`'s. Errors of the body reach
    the caller bare, not in an ExceptionGroup."""
    client = Client(servers, **options)
    await client.connect()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                await client.close()
    except BaseExceptionGroup as group:
        bare = _unwrap(group)
        if bare is group:
            raise
        raise bare from None

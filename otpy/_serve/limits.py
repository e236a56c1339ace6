"""The bounds every connection of a node's endpoints keeps (``otpy.EndpointLimits`` for
MessagePack-RPC, ``otpy.HttpLimits`` for HTTP)."""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass

from .._protocol import json_rules
from .._protocol.msgpack_rpc import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_OBJECTS,
    READ_SIZE,
)

# accept() failing for want of descriptors or memory: both endpoints survive these
# (they log, wait a little and accept again); any other error is a bug.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


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
    larger request gets the error ``["FrameTooLarge", ...]`` (its bytes are dropped as
    they arrive, and the connection goes on); a message without a msgid to answer by
    closes the connection. The node never buffers more than ``max_frame`` plus one
    read (16 KiB) of a message.

    ``max_objects`` (default 65536, at least 16384): the most objects (arrays, maps,
    strings, numbers...) one message may decode to, so that what a message takes in
    memory is bounded whatever its shape (about 100 bytes per object at worst, beside
    its bytes); past it, ``["FrameTooLarge", ...]`` too.

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

    ``max_connections`` (default 512): connections the client endpoint holds at once,
    lowered at start so that the process's descriptor limit (``ulimit -n``) keeps room
    for the admin endpoint and 64 more. At the cap, a new connection closes the one
    idle the longest; when none is idle, the new one is closed at once.

    ``max_admin_connections`` (default 16): the same for the admin endpoint, which has
    its own cap, so that clients never lock the operator out.

    ``idle_timeout`` (seconds, default 60.0; None: never): a connection that completes
    no message for this long while no call of it is in flight and no reply is owed is
    closed (checked every quarter of it). An unfinished message does not count as
    activity. ``otpy.connect`` reconnects by itself on its next call.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    max_depth: int = DEFAULT_MAX_DEPTH
    max_inflight: int = 256
    max_send_buffer: int = 1 << 20
    call_timeout: float = 5.0
    max_objects: int = DEFAULT_MAX_OBJECTS
    max_connections: int = 512
    max_admin_connections: int = 16
    idle_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        for field in ("max_frame", "max_depth", "max_inflight", "max_send_buffer",
                      "max_objects", "max_connections", "max_admin_connections"):
            value = getattr(self, field)
            if type(value) is not int:
                raise TypeError(f"EndpointLimits({field}=...) takes an int, got {value!r}")
            if value < 1:
                raise ValueError(f"EndpointLimits({field}=...) must be at least 1, got "
                                 f"{value!r}")
        if self.max_objects < READ_SIZE:
            raise ValueError(f"EndpointLimits(max_objects=...) must be at least {READ_SIZE} "
                             f"(what one read of {READ_SIZE} bytes may hold), got "
                             f"{self.max_objects!r}")
        for field in ("call_timeout", "idle_timeout"):
            timeout = getattr(self, field)
            if timeout is None and field == "idle_timeout":
                continue
            if type(timeout) is not float and type(timeout) is not int:
                raise TypeError(f"EndpointLimits({field}=...) takes seconds as a float, "
                                f"got {timeout!r}")
            if not timeout > 0:
                raise ValueError(f"EndpointLimits({field}=...) must be more than 0 "
                                 f"seconds, got {timeout!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpLimits:
    """The bounds of a node's HTTP endpoint, so that no client can make the node
    buffer, or wait, without limit.

    ::

        limits = otpy.HttpLimits(max_body=64 * 1024, max_connections=100)

    Limits
    ------
    ``max_head`` (bytes, default 16 KiB): the request line and headers; past it, 431.
    ``max_headers`` (default 64): headers in one request; past it, 431.
    ``max_body`` (bytes, default 1 MiB): a request's body; past it, 413, refused from
    its ``Content-Length`` before any of it is read.
    ``max_objects`` (default 65536) and ``max_depth`` (default 32): values in a decoded
    request body and their nesting; past them, 413 ``TooManyObjects`` and 400
    ``TooDeep``.
    ``max_connections`` (default 256): connections served at once. One past it is
    accepted, answered 503 ``TooManyConnections`` with ``Retry-After`` and closed: a
    client learns why at once, rather than waiting unanswered in the listen queue, and
    the node holds its descriptor only for that answer.
    ``max_pipelined`` (default 64): requests of one connection parsed and not yet
    answered; past it the connection parses no further until they are answered.
    ``max_send_buffer`` (bytes, default 1 MiB): responses made and not yet taken by the
    client; past it the connection stops serving until the client reads.
    ``read_timeout`` (seconds, default 10): a request must arrive whole (line, headers,
    body) within this time of its first byte; else 408 and the connection closes.
    ``idle_timeout`` (seconds, default 15): a keep-alive connection with no request in
    progress is closed after this time. Both timeouts are checked every quarter of the
    shorter one (at most every second), so they are honoured within that much.
    ``write_timeout`` (seconds, default 10): a client must take the responses pending
    for it within this time; else the connection closes.
    ``call_timeout`` (seconds, default 5.0): a call's timeout when the request names
    none; ``max_call_timeout`` (default 60): the largest ``?timeout=`` accepted.
    ``drain_grace`` (seconds, default 5): on shutdown, how long requests in progress
    may take to finish before their connections are closed.
    ``metrics_top_k`` (default 20): servers with per-server series in ``/metrics``
    (those with the longest mailboxes, the busiest, the most crashed), so that
    cardinality stays bounded.
    ``max_streams`` (default 16): dashboards open at once (live streams of server-sent
    events); one more is answered 503 ``TooManyStreams``.
    """

    max_head: int = 16 * 1024
    max_headers: int = 64
    max_body: int = 1 << 20
    max_objects: int = json_rules.DEFAULT_MAX_OBJECTS
    max_depth: int = json_rules.DEFAULT_MAX_DEPTH
    max_connections: int = 256
    max_pipelined: int = 64
    max_send_buffer: int = 1 << 20
    read_timeout: float = 10.0
    idle_timeout: float = 15.0
    write_timeout: float = 10.0
    call_timeout: float = 5.0
    max_call_timeout: float = 60.0
    drain_grace: float = 5.0
    metrics_top_k: int = 20
    max_streams: int = 16

    def __post_init__(self) -> None:
        for field in ("max_head", "max_headers", "max_body", "max_objects", "max_depth",
                      "max_connections", "max_pipelined", "max_send_buffer",
                      "metrics_top_k", "max_streams"):
            value = getattr(self, field)
            if type(value) is not int:
                raise TypeError(f"HttpLimits({field}=...) takes an int, got {value!r}")
            if value < 1:
                raise ValueError(f"HttpLimits({field}=...) must be at least 1, got "
                                 f"{value!r}")
        for field in ("read_timeout", "idle_timeout", "write_timeout", "call_timeout",
                      "max_call_timeout", "drain_grace"):
            value = getattr(self, field)
            if type(value) is not float and type(value) is not int:
                raise TypeError(f"HttpLimits({field}=...) takes seconds as a float, got "
                                f"{value!r}")
            if not 0 < value < math.inf:
                raise ValueError(f"HttpLimits({field}=...) must be more than 0 seconds "
                                 f"and finite, got {value!r}")
        if self.call_timeout > self.max_call_timeout:
            raise ValueError(f"HttpLimits(call_timeout={self.call_timeout!r}) exceeds "
                             f"max_call_timeout={self.max_call_timeout!r}")

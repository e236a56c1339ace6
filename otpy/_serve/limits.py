"""The bounds every connection of a node's endpoints keeps (``otpy.EndpointLimits``)."""

from __future__ import annotations

from dataclasses import dataclass

from .._protocol.msgpack_rpc import DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME


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

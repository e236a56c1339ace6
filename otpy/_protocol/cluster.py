"""What one otpy node says to another over NATS: sans-io encoding and decoding.

Every payload on an otpy subject is one msgpack array that starts with the protocol's
magic and the cluster's name, so that a message from another cluster, or anything that
is not otpy's, is recognised and dropped (with an event) instead of acted on::

    ["otpy/1", cluster, "call",  target, request, vsn, timeout, level]  (a request)
    ["otpy/1", cluster, "cast",  target, message]
    ["otpy/1", cluster, "send",  target, message]                 (to handle_info)
    ["otpy/1", cluster, "mon",   target, ref_id, watcher_node]    (a NATS request)
    ["otpy/1", cluster, "demon", ref_id, watcher_node]
    ["otpy/1", cluster, "down",  ref_id, pid, reason]             (to the watcher's node)
    ["otpy/1", cluster, "ping"]                                   (a NATS request)

A reply (to call, mon and ping) is ``[0, value]`` or ``[1, [kind, message]]``. A call's
``level`` is how many cluster-wide releases its sender had applied (see
``otpy._cluster.releases``).

Targets are a server name (``str``) or a pid (msgpack extension 1, as on the
MessagePack-RPC wire). Values are what msgpack carries, with arrays decoded as tuples,
so a request reaches ``handle_call`` in the shape it has in process; a value msgpack
cannot carry is refused when it is encoded (:class:`Unsendable`), never half sent.
A stop reason that is an exception crosses as ``{"$error": [type name, message]}``.

What must stay true: :func:`decode` never raises. Anything that is not a well-formed
message of this cluster comes back as a :class:`Bad` naming what was wrong. Decoding
is bounded: the NATS client bounds a payload's bytes; the unpacker bounds the length
of every array, map, string and binary to the payload's size and refuses nesting
deeper than :data:`MAX_DEPTH`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]

from .._core.names import Pid
from .._exceptions import remote_error
from .msgpack_rpc import Uncountable, check_objects, decode_ext, encode_ext

MAGIC = "otpy/1"
MAX_DEPTH = 32
MAX_OBJECTS = 65_536  # objects of one message, at most (as the wire's max_objects)
WALK_ABOVE = 4096  # bytes: a payload larger than this is walked before it is decoded

OK, ERROR = 0, 1


class Unsendable(TypeError):
    """A request, message, reply or reason that msgpack cannot carry to another node."""


class Bad(NamedTuple):
    """A payload that is not a well-formed message of this cluster: dropped."""

    reason: str


class Call(NamedTuple):
    target: str | Pid
    request: Any
    vsn: str | None
    timeout: float | None
    level: int = 0


class Cast(NamedTuple):
    target: str | Pid
    message: Any
    info: bool  # send (handle_info) rather than cast


class Monitor(NamedTuple):
    target: str | Pid
    ref: int
    watcher_node: str


class Demonitor(NamedTuple):
    ref: int
    watcher_node: str


class Down(NamedTuple):
    ref: int
    pid: Pid | str
    reason: Any


class Ping(NamedTuple):
    pass


Message = Call | Cast | Monitor | Demonitor | Down | Ping


def _encode_reason(reason: Any) -> Any:
    if isinstance(reason, BaseException):
        return {"$error": (type(reason).__name__, str(reason))}
    if isinstance(reason, tuple):
        return tuple(_encode_reason(r) for r in reason)
    return reason


def decode_reason(reason: Any) -> Any:
    """A stop reason as it crossed: an exception comes back as a ``RemoteError``."""
    if type(reason) is dict and len(reason) == 1 and "$error" in reason:
        error = reason["$error"]
        if type(error) is tuple and len(error) == 2:
            return remote_error(str(error[0]), str(error[1]))
        return remote_error("Error", repr(error)[:200])
    if type(reason) is tuple:
        return tuple(decode_reason(r) for r in reason)
    return reason


def _packb(obj: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True, default=encode_ext)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Unsendable(f"cannot be sent to another node: {exc}; send what msgpack "
                         f"carries (None, bool, int, float, str, bytes, lists/tuples, "
                         f"dicts and otpy.Pid)") from None
    return data


def encode_call(cluster: str, target: Any, request: Any, vsn: str | None,
                timeout: float | None, level: int) -> bytes:
    """``encode(cluster, Call(...))`` without building the Call (every remote call
    comes through here)."""
    try:
        data: bytes = msgpack.packb((MAGIC, cluster, "call", target, request, vsn, timeout,
                                     level), use_bin_type=True, default=encode_ext)
    except (TypeError, ValueError, OverflowError):
        return _packb((MAGIC, cluster, "call", target, request, vsn, timeout, level))
    return data


def encode(cluster: str, message: Message) -> bytes:
    """The payload for ``message`` (:class:`Unsendable` if msgpack cannot carry it)."""
    if isinstance(message, Call):
        return encode_call(cluster, *message)
    if isinstance(message, Cast):
        kind = "send" if message.info else "cast"
        return _packb((MAGIC, cluster, kind, message.target, message.message))
    if isinstance(message, Monitor):
        return _packb((MAGIC, cluster, "mon", *message))
    if isinstance(message, Demonitor):
        return _packb((MAGIC, cluster, "demon", *message))
    if isinstance(message, Down):
        try:
            return _packb((MAGIC, cluster, "down", message.ref, message.pid,
                           _encode_reason(message.reason)))
        except Unsendable:  # a reason msgpack cannot carry still says what it was
            return _packb((MAGIC, cluster, "down", message.ref, message.pid,
                           repr(message.reason)[:500]))
    return _packb((MAGIC, cluster, "ping"))


def encode_reply(value: Any) -> bytes:
    """``[0, value]`` (:class:`Unsendable` if msgpack cannot carry it)."""
    return _packb((OK, value))


def encode_error(kind: str, message: str) -> bytes:
    """``[1, [kind, message]]``."""
    return _packb((ERROR, (kind, message[:2000])))


def _unpack(payload: bytes) -> Any:
    n = len(payload)
    if n > WALK_ABOVE:
        # A large payload is counted before it is built: at most MAX_OBJECTS objects
        # (a small one cannot hold more than WALK_ABOVE).
        check_objects(payload, MAX_OBJECTS)
    return msgpack.unpackb(payload, use_list=False, raw=False, strict_map_key=False,
                           ext_hook=decode_ext, max_str_len=n,
                           max_bin_len=n, max_array_len=n, max_map_len=n, max_ext_len=n)


def decode_value(payload: bytes) -> Any:
    """One msgpack value from another node (a child spec, say), within the bounds of a
    message: at most MAX_OBJECTS objects, counted before they are built, and MAX_DEPTH
    levels. ValueError saying which bound it broke, or that it is not msgpack."""
    try:
        obj = _unpack(payload)
    except Uncountable as exc:
        raise ValueError(f"refused before decoding: {str(exc)[:200]}") from None
    except Exception as exc:
        raise ValueError(f"not msgpack ({type(exc).__name__})") from None
    if _too_deep(obj, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return obj


def _too_deep(obj: Any, limit: int) -> bool:
    if limit <= 0:
        return True
    if type(obj) is dict:
        obj = (*obj.keys(), *obj.values())
    elif type(obj) is not tuple:
        return False
    for x in obj:  # a loop, not any(genexpr): every message and reply comes through
        t = type(x)
        if (t is tuple or t is dict) and _too_deep(x, limit - 1):
            return True
    return False


def _address(value: Any) -> bool:
    return type(value) is str or type(value) is Pid


_ARITY = {"call": 8, "cast": 5, "send": 5, "mon": 6, "demon": 5, "down": 6, "ping": 3}


def decode(cluster: str, payload: bytes) -> Message | Bad:
    """The message in ``payload``, or :class:`Bad` saying why it is not one; never
    raises."""
    try:
        obj = _unpack(payload)
    except Uncountable as exc:
        return Bad(f"refused before decoding: {str(exc)[:200]}")
    except Exception as exc:
        return Bad(f"not msgpack ({type(exc).__name__}: {str(exc)[:100]})")
    if type(obj) is not tuple or len(obj) < 3 or obj[0] != MAGIC:
        return Bad("not an otpy message (no otpy/1 header)")
    if obj[1] != cluster:
        return Bad(f"a message of cluster {str(obj[1])[:80]!r}, not of {cluster!r}")
    kind = obj[2]
    if _ARITY.get(kind) != len(obj):
        return Bad(f"a {str(kind)[:40]!r} message of {len(obj)} fields")
    if _too_deep(obj, MAX_DEPTH):
        return Bad(f"nested deeper than {MAX_DEPTH} levels")
    f = obj[3:]
    if kind == "call":
        timeout = f[3]
        if (not _address(f[0]) or not (f[2] is None or type(f[2]) is str)
                or not (timeout is None or type(timeout) in (int, float))
                or type(f[4]) is not int):
            return Bad("a call needs (target, request, vsn, timeout, level)")
        return Call(f[0], f[1], f[2], None if timeout is None else float(timeout), f[4])
    if kind in ("cast", "send"):
        if not _address(f[0]):
            return Bad(f"a {kind} needs a server name or pid as its target")
        return Cast(f[0], f[1], kind == "send")
    if kind == "mon":
        if not (_address(f[0]) and type(f[1]) is int and type(f[2]) is str):
            return Bad("a monitor needs (target, ref, watcher node)")
        return Monitor(f[0], f[1], f[2])
    if kind == "demon":
        if not (type(f[0]) is int and type(f[1]) is str):
            return Bad("a demonitor needs (ref, watcher node)")
        return Demonitor(f[0], f[1])
    if kind == "down":
        if not (type(f[0]) is int and _address(f[1])):
            return Bad("a down needs (ref, pid, reason)")
        return Down(f[0], f[1], decode_reason(f[2]))
    return Ping()


def decode_reply(payload: bytes) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, (kind, message))``; a payload that is neither is
    ``(False, ("BadReply", why))``. Never raises."""
    try:
        obj = _unpack(payload)
    except Uncountable as exc:
        return False, ("BadReply", f"refused before decoding: {str(exc)[:200]}")
    except Exception as exc:
        return False, ("BadReply", f"not msgpack: {type(exc).__name__}")
    if type(obj) is not tuple or len(obj) != 2 or obj[0] not in (OK, ERROR):
        return False, ("BadReply", "not an otpy reply")
    if _too_deep(obj, MAX_DEPTH):
        return False, ("BadReply", f"a reply nested deeper than {MAX_DEPTH} levels")
    if obj[0] == OK:
        return True, obj[1]
    err = obj[1]
    if type(err) is not tuple or len(err) != 2:
        return False, ("BadReply", "an error reply without (kind, message)")
    return False, (str(err[0]), str(err[1]))

"""MessagePack-RPC framing and codec, and the admin handshake's HMAC: no I/O, no trio.

The wire is plain MessagePack-RPC, so any client of that protocol can reach a node::

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]     error is None or [kind, message]
    notification  [2, method, params]

:class:`Decoder` turns the bytes a connection receives into requests (the decoded
``(0, msgid, method, params)`` tuple itself, its shape checked), :class:`Notification`,
:class:`Invalid` (a message whose msgid is known but which cannot be served: it gets an
error reply) and :class:`Fatal` (the stream cannot be trusted any more: the connection
must close). Arrays decode as tuples, so a request
made over the wire reaches ``handle_call`` in the shape the same request has in process.

What must stay true: a frame larger than ``max_frame`` bytes never makes the decoder
buffer more than ``max_frame`` plus one read; nesting deeper than ``max_depth`` is
refused (deeper than msgpack's own stack limit it is fatal, below it an error reply).

The admin handshake: the node sends ``[2, "challenge", [nonce]]``; the client answers
``[0, msgid, "auth", [HMAC-SHA256(cookie, nonce)]]``; the node compares in constant
time. The cookie never crosses the wire and a fresh nonce per connection defeats replay.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]

from .._core.names import Pid

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2

DEFAULT_MAX_FRAME = 1 << 20  # bytes in one message
DEFAULT_MAX_DEPTH = 32  # nested arrays/maps in one message, the message itself included
READ_SIZE = 1 << 16  # the most bytes fed at once

NONCE_SIZE = 32
MAX_MSGID = (1 << 32) - 1


# A well-formed request is passed on as msgpack decoded it, the tuple
# ``(0, msgid, method, params)``, with its shape checked: building another object per
# request would cost a tenth of the endpoint's time. ``type(msg) is tuple`` tells it
# from the other messages, which are named tuples.
Request = tuple[int, int, str, tuple[Any, ...]]


class Notification(NamedTuple):
    """``[2, method, params]``: served without a reply."""

    method: str
    params: tuple[Any, ...]


class Invalid(NamedTuple):
    """A message with a known msgid that cannot be served: reply ``[kind, message]``."""

    msgid: int
    kind: str
    message: str


class Fatal(NamedTuple):
    """The stream is broken or carries something that is not a request: close it."""

    reason: str


Message = Request | Notification | Invalid | Fatal


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """True if ``obj`` nests arrays/maps more than ``limit`` levels deep."""
    # Plain loops, not any(<genexpr>): this runs on every request.
    if limit <= 0:
        return True
    if type(obj) is dict:
        obj = (*obj.keys(), *obj.values())
    for x in obj:
        t = type(x)
        if (t is tuple or t is dict) and _depth_exceeds(x, limit - 1):
            return True
    return False


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


class Decoder:
    """A streaming decoder for one connection: :meth:`feed` it the bytes received, get
    back the messages completed by them, in order.

    ::

        decoder = Decoder()
        [msg] = decoder.feed(msgpack.packb([0, 1, "call", ["c", "incr"]]))
        assert msg == (0, 1, "call", ("c", "incr"))
    """

    __slots__ = ("_fed", "_unpacker", "broken", "max_depth", "max_frame")

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_frame = max_frame
        self.max_depth = max_depth
        self.broken = False
        self._fed = 0
        self._unpacker = msgpack.Unpacker(
            use_list=False, raw=False, strict_map_key=False, ext_hook=decode_ext,
            max_buffer_size=max_frame + READ_SIZE, max_array_len=max_frame,
            max_map_len=max_frame // 2)

    def feed(self, data: bytes) -> list[Message]:
        """Decode what ``data`` completes. A :class:`Fatal` is always the last item; after
        it the decoder refuses everything (the connection must close)."""
        if self.broken:
            return [Fatal("the stream was already broken")]
        if len(data) > READ_SIZE:
            out: list[Message] = []
            for i in range(0, len(data), READ_SIZE):
                out.extend(self.feed(data[i:i + READ_SIZE]))
                if self.broken:
                    break
            return out
        up = self._unpacker
        try:
            up.feed(data)
        except msgpack.BufferFull:
            return self._fatal(f"a frame exceeds the limit of {self.max_frame} bytes")
        self._fed += len(data)
        out = []
        append = out.append
        tell = up.tell
        max_frame, max_depth = self.max_frame, self.max_depth
        start = tell()
        # No frame completed by this feed can be larger than what is buffered now: when
        # that is within max_frame (nearly always), frames need not be measured one by
        # one.
        sized = self._fed - start > max_frame
        inner = max_depth - 2  # the levels left below [0, msgid, method, params]
        size = 0
        try:
            for obj in up:
                if sized:
                    end = tell()
                    size, start = end - start, end
                # The fast path: a well-formed request, which nearly every frame is; it
                # is passed on as decoded, with no copy.
                if (type(obj) is tuple and len(obj) == 4 and obj[0] == REQUEST
                        and type(obj[1]) is int and type(obj[2]) is str
                        and type(obj[3]) is tuple and 0 <= obj[1] <= MAX_MSGID
                        and size <= max_frame and inner > 0):
                    for x in obj[3]:
                        t = type(x)
                        if (t is tuple or t is dict) and _depth_exceeds(x, inner):
                            break
                    else:
                        append(obj)
                        continue
                msg = self._classify(obj, size)
                append(msg)
                if type(msg) is Fatal:
                    self.broken = True
                    return out
        except Exception as exc:  # FormatError, StackError, UnicodeDecodeError, ...
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            out.extend(self._fatal(f"malformed msgpack ({detail})"))
            return out
        if self._fed - tell() > max_frame:
            out.extend(self._fatal(f"a frame exceeds the limit of {max_frame} bytes"))
        return out

    def _fatal(self, reason: str) -> list[Message]:
        self.broken = True
        return [Fatal(reason)]

    def _classify(self, obj: Any, size: int) -> Message:
        if not isinstance(obj, tuple) or not obj or type(obj[0]) is not int:
            return Fatal(f"expected a MessagePack-RPC message [type, ...], got {_short(obj)}")
        kind = obj[0]
        if kind == REQUEST:
            msgid = obj[1] if len(obj) > 1 else None
            if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
                return Fatal(f"a request needs a msgid between 0 and 2**32-1, got "
                             f"{_short(msgid)}")
            if size > self.max_frame:
                return Invalid(msgid, "FrameTooLarge",
                               f"the request is {size} bytes; the limit is {self.max_frame}")
            if len(obj) != 4 or not isinstance(obj[2], str) or not isinstance(obj[3], tuple):
                return Invalid(msgid, "BadRequest",
                               f"expected [0, msgid, method (a string), params (an array)], "
                               f"got {_short(obj)}")
            if _depth_exceeds(obj, self.max_depth):
                return Invalid(msgid, "TooDeep",
                               f"the request nests arrays/maps more than {self.max_depth} "
                               f"levels deep")
            return obj
        if kind == NOTIFICATION:
            if size > self.max_frame:
                return Fatal(f"a notification of {size} bytes exceeds the limit of "
                             f"{self.max_frame}")
            if len(obj) != 3 or not isinstance(obj[1], str) or not isinstance(obj[2], tuple):
                return Fatal(f"expected a notification [2, method, params], got {_short(obj)}")
            if _depth_exceeds(obj, self.max_depth):
                return Fatal(f"a notification nests more than {self.max_depth} levels deep")
            return Notification(obj[1], obj[2])
        return Fatal(f"expected a request (0) or a notification (2), got message type "
                     f"{_short(kind)}")


# -- otpy's own values on the wire: extension types ------------------------------------

PID_EXT = 1  # an otpy.Pid: ext 1 holding msgpack [node, creation, name, serial]
_MAX_EXT = 1024  # bytes in one of our extension values; larger ones stay opaque


def encode_ext(obj: Any) -> Any:
    """The msgpack form of otpy's own values (a Pid travels as extension type 1, which
    any MessagePack client can hold and send back unchanged); TypeError for others."""
    if type(obj) is Pid:
        return msgpack.ExtType(PID_EXT, msgpack.packb(
            (obj.node, obj.creation, obj.name, obj.serial), use_bin_type=True))
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def decode_ext(code: int, data: bytes) -> Any:
    """An extension value as otpy's own (a Pid), or the ExtType unchanged when it is
    not ours or not well formed: a malformed pid then fails as an address, with the
    value shown, instead of breaking the stream."""
    if code == PID_EXT and len(data) <= _MAX_EXT:
        try:
            fields = msgpack.unpackb(data, use_list=False, raw=False, max_array_len=4,
                                     max_map_len=0, max_ext_len=0)
        except Exception:
            fields = None
        if (type(fields) is tuple and len(fields) == 4 and type(fields[0]) is str
                and type(fields[1]) is int and type(fields[2]) is str
                and type(fields[3]) is int):
            return Pid(*fields)
    return msgpack.ExtType(code, data)


# One packer each, reused: packing is on the hot path. On error a packer's buffer is
# reset, so a failed encode never leaks into the next one.
_packer = msgpack.Packer(use_bin_type=True, datetime=False, default=encode_ext)


def _lenient(obj: Any) -> Any:
    if type(obj) is Pid:
        return encode_ext(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    return repr(obj)


_lenient_packer = msgpack.Packer(use_bin_type=True, default=_lenient)

ENCODE_ERRORS = (TypeError, ValueError, OverflowError)


def _pack(obj: Any, lenient: bool) -> bytes:
    packer = _lenient_packer if lenient else _packer
    try:
        data: bytes = packer.pack(obj)
        return data
    except BaseException:
        packer.reset()
        raise


def result_packer(*, lenient: bool = False) -> Callable[[Any], bytes]:
    """The reused packer's ``pack``, for a loop that builds ``(RESPONSE, msgid, None,
    result)`` itself, saving a call per reply; it raises as :func:`encode_result` does
    and is left clean after an error (msgpack resets its buffer)."""
    pack: Callable[[Any], bytes] = (_lenient_packer if lenient else _packer).pack
    return pack


def encode_result(msgid: int, result: Any, *, lenient: bool = False) -> bytes:
    """``[1, msgid, None, result]``. Raises ``TypeError``/``ValueError``/``OverflowError``
    when msgpack cannot encode ``result``; with ``lenient`` any object is sent as its
    ``repr`` (for the admin endpoint, whose reader is a person)."""
    return _pack((RESPONSE, msgid, None, result), lenient)


def encode_error(msgid: int, kind: str, message: str) -> bytes:
    """``[1, msgid, [kind, message], None]``."""
    message = message.encode("utf-8", "replace").decode("utf-8")  # lone surrogates
    return _pack((RESPONSE, msgid, (kind, message), None), False)


def encode_request(msgid: int, method: str, params: Any) -> bytes:
    """``[0, msgid, method, params]`` (what a client sends)."""
    return _pack((REQUEST, msgid, method, params), False)


def encode_notification(method: str, params: Any) -> bytes:
    """``[2, method, params]``."""
    return _pack((NOTIFICATION, method, params), False)


def error_of(exc: BaseException) -> tuple[str, str]:
    """The ``[kind, message]`` pair for an exception: its class name and its text."""
    return type(exc).__name__, str(exc) or type(exc).__name__


# -- the admin handshake ------------------------------------------------------------


def new_nonce() -> bytes:
    """A fresh random challenge; one per connection."""
    return secrets.token_bytes(NONCE_SIZE)


def _key(cookie: str | bytes) -> bytes:
    return cookie.encode() if isinstance(cookie, str) else cookie


def auth_answer(cookie: str | bytes, nonce: bytes) -> bytes:
    """What a client sends back: HMAC-SHA256 keyed by the cookie, over the nonce."""
    return hmac.new(_key(cookie), nonce, hashlib.sha256).digest()


def auth_ok(cookie: str | bytes, nonce: bytes, answer: object) -> bool:
    """Whether ``answer`` proves knowledge of ``cookie``; compared in constant time."""
    if not isinstance(answer, bytes):
        return False
    return hmac.compare_digest(auth_answer(cookie, nonce), answer)

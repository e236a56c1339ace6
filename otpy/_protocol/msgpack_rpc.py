"""MessagePack-RPC framing and codec: no I/O, no trio.

The wire is plain MessagePack-RPC, so any client of that protocol can reach a node::

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]     error is None or [kind, message]
    notification  [2, method, params]
    sealed        [3, body, mac]                the admin session (see ``handshake``)

:class:`Decoder` turns the bytes a connection receives into requests (the decoded
``(0, msgid, method, params)`` tuple itself, its shape checked), :class:`Notification`,
:class:`Invalid` (a message whose msgid is known but which cannot be served: it gets an
error reply), :class:`Sealed` and :class:`Fatal` (the stream cannot be trusted any
more: the connection must close); a client's decoder (``replies=True``) gives
:class:`Response` instead of requests. Arrays decode as tuples, so a request made over
the wire reaches ``handle_call`` in the shape the same request has in process.

How a frame is decoded, and what it may cost
--------------------------------------------
msgpack builds the elements of an unfinished array or map as they arrive (one byte,
an empty map, becomes a 64-byte dict), so it is never left holding an unfinished
frame. Bytes are fed at most READ_SIZE (16 KiB) at a time; msgpack decodes the frames
that end in the read that began them, which hold at most READ_SIZE objects. When a
read ends inside a frame, what msgpack built of it is dropped at once and a walker
(:class:`_Partial`) takes the frame from its start: it follows the type bytes to the
frame's end, counting objects and nesting, building nothing. A frame that ends within
``max_frame`` bytes and ``max_objects`` objects is then decoded whole; one that passes
either limit is walked on with its bytes dropped as they come, and answered
FrameTooLarge under its msgid when it ends (a frame without a msgid to answer it by,
or of more than twice ``max_objects`` objects, is Fatal).

What must stay true, whatever the shape of the bytes:

- between reads, a decoder holds the bytes of one unfinished frame (at most
  ``max_frame`` plus one read, kept in a bytearray), msgpack's own object and buffer
  (about 60 KiB), and no decoded object;
- a message decodes to at most ``max_objects`` objects (64 Ki by default), so what a
  decoded message takes is at most its bytes plus about 100 bytes per object;
- nesting deeper than ``max_depth`` is refused (deeper than msgpack's own stack limit,
  1024, it is fatal; below it, an error reply);
- the work of one ``feed`` is bounded by one read: msgpack decodes at most READ_SIZE
  objects, or the walker walks at most READ_SIZE bytes, or a walked frame of at most
  ``max_objects`` objects is decoded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]

from .._core.names import Pid

REQUEST, RESPONSE, NOTIFICATION, SEALED = 0, 1, 2, 3

DEFAULT_MAX_FRAME = 1 << 20  # bytes in one message
DEFAULT_MAX_DEPTH = 32  # nested arrays/maps in one message, the message itself included
DEFAULT_MAX_OBJECTS = 1 << 16  # arrays, maps and scalars in one message, itself included
# The most bytes fed (and read) at once: a frame that ends in the read that began it
# holds at most this many objects, so msgpack may decode it unwalked.
READ_SIZE = 1 << 14

# Nesting the walker follows (msgpack's own stack is as deep).
MAX_NESTING = 1024
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
    """A message with a known msgid that cannot be served: reply ``[kind, message]``.
    ``sealed``: it came sealed, and was skipped unopened for its size (a session counts
    it as received)."""

    msgid: int
    kind: str
    message: str
    sealed: bool = False


class Fatal(NamedTuple):
    """The stream is broken or carries something that is not a request: close it."""

    reason: str


class Response(NamedTuple):
    """``[1, msgid, error, result]``: what a client receives (``Decoder(replies=True)``)."""

    msgid: int
    error: Any
    result: Any


class Sealed(NamedTuple):
    """``[3, body, mac]``: a message of an authenticated session (see ``handshake``),
    whose ``body`` is one msgpack-encoded message."""

    body: bytes
    mac: bytes


Message = Request | Notification | Invalid | Fatal | Response | Sealed


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """True if ``obj`` nests arrays/maps more than ``limit`` levels deep."""
    # Plain loops, not any(<genexpr>): this runs on every request. Empty containers
    # are skipped without a call: a frame of them must cost no more than its decoding.
    if limit <= 0:
        return True
    if type(obj) is dict:
        obj = (*obj.keys(), *obj.values())
    for x in obj:
        t = type(x)
        if (t is tuple or t is dict) and x and _depth_exceeds(x, limit - 1):
            return True
    return False


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


# -- the frame walker ------------------------------------------------------------------
#
# How the first byte of a msgpack token reads. _FIXED[b]: the token's whole size in
# bytes when it is an element of fixed size (a scalar, or an empty array or map;
# header and payload; 0 otherwise). _VAR[b]: (bytes of its length or count field,
# bytes between that field and the payload, what it is) for the others; None for
# 0xc1, which msgpack never uses.
_PAYLOAD, _ARRAY, _MAP = 0, 1, 2


def _tables() -> tuple[list[int], list[tuple[int, int, int] | None]]:
    fixed = [0] * 256
    var: list[tuple[int, int, int] | None] = [None] * 256
    for b in range(256):
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3, 0x80, 0x90):
            fixed[b] = 1
        elif 0x81 <= b <= 0x8F:
            var[b] = (0, 0, _MAP)
        elif 0x91 <= b <= 0x9F:
            var[b] = (0, 0, _ARRAY)
        elif 0xA0 <= b <= 0xBF:
            fixed[b] = 1 + (b & 0x1F)
    for b, size in {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
                    0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}.items():
        fixed[b] = size
    for b, spec in {0xC4: (1, 0, _PAYLOAD), 0xC5: (2, 0, _PAYLOAD), 0xC6: (4, 0, _PAYLOAD),
                    0xC7: (1, 1, _PAYLOAD), 0xC8: (2, 1, _PAYLOAD), 0xC9: (4, 1, _PAYLOAD),
                    0xD9: (1, 0, _PAYLOAD), 0xDA: (2, 0, _PAYLOAD), 0xDB: (4, 0, _PAYLOAD),
                    0xDC: (2, 0, _ARRAY), 0xDD: (4, 0, _ARRAY), 0xDE: (2, 0, _MAP),
                    0xDF: (4, 0, _MAP)}.items():
        var[b] = spec
    return fixed, var


_FIXED, _VAR = _tables()
# A run of one-byte elements (small ints, nil, booleans, an empty map, array or str):
# walked by the regex engine rather than one by one.
_RUN = re.compile(rb"[\x00-\x80\x90\xa0\xc0\xc2\xc3\xe0-\xff]*").match
DONE, MORE, OVER = 0, 1, 2


class _Broken(Exception):
    """The walker met bytes that no frame can hold: the stream cannot be trusted."""


class _Partial:
    """A frame that did not end in the read that began it, walked token by token as its
    bytes arrive, building no object (see the module docstring).

    ``buf`` holds the frame's bytes from its start while ``skipping`` is False, and only
    the bytes not walked yet once it is (an oversized frame's bytes are dropped as they
    are walked). ``top`` is the number of elements the innermost open array or map
    still awaits (the frame itself is the one element of level 0), ``stack`` those of
    the levels around it.
    """

    __slots__ = ("buf", "deepest", "kind", "msgid", "need", "objects", "pos", "size",
                 "skipping", "stack", "top")

    def __init__(self, data: bytes | bytearray) -> None:
        self.buf = bytearray(data)
        self.pos = 0  # where the walk goes on in buf
        self.size = 0  # bytes of the frame dropped so far (skipping)
        self.stack: list[int] = []
        self.top = 1
        self.deepest = 0
        self.objects = 0
        self.need = 0  # payload bytes of the current str/bin/ext still to come
        self.skipping = False
        self.kind: int | None = None
        self.msgid: int | None = None

    def walk(self, max_objects: int, most: int) -> int:
        """Walk what ``buf`` holds: DONE once the frame ended (at ``pos``), MORE when it
        needs more bytes, OVER once it holds more than ``max_objects`` objects (checked
        per container and per read; the walk can go on from there). Raises
        :class:`_Broken` for bytes that are not msgpack, nesting deeper than
        MAX_NESTING, or an array or map announced with more than ``most`` elements."""
        buf, pos, stack, top, need = self.buf, self.pos, self.stack, self.top, self.need
        objects = self.objects
        end = len(buf)
        fixed, var, run = _FIXED, _VAR, _RUN
        status = MORE
        ended = False
        if need:  # a payload that began in an earlier read
            take = min(need, end - pos)
            pos += take
            need -= take
            ended = not need
        try:
            while ended or need == 0:
                if ended:
                    ended = False
                else:
                    if pos >= end:
                        break
                    b = buf[pos]
                    n = fixed[b]
                    if n:
                        if pos + n > end:
                            break  # the rest of this element is in the next read
                        if n == 1 and top > 2 and pos + 1 < end and fixed[buf[pos + 1]] == 1:
                            # A run of one-byte elements in the open container (the
                            # pattern matches the empty string too: never None).
                            k = run(buf, pos, min(end, pos + top)).end() - pos  # type: ignore[union-attr]
                            pos += k
                            objects += k
                            top -= k - 1  # the last one ends below
                        else:
                            pos += n
                            objects += 1
                    else:
                        spec = var[b]
                        if spec is None:
                            raise _Broken(f"malformed msgpack (byte 0x{b:02x} at offset "
                                          f"{self.size + pos} of a frame)")
                        width, extra, what = spec
                        head = 1 + width + extra
                        if pos + head > end:
                            break
                        count = (int.from_bytes(buf[pos + 1:pos + 1 + width], "big")
                                 if width else b & 0x0F)
                        pos += head
                        objects += 1
                        if what == _PAYLOAD:
                            if pos + count > end:
                                need = count - (end - pos)
                                pos = end
                                break
                            pos += count
                        elif count:
                            if what == _MAP:
                                count *= 2
                            if count > most:
                                raise _Broken(f"an array or map of {count} elements "
                                              f"announced; no message is walked past "
                                              f"{most} objects")
                            stack.append(top)
                            top = count
                            depth = len(stack)
                            if depth > self.deepest:
                                self.deepest = depth
                                if depth > MAX_NESTING:
                                    raise _Broken(f"nesting deeper than {MAX_NESTING} "
                                                  f"levels")
                            if objects + count > max_objects:
                                status = OVER
                                break
                            continue
                # An element ended: close every container it completes.
                top -= 1
                if top:
                    continue
                while stack:
                    top = stack.pop() - 1
                    if top:
                        break
                else:
                    status = DONE
                    break
        finally:
            self.pos, self.top, self.need, self.objects = pos, top, need, objects
        if status == MORE and objects > max_objects:
            status = OVER
        return status

    def drop_walked(self) -> None:
        """Forget the bytes walked so far (an oversized frame is not kept)."""
        self.size += self.pos
        del self.buf[:self.pos]
        self.pos = 0


class Uncountable(ValueError):
    """A msgpack value refused before decoding (see :func:`check_objects`)."""


def check_objects(data: bytes, max_objects: int) -> None:
    """Raise :class:`Uncountable` (a ValueError), saying why, if the one msgpack value
    in ``data`` holds more than ``max_objects`` objects, nests deeper than MAX_NESTING,
    or is cut short: a walk of its type bytes, building nothing, before anyone decodes
    it (an empty map is one byte on the wire and a dict in memory)."""
    walker = _Partial(data)
    try:
        status = walker.walk(max_objects, max_objects)
    except _Broken as exc:
        raise Uncountable(str(exc)) from None
    if status == OVER:
        raise Uncountable(f"more than {max_objects} objects in {len(data)} bytes")
    if status != DONE:
        raise Uncountable(f"a value cut short at {len(data)} bytes")


_PENDING = object()


def _frames_end(data: bytes | bytearray, n: int) -> int:
    """Where the first ``n`` frames of ``data`` (which msgpack decoded) end."""
    skipper = msgpack.Unpacker(max_buffer_size=max(len(data), 1), read_size=len(data) or 1)
    skipper.feed(data)
    for _ in range(n):
        skipper.skip()
    end: int = skipper.tell()
    return end


def _head(data: bytes | bytearray) -> tuple[int | None, int | None]:
    """The message type and msgid at the start of a frame ``[type, msgid, ...]`` (msgid
    None for a notification), or (None, None). For a sealed message ``[3, body, mac]``,
    the type is SEALED and the msgid that of the message its body begins with."""
    try:
        up = msgpack.Unpacker(max_buffer_size=64)
        up.feed(bytes(data[:48]))
        if up.read_array_header() not in (3, 4):
            return None, None
        kind = up.unpack()
        if type(kind) is not int:
            return None, None
        if kind == SEALED:
            # The body's bin header, then the head of the message inside it.
            offset = up.tell()
            width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(data[offset])
            if width is None:
                return None, None
            inner = _head(data[offset + 1 + width:offset + 1 + width + 32])
            return (SEALED, inner[1]) if inner[0] in (REQUEST, RESPONSE) else (None, None)
        if kind == NOTIFICATION:
            return kind, None
        msgid = up.unpack()
    except Exception:
        return None, None
    if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
        return None, None
    return kind, msgid


class Decoder:
    """A streaming decoder for one connection: :meth:`feed` it the bytes received, get
    back the messages completed by them, in order.

    ::

        decoder = Decoder()
        [msg] = decoder.feed(msgpack.packb([0, 1, "call", ["c", "incr"]]))
        assert msg == (0, 1, "call", ("c", "incr"))

    ``replies=True`` decodes what a client receives instead (:class:`Response` and
    :class:`Notification`). Either side also decodes :class:`Sealed` messages, which
    only an authenticated session (``handshake.Session``) opens. ``max_objects`` (at
    least READ_SIZE): the most objects one message may decode to.
    """

    __slots__ = ("_partial", "_unpacker", "broken", "max_depth", "max_frame", "max_objects",
                 "replies", "skip_oversized")

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_depth: int = DEFAULT_MAX_DEPTH, max_objects: int = DEFAULT_MAX_OBJECTS,
                 replies: bool = False) -> None:
        self.max_frame = max_frame
        self.max_depth = max_depth
        self.max_objects = max(max_objects, READ_SIZE)
        self.replies = replies
        # Whether an oversized request (or response) is skipped and answered; when
        # False (before authentication) it is Fatal at once.
        self.skip_oversized = True
        self.broken = False
        self._partial: _Partial | None = None
        self._unpacker = self._new_unpacker()

    def _new_unpacker(self) -> Any:
        # msgpack only ever gets one read's worth of bytes (and the frames in it): an
        # unfinished last frame is thrown away with what msgpack built of it, and
        # walked instead. Its limits are a second line of defence.
        return msgpack.Unpacker(
            use_list=False, raw=False, strict_map_key=False, read_size=READ_SIZE,
            max_buffer_size=2 * READ_SIZE, max_array_len=READ_SIZE,
            max_map_len=READ_SIZE // 2, ext_hook=decode_ext)

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held now (at most ``max_frame`` plus one read)."""
        partial = self._partial
        return 0 if partial is None else len(partial.buf)

    def feed(self, data: bytes | bytearray) -> list[Message]:
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
        out = []
        if self._partial is not None:
            data = self._go_on(data, out)
        if data:
            self._decode(data, out)
        return out

    def _decode(self, data: bytes | bytearray, out: list[Message]) -> None:
        """Decode the frames of ``data`` (at most one read) with msgpack; an unfinished
        last frame goes to the walker."""
        up = self._unpacker
        up.feed(data)
        first = len(out)
        append = out.append
        tell = up.tell
        max_frame, max_depth = self.max_frame, self.max_depth
        # No frame that ends in data can be larger than data: when that is within
        # max_frame (nearly always), frames need not be measured one by one.
        sized = len(data) > max_frame
        start = tell()
        size = 0
        inner = max_depth - 2  # the levels left below [0, msgid, method, params]
        failed: Exception | None = None
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
                        if (t is tuple or t is dict) and x and _depth_exceeds(x, inner):
                            break
                    else:
                        append(obj)
                        continue
                msg = self._classify(obj, size, None)
                append(msg)
                if type(msg) is Fatal:
                    self.broken = True
                    return
        except Exception as exc:  # FormatError, StackError, UnicodeDecodeError, ...
            failed = exc
        if failed is None:
            # Did data end on a frame boundary? msgpack cannot say, so ask it: after a
            # whole frame, a nil byte is a whole message of its own (one feed and one
            # step per read, rather than a tell() per frame).
            up.feed(b"\xc0")
            try:
                if next(up, _PENDING) is None:
                    return
            except Exception:
                pass
        # The last frame is unfinished (or msgpack refused it), and msgpack holds what
        # it built of it: drop that, and let the walker take the frame from its start.
        self._unpacker = self._new_unpacker()
        rest = self._go_on(data[_frames_end(data, len(out) - first):], out, failed)
        if rest:
            self._decode(rest, out)

    def _go_on(self, data: bytes | bytearray, out: list[Message],
               failed: Exception | None = None) -> bytes | bytearray:
        """Walk the unfinished frame on with ``data``; when it ends, its message goes to
        ``out``. Returns the bytes that follow its end, for msgpack."""
        partial = self._partial
        if partial is None:
            partial = self._partial = _Partial(data)
        else:
            partial.buf += data
        max_objects = self.max_objects
        most = 2 * max_objects  # an oversized frame is walked (and skipped) up to this
        while True:
            try:
                status = partial.walk(most if partial.skipping else max_objects, most)
            except _Broken as exc:
                detail = f" ({type(failed).__name__}: {failed})" if failed else ""
                out.extend(self._fatal(f"{exc}{detail}"))
                return b""
            if partial.skipping:
                if status == OVER:
                    out.extend(self._fatal(f"a message of more than {most} objects"))
                    return b""
                break
            if status == OVER or partial.pos > self.max_frame:
                if not self._skip(partial, out):
                    return b""
                if status == OVER:
                    continue  # walk on, skipping
            break
        if status == MORE:
            if partial.skipping:
                partial.drop_walked()
            return b""
        self._partial = None
        end = partial.pos
        if partial.skipping:
            what = "response" if self.replies else "request"
            out.append(Invalid(partial.msgid or 0, "FrameTooLarge",
                               f"the {what} is {partial.size + end} bytes in "
                               f"{partial.objects} objects; the limit is {self.max_frame} "
                               f"bytes and {max_objects} objects",
                               partial.kind == SEALED))
            return partial.buf[end:]
        try:
            obj = msgpack.unpackb(
                partial.buf[:end], use_list=False, raw=False, strict_map_key=False,
                max_array_len=max_objects, max_map_len=max_objects, ext_hook=decode_ext)
        except Exception as exc:
            exc = failed or exc
            out.extend(self._fatal(f"malformed msgpack ({type(exc).__name__}: {exc})"))
            return b""
        msg = self._classify(obj, end, partial.deepest > self.max_depth)
        out.append(msg)
        if type(msg) is Fatal:
            self.broken = True
            return b""
        return partial.buf[end:]

    def _skip(self, partial: _Partial, out: list[Message]) -> bool:
        """Start skipping an oversized frame, if it has a msgid to answer; else Fatal."""
        kind, msgid = _head(partial.buf)
        expected = RESPONSE if self.replies else REQUEST
        if kind not in (expected, SEALED) or msgid is None or not self.skip_oversized:
            self._partial = None
            what = "a message" if kind is None else f"a message of type {kind}"
            out.extend(self._fatal(
                f"{what} over the limit of {self.max_frame} bytes or {self.max_objects} "
                f"objects, without a msgid to answer it by"))
            return False
        partial.skipping = True
        partial.kind, partial.msgid = kind, msgid
        return True

    def _fatal(self, reason: str) -> list[Message]:
        self.broken = True
        self._partial = None
        return [Fatal(reason)]

    def _classify(self, obj: Any, size: int, deep: bool | None) -> Message:
        """The message ``obj`` (a frame of ``size`` bytes) stands for; ``deep``: whether
        it nests deeper than ``max_depth`` (None: not known yet)."""
        if not isinstance(obj, tuple) or not obj or type(obj[0]) is not int:
            return Fatal(f"expected a MessagePack-RPC message [type, ...], got {_short(obj)}")
        kind = obj[0]
        if kind == SEALED:
            # Its size is checked once opened (the message inside is decoded with the
            # session's limits): what it holds is only two byte strings.
            if len(obj) == 3 and type(obj[1]) is bytes and type(obj[2]) is bytes:
                return Sealed(obj[1], obj[2])
            return Fatal(f"expected a sealed message [3, body, mac], got {_short(obj)}")
        if kind == (RESPONSE if self.replies else REQUEST):
            what = "response" if self.replies else "request"
            msgid = obj[1] if len(obj) > 1 else None
            if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
                return Fatal(f"a {what} needs a msgid between 0 and 2**32-1, got "
                             f"{_short(msgid)}")
            if size > self.max_frame:
                return Invalid(msgid, "FrameTooLarge",
                               f"the {what} is {size} bytes; the limit is {self.max_frame}")
            if self.replies:
                if len(obj) != 4:
                    return Fatal(f"expected a response [1, msgid, error, result], got "
                                 f"{_short(obj)}")
                if _depth_exceeds(obj, self.max_depth) if deep is None else deep:
                    return Invalid(msgid, "TooDeep", f"the response nests arrays/maps more "
                                                     f"than {self.max_depth} levels deep")
                return Response(msgid, obj[2], obj[3])
            if len(obj) != 4 or not isinstance(obj[2], str) or not isinstance(obj[3], tuple):
                return Invalid(msgid, "BadRequest",
                               f"expected [0, msgid, method (a string), params (an array)], "
                               f"got {_short(obj)}")
            if _depth_exceeds(obj, self.max_depth) if deep is None else deep:
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
            if _depth_exceeds(obj, self.max_depth) if deep is None else deep:
                return Fatal(f"a notification nests more than {self.max_depth} levels deep")
            return Notification(obj[1], obj[2])
        expected = "a response (1)" if self.replies else "a request (0)"
        return Fatal(f"expected {expected} or a notification (2), got message type "
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

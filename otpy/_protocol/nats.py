"""The NATS core client protocol, sans-io: bytes from a server in, typed events out, and
the encoders for what a client sends. No trio, no sockets (``otpy._cluster.nats_client``
is the trio transport over it).

The protocol (https://docs.nats.io/reference/reference-protocols/nats-protocol) is
text lines ending in CRLF, some followed by a payload of a declared length::

    server -> client                          client -> server
    INFO {json}                               CONNECT {json}
    MSG <subject> <sid> [reply] <#bytes>      PUB <subject> [reply] <#bytes>
    HMSG <subject> <sid> [reply] <#hdr> <#total>   HPUB <subject> [reply] <#hdr> <#total>
    PING / PONG                               SUB <subject> [queue] <sid>
    +OK / -ERR '<text>'                       UNSUB <sid> [max_msgs]
                                              PING / PONG

A header block (HMSG/HPUB) is ``NATS/1.0[ <status>[ <description>]]\\r\\n`` followed by
``Key: Value\\r\\n`` lines and an empty line. Keys are case-sensitive and may repeat (a
key maps to a list of values). The status line carries the server's own signals:
``503`` no responders (a request to a subject nobody subscribes to), ``408`` request
timeout, ``404`` no messages, ``100`` an idle heartbeat or a flow-control request of a
JetStream push consumer.

::

    parser = Parser()
    events = parser.feed(b"MSG greet 1 _INBOX.x 5\\r\\nhello\\r\\nPING\\r\\n")
    assert events == [Msg("greet", 1, "_INBOX.x", None, b"hello"), PING]

What must stay true:

- :meth:`Parser.feed` never raises. Whatever bytes arrive, it returns events; anything
  that breaks the protocol or a bound is a :class:`Fatal` event, always the last one of
  its feed, after which the parser is broken and answers every feed with a Fatal (the
  connection must close).
- Memory is bounded before it is spent: a control line longer than
  ``max_control_line``, a payload larger than ``max_payload`` (set it to the server's
  INFO ``max_payload``, capped by our own), a header block larger than
  ``max_header_bytes`` or with more than ``max_headers`` lines is refused from its
  control line (or, for a line with no end, from its length), before its bytes are
  buffered. So the parser never holds more than one control line plus one message plus
  the bytes of the current feed.
- It counts what it holds and what it made: :attr:`Parser.buffered` bytes now,
  :attr:`Parser.events_out` and :attr:`Parser.bytes_in` in total, and
  :attr:`Parser.last_feed_events` for the latest feed (at most one event per 6 bytes
  fed, the size of the shortest, ``PING\\r\\n``: so the transport bounds the objects one
  feed can make by the size of its reads).
- Splitting a stream differently across feeds never changes the events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

DEFAULT_MAX_CONTROL_LINE = 16 * 1024  # an INFO with many connect_urls is the longest
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024  # our own cap; the server's INFO max_payload lowers it
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_HEADERS = 256  # header lines in one block

STATUS_NO_RESPONDERS = 503
STATUS_TIMEOUT = 408
STATUS_NOT_FOUND = 404
STATUS_CONTROL = 100  # idle heartbeat or flow-control request (JetStream)

HEADER_VERSION = b"NATS/1.0"
CRLF = b"\r\n"


# -- events ---------------------------------------------------------------------------


class Headers(dict[str, list[str]]):
    """A header block: each key maps to the list of its values, in the order received;
    ``status`` and ``description`` come from the status line (``NATS/1.0 503`` gives
    ``status == 503``; a block with no status has ``status is None``)."""

    __slots__ = ("description", "status")

    def __init__(self, items: Iterable[tuple[str, list[str]]] = (), *,
                 status: int | None = None, description: str = "") -> None:
        super().__init__(items)
        self.status = status
        self.description = description

    def get_one(self, key: str, default: str | None = None) -> str | None:
        """The first value of ``key``, or ``default``."""
        values = self.get(key)
        return values[0] if values else default

    def __repr__(self) -> str:
        extra = f", status={self.status!r}" if self.status is not None else ""
        if self.description:
            extra += f", description={self.description!r}"
        return f"Headers({dict(self)!r}{extra})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return (dict.__eq__(self, other) and self.status == other.status
                    and self.description == other.description)
        return dict.__eq__(self, other)

    __hash__ = None


class Info(NamedTuple):
    """``INFO {json}``: the server's options (``max_payload``, ``headers``, ``ldm``, ...)."""

    options: dict[str, Any]


class Msg(NamedTuple):
    """``MSG``/``HMSG``: a message for subscription ``sid``; ``headers`` is None for a
    plain MSG."""

    subject: str
    sid: int
    reply: str | None
    headers: Headers | None
    payload: bytes

    @property
    def status(self) -> int | None:
        """The status of the header block (503 no responders, ...), or None."""
        h = self.headers
        return None if h is None else h.status


class Ping:
    """``PING`` from the server: answer with :data:`PONG_BYTES`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PING"


class Pong:
    """``PONG``: the answer to one of our PINGs, in the order they were sent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PONG"


class Ok:
    """``+OK`` (only in verbose mode, which otpy never asks for)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OK"


PING, PONG, OK = Ping(), Pong(), Ok()


class Err(NamedTuple):
    """``-ERR '<text>'``: an error the server reports (the quotes are removed). Most close
    the connection; a permissions violation does not."""

    text: str


class Fatal(NamedTuple):
    """The bytes broke the protocol or a bound; the connection must close. ``reason`` says
    what was wrong."""

    reason: str


Event = Info | Msg | Ping | Pong | Ok | Err | Fatal


def _short(data: bytes | bytearray, limit: int = 60) -> str:
    text = repr(bytes(data[:limit]))
    return text + ("..." if len(data) > limit else "")


# -- the parser -------------------------------------------------------------------------


_new_tuple = tuple.__new__


class _Pending(NamedTuple):
    subject: str
    sid: int
    reply: str | None
    header_size: int  # 0 for MSG
    total: int  # header + payload bytes, without the trailing CRLF


class Parser:
    """A streaming parser of what a NATS server sends: :meth:`feed` it the bytes
    received, get back the events they complete, in order."""

    __slots__ = ("_buf", "_chunks", "_chunks_len", "_pending", "broken", "bytes_in",
                 "events_out", "last_feed_events", "max_control_line",
                 "max_header_bytes", "max_headers", "max_payload", "reason")

    def __init__(self, *, max_control_line: int = DEFAULT_MAX_CONTROL_LINE,
                 max_payload: int = DEFAULT_MAX_PAYLOAD,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_headers: int = DEFAULT_MAX_HEADERS) -> None:
        self.max_control_line = max_control_line
        self.max_payload = max_payload
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.broken = False
        self.reason = ""
        self.bytes_in = 0
        self.events_out = 0
        self.last_feed_events = 0
        # What is held between feeds: the unparsed tail of the last feed (an incomplete
        # control line, or the start of a message), or, while a message longer than
        # what has arrived is awaited, its pieces, joined once it is complete (so a
        # large payload arriving in many reads is copied once, not once per read).
        self._buf = b""
        self._chunks: list[bytes] = []
        self._chunks_len = 0
        self._pending: _Pending | None = None

    @property
    def buffered(self) -> int:
        """Bytes held now: an incomplete control line or message."""
        return len(self._buf) + self._chunks_len

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """The events ``data`` completes. A :class:`Fatal` is always the last item; after
        it the parser refuses everything."""
        if self.broken:
            self.last_feed_events = 1
            return [Fatal(f"the stream was already broken ({self.reason})")]
        self.bytes_in += len(data)
        if self._chunks:
            self._chunks.append(bytes(data))
            self._chunks_len += len(data)
            pending = self._pending
            if pending is not None and self._chunks_len < pending.total + 2:
                self.last_feed_events = 0
                return []
            data = b"".join(self._chunks)
            self._chunks = []
            self._chunks_len = 0
        elif self._buf:
            data = self._buf + data
        elif type(data) is not bytes:
            data = bytes(data)
        out: list[Event] = []
        try:
            pos = self._parse(data, out)
        except _Broken as exc:
            out.append(Fatal(str(exc)))
            self.broken = True
            self.reason = str(exc)
            self._buf = b""
            self._pending = None
        else:
            rest = data[pos:] if pos < len(data) else b""
            pending = self._pending
            if pending is not None and len(rest) < pending.total + 2 and len(rest) > 4096:
                self._buf = b""
                self._chunks = [rest]
                self._chunks_len = len(rest)
            else:
                self._buf = rest
        self.last_feed_events = len(out)
        self.events_out += len(out)
        return out

    def _parse(self, buf: bytes, out: list[Event]) -> int:
        pos = 0
        n = len(buf)
        append = out.append
        max_line = self.max_control_line
        pending = self._pending
        while True:
            if pending is not None:
                end = pos + pending.total
                if n < end + 2:
                    return pos
                if buf[end:end + 2] != CRLF:
                    raise _Broken(f"a message of {pending.total} bytes is not followed by "
                                  f"CRLF (got {_short(buf[end:end + 2])}): the server's "
                                  f"byte count is wrong")
                hsize = pending[3]
                if hsize:
                    headers: Headers | None = self._headers(buf, pos, pos + hsize)
                    payload = buf[pos + hsize:end]
                else:
                    headers = None
                    payload = buf[pos:end]
                append(_new_tuple(Msg, (pending[0], pending[1], pending[2], headers, payload)))
                self._pending = pending = None
                pos = end + 2
            eol = buf.find(CRLF, pos, pos + max_line + 2)
            if eol < 0:
                if n - pos > max_line:
                    raise _Broken(f"a control line longer than {max_line} bytes "
                                  f"(starts {_short(buf[pos:pos + 60])})")
                return pos
            line = buf[pos:eol]
            pos = eol + 2
            head = line[:4]
            if head == b"MSG ":
                self._pending = pending = self._msg_line(line, False)
            elif head == b"HMSG" and line[4:5] == b" ":
                self._pending = pending = self._msg_line(line, True)
            elif line == b"PING":
                append(PING)
            elif line == b"PONG":
                append(PONG)
            else:
                self._other(line, out)
                pending = self._pending

    def _other(self, line: bytes, out: list[Event]) -> None:
        op, _, rest = line.partition(b" ")
        if not rest:
            op, _, rest = line.partition(b"\t")
        op = op.upper()
        rest = rest.strip()
        if op == b"MSG":
            self._pending = self._msg_line(b"MSG " + rest, False)
        elif op == b"HMSG":
            self._pending = self._msg_line(b"HMSG " + rest, True)
        elif op == b"PING" and not rest:
            out.append(PING)
        elif op == b"PONG" and not rest:
            out.append(PONG)
        elif op == b"+OK" and not rest:
            out.append(OK)
        elif op == b"-ERR":
            text = rest.decode("utf-8", "replace")
            if len(text) >= 2 and text[0] == text[-1] == "'":
                text = text[1:-1]
            out.append(Err(text))
        elif op == b"INFO":
            try:
                options = json.loads(rest)
            except ValueError as exc:
                raise _Broken(f"INFO carries malformed JSON ({exc})") from None
            if not isinstance(options, dict):
                raise _Broken(f"INFO must carry a JSON object, got {_short(rest)}")
            out.append(Info(options))
        else:
            raise _Broken(f"expected a server operation (INFO, MSG, HMSG, PING, PONG, "
                          f"+OK, -ERR), got {_short(line)}")

    def _msg_line(self, line: bytes, with_headers: bool) -> _Pending:
        args = line.split()
        # MSG subject sid [reply] size / HMSG subject sid [reply] hsize total
        nargs = len(args)
        fixed = 5 if with_headers else 4
        if nargs == fixed:
            reply_b = None
        elif nargs == fixed + 1:
            reply_b = args[3]
        else:
            form = ("HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>"
                    if with_headers else "MSG <subject> <sid> [reply-to] <#bytes>")
            raise _Broken(f"expected {form}, got {_short(line)}")
        sid_b = args[2]
        if not sid_b.isdigit():
            raise _Broken(f"a message names subscription id {_short(sid_b)}; ours are "
                          f"decimal integers")
        total_b = args[-1]
        if not (total_b.isdigit() and (not with_headers or args[-2].isdigit())):
            raise _Broken(f"a message's sizes must be decimal integers, got {_short(line)}")
        total = int(total_b)
        hsize = int(args[-2]) if with_headers else 0
        if with_headers:
            if hsize < len(HEADER_VERSION) + 4 or hsize > total:
                raise _Broken(f"HMSG declares a header block of {hsize} bytes in a message "
                              f"of {total}")
            if hsize > self.max_header_bytes:
                raise _Broken(f"a header block of {hsize} bytes exceeds the limit of "
                              f"{self.max_header_bytes}")
        if total - hsize > self.max_payload:
            raise _Broken(f"a payload of {total - hsize} bytes exceeds the limit of "
                          f"{self.max_payload} (the server's max_payload, capped by ours)")
        try:
            subject = args[1].decode()
            reply = None if reply_b is None else reply_b.decode()
        except UnicodeDecodeError:
            raise _Broken(f"a message's subject or reply subject is not UTF-8: "
                          f"{_short(line)}") from None
        # tuple.__new__ is the C constructor: a NamedTuple's own __new__ is Python code,
        # and this runs once per message.
        return _new_tuple(_Pending, (subject, int(sid_b), reply, hsize, total))

    def _headers(self, buf: bytes, start: int, end: int) -> Headers:
        block = buf[start:end]
        if not block.endswith(b"\r\n\r\n"):
            raise _Broken(f"a header block must end with an empty line, got "
                          f"{_short(block[-20:])}")
        lines = block[:-4].split(b"\r\n")
        if len(lines) > self.max_headers + 1:
            raise _Broken(f"a header block of {len(lines) - 1} lines exceeds the limit of "
                          f"{self.max_headers}")
        first = lines[0]
        if not first.startswith(HEADER_VERSION):
            raise _Broken(f"a header block must start with NATS/1.0, got {_short(first)}")
        status: int | None = None
        description = ""
        rest = first[len(HEADER_VERSION):]
        if rest:
            if rest[:1] not in (b" ", b"\t"):
                raise _Broken(f"expected NATS/1.0 [status [description]], got {_short(first)}")
            code, _, desc = rest.strip().partition(b" ")
            if code:
                if not (len(code) == 3 and code.isdigit()):
                    raise _Broken(f"a status must be three digits, got {_short(first)}")
                status = int(code)
                description = desc.strip().decode("utf-8", "replace")
        headers = Headers(status=status, description=description)
        for raw in lines[1:]:
            key, sep, value = raw.partition(b":")
            if not sep or not key or key != key.strip() or b" " in key:
                raise _Broken(f"expected a header line 'Key: Value', got {_short(raw)}")
            k = key.decode("utf-8", "replace")
            v = value.strip().decode("utf-8", "replace")
            values = headers.get(k)
            if values is None:
                headers[k] = [v]
            else:
                values.append(v)
        return headers


class _Broken(Exception):
    """Internal: the stream is broken; the message is the Fatal's reason."""


# -- encoders ---------------------------------------------------------------------------

PING_BYTES = b"PING\r\n"
PONG_BYTES = b"PONG\r\n"

# A subject: dot-separated tokens, none empty, no whitespace (which would split the
# protocol line) and no control characters.
_BAD_SUBJECT = re.compile(r"[\s\x00-\x1f\x7f]|^\.|\.$|\.\.|^$")
_BAD_HEADER_KEY = re.compile(r"[\s:\x00-\x1f\x7f]|^$")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]")


def check_subject(subject: str, what: str = "subject") -> str:
    """``subject`` itself, if it is a valid NATS subject; else ``ValueError`` saying why."""
    if _BAD_SUBJECT.search(subject):
        raise ValueError(f"expected a NATS {what}: dot-separated tokens, none empty, with no "
                         f"whitespace or control characters; got {subject!r}")
    return subject


def encode_connect(options: Mapping[str, Any]) -> bytes:
    """``CONNECT {json}``."""
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + CRLF


def encode_pub(subject: str, payload: bytes, reply: str | None = None) -> bytes:
    """``PUB <subject> [reply] <#bytes>`` and the payload."""
    check_subject(subject)
    if reply is None:
        return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)
    check_subject(reply, "reply subject")
    return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload),
                                        payload)


HeaderInput = Mapping[str, str | Sequence[str]]


def encode_headers(headers: HeaderInput, status: int | None = None,
                   description: str = "") -> bytes:
    """A header block: ``NATS/1.0[ status[ description]]``, then each ``Key: Value``
    (a key with a list of values gives one line per value), then an empty line."""
    parts = [b"NATS/1.0"]
    if status is not None:
        parts.append(b" %03d" % status)
        if description:
            parts.append(b" " + description.encode())
    parts.append(CRLF)
    for key, values in headers.items():
        if _BAD_HEADER_KEY.search(key):
            raise ValueError(f"expected a header key with no whitespace, ':' or control "
                             f"characters, got {key!r}")
        kb = key.encode()
        for value in ((values,) if isinstance(values, str) else values):
            if _BAD_HEADER_VALUE.search(value):
                raise ValueError(f"a header value must not contain CR, LF or NUL; {key!r} "
                                 f"has {value!r}")
            parts += (kb, b": ", value.encode(), CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def encode_hpub(subject: str, headers: HeaderInput | bytes, payload: bytes,
                reply: str | None = None) -> bytes:
    """``HPUB <subject> [reply] <#header bytes> <#total bytes>``, the header block and the
    payload. ``headers`` may be an already encoded block."""
    check_subject(subject)
    block = headers if isinstance(headers, bytes) else encode_headers(headers)
    total = len(block) + len(payload)
    if reply is None:
        line = b"HPUB %s %d %d\r\n" % (subject.encode(), len(block), total)
    else:
        check_subject(reply, "reply subject")
        line = b"HPUB %s %s %d %d\r\n" % (subject.encode(), reply.encode(), len(block), total)
    return line + block + payload + CRLF


def encode_sub(subject: str, sid: int, queue: str | None = None) -> bytes:
    """``SUB <subject> [queue group] <sid>``."""
    check_subject(subject)
    if queue is None:
        return b"SUB %s %d\r\n" % (subject.encode(), sid)
    check_subject(queue, "queue group")
    return b"SUB %s %s %d\r\n" % (subject.encode(), queue.encode(), sid)


def encode_unsub(sid: int, max_msgs: int | None = None) -> bytes:
    """``UNSUB <sid> [max_msgs]``: stop now, or after ``max_msgs`` more messages."""
    if max_msgs is None:
        return b"UNSUB %d\r\n" % sid
    return b"UNSUB %d %d\r\n" % (sid, max_msgs)

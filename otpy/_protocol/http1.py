"""HTTP/1.1 requests in, responses out: the sans-io half of a node's HTTP endpoint.

:class:`RequestParser` turns the bytes a connection receives into :class:`Request`
objects (complete: line, headers and body), :data:`CONTINUE` (the request in progress
asked for ``100 Continue`` before it sends its body) and :class:`Refusal` (the stream
cannot be served further: answer it with its status and close). Parsing is llhttp's,
through httptools, the parser uvicorn uses; on this machine kind it is the fastest
well-kept HTTP/1.1 parser for Python (see ``bench/bench_http.py``). :func:`encode` makes
a response's bytes; responses carry no ``Date`` or ``Server`` header.

What must stay true, so that no peer can make a connection hold more than it counts:

- the request head (request line and headers) is refused with 431 past ``max_head``
  bytes or ``max_headers`` headers; while a head is in progress the parser is fed
  at most ``max_head`` plus two chunks (``CHUNK`` bytes each) of it, so httptools
  never buffers more of a header than that;
- a body is refused with 413 past ``max_body`` bytes: at once from its
  ``Content-Length``, before any of it is read, and while it arrives when chunked;
  a body is kept as one bytearray, whatever its chunks;
- one :meth:`RequestParser.feed` returns at most ``max_batch`` requests, plus what one
  chunk completes: the rest of the bytes wait in the parser (:attr:`has_rest`,
  :meth:`more`) until the transport has served those;
- after a :class:`Refusal` the parser refuses everything (the connection must close).

llhttp itself refuses what is ambiguous (a ``Content-Length`` with a ``Transfer-Encoding``,
bad chunk sizes, bare LF, ...): those are :class:`Refusal` 400. No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import httptools

CHUNK = 2048  # bytes fed to llhttp at once
DEFAULT_MAX_HEAD = 16 * 1024
DEFAULT_MAX_HEADERS = 64
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_BATCH = 64

REASONS = {
    100: "Continue", 200: "OK", 202: "Accepted", 204: "No Content", 303: "See Other",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    415: "Unsupported Media Type", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in
                 REASONS.items()}
_METHODS = {m.encode(): m for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE")}


class Request:
    """One complete request. ``path`` and ``query`` are as sent (percent-encoded);
    header names are lower case."""

    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "path", "query")

    def __init__(self, method: str, path: str, query: str,
                 headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool,
                 http10: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower case), the last one if repeated."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return (f"Request({self.method} {self.path}{'?' if self.query else ''}"
                f"{self.query}, {len(self.headers)} headers, {len(self.body)} bytes)")


class Refusal(NamedTuple):
    """The stream cannot be served any further: answer with ``status`` and a JSON body
    ``{"error": kind, "message": message}``, then close."""

    status: int
    kind: str
    message: str


class _Continue:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE = _Continue()
"""The request in progress sent ``Expect: 100-continue``: send ``100 Continue`` now,
after the responses to the requests before it."""

Message = Request | Refusal | _Continue


class _Refuse(Exception):
    """Raised in a callback to stop llhttp; the reason is in the parser's _refusal."""


class RequestParser:
    """A streaming request parser for one connection.

    ::

        parser = RequestParser()
        [request] = parser.feed(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        assert (request.method, request.path) == ("GET", "/healthz")
    """

    __slots__ = ("_body", "_connection", "_continue", "_count", "_expect", "_fed",
                 "_headers", "_in_head", "_length", "_out", "_parser", "_refusal", "_rest",
                 "_size", "_url", "in_progress", "max_batch", "max_body", "max_head",
                 "max_headers")

    def __init__(self, *, max_head: int = DEFAULT_MAX_HEAD,
                 max_headers: int = DEFAULT_MAX_HEADERS, max_body: int = DEFAULT_MAX_BODY,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.max_head = max_head
        self.max_headers = max_headers
        self.max_body = max_body
        self.max_batch = max_batch
        self.in_progress = False  # a request has begun and is not complete
        self._in_head = False  # ... and its head is not complete
        self._fed = 0  # bytes fed of the request in progress (see _step)
        self._count = 0  # headers of the request in progress
        self._size = 0  # ... and their bytes (names, values, 4 for the separators)
        self._length: bytes | None = None  # its Content-Length, Expect, Connection
        self._expect: bytes | None = None
        self._connection: bytes | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._continue = 0  # 1: asked for, 2: answered (or no longer needed)
        self._out: list[Message] = []
        self._rest: memoryview | None = None
        self._refusal: Refusal | None = None
        self._parser = httptools.HttpRequestParser(self)

    @property
    def broken(self) -> bool:
        """The stream was refused: nothing more is parsed."""
        return self._refusal is not None

    @property
    def has_rest(self) -> bool:
        """Bytes are waiting to be parsed: the last feed returned a full batch."""
        return self._rest is not None

    def feed(self, data: bytes) -> list[Message]:
        """Parse ``data`` (after any rest left by the last batch), up to a batch."""
        if self._rest is not None:
            self._rest = memoryview(bytes(self._rest) + data)
        elif len(data) <= CHUNK and self._refusal is None:
            # The common case, one small request: no slicing.
            out = self._out = []
            self._step(data)
            if self._continue == 1 and self._refusal is None:
                self._continue = 2
                out.append(CONTINUE)
            return out
        else:
            self._rest = memoryview(data)
        return self.more()

    def more(self) -> list[Message]:
        """Go on parsing the bytes left by the last feed, up to a batch."""
        out = self._out = []
        view = self._rest
        self._rest = None
        if self._refusal is not None:
            return [self._refusal]
        if view is None:
            return out
        start = 0
        while start < len(view):
            chunk = view[start:start + CHUNK]
            start += len(chunk)
            if not self._step(chunk):
                return out
            if len(out) >= self.max_batch and start < len(view):
                self._rest = view[start:]
                return out
        if self._continue == 1:
            self._continue = 2
            out.append(CONTINUE)
        return out

    def _step(self, chunk: bytes | memoryview) -> bool:
        """Feed one chunk; False once the stream is refused.

        What httptools buffers itself (a header's name and value, until the next one)
        is bounded here by counting the bytes fed while a request is in progress: a
        chunk that began within that request counts whole, an upper bound, exact to
        within the one chunk in which the request (or its body) began."""
        head = self._in_head
        body = self.in_progress and not head
        if self._refusal is not None:
            self._out.append(self._refusal)
            return False
        try:
            try:
                self._parser.feed_data(chunk)
            except httptools.HttpParserUpgrade as exc:
                self._upgraded(chunk, exc.args[0])
        except httptools.HttpParserError as exc:
            # Our own refusals, raised in the callbacks below, come out of llhttp as a
            # callback error; anything else is llhttp's own verdict.
            self._refuse(400, "BadRequest", f"malformed HTTP/1.1 request ({exc}); send "
                         f"a request line, headers and a body as RFC 9112 describes")
        if self._refusal is None and self.in_progress:
            if self._in_head:
                if head:
                    self._fed += len(chunk)
                    if self._fed > self.max_head + CHUNK:
                        self._refuse(431, "HeadTooLarge", self._head_message())
            elif body:
                # The body as sent: its bytes and, when chunked, its framing and
                # trailers (which httptools buffers like headers).
                self._fed += len(chunk)
                if self._fed > 2 * self.max_body + self.max_head + CHUNK:
                    self._refuse(413, "BodyTooLarge",
                                 f"the body, with its chunk framing and trailers, exceeds "
                                 f"{2 * self.max_body + self.max_head} bytes; send at most "
                                 f"{self.max_body} bytes in larger chunks")
        if self._refusal is not None:
            self._out.append(self._refusal)
            return False
        return True

    def _upgraded(self, chunk: bytes | memoryview, offset: int) -> None:
        """A request to switch protocols (WebSocket, h2c, CONNECT) is served as a plain
        request, as RFC 9110 lets a server do: the client waits for a 101 that never
        comes, then goes on in HTTP/1.1. llhttp stopped right after it: the rest of the
        chunk is fed on."""
        rest = chunk[offset:]
        while rest:
            try:
                self._parser.feed_data(rest)
                return
            except httptools.HttpParserUpgrade as exc:
                rest = rest[exc.args[0]:]

    def _refuse(self, status: int, kind: str, message: str) -> None:
        if self._refusal is None:  # the first reason found is the one given
            self._refusal = Refusal(status, kind, message)

    def _head_message(self) -> str:
        return (f"the request line and headers exceed {self.max_head} bytes; send "
                f"shorter headers and URLs")

    # -- llhttp's callbacks (through httptools); raising in one stops llhttp ---------

    def _begin(self) -> None:
        # Called from on_url, the first callback of every request (its target is never
        # empty): one Python callback less per request than on_message_begin.
        self.in_progress = True
        self._in_head = True
        self._fed = 0
        self._count = 0
        self._size = 0
        self._url = b""
        self._headers = []
        self._continue = 0
        self._length = self._expect = self._connection = None

    def on_url(self, url: bytes) -> None:
        if not self._in_head:
            self._begin()
        self._url += url
        if len(self._url) > self.max_head:
            self._stop(431, "HeadTooLarge", self._head_message())

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        if self._count > self.max_headers:
            self._stop(431, "TooManyHeaders", f"the request has more than "
                       f"{self.max_headers} headers; send fewer")
        self._size += len(name) + len(value) + 4
        name = name.lower()
        self._headers.append((name, value))
        if name == b"content-length":
            self._length = value
        elif name == b"expect":
            self._expect = value
        elif name == b"connection":
            self._connection = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._fed = 0
        if len(self._url) + self._size > self.max_head:
            self._stop(431, "HeadTooLarge", self._head_message())
        length = self._length
        # llhttp has checked that a Content-Length is a number
        if length is not None and int(length) > self.max_body:
            self._stop(413, "BodyTooLarge", f"the body is {int(length)} bytes; the limit "
                       f"is {self.max_body} bytes")
        expect = self._expect
        if expect is not None and expect.lower() == b"100-continue":
            self._continue = 1

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self.max_body:
            self._stop(413, "BodyTooLarge",
                       f"the body exceeds the limit of {self.max_body} bytes")

    def on_message_complete(self) -> None:
        parser = self._parser
        url = self._url.decode("latin-1")
        path, _, query = url.partition("?")
        method = parser.get_method()
        body = self._body
        keep_alive = parser.should_keep_alive()
        # An HTTP/1.0 client keeps alive only when it says so: only then does its
        # version matter (the response must say keep-alive too).
        connection = self._connection
        http10 = (keep_alive and connection is not None and
                  connection.lower() == b"keep-alive" and
                  parser.get_http_version() == "1.0")
        self._out.append(Request(
            _METHODS.get(method) or method.decode("latin-1"), path, query, self._headers,
            bytes(body) if body else b"", keep_alive, http10))
        self.in_progress = False
        self._in_head = False
        self._continue = 0
        self._headers = []
        if body:
            self._body = bytearray()

    def _stop(self, status: int, kind: str, message: str) -> None:
        self._refuse(status, kind, message)
        raise _Refuse(message)


def refusal_body(kind: str, message: str) -> bytes:
    """The JSON body of an error: ``{"error": kind, "message": message}``."""
    return json.dumps({"error": kind, "message": message}).encode()


class Response:
    """A response to send: ``status``, ``body`` and its content type (None: no
    ``Content-Type`` header), and extra ``headers`` as (name, value) strings."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes = b"",
                 content_type: str | None = "application/json",
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    @classmethod
    def error(cls, status: int, kind: str, message: str,
              headers: Sequence[tuple[str, str]] = ()) -> Response:
        """``status`` with the JSON body ``{"error": kind, "message": message}``."""
        return cls(status, refusal_body(kind, message), "application/json", headers)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:60]!r})"


class Stream(Response):
    """A response whose body is sent as it is made (server-sent events): after the
    head, ``run(send)`` awaits ``send(piece)`` for each piece, until it returns. It has
    no ``Content-Length``: its end is the connection's close, so it is always the last
    response of its connection."""

    __slots__ = ("abandon", "run")

    def __init__(self, status: int, content_type: str,
                 run: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]],
                 headers: Sequence[tuple[str, str]] = (),
                 abandon: Callable[[], None] | None = None) -> None:
        super().__init__(status, b"", content_type, headers)
        self.run = run
        # Called instead of run when the stream never starts (a HEAD request, a client
        # gone before the head was sent): what the route reserved for it is freed.
        self.abandon = abandon


_CONTENT_TYPES: dict[str, bytes] = {}


def encode(response: Response, *, head: bool = False, close: bool = False,
           http10: bool = False) -> bytes:
    """The bytes of ``response``; ``head``: without its body (a HEAD request);
    ``close``: with ``Connection: close``; ``http10``: to an HTTP/1.0 client that
    asked for keep-alive (``Connection: keep-alive`` unless ``close``)."""
    status = response.status
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status\r\n".encode()
    body = response.body
    parts = [line]
    ctype = response.content_type
    if ctype is not None:
        header = _CONTENT_TYPES.get(ctype)
        if header is None:
            _check(ctype)
            header = f"content-type: {ctype}\r\n".encode("latin-1")
            if len(_CONTENT_TYPES) < 64:
                _CONTENT_TYPES[ctype] = header
        parts.append(header)
    if type(response) is Stream:
        close = True
    else:
        parts.append(b"content-length: %d\r\n" % len(body))
    for name, value in response.headers:
        _check(name)
        _check(value)
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    if close:
        parts.append(b"connection: close\r\n")
    elif http10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(body)
    return b"".join(parts)


CONTINUE_BYTES = b"HTTP/1.1 100 Continue\r\n\r\n"


def _check(text: str) -> None:
    if "\r" in text or "\n" in text:
        raise ValueError(f"a response header may not contain CR or LF: {text!r:.80}")


def status_reason(status: int) -> str:
    """The reason phrase otpy sends with ``status``."""
    return REASONS.get(status, "Status")


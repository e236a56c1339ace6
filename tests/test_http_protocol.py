"""The sans-io half of the HTTP endpoint: requests parsed from bytes, within what the
parser counts (head, headers, body, batch), and responses encoded; no sockets."""

from __future__ import annotations

import pytest

from otpy._protocol.http1 import (
    CHUNK,
    CONTINUE,
    Refusal,
    Request,
    RequestParser,
    Response,
    encode,
)

GET = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (b"POST " + path + b" HTTP/1.1\r\nHost: h\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + head + b"\r\n" + body)


def only_requests(messages: list[object]) -> list[Request]:
    assert all(type(m) is Request for m in messages), messages
    return messages  # type: ignore[return-value]


def test_a_request_is_parsed_with_lower_case_headers_and_its_query() -> None:
    """Method, path, query (as sent), headers (names lower case), body, keep-alive."""
    [req] = only_requests(RequestParser().feed(
        post(b"/call/x%20y?timeout=1", b'"hi"', b"Content-Type: application/json")))
    assert ("POST", "/call/x%20y", "timeout=1", b'"hi"', True, False) == (
        req.method, req.path, req.query, req.body, req.keep_alive, req.http10)
    assert b"application/json" == req.header(b"content-type")


def test_keep_alive_follows_the_version_and_connection_header() -> None:
    """HTTP/1.1 keeps alive unless ``Connection: close``; HTTP/1.0 only if it asks."""
    cases = [(b"GET / HTTP/1.1\r\n\r\n", True), (b"GET / HTTP/1.1\r\nConnection: close"
                                                 b"\r\n\r\n", False),
             (b"GET / HTTP/1.0\r\n\r\n", False),
             (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True)]
    for data, keep_alive in cases:
        [req] = only_requests(RequestParser().feed(data))
        assert keep_alive == req.keep_alive


def test_pipelined_requests_in_one_feed_come_out_in_order() -> None:
    """Requests sent back to back in one packet are all parsed, in order."""
    data = b"".join(post(b"/call/s", str(i).encode()) for i in range(20))
    requests = only_requests(RequestParser().feed(data))
    assert [str(i).encode() for i in range(20)] == [r.body for r in requests]


def test_a_feed_returns_at_most_a_batch_and_keeps_the_rest() -> None:
    """With max_batch 8, a feed of 1000 requests returns a batch (8, plus what the
    chunk that completed the 8th completes) and keeps the rest; more() goes on, until
    all 1000 are out, in order."""
    parser = RequestParser(max_batch=8)
    data = GET * 1000
    per_chunk = CHUNK // len(GET) + 1
    batch = parser.feed(data)
    assert 8 <= len(batch) <= 8 + per_chunk
    assert parser.has_rest
    total = len(batch)
    for _ in range(1000):
        if not parser.has_rest:
            break
        batch = parser.more()
        assert len(batch) <= 8 + per_chunk
        total += len(batch)
    assert (1000, False) == (total, parser.has_rest)


def test_a_request_split_over_many_feeds_is_parsed_once_whole() -> None:
    """Bytes arriving one at a time make one request when the last arrives."""
    parser = RequestParser()
    data = post(b"/cast/s", b"[1, 2]")
    for byte in data[:-1]:
        assert [] == parser.feed(bytes([byte]))
    [req] = only_requests(parser.feed(data[-1:]))
    assert b"[1, 2]" == req.body


def test_a_chunked_body_is_joined() -> None:
    """Transfer-Encoding: chunked bodies arrive as one body."""
    data = (b"POST /call/s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\n[1,\r\n2\r\n 2\r\n1\r\n]\r\n0\r\n\r\n")
    [req] = only_requests(RequestParser().feed(data))
    assert b"[1, 2]" == req.body


def test_expect_100_continue_asks_for_continue_before_the_body() -> None:
    """``Expect: 100-continue`` yields CONTINUE once the headers are in and the body is
    not; the body then completes the request."""
    parser = RequestParser()
    head = b"POST /call/s HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    assert [CONTINUE] == parser.feed(head)
    [req] = only_requests(parser.feed(b"42"))
    assert b"42" == req.body


def test_no_continue_when_the_body_came_with_the_headers() -> None:
    """A client that sent its body at once gets no 100 Continue (RFC 9110 allows
    omitting it)."""
    data = post(b"/call/s", b"42", b"Expect: 100-continue")
    assert 1 == len(only_requests(RequestParser().feed(data)))


def test_too_many_headers_is_refused_431() -> None:
    """Past max_headers headers the request is refused with 431 TooManyHeaders."""
    data = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 11 + b"\r\n"
    [refusal] = RequestParser(max_headers=10).feed(data)
    assert (431, "TooManyHeaders") == refusal[:2]


def test_a_head_larger_than_max_head_is_refused_431() -> None:
    """A long URL or header is refused with 431 HeadTooLarge."""
    for data in (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n",
                 b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n"):
        [refusal] = RequestParser(max_head=1000).feed(data)
        assert (431, "HeadTooLarge") == refusal[:2]


def test_a_header_trickled_forever_is_refused_within_max_head_plus_two_chunks() -> None:
    """A header value that never ends, sent a little at a time, is refused before the
    parser was fed more than max_head plus two chunks of it (so httptools, which
    buffers an unfinished header itself, never holds more)."""
    parser = RequestParser(max_head=4096)
    fed = len(b"GET / HTTP/1.1\r\nX: ")
    messages = parser.feed(b"GET / HTTP/1.1\r\nX: ")
    for _ in range(10_000):
        if messages:
            break
        messages = parser.feed(b"a" * 100)
        fed += 100
    assert [(431, "HeadTooLarge")] == [m[:2] for m in messages]  # type: ignore[index]
    assert fed <= 4096 + 2 * CHUNK


def test_a_content_length_past_max_body_is_refused_before_the_body() -> None:
    """413 from the headers alone: no byte of the body is needed."""
    data = b"POST /call/s HTTP/1.1\r\nContent-Length: 1000001\r\n\r\n"
    [refusal] = RequestParser(max_body=1_000_000).feed(data)
    assert (413, "BodyTooLarge") == refusal[:2]


def test_a_chunked_body_past_max_body_is_refused() -> None:
    """A chunked body is counted as it arrives: 413 past max_body."""
    data = (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"400\r\n" + b"a" * 1024 + b"\r\n") * 20)
    refusal = RequestParser(max_body=10_000).feed(data)[-1]
    assert isinstance(refusal, Refusal)
    assert (413, "BodyTooLarge") == refusal[:2]


def test_a_chunk_bomb_is_refused_by_its_framing() -> None:
    """One-byte chunks (5 bytes of framing per byte of body) are refused once the body
    with its framing passes twice max_body plus max_head, whatever the body's size."""
    parser = RequestParser(max_body=10_000, max_head=1000)
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 10_000
    refusal = parser.feed(data)[-1]
    assert isinstance(refusal, Refusal)
    assert (413, "BodyTooLarge") == refusal[:2]


@pytest.mark.parametrize("data", [b"garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nContent-Length: 1\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                                  b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"])
def test_malformed_or_ambiguous_requests_are_refused_400(data: bytes) -> None:
    """What llhttp refuses (garbage, a bad version, a length that smuggles) is 400."""
    [refusal] = RequestParser().feed(data)
    assert (400, "BadRequest") == refusal[:2]


def test_after_a_refusal_the_parser_refuses_everything() -> None:
    """Once refused, nothing more is parsed: the connection must close."""
    parser = RequestParser()
    [first] = parser.feed(b"garbage\r\n\r\n")
    assert [first] == parser.feed(GET)


def test_an_upgrade_request_is_served_as_a_plain_request() -> None:
    """``Upgrade: websocket`` is ignored (RFC 9110 allows it): the request and the one
    after it are parsed as plain HTTP/1.1."""
    data = (b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + GET)
    assert ["/x", "/healthz"] == [r.path for r in only_requests(RequestParser().feed(data))]


def test_a_response_is_minimal() -> None:
    """Status line, content type and length, and the body: no Date, no Server."""
    assert (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
            b"\r\n[]") == encode(Response(200, b"[]"))


def test_a_head_response_has_the_length_but_no_body() -> None:
    """HEAD: the same headers as GET, no body."""
    assert encode(Response(200, b"[]"), head=True).endswith(b"content-length: 2\r\n\r\n")


def test_connection_headers_say_close_or_keep_alive_to_http10() -> None:
    """``close`` adds Connection: close; an HTTP/1.0 keep-alive client is told
    keep-alive."""
    assert b"connection: close\r\n" in encode(Response(204), close=True)
    assert b"connection: keep-alive\r\n" in encode(Response(204), http10=True)


def test_a_header_with_cr_or_lf_is_never_sent() -> None:
    """Response splitting is impossible: CR or LF in a header raises."""
    with pytest.raises(ValueError, match="CR or LF"):
        encode(Response(200, headers=[("location", "/\r\nset-cookie: x")]))

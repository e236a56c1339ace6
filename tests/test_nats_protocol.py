"""The sans-io NATS codec (otpy._protocol.nats): what a server's bytes parse to, the
bounds that make a hostile server's bytes fatal before they are buffered, and the
encoders. No server and no trio here."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otpy._protocol.nats import (
    OK,
    PING,
    PONG,
    Err,
    Event,
    Fatal,
    Headers,
    Info,
    Msg,
    Parser,
    check_subject,
    encode_connect,
    encode_headers,
    encode_hpub,
    encode_pub,
    encode_sub,
    encode_unsub,
)


def msg_bytes(msg: Msg) -> bytes:
    """What a server sends for ``msg`` (MSG, or HMSG when it has headers)."""
    reply = f" {msg.reply}" if msg.reply is not None else ""
    if msg.headers is None:
        return (f"MSG {msg.subject} {msg.sid}{reply} {len(msg.payload)}\r\n".encode()
                + msg.payload + b"\r\n")
    block = encode_headers(msg.headers, msg.headers.status, msg.headers.description)
    return (f"HMSG {msg.subject} {msg.sid}{reply} {len(block)} "
            f"{len(block) + len(msg.payload)}\r\n".encode() + block + msg.payload + b"\r\n")


def only(parser: Parser, data: bytes) -> Event:
    events = parser.feed(data)
    assert 1 == len(events), events
    return events[0]


# -- what parses to what ------------------------------------------------------------------


def test_msg_without_reply() -> None:
    """``MSG subject sid size`` and its payload make one Msg with no reply and no headers."""
    assert Msg("a.b", 7, None, None, b"hello") == only(Parser(), b"MSG a.b 7 5\r\nhello\r\n")


def test_msg_with_reply() -> None:
    """A MSG with a reply subject carries it."""
    assert Msg("a", 1, "_INBOX.x.1", None, b"") == only(Parser(), b"MSG a 1 _INBOX.x.1 0\r\n\r\n")


def test_payload_may_contain_crlf() -> None:
    """The payload is taken by its declared length, CRLFs and all."""
    assert b"x\r\nMSG y\r\n" == only(Parser(), b"MSG a 1 10\r\nx\r\nMSG y\r\n\r\n").payload


def test_hmsg_headers_keep_every_value_in_order() -> None:
    """A key repeated in a header block maps to all its values, in the order received."""
    block = b"NATS/1.0\r\nA: 1\r\nB: x y\r\nA: 2\r\n\r\n"
    data = b"HMSG s 3 %d %d\r\n%spay\r\n" % (len(block), len(block) + 3, block)
    msg = only(Parser(), data)
    assert Msg("s", 3, None, Headers({"A": ["1", "2"], "B": ["x y"]}.items()), b"pay") == msg
    assert msg.headers is not None
    assert "1" == msg.headers.get_one("A")
    assert msg.status is None


def test_header_keys_are_case_sensitive() -> None:
    """``A`` and ``a`` are two keys, as NATS defines them."""
    block = b"NATS/1.0\r\nA: 1\r\na: 2\r\n\r\n"
    msg = only(Parser(), b"HMSG s 3 %d %d\r\n%s\r\n" % (len(block), len(block), block))
    assert {"A": ["1"], "a": ["2"]} == dict(msg.headers or {})


@pytest.mark.parametrize(("line", "status", "description"), [
    (b"NATS/1.0 503", 503, ""),
    (b"NATS/1.0 408 Request Timeout", 408, "Request Timeout"),
    (b"NATS/1.0 100 Idle Heartbeat", 100, "Idle Heartbeat"),
    (b"NATS/1.0 404 Message Not Found", 404, "Message Not Found"),
])
def test_status_line(line: bytes, status: int, description: str) -> None:
    """The status line gives the status code and its description (503 = no responders,
    408 = timeout, 100 = heartbeat)."""
    block = line + b"\r\n\r\n"
    msg = only(Parser(), b"HMSG _INBOX.a.1 1 %d %d\r\n%s\r\n" % (len(block), len(block), block))
    assert msg.headers is not None
    assert (status, description) == (msg.headers.status, msg.headers.description)
    assert status == msg.status


def test_heartbeat_carries_headers_after_its_status() -> None:
    """A status line can be followed by headers (an idle heartbeat names its last
    consumer sequence)."""
    block = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\n\r\n"
    msg = only(Parser(), b"HMSG d 1 %d %d\r\n%s\r\n" % (len(block), len(block), block))
    assert msg.headers == Headers([("Nats-Last-Consumer", ["5"])], status=100,
                                  description="Idle Heartbeat")


def test_control_messages() -> None:
    """INFO, PING, PONG, +OK and -ERR (its quotes removed)."""
    data = (b'INFO {"max_payload":1048576,"headers":true}\r\nPING\r\nPONG\r\n+OK\r\n'
            b"-ERR 'Authorization Violation'\r\n")
    assert [Info({"max_payload": 1048576, "headers": True}), PING, PONG, OK,
            Err("Authorization Violation")] == Parser().feed(data)


def test_operations_are_case_insensitive() -> None:
    """The protocol says operation names are case-insensitive; fields may be split by
    tabs."""
    assert [PING, Msg("a", 1, None, None, b"x")] == Parser().feed(b"ping\r\nmsg\ta\t1\t1\r\nx\r\n")


def test_split_anywhere_gives_the_same_events() -> None:
    """A stream fed one byte at a time parses to what it parses to in one feed."""
    data = (b"INFO {}\r\nMSG a 1 3\r\nabc\r\n" + msg_bytes(
        Msg("b", 2, "r", Headers([("K", ["v"])], status=503), b"zz")) + b"PONG\r\n")
    whole = Parser().feed(data)
    parser = Parser()
    pieces = [e for i in range(len(data)) for e in parser.feed(data[i:i + 1])]
    assert whole == pieces
    assert 0 == parser.buffered


def test_large_payload_in_many_reads() -> None:
    """A payload far larger than one read, arriving in small pieces (and followed by
    more messages in its last piece), parses to the same message; while it is awaited
    the parser holds only what arrived."""
    payload = bytes(range(256)) * 400
    data = (b"MSG big 1 %d\r\n" % len(payload)) + payload + b"\r\nPING\r\nMSG s 2 1\r\nx\r\n"
    parser = Parser()
    events: list[Event] = []
    for i in range(0, len(data), 1000):
        events += parser.feed(data[i:i + 1000])
        assert parser.buffered <= min(i + 1000, len(data))
    assert [Msg("big", 1, None, None, payload), PING, Msg("s", 2, None, None, b"x")] == events
    assert 0 == parser.buffered


# -- counting -----------------------------------------------------------------------------


def test_counts_bytes_events_and_what_it_holds() -> None:
    """The parser counts the bytes fed, the events made (total and last feed) and the
    bytes it holds for an incomplete message."""
    parser = Parser()
    parser.feed(b"PING\r\nPONG\r\nMSG a 1 10\r\nabc")
    assert (2, 2, 3) == (parser.last_feed_events, parser.events_out, parser.buffered)
    parser.feed(b"defghij\r\n")
    assert (1, 3, 0, 36) == (parser.last_feed_events, parser.events_out, parser.buffered,
                             parser.bytes_in)


# -- bounds and broken streams ----------------------------------------------------------


def fatal_of(parser: Parser, *chunks: bytes) -> str:
    events: list[Event] = []
    for chunk in chunks:
        events = parser.feed(chunk)
        if events and isinstance(events[-1], Fatal):
            break
    assert events and isinstance(events[-1], Fatal), events
    assert parser.broken
    return events[-1].reason


def test_endless_control_line_is_fatal_before_it_is_buffered() -> None:
    """A line with no CRLF is refused once it exceeds max_control_line: the parser
    holds at most that, never what keeps coming."""
    parser = Parser(max_control_line=100)
    parser.feed(b"INFO " + b"x" * 90)
    assert 95 == parser.buffered
    reason = fatal_of(parser, b"x" * 50)
    assert "control line longer than 100 bytes" in reason
    assert 0 == parser.buffered


def test_long_control_line_with_its_end_is_fatal() -> None:
    """A complete control line that is too long is refused too."""
    assert "longer than 10" in fatal_of(Parser(max_control_line=10), b"-ERR 'abcdefghijk'\r\n")


def test_oversized_payload_is_fatal_from_its_control_line() -> None:
    """A MSG declaring more than max_payload is refused when its control line arrives,
    before any payload byte is held."""
    parser = Parser(max_payload=1000)
    reason = fatal_of(parser, b"MSG a 1 1001\r\n")
    assert "payload of 1001 bytes exceeds the limit of 1000" in reason
    assert 0 == parser.buffered


def test_oversized_header_block_is_fatal() -> None:
    """An HMSG declaring a header block over max_header_bytes is refused at once."""
    reason = fatal_of(Parser(max_header_bytes=100), b"HMSG a 1 200 200\r\n")
    assert "header block of 200 bytes exceeds the limit of 100" in reason


def test_too_many_header_lines_is_fatal() -> None:
    """More header lines than max_headers is fatal (objects are counted, not bytes)."""
    block = b"NATS/1.0\r\n" + b"K: v\r\n" * 5 + b"\r\n"
    data = b"HMSG a 1 %d %d\r\n%s\r\n" % (len(block), len(block), block)
    assert "5 lines exceeds the limit of 4" in fatal_of(Parser(max_headers=4), data)


@pytest.mark.parametrize(("data", "expected"), [
    (b"HELLO\r\n", "expected a server operation"),
    (b"MSG a x 1\r\n", "subscription id"),
    (b"MSG a 1 -1\r\n", "decimal integers"),
    (b"MSG a 1 2 3 4\r\n", "expected MSG <subject>"),
    (b"MSG a 1 3\r\nabcXY", "not followed by CRLF"),
    (b"HMSG a 1 30 20\r\n", "header block of 30 bytes in a message of 20"),
    (b"HMSG a 1 12 12\r\nHTTP/1.1\r\n\r\n\r\n", "must start with NATS/1.0"),
    (b"HMSG a 1 15 15\r\nNATS/1.0\r\nK\r\n\r\n\r\n", "expected a header line"),
    (b"HMSG a 1 16 16\r\nNATS/1.0 5x3\r\n\r\n\r\n", "three digits"),
    (b"HMSG a 1 14 14\r\nNATS/1.0\r\nab\r\n\r\n", "must end with an empty line"),
    (b"INFO {nope\r\n", "malformed JSON"),
    (b"INFO [1]\r\n", "JSON object"),
    (b"MSG \xff 1 0\r\n\r\n", "not UTF-8"),
])
def test_malformed_input_is_fatal_and_says_what(data: bytes, expected: str) -> None:
    """Each way of breaking the protocol gives a Fatal naming what was wrong."""
    assert expected in fatal_of(Parser(), data)


def test_broken_parser_refuses_everything_after() -> None:
    """After a Fatal, every feed answers with a Fatal only."""
    parser = Parser()
    parser.feed(b"BOGUS\r\n")
    [event] = parser.feed(b"PING\r\n")
    assert isinstance(event, Fatal)
    assert "already broken" in event.reason


def test_events_before_a_fatal_are_kept() -> None:
    """What was complete before the fault is returned, the Fatal last."""
    events = Parser().feed(b"PING\r\nBOGUS\r\nPONG\r\n")
    assert PING == events[0]
    assert isinstance(events[1], Fatal)
    assert 2 == len(events)


# -- encoders ---------------------------------------------------------------------------


def test_encode_pub() -> None:
    """PUB with and without a reply subject; the size counts bytes, not characters."""
    assert b"PUB a.b 5\r\nhello\r\n" == encode_pub("a.b", b"hello")
    assert b"PUB a r.1 2\r\n\xc3\xa9\r\n" == encode_pub("a", "é".encode(), "r.1")


def test_encode_hpub_round_trips_through_the_parser() -> None:
    """An HPUB's header block, delivered back as HMSG, parses to the same headers."""
    data = encode_hpub("s", {"Nats-Expected-Last-Subject-Sequence": "0",
                             "Multi": ["a", "b"]}, b"val", reply="_INBOX.q.1")
    line, _, rest = data.partition(b"\r\n")
    assert b"HPUB s _INBOX.q.1 " == line[:18]
    hsize, total = map(int, line.split()[-2:])
    served = b"HMSG s 9 _INBOX.q.1 %d %d\r\n" % (hsize, total) + rest
    msg = only(Parser(), served)
    assert msg.headers == Headers([("Nats-Expected-Last-Subject-Sequence", ["0"]),
                                   ("Multi", ["a", "b"])])
    assert b"val" == msg.payload


def test_encode_status_headers() -> None:
    """A header block may carry a status line."""
    assert b"NATS/1.0 503\r\n\r\n" == encode_headers({}, 503)


def test_encode_sub_unsub_connect() -> None:
    """SUB with and without a queue group, UNSUB with and without max_msgs, CONNECT."""
    assert b"SUB a.* 3\r\n" == encode_sub("a.*", 3)
    assert b"SUB a q 3\r\n" == encode_sub("a", 3, "q")
    assert b"UNSUB 3\r\n" == encode_unsub(3)
    assert b"UNSUB 3 10\r\n" == encode_unsub(3, 10)
    line = encode_connect({"verbose": False, "headers": True})
    assert b'CONNECT {"verbose":false,"headers":true}\r\n' == line


@pytest.mark.parametrize("subject", ["", "a b", "a\r\nPUB x 1", ".a", "a.", "a..b", "a\tb"])
def test_bad_subject_is_refused(subject: str) -> None:
    """A subject that would break the protocol line (or is not a subject) is refused
    with a ValueError naming it: protocol injection through a name cannot happen."""
    with pytest.raises(ValueError, match="expected a NATS subject"):
        encode_pub(subject, b"")
    with pytest.raises(ValueError):
        check_subject(subject)


@pytest.mark.parametrize("headers", [{"a b": "1"}, {"a:b": "1"}, {"": "1"},
                                     {"K": "x\r\nEvil: 1"}])
def test_bad_header_is_refused(headers: dict[str, str]) -> None:
    """A header key with whitespace or ':' and a value with CR/LF are refused."""
    with pytest.raises(ValueError):
        encode_headers(headers)


# -- fuzz ---------------------------------------------------------------------------------

tokens = st.text(alphabet="abcxyz019_-", min_size=1, max_size=6)
subjects = st.lists(tokens, min_size=1, max_size=3).map(".".join)
header_values = st.text(alphabet="abc 019:;=", max_size=8).map(str.strip)
headers_st = st.builds(
    lambda items, status, desc: Headers(items, status=status, description=desc if status
                                        else ""),
    st.dictionaries(tokens, st.lists(header_values, min_size=1, max_size=3),
                    max_size=3).map(lambda d: list(d.items())),
    st.one_of(st.none(), st.sampled_from([100, 404, 408, 503])),
    st.sampled_from(["", "Idle Heartbeat"]),
)
msgs = st.builds(Msg, subjects, st.integers(0, 10**6), st.one_of(st.none(), subjects),
                 st.one_of(st.none(), headers_st),
                 # Mostly small; sometimes larger than the parser keeps as a plain tail.
                 st.one_of(st.binary(max_size=40), st.binary(min_size=4100, max_size=4500)))
events_st = st.lists(st.one_of(
    msgs,
    st.sampled_from([PING, PONG, OK]),
    st.builds(Err, st.text(alphabet="abc ", max_size=10).map(str.strip)),
    st.builds(Info, st.dictionaries(tokens, st.integers(), max_size=2)),
), max_size=8)


def event_bytes(event: Event) -> bytes:
    if isinstance(event, Msg):
        return msg_bytes(event)
    if isinstance(event, Err):
        return f"-ERR '{event.text}'\r\n".encode()
    if isinstance(event, Info):
        return b"INFO " + json.dumps(event.options).encode() + b"\r\n"
    return {PING: b"PING\r\n", PONG: b"PONG\r\n", OK: b"+OK\r\n"}[event]


@settings(max_examples=80, deadline=None)
@given(events_st, st.data())
def test_any_split_of_a_valid_stream_gives_its_events(events: list[Event],
                                                      data: st.DataObject) -> None:
    """However a valid stream is cut into feeds, the events are the ones it encodes,
    and nothing is left buffered at its end."""
    stream = b"".join(event_bytes(e) for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = Parser()
    out: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += parser.feed(stream[a:b])
    assert events == out
    assert 0 == parser.buffered


LIMITS = {"max_control_line": 64, "max_payload": 128, "max_header_bytes": 64,
          "max_headers": 4}
PREFIXES = [b"", b"MSG a 1 ", b"HMSG a 1 ", b"INFO ", b"-ERR ", b"PING\r\n",
            b"HMSG a 1 12 12\r\nNATS/1.0"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=200)),
                min_size=1, max_size=10))
def test_garbage_never_raises_and_memory_stays_bounded(feeds: list[tuple[bytes, bytes]]
                                                       ) -> None:
    """Arbitrary bytes (some starting like real operations) never raise: they give
    events or a Fatal, Fatal only last; and the parser never holds more than one
    control line plus one message plus one feed."""
    parser = Parser(**LIMITS)
    bound = (LIMITS["max_control_line"] + 2 + LIMITS["max_payload"]
             + LIMITS["max_header_bytes"] + 2)
    for prefix, body in feeds:
        chunk = prefix + body
        events = parser.feed(chunk)
        assert all(not isinstance(e, Fatal) for e in events[:-1])
        assert parser.buffered <= bound + len(chunk)
        assert parser.last_feed_events <= len(chunk) // 6 + 1
        if parser.broken:
            assert isinstance(events[-1], Fatal)
            assert 0 == parser.buffered

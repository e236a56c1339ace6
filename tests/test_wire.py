"""The wire codec (otpy._protocol.msgpack_rpc): MessagePack-RPC framing, limits, encoders and the
admin handshake's HMAC, tested without any I/O."""

from __future__ import annotations

import hashlib
import hmac
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpy._protocol.handshake import Session, client_proof, new_nonce, node_proof
from otpy._protocol.msgpack_rpc import (
    DEFAULT_MAX_OBJECTS,
    READ_SIZE,
    Decoder,
    Fatal,
    Invalid,
    Notification,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    error_of,
)


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj))


def test_request_and_notification_decode_with_arrays_as_tuples() -> None:
    """Arrays decode as tuples (the in-process shape), maps as dicts."""
    data = pack([0, 1, "call", ["c", ["store", "x", {"k": [1]}]]]) + pack([2, "cast", ["c", 1]])
    assert [(0, 1, "call", ("c", ("store", "x", {"k": (1,)}))),
            Notification("cast", ("c", 1))] == Decoder().feed(data)


def test_frames_split_anywhere_decode_the_same() -> None:
    """Bytes fed one at a time give the same messages, each once, when complete."""
    data = pack([0, 7, "call", ["c", "incr"]]) * 3
    decoder = Decoder()
    got = [m for i in range(len(data)) for m in decoder.feed(data[i:i + 1])]
    assert [(0, 7, "call", ("c", "incr"))] * 3 == got


def test_non_integer_map_keys_are_allowed() -> None:
    """Maps keyed by ints or tuples arrive as the same dicts as in process."""
    assert [(0, 1, "call", ("c", {1: "a", (1, 2): "b"}))] == Decoder().feed(
        pack([0, 1, "call", ["c", {1: "a", (1, 2): "b"}]]))


@pytest.mark.parametrize(("message", "kind"), [
    ([0, 3, "call"], "BadRequest"),
    ([0, 3, 5, []], "BadRequest"),
    ([0, 3, "call", {"a": 1}], "BadRequest"),
    ([0, 3, "call", ["c", "x" * 200]], "FrameTooLarge"),
    ([0, 3, "call", [[[[[[[[[[1]]]]]]]]]]], "TooDeep"),
    ([0, 3, "call", [{"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": 1}}}}}}}}]], "TooDeep"),
])
def test_requests_with_a_known_msgid_are_invalid_not_fatal(message: Any, kind: str) -> None:
    """A bad request whose msgid is known becomes Invalid (an error reply); the stream
    stays usable."""
    decoder = Decoder(max_frame=128, max_depth=8)
    got = decoder.feed(pack(message) + pack([0, 4, "call", ["c", 1]]))
    assert 2 == len(got)
    assert isinstance(got[0], Invalid) and (3, kind) == (got[0].msgid, got[0].kind)
    assert (0, 4, "call", ("c", 1)) == got[1]


@pytest.mark.parametrize("data", [
    b"\xc1",
    pack("text"),
    pack([]),
    pack(["0", 1, "m", []]),
    pack([0, -1, "m", []]),
    pack([0, 2**32, "m", []]),
    pack([0, "id", "m", []]),
    pack([1, 1, None, None]),
    pack([2, "m"]),
    pack([2, "m", "params"]),
    pack([9, 1]),
    b"\x91" * 3000,
    b"\xdd\xff\xff\xff\xff",
    b"\xa3\xff\xfe\xfd",
])
def test_garbage_and_non_requests_are_fatal(data: bytes) -> None:
    """What has no usable msgid is Fatal, last in the list, and the decoder stays
    broken afterwards."""
    decoder = Decoder(max_frame=1024)
    got = decoder.feed(pack([0, 1, "call", ["c", 1]]) + data)
    assert (0, 1, "call", ("c", 1)) == got[0]
    assert isinstance(got[-1], Fatal) and 2 == len(got)
    assert isinstance(decoder.feed(pack([0, 2, "call", ["c", 1]]))[0], Fatal)


def test_an_endless_request_is_never_buffered_past_the_limit() -> None:
    """A request that never ends: its bytes are dropped once it passes ``max_frame``
    (it will be answered FrameTooLarge if it ever ends), never buffered."""
    decoder = Decoder(max_frame=1000)
    head = pack([0, 1, "call", ["c", "x" * 100_000]])[:-10]
    held = []
    for i in range(0, len(head), 700):
        assert [] == decoder.feed(head[i:i + 700])
        held.append(decoder.buffered)
    assert max(held) <= 1000 + 700


@pytest.mark.parametrize("message", [
    [2, "cast", ["c", "x" * 5000]],
    ["x" * 5000],
    "x" * 5000,
    [1, 1, None, "x" * 5000],
])
def test_an_oversized_frame_without_a_msgid_to_answer_is_fatal(message: Any) -> None:
    """Past ``max_frame``, a frame that is not a request cannot be answered: Fatal."""
    decoder = Decoder(max_frame=1000)
    data = pack(message)
    assert [] == decoder.feed(data[:900])
    assert isinstance(decoder.feed(data[900:1200])[-1], Fatal)


def test_big_feeds_are_cut_into_reads() -> None:
    """A feed larger than one read is decoded piecewise, never over the buffer."""
    data = pack([0, 1, "call", ["c", "y" * 100]]) * (3 * READ_SIZE // 100)
    got = Decoder().feed(data)
    assert all(type(m) is tuple for m in got) and len(got) == 3 * READ_SIZE // 100


def test_encoders_round_trip() -> None:
    """Responses, errors, requests and notifications are MessagePack-RPC arrays."""
    assert [1, 5, None, [1, "a"]] == msgpack.unpackb(encode_result(5, (1, "a")))
    assert [1, 5, ["NoSuchServer", "no"], None] == msgpack.unpackb(
        encode_error(5, "NoSuchServer", "no"))
    assert [0, 6, "call", ["c", 1]] == msgpack.unpackb(encode_request(6, "call", ("c", 1)))
    assert [2, "cast", ["c", 1]] == msgpack.unpackb(encode_notification("cast", ("c", 1)))


@pytest.mark.parametrize("value", [object(), 2**70, {1, 2}])
def test_unencodable_results_raise_and_leave_the_encoder_usable(value: Any) -> None:
    """What msgpack cannot encode raises; the next encode is unaffected."""
    with pytest.raises((TypeError, ValueError, OverflowError)):
        encode_result(1, value)
    assert [1, 2, None, "ok"] == msgpack.unpackb(encode_result(2, "ok"))


def test_lenient_results_send_a_repr() -> None:
    """The admin endpoint's lenient encoding shows unknown objects as their repr."""
    assert [1, 1, None, ["<x>", [1, 2]]] == msgpack.unpackb(
        encode_result(1, (type("X", (), {"__repr__": lambda self: "<x>"})(), {2, 1}),
                      lenient=True))


def test_error_messages_with_lone_surrogates_still_encode() -> None:
    """An exception text that is not valid UTF-8 is sent with replacements."""
    assert "a?b" == msgpack.unpackb(encode_error(1, "E", "a\udc80b"))[2][1]


def test_error_of_names_the_exception_class() -> None:
    """``[kind, message]`` is the class name and the text."""
    assert ("KeyError", "'k'") == error_of(KeyError("k"))
    assert ("ValueError", "ValueError") == error_of(ValueError())


def test_proofs_are_the_documented_hmacs() -> None:
    """Each side's proof is HMAC-SHA256 keyed by the cookie over its role label and
    both nonces, as docs/network.md describes; the two never coincide."""
    node_nonce, client_nonce = new_nonce(), new_nonce()
    assert hmac.new(b"c", b"otpy admin client\x00" + node_nonce + client_nonce,
                    hashlib.sha256).digest() == client_proof("c", node_nonce, client_nonce)
    assert hmac.new(b"c", b"otpy admin node\x00" + node_nonce + client_nonce,
                    hashlib.sha256).digest() == node_proof(b"c", node_nonce, client_nonce)
    assert client_proof("c", node_nonce, client_nonce) != node_proof("c", node_nonce,
                                                                      client_nonce)
    assert 32 == len(node_nonce) and node_nonce != client_nonce


def sessions(cookie: str = "c") -> tuple[Session, Session]:
    node_nonce, client_nonce = new_nonce(), new_nonce()
    return (Session(cookie, node_nonce, client_nonce, node_side=True),
            Session(cookie, node_nonce, client_nonce, node_side=False))


def test_a_session_opens_what_the_other_side_sealed_in_order() -> None:
    """Sealed requests open on the node as the requests, and replies on the client."""
    node, client = sessions()
    frames = Decoder().feed(client.seal(pack([0, 1, "call", ["c", 1]]))
                            + client.seal(pack([2, "cast", ["c", 2]])))
    assert [(0, 1, "call", ("c", 1)), Notification("cast", ("c", 2))] == node.open_all(frames)
    [reply] = Decoder(replies=True).feed(node.seal(encode_result(1, "ok")))
    assert [Response(1, None, "ok")] == client.open_all([reply])


@pytest.mark.parametrize("tamper", ["replay", "reorder", "alter", "inject", "reflect",
                                    "other session", "unsealed"])
def test_a_sealed_message_out_of_its_place_ends_the_session(tamper: str) -> None:
    """Whoever lacks the cookie can only forward sealed messages unchanged and in
    order: a replayed, reordered, altered, injected or reflected one is Fatal, as is
    an unsealed one or one sealed in another session."""
    node, client = sessions()
    first, second, third = (client.seal(pack([0, i, "call", ["c", i]])) for i in (1, 2, 3))
    if tamper == "replay":
        data = first + first
    elif tamper == "reorder":
        data = first + third + second
    elif tamper == "alter":
        sealed = Decoder().feed(first)[0]
        data = first + pack([3, sealed.body.replace(b"\x01", b"\x02"), sealed.mac])
    elif tamper == "inject":
        data = first + pack([3, pack([0, 9, "call", ["c", 9]]), b"\x00" * 32])
    elif tamper == "reflect":
        data = first + node.seal(pack([0, 2, "call", ["c", 2]]))
    elif tamper == "other session":
        data = first + sessions()[1].seal(pack([0, 2, "call", ["c", 2]]))
    else:
        data = first + pack([0, 2, "call", ["c", 2]])
    got = node.open_all(Decoder().feed(data))
    assert (0, 1, "call", ("c", 1)) == got[0]
    assert isinstance(got[1], Fatal) and 2 == len(got)


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_messages_or_fatal(data: bytes) -> None:
    """Random bytes never raise out of the decoder; at most the last item is Fatal."""
    got = Decoder(max_frame=256, max_depth=8).feed(data)
    assert not any(isinstance(m, Fatal) for m in got[:-1])


# -- what a frame may make the decoder hold (issue 11, items 1 and 14) ----------------

# What msgpack's Unpacker takes of its own (its object, with its stack, and its
# buffer of one read), beside the bytes of the frame being walked.
UNPACKER = 64 * 1024


def held_while(feed: Any) -> int:
    """Bytes of Python memory still allocated after ``feed()`` returns (tracemalloc)."""
    tracemalloc.start()
    try:
        feed()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_an_unfinished_frame_holds_its_bytes_not_objects() -> None:
    """Empty maps (one byte each on the wire, a dict each in memory) in a request that
    has not ended: the decoder holds the bytes received (and msgpack's own buffer), not
    the objects msgpack would make of them."""
    decoder = Decoder(max_frame=1 << 20)
    n = DEFAULT_MAX_OBJECTS - 100
    head = b"\x94\x00\x01\xa4call\x92\xa1c\xdd" + n.to_bytes(4, "big")
    sent = n - 1000

    def feed() -> None:
        assert [] == decoder.feed(head)
        for i in range(0, sent, 10_000):
            assert [] == decoder.feed(b"\x80" * min(10_000, sent - i))

    assert held_while(feed) < 1.25 * sent + UNPACKER
    assert [(0, 1, "call", ("c", ({},) * n))] == decoder.feed(b"\x80" * (n - sent))


def test_a_frame_of_too_many_objects_is_refused_before_it_is_decoded() -> None:
    """A request that fits in ``max_frame`` bytes but holds more than DEFAULT_MAX_OBJECTS
    objects is refused with its msgid (FrameTooLarge) and never built; the next
    request decodes."""
    decoder = Decoder(max_frame=1 << 20)
    n = DEFAULT_MAX_OBJECTS + 10
    frame = b"\x94\x00\x07\xa4call\x92\xa1c\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    got = [m for i in range(0, len(frame), READ_SIZE) for m in
           decoder.feed(frame[i:i + READ_SIZE])]
    assert [(7, "FrameTooLarge")] == [(m.msgid, m.kind) for m in got
                                      if isinstance(m, Invalid)]
    assert 1 == len(got)
    assert [(0, 8, "call", ("c", 1))] == decoder.feed(pack([0, 8, "call", ["c", 1]]))


def test_an_oversized_request_is_skipped_and_refused_with_its_msgid() -> None:
    """A request several times ``max_frame``, arriving in reads: its bytes are dropped
    as they come (never buffered past the limit), it is answered with FrameTooLarge
    under its msgid, and the stream goes on."""
    decoder = Decoder(max_frame=4096)
    data = pack([0, 9, "call", ["c", "x" * 50_000]]) + pack([0, 10, "call", ["c", 1]])
    got: list[Any] = []
    held = []

    def feed() -> None:
        for i in range(0, len(data), 1000):
            got.extend(decoder.feed(data[i:i + 1000]))
            held.append(decoder.buffered)

    assert held_while(feed) < 1.25 * (4096 + 1000) + UNPACKER
    assert max(held) <= 4096 + 1000
    assert isinstance(got[0], Invalid) and (9, "FrameTooLarge") == (got[0].msgid, got[0].kind)
    assert "50" in got[0].message and "4096" in got[0].message
    assert [(0, 10, "call", ("c", 1))] == got[1:]


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=40)
    | st.binary(max_size=300) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.integers(-9, 99), inner,
                                                                 max_size=5),
    max_leaves=60)


def as_decoded(obj: Any) -> Any:
    """``obj`` as msgpack decodes it here: arrays as tuples."""
    if isinstance(obj, list):
        return tuple(as_decoded(x) for x in obj)
    if isinstance(obj, dict):
        return {as_decoded(k): as_decoded(v) for k, v in obj.items()}
    return obj


@given(st.lists(values, min_size=1, max_size=6), st.lists(st.integers(1, 400), max_size=30))
def test_requests_cut_anywhere_decode_as_msgpack_says(params: list[Any],
                                                      cuts: list[int]) -> None:
    """Requests fed in pieces of any size: each within the limits decodes as msgpack
    decodes it, each over ``max_frame`` is FrameTooLarge under its msgid, in order,
    whether it ended in the read that began it or was walked across reads."""
    frames = [pack([0, i, "call", ["c", p]]) for i, p in enumerate(params)]
    data = b"".join(frames)
    decoder = Decoder(max_frame=512)
    got: list[Any] = []
    at = 0
    for n in [*cuts, len(data)]:
        got.extend(decoder.feed(data[at:at + n]))
        at += n
    got.extend(decoder.feed(data[at:]))
    expected = [(i, "FrameTooLarge") if len(f) > 512 else (0, i, "call", ("c", as_decoded(p)))
                for i, (f, p) in enumerate(zip(frames, params, strict=True))]
    assert expected == [(m.msgid, m.kind) if isinstance(m, Invalid) else m for m in got]

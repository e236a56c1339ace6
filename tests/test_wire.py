"""The wire codec (otpy._protocol.msgpack_rpc): MessagePack-RPC framing, limits, encoders and the
admin handshake's HMAC, tested without any I/O."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpy._protocol.msgpack_rpc import (
    READ_SIZE,
    Decoder,
    Fatal,
    Invalid,
    Notification,
    auth_answer,
    auth_ok,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    error_of,
    new_nonce,
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


def test_a_frame_that_never_ends_is_fatal_once_it_passes_the_limit() -> None:
    """Buffering stops at max_frame bytes (plus one read): an endless frame is Fatal."""
    decoder = Decoder(max_frame=1000)
    head = pack([0, 1, "call", ["c", "x" * 100_000]])
    assert [] == decoder.feed(head[:900])
    assert isinstance(decoder.feed(head[900:1200])[-1], Fatal)


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


def test_auth_answer_is_hmac_sha256_of_the_nonce() -> None:
    """The answer is HMAC-SHA256 keyed by the cookie over the nonce, as documented."""
    nonce = new_nonce()
    assert hmac.new(b"cookie", nonce, hashlib.sha256).digest() == auth_answer("cookie", nonce)
    assert auth_ok(b"cookie", nonce, auth_answer(b"cookie", nonce))
    assert not auth_ok(b"cookie", nonce, auth_answer(b"other", nonce))
    assert not auth_ok(b"cookie", new_nonce(), auth_answer(b"cookie", nonce))
    assert not auth_ok(b"cookie", nonce, "text")
    assert 32 == len(nonce) and nonce != new_nonce()


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_messages_or_fatal(data: bytes) -> None:
    """Random bytes never raise out of the decoder; at most the last item is Fatal."""
    got = Decoder(max_frame=256, max_depth=8).feed(data)
    assert not any(isinstance(m, Fatal) for m in got[:-1])

"""The one JSON rule shared by the HTTP endpoint and ``otpy call``: the shape requests
take (the shape MessagePack-RPC gives them), how replies that JSON cannot carry are
encoded, and the bounds on what a body may make the node build."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgpack
import pydantic
import pytest

import otpy
from otpy._protocol.json_rules import (
    Undecodable,
    Unencodable,
    address_of,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)
from otpy._protocol.msgpack_rpc import Decoder

REQUESTS = ['"incr"', '["add", 1]', '["store", "x", [1, [2, 3]], {"k": [4]}]', "null",
            '{"a": {"b": []}}', "[true, false, 1.5, -3]"]


@pytest.mark.parametrize("text", REQUESTS)
def test_a_json_request_has_the_shape_the_same_request_has_over_msgpack_rpc(
        text: str) -> None:
    """handle_call sees the same value whether the request came as JSON or over the
    MessagePack-RPC endpoint (arrays as tuples, at every depth)."""
    [wire] = Decoder().feed(msgpack.packb([0, 1, "call", ["s", json.loads(text)]]))
    assert wire[3][1] == decode_json(text)
    assert repr(wire[3][1]) == repr(decode_json(text))  # tuples, not lists


def test_json_bytes_object_decodes_to_bytes() -> None:
    """``{"$bytes": base64}`` is bytes, so bytes round-trip through JSON."""
    assert ("put", b"\x00hi") == decode_json('["put", {"$bytes": "AGhp"}]')
    assert b"\x00\xff" == decode_json(encode_json(b"\x00\xff"))


def test_json_bytes_object_with_bad_base64_is_refused() -> None:
    """A ``$bytes`` value that is not base64 is a BadJson error, not a string."""
    with pytest.raises(Undecodable) as info:
        decode_json('{"$bytes": "not base64!"}')
    assert "BadJson" == info.value.kind


@pytest.mark.parametrize("text", ["bad json", "[1,", "NaN", "[Infinity]", "'x'", ""])
def test_text_that_is_not_strict_json_is_refused(text: str) -> None:
    """Anything but strict JSON is BadJson, with a hint of what to send."""
    with pytest.raises(Undecodable) as info:
        decode_json(text)
    assert "BadJson" == info.value.kind
    assert '"incr"' in str(info.value)


def test_json_nested_past_max_depth_is_too_deep() -> None:
    """max_depth levels of arrays are read; one more is TooDeep (also far past Python's
    own recursion limit)."""
    assert decode_json("[" * 4 + "]" * 4, max_depth=4) == ((((),),),)
    for depth in (5, 100_000):
        with pytest.raises(Undecodable) as info:
            decode_json("[" * depth + "]" * depth, max_depth=4, max_objects=10**6)
        assert "TooDeep" == info.value.kind


def test_json_with_more_values_than_max_objects_is_refused() -> None:
    """max_objects counts every array element, object key and value and the body: at
    the limit it is read, one past it is refused."""
    assert 9 == len(decode_json("[" + ",".join("1" * 9) + "]", max_objects=10))
    with pytest.raises(Undecodable) as info:
        decode_json("[" + ",".join("1" * 10) + "]", max_objects=10)
    assert "TooManyObjects" == info.value.kind
    assert {"a": 1, "b": 2} == decode_json('{"a": 1, "b": 2}', max_objects=5)
    with pytest.raises(Undecodable):
        decode_json('{"a": 1, "b": 2, "c": 3}', max_objects=6)


def test_separators_inside_strings_do_not_count_as_values() -> None:
    """A string full of commas, colons and brackets is one value (the count before
    decoding skips strings, escaped quotes included)."""
    text = json.dumps(["x" + ',:[{\\"' * 1000])
    assert 1 == len(decode_json(text, max_objects=5))


def test_a_huge_flat_json_array_is_refused_before_it_is_decoded() -> None:
    """A body of far more values than max_objects is refused from its separators alone
    (its bytes counted in C), without building its values."""
    body = b"[" + b"0," * 500_000 + b"0]"
    with pytest.raises(Undecodable) as info:
        decode_json(body, max_objects=1000)
    assert "TooManyObjects" == info.value.kind
    assert "more than 1000 values" in str(info.value)


def test_msgpack_body_within_bounds_decodes_with_tuples() -> None:
    """A msgpack body decodes as the MessagePack-RPC endpoint decodes (arrays as
    tuples)."""
    assert ("add", (1, 2), {"k": b"v"}) == decode_msgpack(
        msgpack.packb(["add", [1, 2], {"k": b"v"}]))


def test_msgpack_nested_empty_maps_are_refused_by_count() -> None:
    """The nested-empty-maps attack of issue #11: refused once max_objects values were
    built, whatever the bytes."""
    body = b"\x91" * 50 + b"\x90"  # 50 nested arrays
    with pytest.raises(Undecodable) as info:
        decode_msgpack(body, max_depth=10, max_objects=1000)
    assert "TooDeep" == info.value.kind
    flat = msgpack.packb([{}] * 5000)
    with pytest.raises(Undecodable) as info:
        decode_msgpack(flat, max_objects=1000)
    assert "TooManyObjects" == info.value.kind


def test_msgpack_garbage_is_bad_msgpack() -> None:
    """Bytes that are not one msgpack value (truncated, or with extra data) are
    BadMsgpack."""
    for body in (b"\x92\x01", b"\x01\x02"):
        with pytest.raises(Undecodable) as info:
            decode_msgpack(body)
        assert "BadMsgpack" == info.value.kind


@dataclasses.dataclass
class Point:
    x: int
    tags: tuple[str, ...]


@dataclasses.dataclass
class Shape:
    name: str
    corners: list[Point]


class Model(pydantic.BaseModel):
    name: str
    size: int


REPLIES: list[tuple[Any, Any]] = [
    (("ok", (1, 2)), ["ok", [1, 2]]),
    (b"\x00hi", {"$bytes": "AGhp"}),
    (bytearray(b"hi"), {"$bytes": "aGk="}),
    ({3, 1, 2}, [1, 2, 3]),
    (frozenset({"b", "a"}), ["a", "b"]),
    ({1, "a"}, ["a", 1]),  # mixed: sorted by repr, "'a'" < "1"
    (Point(1, ("a",)), {"x": 1, "tags": ["a"]}),
    (Shape("s", [Point(0, ())]), {"name": "s", "corners": [{"x": 0, "tags": []}]}),
    (Model(name="m", size=3), {"name": "m", "size": 3}),
    ({1: "int keys become strings"}, {"1": "int keys become strings"}),
    (None, None),
]


@pytest.mark.parametrize(("reply", "expected"), REPLIES)
def test_replies_json_cannot_carry_are_encoded_by_the_table(reply: Any,
                                                            expected: Any) -> None:
    """Tuples -> arrays, bytes -> {"$bytes": base64}, sets -> sorted arrays (by repr
    when mixed), dataclasses and pydantic models -> objects."""
    assert expected == json.loads(encode_json(reply))


@pytest.mark.parametrize(("reply", "named"), [
    (object(), "builtins.object"),
    (float("nan"), "NaN"),
    ({("tuple", "key"): 1}, "str keys"),
    (Ellipsis, "builtins.ellipsis"),
])
def test_a_reply_json_cannot_carry_is_a_clear_error(reply: Any, named: str) -> None:
    """Anything else is Unencodable, naming the type (or value) and how to fix it."""
    with pytest.raises(Unencodable) as info:
        encode_json(reply)
    assert named in str(info.value)


def test_a_reply_that_contains_itself_is_a_clear_error() -> None:
    """A cycle is refused, not a RecursionError."""
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(Unencodable) as info:
        encode_json(cycle)
    assert "cycle" in str(info.value)


def test_msgpack_reply_of_an_unencodable_value_is_a_clear_error() -> None:
    """encode_msgpack refuses what msgpack cannot carry, naming how to fix it, and the
    packer is clean for the next reply."""
    with pytest.raises(Unencodable) as info:
        encode_msgpack({"x": object()})
    assert "MessagePack" in str(info.value)
    assert msgpack.packb([1]) == encode_msgpack((1,))


# -- pids ----------------------------------------------------------------------------------

PID = otpy.Pid("a", 7, "counter", 3)


def test_a_pid_round_trips_through_json_as_a_pid_object() -> None:
    """A reply's pid is ``{"$pid": [node, creation, name, serial]}``, and that object in
    a request is the same pid again (creation included, so it names one incarnation)."""
    text = encode_json(("monitoring", PID))
    assert b'["monitoring",{"$pid":["a",7,"counter",3]}]' == text
    assert ("monitoring", PID) == decode_json(text)


def test_a_pid_round_trips_through_msgpack_bodies_as_the_wire_does() -> None:
    """A msgpack body carries a pid as the MessagePack-RPC endpoint does (extension 1)."""
    assert [PID] == list(decode_msgpack(encode_msgpack((PID,))))


@pytest.mark.parametrize("text", ['{"$pid": ["a", 7, "counter"]}', '{"$pid": "<c.1@a>"}',
                                  '{"$pid": ["a", "7", "counter", 3]}'])
def test_a_malformed_pid_object_is_bad_json_saying_what_a_pid_is(text: str) -> None:
    """A ``$pid`` object that is not [str, int, str, int] is refused, not passed on."""
    with pytest.raises(Undecodable) as info:
        decode_json(text)
    assert ("BadJson", True) == (info.value.kind, "[node, creation, name, serial]" in
                                 str(info.value))


def test_an_address_is_a_name_or_a_pid_in_its_json_form() -> None:
    """One rule for addresses (the HTTP path and ``otpy call NAME``): text is a name (or
    name@node) as it is; a JSON pid object is that pid; other JSON is refused."""
    assert ("kv", "kv@b", PID) == (address_of("kv"), address_of("kv@b"),
                                   address_of(encode_json(PID).decode()))
    with pytest.raises(Undecodable):
        address_of('{"name": "kv"}')

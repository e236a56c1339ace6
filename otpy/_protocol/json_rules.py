"""One rule for JSON requests and replies, shared by the HTTP endpoint and ``otpy call``.

A request made in JSON reaches ``handle_call`` in the shape the same request has when it
comes over MessagePack-RPC, whose arrays decode as tuples::

    decode_json(b'["store", "x", [1, 2]]') == ("store", "x", (1, 2))

Requests (JSON -> Python): arrays become tuples, objects dicts, an object whose only
key is ``"$bytes"`` with a base64 string becomes ``bytes``, and one whose only key is
``"$pid"`` with ``[node, creation, name, serial]`` becomes that :class:`otpy.Pid` (so
bytes and pids round-trip). Only strict JSON is read: ``NaN`` and ``Infinity`` are
refused, as are integers longer than Python's 4300-digit limit.

Addresses (:func:`address_of`): a server is named by its name, ``"name@node"``, or a
pid in that same JSON form (``{"$pid": [...]}``): the printed form ``<name.7@node>``
lacks the node's creation, so it could name an incarnation of an earlier run; the JSON
form names exactly one.

Replies (Python -> JSON), the values JSON cannot carry:

==========================  ===============================================
Python                      JSON
==========================  ===============================================
tuple, list                 array
dict                        object (int, float, bool and None keys become
                            strings, as Python's json does; other keys are
                            refused)
bytes, bytearray            ``{"$bytes": "<base64>"}``
otpy.Pid                    ``{"$pid": [node, creation, name, serial]}``
set, frozenset              array, sorted (by value, else by repr when the
                            elements do not compare)
a dataclass instance        object of its fields (not recursive copies:
                            each field is encoded by these same rules)
a pydantic model            ``model.model_dump(mode="json")``
float NaN or infinity       refused (JSON has no such number)
anything else               refused: :class:`Unencodable` names the type
                            and how to fix it
==========================  ===============================================

MessagePack bodies (``application/msgpack`` on the HTTP endpoint) decode as the
MessagePack-RPC endpoint decodes them (arrays as tuples, a pid as extension type 1) and
replies encode as it encodes them.

What must stay true, as for ``msgpack_rpc.Decoder``: decoding is bounded by what it
counts, not only by bytes. A body nests at most ``max_depth`` arrays/objects (the body
itself is level 1) and holds at most ``max_objects`` values, counting every array
element, object key and object value, plus the body itself. A JSON body is measured
before it is decoded (its separators and brackets outside strings, counted in C, bound
its values from above to within a factor of two), so a body of more than
``2 * max_objects`` values is refused without building any of it; otherwise it is
decoded and counted exactly. A MessagePack body is counted while msgpack builds it
(a hook per array and map), so at most ``max_objects`` values plus one array or map
are built before it is refused. No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .._core.names import Pid
from .._exceptions import BadRequest, OtpyError
from .msgpack_rpc import decode_ext, encode_ext

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_OBJECTS = 65536
BYTES_KEY = "$bytes"
PID_KEY = "$pid"

JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/msgpack"


class Undecodable(BadRequest):
    """A request body that cannot become a request; ``kind`` says why: ``"BadJson"``,
    ``"BadMsgpack"``, ``"TooDeep"`` or ``"TooManyObjects"``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Unencodable(OtpyError, TypeError):
    """A reply that JSON (or msgpack) cannot carry; the message names its type and how
    to fix it."""


# -- requests ------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON; send a number, or null, or a string")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
# Escaped backslashes, then escaped quotes, are removed first, so that what is left of
# each string is '"' [^"]* '"' and one linear pass finds them all.
_STRING = re.compile(rb'"[^"]*"')


def _upper_bound(data: bytes) -> int:
    """At least the number of values in the JSON text ``data``, at most twice it, when
    ``data`` holds no strings; with strings, more (their punctuation counts too).

    Every value but the body is an array element or an object member's key or value;
    a container of k items has k-1 commas, and a member one colon: so values =
    1 + commas + colons + non-empty containers, and each container counted here that is
    empty is a value as well."""
    return (1 + data.count(b",") + data.count(b":") + data.count(b"[")
            + data.count(b"{"))


def _without_strings(data: bytes) -> bytes:
    return _STRING.sub(b"", data.replace(b"\\\\", b"").replace(b'\\"', b""))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def decode_json(data: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH,
                max_objects: int = DEFAULT_MAX_OBJECTS) -> Any:
    """The request in the JSON text ``data``, as ``handle_call`` receives it (arrays as
    tuples, ``{"$bytes": base64}`` as bytes). Raises :class:`Undecodable`."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Every value takes at least one byte of its own, so a short body needs no count.
    if len(raw) > max_objects and _upper_bound(raw) > max_objects and \
            _upper_bound(_without_strings(raw)) > 2 * max_objects:
        raise Undecodable("TooManyObjects",
                          f"the request holds more than {max_objects} values (array elements, "
                          f"object keys and values); send fewer, or raise max_objects")
    try:
        text = raw.decode("utf-8")
        value = _decoder.decode(text)
    except RecursionError:
        raise Undecodable("TooDeep", f"the request nests arrays/objects more than {max_depth} "
                          f"levels deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the digit limit
        raise Undecodable("BadJson", f"the request is not JSON ({exc}); send a JSON value, "
                          f"e.g. [\"add\", 1] or \"incr\"") from None
    if type(value) is list or type(value) is dict:
        return _Walk(max_depth, max_objects).walk(value, 1)
    return value


class _Walk:
    """JSON's lists to tuples and ``$bytes`` objects to bytes, counting values and
    levels as it goes."""

    __slots__ = ("count", "max_depth", "max_objects")

    def __init__(self, max_depth: int, max_objects: int) -> None:
        self.count = 1
        self.max_depth = max_depth
        self.max_objects = max_objects

    def walk(self, obj: Any, depth: int) -> Any:
        if depth > self.max_depth:
            raise Undecodable("TooDeep", f"the request nests arrays/objects more than "
                              f"{self.max_depth} levels deep")
        walk = self.walk
        if type(obj) is list:
            self.count += len(obj)
            if self.count > self.max_objects:
                raise _too_many(self.max_objects)
            return tuple([walk(x, depth + 1) if type(x) is list or type(x) is dict else x
                          for x in obj])
        # a dict
        self.count += 2 * len(obj)
        if self.count > self.max_objects:
            raise _too_many(self.max_objects)
        if len(obj) == 1:
            if BYTES_KEY in obj:
                return _bytes_of(obj[BYTES_KEY])
            if PID_KEY in obj:
                return _pid_of(obj[PID_KEY])
        return {k: walk(v, depth + 1) if type(v) is list or type(v) is dict else v
                for k, v in obj.items()}


def _too_many(max_objects: int) -> Undecodable:
    return Undecodable("TooManyObjects",
                       f"the request holds more than {max_objects} values (array elements, "
                       f"object keys and values); send fewer, or raise max_objects")


def _bytes_of(text: Any) -> bytes:
    if not isinstance(text, str):
        raise Undecodable("BadJson", f"{{\"{BYTES_KEY}\": ...}} takes a base64 string, got "
                          f"{_short(text)}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Undecodable("BadJson", f"{{\"{BYTES_KEY}\": ...}} is not valid base64 "
                          f"({exc})") from None


def _pid_of(fields: Any) -> Pid:
    if (type(fields) is list and len(fields) == 4 and type(fields[0]) is str
            and type(fields[1]) is int and type(fields[2]) is str
            and type(fields[3]) is int and fields[0] and fields[2]):
        return Pid(*fields)
    raise Undecodable("BadJson", f"{{\"{PID_KEY}\": ...}} takes [node, creation, name, "
                      f"serial] (a string, an int, a string, an int), as replies encode "
                      f"a pid; got {_short(fields)}")


def pid_json(pid: Pid) -> dict[str, list[Any]]:
    """``pid`` in the JSON form :func:`decode_json` reads back."""
    return {PID_KEY: [pid.node, pid.creation, pid.name, pid.serial]}


def address_of(text: str) -> str | Pid:
    """The server address ``text`` names, as a path segment or a command's argument:
    a pid in its JSON form (``{"$pid": [node, creation, name, serial]}``, the form a
    JSON reply gives it), else a name or ``"name@node"`` as it is. Raises
    :class:`Undecodable` for a ``{`` that is not such a pid, and BadRequest for an
    empty name."""
    if text.startswith("{"):
        value = decode_json(text, max_depth=2, max_objects=16)
        if type(value) is not Pid:
            raise Undecodable("BadJson", f"an address in JSON is a pid, {{\"{PID_KEY}\": "
                              f"[node, creation, name, serial]}}; got {_short(text)}")
        return value
    if not text:
        raise BadRequest("no server name: name a server, or give a pid as "
                         f"{{\"{PID_KEY}\": [node, creation, name, serial]}}")
    return text


def decode_msgpack(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH,
                   max_objects: int = DEFAULT_MAX_OBJECTS) -> Any:
    """The request in the MessagePack ``data`` (arrays as tuples), within the same
    bounds as :func:`decode_json`. Raises :class:`Undecodable`."""
    count = 1

    def arrays(obj: Any) -> Any:
        nonlocal count
        count += len(obj)
        if count > max_objects:
            raise _too_many(max_objects)
        return obj

    def maps(pairs: Any) -> Any:
        nonlocal count
        count += 2 * len(pairs)
        if count > max_objects:
            raise _too_many(max_objects)
        return dict(pairs)

    try:
        value = msgpack.unpackb(
            data, use_list=False, raw=False, strict_map_key=False, list_hook=arrays,
            object_pairs_hook=maps, max_array_len=max_objects, max_map_len=max_objects,
            max_str_len=len(data), max_bin_len=len(data), max_ext_len=len(data),
            ext_hook=decode_ext)
    except Undecodable:
        raise
    except msgpack.StackError:
        raise Undecodable("TooDeep", f"the request nests arrays/maps more than {max_depth} "
                          f"levels deep") from None
    except ValueError as exc:
        if "exceeds max_" not in str(exc):  # one array or map longer than max_objects
            raise Undecodable("BadMsgpack", f"the request is not one MessagePack value "
                              f"({type(exc).__name__}: {exc})") from None
        raise _too_many(max_objects) from None
    except Exception as exc:  # FormatError, ExtraData, UnicodeDecodeError, ...
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise Undecodable("BadMsgpack", f"the request is not one MessagePack value ({detail})"
                          ) from None
    if _depth_exceeds(value, max_depth):
        raise Undecodable("TooDeep", f"the request nests arrays/maps more than {max_depth} "
                          f"levels deep")
    return value


def _depth_exceeds(obj: Any, limit: int) -> bool:
    t = type(obj)
    if t is not tuple and t is not dict:
        return False
    if limit <= 0:
        return True
    items = (*obj.keys(), *obj.values()) if t is dict else obj
    return any(_depth_exceeds(x, limit - 1) for x in items)


# -- replies -------------------------------------------------------------------------


def _sorted(items: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(items)
    except TypeError:  # elements that do not compare with each other
        return sorted(items, key=repr)


def _default(obj: Any) -> Any:
    """What JSON cannot carry, in terms it can (see the module's table)."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return {BYTES_KEY: base64.b64encode(obj).decode("ascii")}
    if type(obj) is Pid:
        return pid_json(obj)
    if isinstance(obj, set | frozenset):
        return _sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    dump = getattr(type(obj), "model_dump", None)  # a pydantic model, without importing it
    if dump is not None and callable(dump):
        return obj.model_dump(mode="json")
    raise Unencodable(
        f"a value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
        f"encoded as JSON: {_short(obj)}; reply with None, bool, int, float, str, "
        f"lists/tuples, dicts, bytes, sets, pids, dataclasses or pydantic models, or convert "
        f"it (e.g. to a dict or str) in handle_call")


_encoder = json.JSONEncoder(default=_default, separators=(",", ":"), allow_nan=False,
                            ensure_ascii=True)
_encode: Callable[[Any], str] = _encoder.encode


def encode_json(value: Any) -> bytes:
    """``value`` as JSON text (ASCII, compact), by the module's rules. Raises
    :class:`Unencodable` for what JSON cannot carry."""
    try:
        return _encode(value).encode("ascii")
    except Unencodable:
        raise
    except ValueError as exc:
        if "Circular" in str(exc):
            raise Unencodable(f"the reply contains itself ({exc}); reply with a tree of "
                              f"values, not a cycle") from None
        raise Unencodable(f"the reply holds a float JSON cannot carry (NaN or infinity): "
                          f"{_short(value)}; reply with None or a string instead") from None
    except TypeError as exc:  # a dict key that is not a str, int, float, bool or None
        raise Unencodable(f"the reply cannot be encoded as JSON ({exc}): {_short(value)}; "
                          f"use str keys in dicts") from None
    except RecursionError:
        raise Unencodable("the reply nests too deeply to be encoded as JSON") from None


_packer = msgpack.Packer(use_bin_type=True, datetime=False, default=encode_ext)


def encode_msgpack(value: Any) -> bytes:
    """``value`` as MessagePack, as the MessagePack-RPC endpoint encodes replies.
    Raises :class:`Unencodable`."""
    try:
        data: bytes = _packer.pack(value)
        return data
    except (TypeError, ValueError, OverflowError) as exc:
        _packer.reset()
        raise Unencodable(f"the reply cannot be encoded as MessagePack ({exc}): "
                          f"{_short(value)}; reply with None, bool, int, float, str, bytes, "
                          f"lists/tuples and dicts") from None

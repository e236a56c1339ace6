"""Release bundles: a release's file and the modules of its code directory, with their
digests, as one bounded message (bytes in, a checked :class:`Bundle` out; no I/O).

The ``otpy upgrade`` command reads a release from disk into a bundle and sends it over
the authenticated admin channel; the node loads the release from the bundle, never from
a path of its own. ``otpy.Release.load(path)`` goes through a bundle too, so a release
loaded in process and one sent over the wire are the same thing, with the same digest.

Format (MessagePack, version 1)::

    ["otpy-release-bundle", 1,
     [release_name, sha256(release), release_bytes],            the TOML file
     [[module_name, sha256(module), module_bytes], ...]]         sorted by name

``release_name`` is a bare file name ending in ``.toml`` (``v2.toml``); each
``module_name`` is a path relative to the release's code directory, of at most
``MAX_NAME_PARTS`` parts, each a Python identifier, the last ending in ``.py``
(``counter_v2.py``, ``shared/util.py``): never absolute, never ``..``, nothing but
``.py`` and ``.toml`` files. ``sha256`` is each file's SHA-256 (32 bytes), checked on
decoding.

A release is identified by :attr:`Bundle.digest`: the SHA-256 of the release file's
content and of each module's name and content, so two bundles have the same digest
exactly when they would load the same code.

What must stay true, whatever bytes arrive: at most ``MAX_BUNDLE_BYTES`` are looked at;
at most ``MAX_FILES`` files (the release file included) are accepted, no module larger
than ``MAX_MODULE_BYTES``; the decoder
builds a fixed number of objects per file (it reads the structure header by header and
refuses an element of the wrong type before decoding it, so nested garbage never
becomes Python objects); every name is checked before it is used.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .._exceptions import UpgradeFailed

FORMAT = "otpy-release-bundle"
VERSION = 1
# The whole encoded bundle: it must fit in one admin request, whose default max_frame is
# 1 MiB, with room to spare for the request around it.
MAX_BUNDLE_BYTES = 960 * 1024
MAX_FILES = 256  # the release file and its modules
# One module: a node unmarshals a module's compiled code in one go (about 16 ms for
# this much source on the reference machine), so this bounds that stall too.
MAX_MODULE_BYTES = 256 * 1024
MAX_NAME = 200  # characters of one name
MAX_NAME_PARTS = 8  # directories deep, plus the file

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_NAME = re.compile(rf"(?:{_IDENT}/){{0,{MAX_NAME_PARTS - 1}}}{_IDENT}\.py")
_RELEASE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.toml")
_SHA256 = 32

# MessagePack type bytes (the first byte of an encoded object).
_STR = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])
_BIN = frozenset([0xC4, 0xC5, 0xC6])
_INT = frozenset([*range(0x00, 0x80), *range(0xCC, 0xD4), *range(0xE0, 0x100)])
_ARRAY = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


@dataclass(frozen=True, slots=True)
class BundleFile:
    """One file of a bundle: its name, its content and the content's SHA-256."""

    name: str
    data: bytes
    sha256: bytes


@dataclass(frozen=True, slots=True)
class Bundle:
    """A release's file and its code directory's modules, checked (see the module
    docstring for the rules). Make one with :func:`make_bundle` or
    :func:`decode_bundle`."""

    release: BundleFile
    modules: tuple[BundleFile, ...]  # sorted by name
    digest: str  # hex SHA-256 naming the release's content

    @property
    def size(self) -> int:
        """Bytes of file content in the bundle."""
        return len(self.release.data) + sum(len(m.data) for m in self.modules)


def _fail(problem: str) -> UpgradeFailed:
    return UpgradeFailed(f"release bundle refused: {problem}")


def check_module_name(name: str) -> None:
    """Raise UpgradeFailed unless ``name`` is a module path a bundle may hold."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not _MODULE_NAME.fullmatch(
            name):
        raise _fail(
            f"module name {name!r:.{MAX_NAME + 10}} is not a relative path of Python "
            f"identifiers ending in .py (at most {MAX_NAME_PARTS} parts and {MAX_NAME} "
            f"characters; no absolute path, no '..')")


def check_release_name(name: str) -> None:
    """Raise UpgradeFailed unless ``name`` is a release file name a bundle may hold."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not _RELEASE_NAME.fullmatch(
            name):
        raise _fail(f"release file name {name!r:.{MAX_NAME + 10}} is not a bare file name "
                    f"ending in .toml (letters, digits, '_', '.', '-')")


def _digest(release: BundleFile, modules: tuple[BundleFile, ...]) -> str:
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\0".encode())
    h.update(release.sha256)
    for m in modules:
        h.update(m.name.encode() + b"\0" + m.sha256)
    return h.hexdigest()


def make_bundle(release_name: str, release_data: bytes,
                modules: Iterable[tuple[str, bytes]]) -> Bundle:
    """Check the names, count and size of a release's files and make its bundle.
    Raises :class:`otpy.UpgradeFailed` naming the first rule broken."""
    check_release_name(release_name)
    release = BundleFile(release_name, bytes(release_data),
                         hashlib.sha256(release_data).digest())
    files: dict[str, BundleFile] = {}
    size = len(release.data)
    for name, data in modules:
        check_module_name(name)
        if name in files:
            raise _fail(f"module {name!r} appears twice")
        if len(data) > MAX_MODULE_BYTES:
            raise _fail(f"module {name!r} takes {len(data)} bytes, more than "
                        f"{MAX_MODULE_BYTES}; split it into smaller modules")
        if len(files) + 1 >= MAX_FILES:
            raise _fail(f"more than {MAX_FILES} files (the release file and its modules); "
                        f"give the release a code directory that holds only its modules")
        size += len(data)
        if size > MAX_BUNDLE_BYTES:
            raise _fail(f"its files take more than {MAX_BUNDLE_BYTES} bytes; give the "
                        f"release a code directory that holds only its modules")
        files[name] = BundleFile(name, bytes(data), hashlib.sha256(data).digest())
    mods = tuple(files[name] for name in sorted(files))
    return Bundle(release, mods, _digest(release, mods))


def encode_bundle(bundle: Bundle) -> bytes:
    """The bundle as bytes (the format above); UpgradeFailed if it exceeds
    ``MAX_BUNDLE_BYTES`` once encoded."""
    data: bytes = msgpack.packb(
        [FORMAT, VERSION, [bundle.release.name, bundle.release.sha256, bundle.release.data],
         [[m.name, m.sha256, m.data] for m in bundle.modules]], use_bin_type=True)
    if len(data) > MAX_BUNDLE_BYTES:
        raise _fail(f"it takes {len(data)} bytes encoded, more than {MAX_BUNDLE_BYTES}")
    return data


class _Reader:
    """Reads a bundle's fixed structure header by header, refusing an element of the
    wrong type from its first byte, before msgpack builds anything of it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=max(len(data), 1), max_str_len=MAX_NAME,
            max_bin_len=MAX_BUNDLE_BYTES, max_array_len=MAX_FILES, max_map_len=0,
            max_ext_len=0)
        self.unpacker.feed(data)

    def _peek(self, kinds: frozenset[int], what: str) -> None:
        at = self.unpacker.tell()
        if at >= len(self.data):
            raise _fail(f"it ends before its {what}")
        if self.data[at] not in kinds:
            raise _fail(f"its {what} has the wrong type (byte 0x{self.data[at]:02x} at "
                        f"offset {at})")

    def array(self, what: str, length: int | None = None) -> int:
        self._peek(_ARRAY, what)
        n: int = self.unpacker.read_array_header()
        if length is not None and n != length:
            raise _fail(f"its {what} has {n} items, expected {length}")
        return n

    def scalar(self, kinds: frozenset[int], what: str) -> Any:
        self._peek(kinds, what)
        try:
            return self.unpacker.unpack()
        except ValueError as exc:  # longer than max_str_len or max_bin_len
            raise _fail(f"its {what}: {exc}") from None

    def file(self, what: str) -> tuple[str, bytes]:
        self.array(what, 3)
        name = self.scalar(_STR, f"{what}'s name")
        sha = self.scalar(_BIN, f"{what}'s digest")
        data = self.scalar(_BIN, f"{what}'s content")
        if len(sha) != _SHA256 or hashlib.sha256(data).digest() != sha:
            raise _fail(f"the content of {name!r:.{MAX_NAME + 10}} does not match its "
                        f"SHA-256 digest")
        return name, data


def decode_bundle(data: bytes) -> Bundle:
    """Decode and check a bundle (the format above). Raises :class:`otpy.UpgradeFailed`
    saying what is wrong with it."""
    if not isinstance(data, bytes | bytearray):
        raise _fail(f"expected the bundle's bytes, got {type(data).__name__}")
    if len(data) > MAX_BUNDLE_BYTES:
        raise _fail(f"it takes {len(data)} bytes, more than {MAX_BUNDLE_BYTES}")
    reader = _Reader(bytes(data))
    try:
        reader.array("top level", 4)
        tag = reader.scalar(_STR, "format name")
        version = reader.scalar(_INT, "format version")
        if tag != FORMAT or version != VERSION:
            raise _fail(f"expected format {FORMAT!r} version {VERSION}, got {tag!r:.40} "
                        f"version {version!r}; is the otpy command as new as the node?")
        release_name, release_data = reader.file("release file")
        n = reader.array("module list")
        if n + 1 > MAX_FILES:
            raise _fail(f"{n} modules, more than {MAX_FILES - 1}")
        modules = [reader.file(f"module {i}") for i in range(n)]
        if reader.unpacker.tell() != len(data):
            raise _fail(f"{len(data) - reader.unpacker.tell()} bytes follow its end")
    except (ValueError, msgpack.UnpackException) as exc:
        raise _fail(f"it is not a valid bundle ({type(exc).__name__}: {exc})") from None
    bundle = make_bundle(release_name, release_data, modules)
    if [m.name for m in bundle.modules] != [name for name, _ in modules]:
        raise _fail("its modules are not sorted by name")
    return bundle

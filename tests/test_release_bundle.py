"""The release bundle codec (sans-io): a release's file and modules with their digests,
round-tripped, and refused with a clear error for every hostile shape."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

import otpy
from otpy._protocol.release_bundle import (
    FORMAT,
    MAX_BUNDLE_BYTES,
    MAX_FILES,
    VERSION,
    decode_bundle,
    encode_bundle,
    make_bundle,
)

RELEASE = b'vsn = "2"\n[[updates]]\ntarget = "a:C"\nnew = "b:C"\n'


def bundle_bytes(release: list[object], modules: list[object]) -> bytes:
    data: bytes = msgpack.packb([FORMAT, VERSION, release, modules], use_bin_type=True)
    return data


def entry(name: str, data: bytes) -> list[object]:
    return [name, hashlib.sha256(data).digest(), data]


def test_a_bundle_round_trips_with_its_digest() -> None:
    """Encoded and decoded, a bundle is the same bundle, modules sorted by name."""
    bundle = make_bundle("v2.toml", RELEASE, [("b.py", b"x = 1\n"), ("pkg/a.py", b"")])
    again = decode_bundle(encode_bundle(bundle))
    assert bundle == again
    assert ["b.py", "pkg/a.py"] == [m.name for m in again.modules]
    assert 64 == len(again.digest)


def test_the_digest_names_the_content() -> None:
    """Same content, same digest (the release file's name aside); any change in a
    module's content or name, or in the release file, changes it."""
    base = make_bundle("v2.toml", RELEASE, [("b.py", b"x = 1\n")])
    assert base.digest == make_bundle("other.toml", RELEASE, [("b.py", b"x = 1\n")]).digest
    changed = [
        make_bundle("v2.toml", RELEASE, [("b.py", b"x = 2\n")]),
        make_bundle("v2.toml", RELEASE, [("c.py", b"x = 1\n")]),
        make_bundle("v2.toml", RELEASE + b"# more\n", [("b.py", b"x = 1\n")]),
        make_bundle("v2.toml", RELEASE, [("b.py", b"x = 1\n"), ("d.py", b"")]),
    ]
    assert 4 == len({b.digest for b in changed} - {base.digest})


@pytest.mark.parametrize("name", [
    "/etc/passwd.py", "../up.py", "a/../b.py", "a//b.py", "a\\b.py", "b.pyc", "b.so",
    "b", ".hidden.py", "1abc.py", "a-b.py", "a/b/c/d/e/f/g/h/i.py", "x" * 300 + ".py", "",
])
def test_bad_module_names_are_refused(name: str) -> None:
    """A module name is a relative path of identifiers ending in .py: no absolute path,
    no '..', no other kind of file, bounded in depth and length."""
    with pytest.raises(otpy.UpgradeFailed, match="module name"):
        make_bundle("v2.toml", RELEASE, [(name, b"")])
    with pytest.raises(otpy.UpgradeFailed, match=r"module name|module 0's name: .* exceeds"):
        decode_bundle(bundle_bytes(entry("v2.toml", RELEASE), [entry(name, b"")]))


@pytest.mark.parametrize("name", ["../v2.toml", "/v2.toml", "a/v2.toml", "v2.py",
                                  ".toml", "v 2.toml"])
def test_bad_release_file_names_are_refused(name: str) -> None:
    """The release file is a bare name ending in .toml."""
    with pytest.raises(otpy.UpgradeFailed, match="release file name"):
        decode_bundle(bundle_bytes(entry(name, RELEASE), []))


def test_a_file_whose_digest_does_not_match_is_refused() -> None:
    """Each file's SHA-256 is checked against its content."""
    bad = ["b.py", hashlib.sha256(b"x = 1").digest(), b"x = 2"]
    with pytest.raises(otpy.UpgradeFailed, match="does not match its SHA-256"):
        decode_bundle(bundle_bytes(entry("v2.toml", RELEASE), [bad]))


def test_too_many_files_are_refused() -> None:
    """At most MAX_FILES files, the release file included, when made or decoded."""
    modules = [(f"m{i}.py", b"") for i in range(MAX_FILES)]
    with pytest.raises(otpy.UpgradeFailed, match=f"more than {MAX_FILES} files"):
        make_bundle("v2.toml", RELEASE, modules)
    data = bundle_bytes(entry("v2.toml", RELEASE), [entry(n, d) for n, d in modules])
    with pytest.raises(otpy.UpgradeFailed, match=f"{MAX_FILES} modules, more than"):
        decode_bundle(data)


def test_too_many_bytes_are_refused() -> None:
    """At most MAX_BUNDLE_BYTES, when made, encoded or decoded."""
    big = b"#" * (MAX_BUNDLE_BYTES // 4 + 1)
    with pytest.raises(otpy.UpgradeFailed, match=f"more than {MAX_BUNDLE_BYTES} bytes"):
        make_bundle("v2.toml", RELEASE, [(f"m{i}.py", big) for i in range(4)])
    with pytest.raises(otpy.UpgradeFailed, match=f"more than {MAX_BUNDLE_BYTES}"):
        decode_bundle(b"\x00" * (MAX_BUNDLE_BYTES + 1))


def test_duplicate_module_names_are_refused() -> None:
    with pytest.raises(otpy.UpgradeFailed, match="appears twice"):
        decode_bundle(bundle_bytes(entry("v2.toml", RELEASE),
                                   [entry("a.py", b""), entry("a.py", b"")]))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "ends before its top level"),
    (msgpack.packb({"a": 1}), "top level has the wrong type"),
    (msgpack.packb(["other-format", 1, [], []]), "expected format"),
    (msgpack.packb([FORMAT, 2, [], []]), "version 1, got"),
    (msgpack.packb([FORMAT, VERSION, [[[]], b"", b""], []]),
     "release file's name has the wrong"),
    (msgpack.packb([FORMAT, VERSION]), "top level has 2 items"),
    (b"\xc1", "wrong type"),
])
def test_malformed_bundles_are_refused_with_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(otpy.UpgradeFailed, match=message):
        decode_bundle(data)


def test_nested_garbage_is_refused_before_it_becomes_objects() -> None:
    """Where a name is expected, a deep or wide structure is refused from its first
    byte: the decoder never builds it (a million nested arrays would otherwise cost
    tens of MB, or overflow msgpack's stack)."""
    deep = b"\x91" * 900_000 + b"\xc0"
    data = b"\x94" + msgpack.packb(FORMAT) + msgpack.packb(VERSION) + b"\x93" + deep
    with pytest.raises(otpy.UpgradeFailed, match="name has the wrong type"):
        decode_bundle(data)


def test_a_module_larger_than_the_module_bound_is_refused() -> None:
    """One module is at most MAX_MODULE_BYTES (its compiled code is unmarshalled in one
    go on the node, which that bounds)."""
    from otpy._protocol.release_bundle import MAX_MODULE_BYTES

    with pytest.raises(otpy.UpgradeFailed, match="split it into smaller modules"):
        make_bundle("v2.toml", RELEASE, [("a.py", b"#" * (MAX_MODULE_BYTES + 1))])

"""The node's cookie: where it comes from, how its file is created, and the file checks
that keep another user's (or a planted) file from becoming the node's secret."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from otpy import CookieError
from otpy._cookie import read_cookie


@pytest.fixture(autouse=True)
def cookie_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No OTPY_COOKIE; the cookie file is ``tmp_path / "cookie"``."""
    monkeypatch.delenv("OTPY_COOKIE", raising=False)
    path = tmp_path / "cookie"
    monkeypatch.setenv("OTPY_COOKIE_FILE", str(path))
    return path


def test_cookie_comes_from_the_environment_first(
        monkeypatch: pytest.MonkeyPatch, cookie_file: Path) -> None:
    """``$OTPY_COOKIE`` wins; no file is read or created."""
    monkeypatch.setenv("OTPY_COOKIE", "from-env")
    assert b"from-env" == read_cookie(create=True)
    assert not cookie_file.exists()


def test_cookie_file_is_created_with_mode_0600(cookie_file: Path) -> None:
    """Without OTPY_COOKIE the node creates a random cookie file readable by its owner
    only, and reads the same cookie back afterwards."""
    first = read_cookie(create=True)
    assert 0o600 == stat.S_IMODE(cookie_file.stat().st_mode)
    assert len(first) >= 32
    assert first == read_cookie(create=True) == read_cookie()


def test_cookie_file_open_to_others_is_refused(cookie_file: Path) -> None:
    """A cookie file that others can read is refused, with the fix in the message."""
    cookie_file.write_text("secret\n")
    os.chmod(cookie_file, 0o644)
    with pytest.raises(CookieError, match="chmod 600"):
        read_cookie()


def test_cookie_file_of_another_user_is_refused(cookie_file: Path) -> None:
    """A 0600 cookie file that belongs to another user is not the node's secret: a node
    running as root would otherwise take any user's file (here the test, as root,
    gives the file away; as another user it makes the file as that user cannot, so it
    checks the rule against the file's real owner instead)."""
    cookie_file.write_text("secret\n")
    os.chmod(cookie_file, 0o600)
    if os.geteuid() == 0:
        os.chown(cookie_file, 4242, 4242)
        with pytest.raises(CookieError, match=r"owned by uid 4242.*uid 0"):
            read_cookie()
    else:  # pragma: no cover - the suite runs as root on the reference machine
        assert b"secret" == read_cookie()


def test_cookie_file_that_is_a_symlink_is_refused(cookie_file: Path,
                                                  tmp_path: Path) -> None:
    """The cookie file is opened without following a symlink: a link planted where the
    cookie should be (to a file of the attacker's, or /dev/zero) is refused."""
    target = tmp_path / "elsewhere"
    target.write_text("planted\n")
    os.chmod(target, 0o600)
    cookie_file.symlink_to(target)
    with pytest.raises(CookieError, match="symbolic link"):
        read_cookie()
    with pytest.raises(CookieError, match="symbolic link"):
        read_cookie(create=True)


def test_cookie_file_too_large_is_refused(cookie_file: Path) -> None:
    """A cookie file is a short line: one larger than the bound is refused, not read."""
    cookie_file.write_bytes(b"x" * (1 << 20))
    os.chmod(cookie_file, 0o600)
    with pytest.raises(CookieError, match="larger than"):
        read_cookie()


def test_cookie_file_that_is_a_fifo_is_refused_without_waiting(
        cookie_file: Path) -> None:
    """The checks are made on the opened file (no check-then-read race), which is
    opened without blocking: a FIFO where the cookie should be is refused at once
    instead of hanging the node's start until a writer appears. (Read in a thread: if
    it still waits after 10 s the FIFO gets a writer, which frees it, and the test
    fails.)"""
    os.mkfifo(cookie_file, 0o600)
    raised: list[BaseException] = []

    def read() -> None:
        try:
            read_cookie()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(cookie_file, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("reading the cookie waited on the FIFO")
    [exc] = raised
    assert isinstance(exc, CookieError) and "not a regular file" in str(exc)


def test_empty_cookie_file_is_refused(cookie_file: Path) -> None:
    """An empty cookie file is refused rather than taken as an empty secret."""
    cookie_file.write_text("\n")
    os.chmod(cookie_file, 0o600)
    with pytest.raises(CookieError, match="empty"):
        read_cookie()

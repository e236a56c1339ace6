"""The node's cookie: the shared secret of its admin endpoint, as Erlang's.

It comes from ``$OTPY_COOKIE``, else from a file (``$OTPY_COOKIE_FILE``, by default
``~/.otpy_cookie``) that a node creates with a random cookie and mode 0600 on first
start. Both the node and the ``otpy`` command read it through :func:`read_cookie`;
this module does plain file I/O and no trio, so the command does not load the node's
endpoints to read it.

What must stay true of the file, so that no other local user can choose or read the
node's secret:

- it is opened once, without following a symbolic link (``O_NOFOLLOW``) and without
  blocking (``O_NONBLOCK``: a FIFO cannot hang the open);
- every check is made on that open file (``fstat``), never on the path, so the file
  cannot be swapped between the check and the read: a regular file, owned by the
  effective user (a node running as root refuses another user's file), with no
  permission for group or others, at most ``MAX_COOKIE_BYTES`` long, not empty.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ._exceptions import CookieError

COOKIE_ENV = "OTPY_COOKIE"
COOKIE_FILE_ENV = "OTPY_COOKIE_FILE"
# A cookie is one short line; a bigger file is not a cookie.
MAX_COOKIE_BYTES = 4096

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
_POSIX = os.name == "posix"


def cookie_path() -> Path:
    """Where the cookie file is: ``$OTPY_COOKIE_FILE``, else ``~/.otpy_cookie``."""
    return Path(os.environ.get(COOKIE_FILE_ENV) or Path.home() / ".otpy_cookie")


def read_cookie(*, create: bool = False) -> bytes:
    """The node's secret: ``$OTPY_COOKIE``, else the cookie file (created with mode 0600
    and a random cookie when ``create`` and it does not exist yet). Raises
    :class:`otpy.CookieError` saying what is wrong with the file and how to fix it."""
    env = os.environ.get(COOKIE_ENV)
    if env:
        return env.encode()
    path = cookie_path()
    if create:
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    # O_EXCL never follows a symlink and never reuses a file someone else made.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return  # read (and checked) next
    except OSError as exc:
        raise CookieError(f"cannot create the cookie file {str(path)!r}: {exc}; set "
                          f"{COOKIE_ENV} or point {COOKIE_FILE_ENV} at a writable "
                          f"path") from exc
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def _read(path: Path) -> bytes:
    where = f"the cookie file {str(path)!r}"
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if _POSIX and os.path.islink(path):
            raise CookieError(
                f"{where} is a symbolic link; a cookie file is read only where it is, "
                f"never through a link (someone else may have planted it): replace it "
                f"by the file itself, or point {COOKIE_FILE_ENV} at it") from exc
        raise CookieError(
            f"no cookie: {COOKIE_ENV} is not set and {where} cannot be read "
            f"({exc.strerror or exc}); set {COOKIE_ENV}, or {COOKIE_FILE_ENV} to the "
            f"node's cookie file") from exc
    try:
        info = os.fstat(fd)
        _check(info, where, path)
        data = os.read(fd, MAX_COOKIE_BYTES + 1)
    except OSError as exc:
        raise CookieError(f"cannot read {where}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_COOKIE_BYTES:  # it grew after the fstat
        raise _too_large(where)
    text = data.strip()
    if not text:
        raise CookieError(f"{where} is empty; delete it and the node makes a new one, or "
                          f"write the cluster's cookie into it")
    return text


def _check(info: os.stat_result, where: str, path: Path) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise CookieError(f"{where} is not a regular file (a FIFO, device or directory); "
                          f"point {COOKIE_FILE_ENV} at the cookie file itself")
    if _POSIX:
        euid = os.geteuid()
        if info.st_uid != euid:
            raise CookieError(
                f"{where} is owned by uid {info.st_uid}, and this process runs as uid "
                f"{euid}: a cookie file must belong to the user who reads it; run: "
                f"chown {euid} {str(path)!r}, or set {COOKIE_ENV}")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CookieError(f"{where} is accessible to others (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 "
                              f"{str(path)!r}")
    if info.st_size > MAX_COOKIE_BYTES:
        raise _too_large(where)


def _too_large(where: str) -> CookieError:
    return CookieError(f"{where} is larger than {MAX_COOKIE_BYTES} bytes, so it is not a "
                       f"cookie; point {COOKIE_FILE_ENV} at the node's cookie file")

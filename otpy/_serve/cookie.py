"""The node's cookie: the shared secret of its admin endpoint and its HTTP dashboard.

The cookie comes from ``OTPY_COOKIE`` or from a file (``OTPY_COOKIE_FILE``, by default
``~/.otpy_cookie``) created with mode 0600 on first start, as Erlang's. Shared by the
transports that authenticate (``rpc``'s admin endpoint, ``http``'s dashboard) and the
``otpy`` command, so that none of them imports another.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .._exceptions import OtpyError

COOKIE_ENV = "OTPY_COOKIE"
COOKIE_FILE_ENV = "OTPY_COOKIE_FILE"


class CookieError(OtpyError):
    """The node's cookie cannot be read or created, or its file is open to others."""


def cookie_path() -> Path:
    """Where the cookie file is: ``$OTPY_COOKIE_FILE``, else ``~/.otpy_cookie``."""
    return Path(os.environ.get(COOKIE_FILE_ENV) or Path.home() / ".otpy_cookie")


def read_cookie(*, create: bool = False) -> bytes:
    """The node's secret: ``$OTPY_COOKIE``, else the cookie file (created with mode 0600
    and a random cookie when ``create`` and it does not exist yet)."""
    env = os.environ.get(COOKIE_ENV)
    if env:
        return env.encode()
    path = cookie_path()
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CookieError(f"cannot create the cookie file {str(path)!r}: {exc}; set "
                              f"{COOKIE_ENV} or point {COOKIE_FILE_ENV} at a writable "
                              f"path") from exc
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    try:
        info = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise CookieError(
            f"no cookie: {COOKIE_ENV} is not set and the cookie file {str(path)!r} cannot "
            f"be read ({exc.strerror or exc}); set {COOKIE_ENV}, or {COOKIE_FILE_ENV} to "
            f"the node's cookie file") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CookieError(f"the cookie file {str(path)!r} is accessible to others (mode "
                          f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 {str(path)!r}")
    if not text:
        raise CookieError(f"the cookie file {str(path)!r} is empty")
    return text.encode()

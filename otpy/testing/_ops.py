"""What a simulated client can yield: each value names one operation of a real client.

A client is a generator function; ``reply = yield otpy.testing.call("kv", "get")``
performs the call and resumes the client with the reply (or throws the error into it).
The operations are small frozen values, so a script of them can be built, compared and
printed as data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._core.release import Release


class Call(NamedTuple):
    """``yield call(name, request, timeout=5.0, vsn=None)``: resumes with the reply."""

    name: str
    request: Any
    timeout: float | None
    vsn: str | None = None


class Cast(NamedTuple):
    """``yield cast(name, message)`` (``info=False``) or ``yield send(name, message)``."""

    name: str
    message: Any
    info: bool


class Sleep(NamedTuple):
    """``yield sleep(seconds)``: resumes when the virtual clock has advanced."""

    seconds: float


class Upgrade(NamedTuple):
    """``yield upgrade(release)``: resumes with the report, as ``node.upgrade``."""

    release: Release


class Downgrade(NamedTuple):
    """``yield downgrade()``: resumes with the report, as ``node.downgrade``."""


class Crash(NamedTuple):
    """``yield crash(name)``: crash server ``name`` now, as if its callback raised."""

    name: str
    error: BaseException | None


Operation = Call | Cast | Sleep | Upgrade | Downgrade | Crash


def call(name: str, request: Any, *, timeout: float | None = 5.0,
         vsn: str | None = None) -> Call:
    """Call server ``name``; the client resumes with the reply.

    As ``await node.call`` (the same call path): an idle server is stepped at once, a
    busy one answers in turn. The client gets :class:`otpy.ServerCrashed`,
    :class:`otpy.NoSuchServer` or, after ``timeout`` virtual seconds,
    :class:`otpy.CallTimeout` thrown into it. ``vsn`` is the protocol version the
    client speaks, as for ``node.call``."""
    return Call(name, request, timeout, vsn)


def cast(name: str, message: Any) -> Cast:
    """Cast ``message`` to ``name`` (``handle_cast``); the client resumes with None."""
    return Cast(name, message, False)


def send(name: str, message: Any) -> Cast:
    """Send ``message`` to ``name`` (``handle_info``); the client resumes with None."""
    return Cast(name, message, True)


def sleep(seconds: float) -> Sleep:
    """Let ``seconds`` of virtual time pass (``sleep(0)`` only lets others run)."""
    if not seconds >= 0:
        raise ValueError(f"sleep needs seconds >= 0, got {seconds!r}")
    return Sleep(float(seconds))


def upgrade(release: Release) -> Upgrade:
    """Install ``release`` with the real release handler, migrating while the other
    clients and servers keep running; resumes with the report or throws
    :class:`otpy.UpgradeFailed`."""
    if not isinstance(release, Release):
        raise TypeError(f"upgrade needs an otpy.Release, got {release!r}")
    return Upgrade(release)


def downgrade() -> Downgrade:
    """Go back to the release before the newest, as ``node.downgrade()``."""
    return Downgrade()


def crash(name: str, error: BaseException | None = None) -> Crash:
    """Crash server ``name`` now with ``error`` (default :class:`InjectedFault`): it is
    logged, ``terminate`` runs and its supervisor acts, as for any crash."""
    return Crash(name, error)

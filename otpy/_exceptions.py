"""The whole otpy error tree.

Every error otpy raises derives from :class:`OtpyError` and, where there is one, from
the built-in exception a Python user would already catch for that situation::

    OtpyError (Exception)
    ├── NoSuchServer (LookupError)            no server or supervisor has that name
    ├── CallTimeout (TimeoutError)            no reply within the call's timeout
    ├── StepTimeout (TimeoutError)            a callback overran its step_timeout
    ├── ServerStopped (RuntimeError)          the server stopped before it answered
    │   └── ServerCrashed                     ... because a callback raised
    ├── WouldBlock                            a non-blocking operation cannot finish now
    ├── MailboxFull                           the server's mailbox is at max_mailbox
    ├── BadReturn (TypeError)                 a callback returned an undocumented value
    ├── StateTypeError (TypeError)            a state does not match the declared type
    ├── StartFailed                           a child's init failed while starting
    ├── RestartIntensityExceeded              a supervisor gave up (too many restarts)
    ├── SupervisorError (ValueError)          a bad child spec, id or supervisor call
    └── UpgradeFailed                         a release upgrade changed nothing (why inside)

A message says what was expected, shows what was got and says how to fix it;
context such as the server name goes on with ``add_note``.
"""

from __future__ import annotations

from typing import Any


class OtpyError(Exception):
    """The root of every error otpy raises."""


class NoSuchServer(OtpyError, LookupError):
    """No running server (or supervisor) is registered under the name that was used."""

    def __init__(self, name: object, detail: str = "") -> None:
        self.name = name
        msg = f"no server named {name!r} is running"
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)


class CallTimeout(OtpyError, TimeoutError):
    """A call got no reply within its timeout. The request may still be served later;
    its late reply is dropped."""


class StepTimeout(OtpyError, TimeoutError):
    """A callback ran longer than its server's ``step_timeout`` and was interrupted; the
    server crashed with this error as its reason (the message says where it was)."""

    def __init__(self, message: str, *, name: object = None, seconds: float = 0.0) -> None:
        super().__init__(message)
        self.name = name
        self.seconds = seconds


class Overrun(BaseException):
    """Raised by the watchdog inside a callback that overran (private).

    A BaseException, as ``trio.Cancelled`` is, so that the callback's own
    ``except Exception`` cannot swallow it; whoever ran the callback turns it into the
    server's crash with :class:`StepTimeout` as the reason."""

    def __init__(self, error: StepTimeout) -> None:
        super().__init__(str(error))
        self.error = error

    def timeout(self) -> StepTimeout:
        """The StepTimeout to crash with, carrying the traceback of where it was."""
        return self.error.with_traceback(self.__traceback__)


class ServerStopped(OtpyError, RuntimeError):
    """The server stopped before it answered the call and was not restarted to serve it."""

    def __init__(self, message: str, *, name: object = None, reason: object = None) -> None:
        super().__init__(message)
        self.name = name
        self.reason = reason


class ServerCrashed(ServerStopped):
    """A callback of the server raised while serving this call; ``__cause__`` is the
    original exception."""


class WouldBlock(OtpyError):
    """A synchronous (``*_nowait`` or in-step) operation cannot finish without waiting."""


class MailboxFull(OtpyError):
    """The target's mailbox holds ``max_mailbox`` messages; nothing was queued."""

    def __init__(self, message: str, *, name: object = None) -> None:
        super().__init__(message)
        self.name = name


class BadReturn(OtpyError, TypeError):
    """A callback returned a value that is not one of its documented results."""


class StateTypeError(OtpyError, TypeError):
    """A state does not match the server class's declared state type."""


class StartFailed(OtpyError):
    """A child could not be started: its ``init`` raised or returned ``Stop``.
    ``__cause__`` is the original exception."""

    def __init__(self, message: str, *, child: object = None, reason: Any = None) -> None:
        super().__init__(message)
        self.child = child
        self.reason = reason


class RestartIntensityExceeded(OtpyError):
    """A supervisor saw more than ``max_restarts`` restarts within ``max_seconds`` and
    gave up. Raised by ``open_node`` when the root supervisor gives up."""

    def __init__(self, message: str, *, supervisor: object = None, last_failure: Any = None):
        super().__init__(message)
        self.supervisor = supervisor
        self.last_failure = last_failure


class SupervisorError(OtpyError, ValueError):
    """A child spec, child id or supervisor operation was not valid."""


class UpgradeFailed(OtpyError):
    """A release upgrade or downgrade was refused or rolled back; nothing changed.

    ``failures`` maps each failed server name (or update) to the reason."""

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[str, str] = dict(failures or {})

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
    ├── UpgradeFailed                         a release upgrade changed nothing (why inside)
    ├── BadRequest (ValueError)               a request over the network had the wrong shape
    ├── CookieError (PermissionError)         the node's cookie cannot be read or is unsafe
    ├── StoreError (OSError)                  the durable store cannot open, write or read back
    ├── FrameTooLarge (ValueError)            a message over an endpoint's or client's limits
    ├── RemoteError                           a node answered a client with an error
    │   └── RemoteError[kind]                 ... also the local error named kind, if any
    ├── ConnectionLost (ConnectionError)      a client's connection to a node closed
    ├── AuthFailed (PermissionError)          the admin endpoint refused the cookie
    └── otpy.testing.SimulationError          a simulation cannot go on (RuntimeError)

Plus one error the user's code never catches: the watchdog interrupts a runaway
callback with a private ``BaseException`` (as trio cancels with ``trio.Cancelled``),
which otpy turns into the server's crash with :class:`StepTimeout` as the reason.

A client of a node's endpoint (``otpy.connect``) raises ``RemoteError``; when its kind
names one of the errors above it is also that error, so ``except otpy.NoSuchServer``
works over the network as it does in process.

A message says what was expected, shows what was got and says how to fix it;
context such as the server name goes on with ``add_note``.
"""

from __future__ import annotations

import sys
from types import MappingProxyType
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


class BadRequest(OtpyError, ValueError):
    """A request over the network did not have the shape its method takes (e.g. ``call``
    without a server name); the node answers ``["BadRequest", message]``."""


class CookieError(OtpyError, PermissionError):
    """The node's cookie cannot be read or created, or its file is not safe to trust: a
    symbolic link, not a regular file, another user's, open to others, empty or too
    large. The message says which, and how to fix it."""


class StoreError(OtpyError, OSError):
    """The node's durable store cannot do what was asked: open (a read-only directory,
    a store another process holds), record a state (a full disk, a state that cannot be
    pickled or is larger than the store's bound), or give a stored state back (it
    cannot be unpickled). ``path`` names the store; ``__cause__`` is the underlying
    error, if any. Nothing was recorded by the call that raised it."""

    def __init__(self, message: str, *, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class FrameTooLarge(OtpyError, ValueError):
    """A message over the network was larger than its reader accepts: a request over
    the endpoint's ``max_frame`` bytes or ``max_objects`` objects (the node answers
    ``["FrameTooLarge", message]`` and keeps the connection), or a reply over the
    limits of ``otpy.connect`` (``max_frame=``, ``max_objects=``)."""


class RemoteError(OtpyError):
    """A node answered a request made over the network with an error ``[kind,
    message]``; ``kind`` is the name of the error on the node (``"NoSuchServer"``,
    ``"ServerCrashed"``, ``"BadRequest"``, ``"FrameTooLarge"``, ...).

    ::

        try:
            await client.call("kv9", "x")
        except otpy.NoSuchServer as exc:      # also an otpy.RemoteError
            print(exc.kind, exc.message)

    When ``kind`` names one of otpy's errors, the error raised is also an instance of
    that class (a subclass of both, shown as ``RemoteError[NoSuchServer]``), so code
    written against a local node catches the same errors from a remote one. What only
    the node knew is not there: the original exception of a ``ServerCrashed`` stays in
    the node's log, and attributes such as ``name`` or ``reason`` are None."""

    def __init__(self, kind: str, message: str) -> None:
        # Not super().__init__: in a RemoteError[kind] that would be the local error's
        # constructor, which takes other arguments.
        Exception.__init__(self, f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return remote_error, (self.kind, self.message)


class ConnectionLost(OtpyError, ConnectionError):
    """A client's connection to a node closed before the reply came."""


class AuthFailed(OtpyError, PermissionError):
    """A node's admin endpoint refused the client's answer to its challenge (the
    cookie does not match), or the peer could not prove it knows the cookie."""


_remote_classes: dict[str, type[RemoteError]] = {}


def _local_error(kind: str) -> type[OtpyError] | None:
    cls = getattr(sys.modules[__name__], kind, None)
    if (isinstance(cls, type) and issubclass(cls, OtpyError) and cls is not OtpyError
            and not issubclass(cls, RemoteError)):
        return cls
    return None


def remote_error(kind: str, message: str) -> RemoteError:
    """The error to raise for an error reply ``[kind, message]``: a :class:`RemoteError`
    that is also the local error named ``kind``, if otpy has one (one class per kind,
    made on first use)."""
    cls = _remote_classes.get(kind)
    if cls is None:
        local = _local_error(kind)
        if local is None:
            return RemoteError(kind, message)
        # The local constructor is not run, so the attributes the local errors' own
        # constructors set are given here, as unknown: keep this list in step with them.
        namespace: dict[str, Any] = {
            "__module__": "otpy", "__qualname__": f"RemoteError[{kind}]",
            "__doc__": f"{local.__name__} on a remote node, reported as an error reply.",
            "name": None, "reason": None, "child": None, "supervisor": None,
            "last_failure": None, "seconds": None, "failures": MappingProxyType({}),
        }
        cls = _remote_classes[kind] = type(f"RemoteError[{kind}]", (RemoteError, local),
                                           namespace)
    return cls(kind, message)

"""GenServer, the base class of every otpy server, and the values its callbacks return.

A server is a class whose callbacks are plain synchronous functions of explicit state.
The node steps them directly on its one trio loop: there is no task or thread per
server, so a callback must not block (no ``time.sleep``, no socket reads); run I/O with
:meth:`GenServer.start_task` and receive its result as a message.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import reprlib
import typing
from collections import deque
from collections.abc import Callable
from types import CodeType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypeVar

from .._exceptions import BadReturn
from .typecheck import checker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator

    from .monitors import Links, MonitorRef
    from .names import Pid
    from .scheduler import Scheduler, TaskRef
    from .supervisor import Child, SupervisorRuntime
    from .timers import TimerRef

S = TypeVar("S")

_CALLBACKS = (
    "init",
    "handle_call",
    "handle_cast",
    "handle_info",
    "terminate",
    "code_change",
    "upgrade_request",
    "downgrade_reply",
    "handle_continue",
    "resume",
)
# Public helpers a subclass inherits; a near-miss of these is not a typo of a callback.
_HELPERS = ("call", "cast", "send", "send_after", "start_task", "name", "pid", "monitor",
            "demonitor", "changed")


class _Nothing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no reply>"


NOTHING: Any = _Nothing()


class _Result(Generic[S]):
    # Callback results are values: equal when their fields are, shown as constructed,
    # and (for code written against the tuples they once were) iterable and indexable.
    # Plain slots classes rather than NamedTuples: building one is on every call's path
    # and a slots __init__ costs half as much. Treat them as immutable.
    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fields())

    def __getitem__(self, index: int) -> Any:
        return self._fields()[index]

    def __len__(self) -> int:
        return len(self.__match_args__)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__match_args__)
        return f"otpy.{type(self).__name__}({shown})"


class Reply(_Result[S]):
    """``handle_call`` result: answer the caller with ``reply`` and continue with ``state``."""

    __slots__ = ("reply", "state")
    __match_args__ = ("reply", "state")

    def __init__(self, reply: Any, state: S) -> None:
        self.reply = reply
        self.state = state


class NoReply(_Result[S]):
    """``handle_call`` result: continue with ``state`` and answer later with
    ``caller.reply(value)``."""

    __slots__ = ("state",)
    __match_args__ = ("state",)

    def __init__(self, state: S) -> None:
        self.state = state


class Stop(_Result[S]):
    """Result of any handler (or ``init``): stop the server with ``reason``.

    ``"normal"`` and ``"shutdown"`` are normal exits (a transient child is not restarted);
    any other reason is abnormal. From ``handle_call``, ``reply`` (if given) answers the
    caller before ``terminate(reason, state)`` runs."""

    __slots__ = ("reason", "reply", "state")
    __match_args__ = ("reason", "state", "reply")

    def __init__(self, reason: Any, state: S, reply: Any = NOTHING) -> None:
        self.reason = reason
        self.state = state
        self.reply = reply


class Continue(_Result[S]):
    """Do what ``result`` says, then run ``handle_continue(arg, state)`` before any other
    message reaches the server (OTP's ``{continue, Arg}``).

    One wrapper for every callback, so that the results you know keep their shape::

        return otpy.Continue(otpy.Reply("ok", state), "flush")  # from handle_call
        return otpy.Continue(state, "load")        # from init, handle_cast, handle_info
        return otpy.Continue(otpy.NoReply(state), "fetch")      # answer later, go on now

    ``handle_continue`` returns the new state, ``Stop``, or another ``Continue``. It runs
    within the same step, right after the reply (if any) is handed to the caller: no
    message, timer or call can come in between."""

    __slots__ = ("arg", "result")
    __match_args__ = ("result", "arg")

    def __init__(self, result: Any, arg: Any) -> None:
        if type(result) is Continue:
            raise TypeError("otpy.Continue(result, arg) takes the result of the callback "
                            "(a state, Reply, NoReply), not another Continue")
        self.result = result
        self.arg = arg


class _IgnoreType:
    """``init`` result: do not run this child; its supervisor keeps it listed as not
    running (a temporary child's spec is dropped)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "otpy.Ignore"

    def __reduce__(self) -> str:
        return "Ignore"


Ignore: Any = _IgnoreType()
"""``init`` result: do not run this child; its supervisor keeps it listed as not running."""

NORMAL_REASONS = frozenset({"normal", "shutdown"})


def is_normal_reason(reason: object) -> bool:
    """``"normal"``, ``"shutdown"`` and ``("shutdown", detail)`` are normal exits."""
    if isinstance(reason, str):
        return reason in NORMAL_REASONS
    return isinstance(reason, tuple) and len(reason) == 2 and reason[0] == "shutdown"


class TaskDone(NamedTuple):
    """Message delivered to ``handle_info`` when a task from ``start_task`` returns."""

    tag: Any
    result: Any


class TaskFailed(NamedTuple):
    """Message delivered to ``handle_info`` when a task from ``start_task`` raises."""

    tag: Any
    error: BaseException


# Caller._status: where a call stands. A caller is answered at most once.
WAITING = 0  # nobody answered yet and the caller still waits
ANSWERED = 1  # replied to, or failed with an error
GAVE_UP = 2  # the caller stopped waiting (timeout, cancellation): answers are dropped


class Caller:
    """Who is waiting for a ``handle_call`` reply.

    Return ``NoReply(state)`` from ``handle_call``, keep the caller, and answer later
    with ``caller.reply(value)`` (from any later callback of any server). Replying to a
    caller that gave up (its timeout passed) or replying twice does nothing;
    ``caller.alive`` says whether anyone still waits.

    Every way of reaching a server (a task's ``await node.call``, a connection of an
    endpoint, a simulated client) is a subclass that supplies two hooks, ``_resolve``
    (the reply) and ``_reject`` (an error), each called at most once."""

    __slots__ = ("_status",)

    # A caller stepped inline (self.call, call_nowait) needs its answer within the step:
    # a reply is never held for it (see Durability: group commit holds the others').
    _inline = False

    def __init__(self) -> None:
        self._status = WAITING

    @property
    def alive(self) -> bool:
        """True while the caller still waits for its reply."""
        return self._status == WAITING

    def reply(self, value: Any) -> None:
        """Send ``value`` as the reply. Later replies, and replies after the caller gave
        up, are dropped."""
        if self._status == WAITING:
            self._status = ANSWERED
            self._resolve(value)

    def _fail(self, exc: BaseException) -> None:
        if self._status == WAITING:
            self._status = ANSWERED
            self._reject(exc)

    def _give_up(self) -> None:
        """The caller stops waiting: whatever comes later is dropped."""
        if self._status == WAITING:
            self._status = GAVE_UP

    def _resolve(self, value: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reject(self, exc: BaseException) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class InlineCaller(Caller):
    """The caller of a call stepped inline: the answer is ready when the step returns."""

    __slots__ = ("error", "value")

    _inline = True

    def __init__(self) -> None:
        self._status = WAITING
        self.error: BaseException | None = None

    def _resolve(self, value: Any) -> None:
        self.value = value

    def _reject(self, exc: BaseException) -> None:
        self.error = exc


def _hash_code(h: Any, code: Any) -> None:
    # Bytecode, names and constants, not line numbers: moving a class down a file does
    # not make it a new version.
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(h, const)
        else:
            h.update(repr(const).encode())


def _derive_vsn(cls: type) -> str:
    """A version from the class's code, as OTP derives a module's vsn from its checksum."""
    h = hashlib.blake2b(digest_size=6)
    h.update(cls.__qualname__.encode())
    for name in sorted(vars(cls)):
        value = inspect.unwrap(vars(cls)[name]) if callable(vars(cls)[name]) else None
        code = getattr(value, "__code__", None)
        if code is not None:
            h.update(name.encode())
            _hash_code(h, code)
    return h.hexdigest()


def _declared_state_type(cls: type) -> Any:
    for base in getattr(cls, "__orig_bases__", ()):
        if typing.get_origin(base) is GenServer:
            (arg,) = typing.get_args(base)
            return Any if isinstance(arg, TypeVar) else arg
    for base in cls.__mro__[1:]:
        if "_state_type" in vars(base):
            return vars(base)["_state_type"]
    return Any


def _check_callbacks(cls: type) -> None:
    known = set(_CALLBACKS) | set(_HELPERS)
    for attr, value in vars(cls).items():
        if attr.startswith("__"):
            continue
        func = inspect.unwrap(value) if callable(value) else value
        if attr in _CALLBACKS and (
            inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)
        ):
            raise TypeError(
                f"{cls.__qualname__}.{attr} is an async function, but otpy steps callbacks "
                f"synchronously on the node's loop (no task per server). Write "
                f"'def {attr}(...)' and run I/O with self.start_task(async_fn, ...), whose "
                f"result arrives in handle_info as otpy.TaskDone / otpy.TaskFailed."
            )
        # A leading underscore marks a private helper: the rename the error suggests.
        if attr not in known and not attr.startswith("_") and callable(value):
            close = difflib.get_close_matches(attr, _CALLBACKS, n=1, cutoff=0.85)
            if close:
                raise TypeError(
                    f"{cls.__qualname__} defines {attr!r}, which is not an otpy callback; "
                    f"did you mean {close[0]!r}? Rename it (or give a helper a name that "
                    f"does not look like a callback, e.g. '_{attr}')."
                )


# The code objects of every callback of every server class (see GenServer's
# __init_subclass__): how the watchdog tells a user's callback from otpy's own frames
# and from helpers such as a logger, without a step writing anything down.
CALLBACK_CODES: set[Any] = set()

# The functions that run a server's callbacks, each with the name of its argument (or
# local variable) that holds that server: the watchdog reads the server from their
# frames. Marked with @runs_callbacks next to their definitions, so that renaming the
# variable fails at import instead of silently turning step_timeout off.
RUNNERS: dict[CodeType, str] = {}

F = TypeVar("F", bound="Callable[..., Any]")


def runs_callbacks(server_arg: str) -> Callable[[F], F]:
    """Mark a function that calls callbacks of the server held in its argument or
    local variable ``server_arg`` (for the step watchdog); the function itself is
    unchanged."""

    def mark(fn: F) -> F:
        code = fn.__code__
        if server_arg not in code.co_varnames:
            raise AssertionError(f"{fn.__qualname__} has no variable {server_arg!r}")
        RUNNERS[code] = server_arg
        return fn

    return mark


# Scheduler.OBSERVED and DEAD, spelled here (the scheduler imports this module): a
# server whose commits a store records; a server that stopped.
OBSERVED_FLAG = 64
DEAD_FLAG = 8

# The runtime's own attributes on a server: one prefix that a user's class can never
# reach by accident (a server may set self._node or self._state for itself).
RUNTIME_PREFIX = "_otpy_"


class GenServer(Generic[S]):
    """A generic server: a state machine that otpy steps inline, supervised.

    Subclass it with the state type as the type argument, set ``vsn`` and write the
    callbacks as plain functions of explicit state::

        class Counter(otpy.GenServer[int]):
            vsn = "1"

            def init(self, arg) -> int:
                return 0

            def handle_call(self, request, caller, state):
                if request == "incr":
                    return otpy.Reply("ok", state + 1)
                return otpy.Reply(state, state)

    Callbacks and what the runtime does with their results:

    - ``init(arg)`` returns the first state; ``otpy.Ignore`` (do not run, keep listed);
      ``otpy.Continue(state, arg)`` (then ``handle_continue``); ``otpy.Stop(reason,
      state)`` or an exception makes the start fail.
    - ``handle_call(request, caller, state)`` returns ``Reply(reply, state)``,
      ``NoReply(state)`` (answer later with ``caller.reply``) or ``Stop(reason, state,
      reply=...)``.
    - ``handle_cast(message, state)`` and ``handle_info(message, state)`` return the new
      state or ``Stop(reason, state)``.
    - ``handle_continue(arg, state)`` returns the new state or ``Stop``; any result
      above may be wrapped in ``otpy.Continue(result, arg)`` to ask for it.
    - ``terminate(reason, state)`` runs whenever a running server stops.
    - ``code_change(old_vsn, state, extra)`` returns the migrated state (see releases).
    - ``resume(state, arg)`` (durable servers only) runs *instead of* ``init`` when the
      server starts with a stored state (after a node restart, a crash, or
      ``restart_child``): ``state`` is the last state recorded, already migrated through
      ``code_change`` to this class's ``vsn`` and checked. It returns the state to go on
      with (the default: ``state`` unchanged), ``otpy.Continue(state, arg)`` or
      ``otpy.Stop(reason, state)`` (the start fails; the stored state is kept). Timers
      and monitors that ``init`` arms are not stored: arm them again here. The idiom:
      both ``init`` and ``resume`` return ``otpy.Continue(state, "arm")`` and
      ``handle_continue`` arms them.

    Anything else returned crashes the server with :class:`otpy.BadReturn`; a callback
    that raises crashes it, and its supervisor decides what follows.

    Class attributes: ``vsn`` (derived from the code when not set), ``step_timeout``
    (seconds a callback may run), ``max_mailbox`` (queued messages before
    ``cast``/``send`` raise :class:`otpy.MailboxFull`) and ``durable`` (keep the state
    in the node's store, so that it survives a crash or a kill -9 of the node; see
    docs/durability.md). Attribute names starting with ``_otpy_`` are the runtime's.
    """

    __slots__ = ("_otpy_deferred", "_otpy_flags", "_otpy_links", "_otpy_max_mailbox",
                 "_otpy_mbox", "_otpy_name", "_otpy_pid", "_otpy_restarts", "_otpy_rt",
                 "_otpy_spec", "_otpy_state", "_otpy_sup", "_otpy_tasks")

    vsn: ClassVar[str]
    step_timeout: ClassVar[float] = 1.0
    max_mailbox: ClassVar[int] = 100_000
    durable: ClassVar[bool] = False
    _state_type: ClassVar[Any] = Any

    _otpy_name: str
    _otpy_state: Any
    _otpy_mbox: deque[tuple[int, Any, Caller | None]] | None
    _otpy_flags: int
    _otpy_rt: Scheduler
    _otpy_sup: SupervisorRuntime
    _otpy_spec: Child
    _otpy_restarts: int
    _otpy_tasks: set[TaskRef] | None
    _otpy_deferred: list[Caller] | None  # callers it answered with NoReply (may be stale)
    _otpy_max_mailbox: int  # the class's max_mailbox, or its Child spec's
    _otpy_pid: Pid | None  # made when first asked for (self.pid, whereis, a monitor)
    _otpy_links: Links | None  # monitors on it and of it, once there are any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_callbacks(cls)
        taken = [a for a in vars(cls) if a.startswith(RUNTIME_PREFIX)
                 and a != "_otpy_state_check" and a != "_otpy_origin"]
        if taken:
            raise TypeError(
                f"{cls.__qualname__} defines {taken[0]!r}; names starting with "
                f"{RUNTIME_PREFIX!r} belong to otpy's runtime. Rename it")
        for attr in _CALLBACKS:
            code = getattr(vars(cls).get(attr), "__code__", None)
            if code is not None:
                CALLBACK_CODES.add(code)
        cls._state_type = _declared_state_type(cls)
        # Build the state checker now, so that no start or upgrade pays for it (the
        # first rich type costs pydantic ~70 ms of imports); a type that cannot be
        # built yet (a forward reference) is retried at its first check.
        try:
            checker(cls)
        except Exception:
            pass
        if "step_timeout" in vars(cls):
            check_step_timeout(cls.step_timeout, f"{cls.__qualname__}.step_timeout", TypeError)
        if "max_mailbox" in vars(cls):
            check_max_mailbox(cls.max_mailbox, f"{cls.__qualname__}.max_mailbox", TypeError)
        if "vsn" not in vars(cls):
            cls.vsn = _derive_vsn(cls)
        elif not isinstance(vars(cls)["vsn"], str):
            raise TypeError(
                f"{cls.__qualname__}.vsn must be a string such as \"2\", "
                f"got {vars(cls)['vsn']!r}"
            )

    # -- callbacks (defaults) -------------------------------------------------------

    def init(self, arg: Any) -> S:
        """Return the first state (the default: ``arg`` itself)."""
        return typing.cast(S, arg)

    def handle_call(self, request: Any, caller: Caller, state: S) -> Any:
        """Handle a call. The default crashes: the class handles no calls."""
        raise BadReturn(
            f"server {self._otpy_name!r} ({type(self).__qualname__}) got call {request!r} "
            f"but defines no handle_call; define handle_call(self, request, caller, state)"
        )

    def handle_cast(self, message: Any, state: S) -> Any:
        """Handle a cast. The default crashes: the class handles no casts."""
        raise BadReturn(
            f"server {self._otpy_name!r} ({type(self).__qualname__}) got cast {message!r} "
            f"but defines no handle_cast; define handle_cast(self, message, state)"
        )

    def handle_info(self, message: Any, state: S) -> Any:
        """Handle any other message. The default logs it as unexpected and keeps going."""
        self._otpy_rt.log.warning(
            "unexpected_message", server=self._otpy_name, message=repr(message)[:200]
        )
        return state

    def handle_continue(self, arg: Any, state: S) -> Any:
        """Continue after a callback returned ``otpy.Continue(result, arg)``. The default
        crashes: the class asked for a continuation it does not handle."""
        raise BadReturn(
            f"server {self._otpy_name!r} ({type(self).__qualname__}) returned "
            f"otpy.Continue(..., {arg!r}) but defines no handle_continue; define "
            f"handle_continue(self, arg, state)"
        )

    def terminate(self, reason: Any, state: S) -> None:
        """Called when a running server stops (crash, Stop, shutdown). Default: nothing."""

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        """Migrate ``state`` from ``old_vsn`` (or ``otpy.Down(vsn)``). Default: unchanged."""
        return state

    def resume(self, state: S, arg: Any) -> Any:
        """Go on from a stored state (durable servers: runs instead of ``init`` when one
        is stored). Default: ``state`` unchanged."""
        return state

    # -- helpers for callbacks ------------------------------------------------------

    @property
    def name(self) -> str:
        """The name this server is registered under."""
        return self._otpy_name

    @property
    def pid(self) -> Pid:
        """This incarnation's :class:`otpy.Pid` (a restart makes a new one; an upgrade
        keeps it). ``self.send_after(seconds, self.pid, msg)`` is the periodic timer
        that dies with its incarnation."""
        return self._otpy_rt.pid_of(self)

    def monitor(self, target: Any) -> MonitorRef:
        """Monitor the incarnation that ``target`` (a name, a pid or ``"name@node"``)
        names now: when it stops, for any reason, this server gets one
        ``handle_info(otpy.ServerDown(ref, pid, reason))``. If nothing runs it, the
        ServerDown (reason ``"noproc"``) comes at once. Returns the ref; a monitor of
        a supervisor works too."""
        return self._otpy_rt.monitor(self, target)

    def demonitor(self, ref: MonitorRef) -> bool:
        """Cancel a monitor: True if it was active, False if it had fired already (its
        ServerDown is delivered or waiting in the mailbox). A ref demonitored twice, or
        one of another server, is a ValueError."""
        return self._otpy_rt.demonitor(self, ref)

    def changed(self, *keys: Any) -> None:
        """Say which keys of a mapping state this step set or removed (durable servers):
        the store then records those entries (a patch) instead of the whole state, so a
        step costs what it changed, not what the state holds. Name every key the step
        changed: entries not named must be as they were last recorded. With no keys, the
        step changed nothing and nothing is recorded. On a server that is not durable it
        does nothing."""
        if self._otpy_flags & (OBSERVED_FLAG | DEAD_FLAG) == OBSERVED_FLAG:
            durable = self._otpy_rt.durable
            if durable is not None:
                durable.changed(self, keys)

    def call(self, name: Any, request: Any) -> Any:
        """Call another server synchronously, stepping it inline.

        Never blocks: raises :class:`otpy.WouldBlock` when the target cannot answer
        within this step (it is suspended, is already in the current chain of calls,
        or defers its reply)."""
        return self._otpy_rt.call_nowait(name, request)

    def cast(self, name: Any, message: Any) -> None:
        """Queue ``message`` for ``name``'s ``handle_cast``; returns at once (to a pid
        whose incarnation is gone, it is dropped)."""
        self._otpy_rt.cast(name, message)

    def send(self, name: Any, message: Any) -> None:
        """Queue ``message`` for ``name``'s ``handle_info``; returns at once (to a pid
        whose incarnation is gone, it is dropped)."""
        self._otpy_rt.send(name, message)

    def send_after(self, seconds: float, name: Any, message: Any) -> TimerRef:
        """Deliver ``message`` to ``name``'s ``handle_info`` after ``seconds``.

        Returns a timer with ``cancel()``. A timer addressed to a name reaches whichever
        server holds the name when it fires (none: it is dropped); one addressed to a
        pid (``self.pid``) dies with that incarnation, so a periodic timer re-armed in
        ``handle_info`` never multiplies across restarts."""
        return self._otpy_rt.send_after(seconds, name, message)

    def start_task(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, tag: Any = None
    ) -> TaskRef:
        """Run ``await fn(*args)`` as a trio task owned by this server.

        Its outcome arrives in ``handle_info`` as ``otpy.TaskDone(tag, result)`` or
        ``otpy.TaskFailed(tag, error)``. The task is cancelled when the server stops
        (after the child's ``shutdown`` grace on an orderly shutdown); it survives
        release upgrades."""
        return self._otpy_rt.start_task(self, fn, args, tag)


def check_server_class(cls: object, what: str) -> type[GenServer[Any]]:
    if not (isinstance(cls, type) and issubclass(cls, GenServer)):
        raise TypeError(f"{what} must be a subclass of otpy.GenServer, got {cls!r}")
    return cls


def budget_of(proc: GenServer[Any]) -> float:
    """The seconds ``proc``'s callbacks may run: its Child spec's step_timeout, else its
    class's."""
    own = proc._otpy_spec.step_timeout
    return type(proc).step_timeout if own is None else own


def check_step_timeout(value: object, what: str, error: type[Exception] = ValueError) -> float:
    """``value`` as a step budget in seconds (> 0, or ``math.inf`` for none)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise error(f"{what} must be seconds > 0 (math.inf for no limit), got {value!r}")
    return float(value)


def check_max_mailbox(value: object, what: str, error: type[Exception] = ValueError) -> int:
    """``value`` as a mailbox limit (an int >= 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{what} must be an int >= 1 (queued messages), got {value!r}")
    return value


def bad_return(server: GenServer[Any], callback: str, value: Any, expected: str) -> BadReturn:
    return BadReturn(
        f"server {server._otpy_name!r} ({type(server).__qualname__}.{callback}) returned "
        f"{reprlib.repr(value)}; expected {expected}"
    )

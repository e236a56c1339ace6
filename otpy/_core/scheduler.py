"""Mailboxes, the run queue, timers and inline stepping: plain Python, no trio.

The scheduler owns every running server of a node. A message to an idle server (not
in a step, not suspended, nothing queued) is stepped at once; otherwise it joins the
server's FIFO mailbox (created only when needed) and the server joins the run queue,
which the node's one dispatcher drains fairly in batches. Crashes and stops are handed
to the server's supervisor synchronously, before the step that caused them returns.

The edge (``_node``) plugs in the clock, the wake-up of the dispatcher, and the
spawning of trio tasks, so that this module can be driven step by step by tests.
"""

from __future__ import annotations

import difflib
import heapq
import itertools
import reprlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import (
    MailboxFull,
    NoSuchServer,
    OtpyError,
    Overrun,
    ServerCrashed,
    ServerStopped,
    StartFailed,
    WouldBlock,
)
from .server import (
    NOTHING,
    Caller,
    GenServer,
    Ignore,
    InlineCaller,
    NoReply,
    Reply,
    Stop,
    bad_return,
    budget_of,
    is_normal_reason,
)
from .typecheck import check_state

if TYPE_CHECKING:
    from .supervisor import Child, SupervisorRuntime

CALL, CAST, INFO = 0, 1, 2
_KIND = ("call", "cast", "info")

# GenServer._flags bits. Any of NOT_STEPPABLE keeps a server from being stepped.
BUSY = 1  # in a step: it is on the current chain of calls
SUSPENDED = 2  # node.suspend
WATCHED = 4  # a release is migrating its state: steps mark it TOUCHED (slow path only)
DEAD = 8  # terminated; a new incarnation (if any) holds the name
SCHEDULED = 16  # in the run queue
TOUCHED = 32  # stepped since its migration was computed: migrate again at commit
NOT_STEPPABLE = BUSY | SUSPENDED | DEAD

# How many of one server's messages the dispatcher serves before moving to the next.
PER_SERVER_TURN = 64

Message = tuple[int, Any, "Caller | None"]


class TimerRef:
    """A pending ``send_after``; ``cancel()`` stops it if it has not fired."""

    __slots__ = ("cancelled", "message", "name", "when")

    def __init__(self, when: float, name: str, message: Any) -> None:
        self.when = when
        self.name = name
        self.message = message
        self.cancelled = False

    def cancel(self) -> bool:
        """Cancel the timer; True if it had not fired or been cancelled yet."""
        was = not self.cancelled
        self.cancelled = True
        return was

    def __lt__(self, other: TimerRef) -> bool:  # heap order on ties (never compared)
        return id(self) < id(other)


class TaskRef:
    """A task started with ``start_task``; ``cancel()`` cancels it."""

    __slots__ = ("_cancel", "done", "tag")

    def __init__(self, tag: Any) -> None:
        self.tag = tag
        self.done = False
        self._cancel: Callable[[float | None], None] | None = None

    def cancel(self, grace: float | None = None) -> None:
        """Cancel the task now, or after ``grace`` seconds if it has not finished."""
        if self._cancel is not None and not self.done:
            self._cancel(grace)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 160


def short_repr(value: Any) -> str:
    """A bounded repr: a crash report must not stall the loop on a huge message."""
    return _short.repr(value)


def describe(kind: int, payload: Any) -> str:
    return f"{_KIND[kind]} {short_repr(payload)}"


class Scheduler:
    """The registry, mailboxes, run queue and timers of one node."""

    def __init__(
        self,
        *,
        log: Any,
        clock: Callable[[], float],
        wakeup: Callable[[], None] = lambda: None,
        spawn: Callable[[GenServer[Any], TaskRef, Callable[..., Awaitable[Any]], tuple[Any, ...]],
                        None] | None = None,
    ) -> None:
        self.procs: dict[str, GenServer[Any]] = {}
        self.sups: dict[str, SupervisorRuntime] = {}
        self.runq: deque[GenServer[Any]] = deque()
        self.deferred: deque[Callable[[], None]] = deque()
        # Messages refused for a full mailbox, by server name (what statistics show).
        self.refused: dict[str, int] = {}
        # Calls that found their server's mailbox full, in arrival order, by name:
        # they join the mailbox as room appears (room_for). While a name has a line,
        # its mailbox is full, so nothing that comes later can overtake them.
        self.waiting: dict[str, deque[Message]] = {}
        self.log = log
        self.clock = clock
        self.wakeup = wakeup
        self._spawn = spawn
        self._timers: list[tuple[float, int, TimerRef]] = []
        self._seq = itertools.count()
        # Mailboxes of servers terminated during a supervision act, kept for the
        # server that takes the name next; what nobody took is failed when the
        # outermost act ends (so a restart never loses a queued message).
        self._stash: dict[str, deque[Message]] = {}
        self._acts = 0
        self.root: SupervisorRuntime | None = None
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] = lambda exc: None
        self.stopping = False

    # -- lookup ----------------------------------------------------------------------

    def lookup(self, name: str) -> GenServer[Any]:
        proc = self.procs.get(name)
        if proc is None:
            raise self._no_such(name)
        return proc

    def supervisor(self, name: str) -> SupervisorRuntime:
        """The running supervisor ``name``, or NoSuchServer listing the ones there are."""
        rt = self.sups.get(name)
        if rt is None:
            raise NoSuchServer(name, f"no supervisor of that name; supervisors are "
                                     f"{sorted(self.sups)[:20]!r}")
        return rt

    def _no_such(self, name: object) -> NoSuchServer:
        detail = ""
        if name in self.sups:
            detail = f"{name!r} is a supervisor; call one of its children"
        elif len(self.procs) <= 1000 and isinstance(name, str):
            close = difflib.get_close_matches(name, list(self.procs), n=1)
            if close:
                detail = f"did you mean {close[0]!r}?"
        if not detail:
            detail = "check the name, or whether its supervisor stopped it"
        return NoSuchServer(name, detail)

    # -- stepping --------------------------------------------------------------------

    def step(self, proc: GenServer[Any], kind: int, payload: Any, caller: Caller | None) -> None:
        """Run one callback of ``proc`` and act on its result; never raises."""
        proc._flags |= BUSY
        try:
            if kind == CALL:
                result = proc.handle_call(payload, caller, proc._state)  # type: ignore[arg-type]
            elif kind == CAST:
                result = proc.handle_cast(payload, proc._state)
            else:
                result = proc.handle_info(payload, proc._state)
        except Exception as exc:
            proc._flags &= ~BUSY
            self.crashed(proc, exc, kind, payload, caller)
            return
        except BaseException as exc:
            proc._flags &= ~BUSY
            if type(exc) is Overrun:  # the watchdog interrupted a runaway callback
                self.crashed(proc, exc.timeout(), kind, payload, caller)
                return
            raise  # KeyboardInterrupt, SystemExit, trio.Cancelled: not the server's
        flags = proc._flags = proc._flags & ~BUSY
        if flags & DEAD:
            # A sibling's restart terminated this server while it was stepping (it
            # called the sibling inline): its result belongs to a dead incarnation.
            if caller is not None:
                caller._fail(ServerStopped(
                    f"server {proc._name!r} was stopped by its supervisor while serving "
                    f"this call", name=proc._name, reason="shutdown"))
            return
        t = type(result)
        if kind == CALL:
            if t is Reply:
                proc._state = result[1]
                # caller.reply(result[0]), inlined on the hottest path; this stays
                # equivalent because Caller subclasses hook _resolve, never reply.
                if caller is not None and caller._status == 0:
                    caller._status = 1
                    caller._resolve(result[0])
                return
            if t is NoReply:
                proc._state = result[0]
                if caller._status == 0:  # type: ignore[union-attr]
                    self._defer_caller(proc, caller)  # type: ignore[arg-type]
                return
            expected = "otpy.Reply(reply, state), otpy.NoReply(state) or otpy.Stop(...)"
        else:
            if t is not Reply and t is not NoReply and t is not Stop:
                proc._state = result
                return
            expected = "the new state or otpy.Stop(reason, state)"
        if t is Stop:
            self.stopped(proc, result, caller)
            return
        callback = ("handle_call", "handle_cast", "handle_info")[kind]
        self.crashed(proc, bad_return(proc, callback, result, expected), kind, payload, caller)

    @staticmethod
    def _defer_caller(proc: GenServer[Any], caller: Caller) -> None:
        # Kept so that a server that stops fails its deferred callers at once instead
        # of leaving them to their timeouts; answered ones are pruned as it grows.
        deferred = proc._deferred
        if deferred is None:
            proc._deferred = [caller]
            return
        if len(deferred) >= 32 and len(deferred) & (len(deferred) - 1) == 0:
            deferred[:] = [c for c in deferred if c._status == 0]
        deferred.append(caller)

    def call_nowait(self, name: str, request: Any) -> Any:
        """Call ``name`` and step it inline; raise WouldBlock if it cannot answer now."""
        proc = self.procs.get(name)
        if proc is None:
            raise self._no_such(name)
        if proc._flags:
            if proc._flags & NOT_STEPPABLE:
                raise WouldBlock(self._why_blocked(proc))
            if proc._flags & WATCHED:
                proc._flags |= TOUCHED
        if proc._mbox:
            # The call must not jump the messages already queued: serve them first.
            proc = self._drain(proc)
        caller = InlineCaller()
        self.step(proc, CALL, request, caller)
        if caller._status == 0:
            caller._status = 2  # the deferred reply, if it ever comes, is dropped
            raise WouldBlock(
                f"server {name!r} deferred its reply (handle_call returned NoReply), so it "
                f"cannot answer within this step; its state was updated. Use "
                f"'await node.call' from a task, or a cast and a reply message."
            )
        if caller.error is not None:
            raise caller.error
        return caller.value

    def _why_blocked(self, proc: GenServer[Any]) -> str:
        name, flags = proc._name, proc._flags
        if flags & BUSY:
            return (f"server {name!r} is already in the current chain of calls (a call to "
                    f"itself or a cycle of calls); calling it would deadlock. Use cast or "
                    f"send to reach it, or answer from its own state")
        if flags & SUSPENDED:
            return (f"server {name!r} is suspended; its messages wait until it resumes. "
                    f"Use 'await node.call' to wait, or cast")
        return f"server {name!r} has stopped"

    def _drain(self, proc: GenServer[Any]) -> GenServer[Any]:
        name = proc._name
        while True:
            if proc._flags & WATCHED:
                proc._flags |= TOUCHED
            mb = proc._mbox
            if not mb:
                proc._mbox = None
                return proc
            kind, payload, caller = mb.popleft()
            if self.waiting:
                self.room_for(proc)
            self.step(proc, kind, payload, caller)
            if proc._flags & DEAD:
                new = self.procs.get(name)
                if new is None:
                    raise self._no_such(name)
                proc = new
            if proc._flags & NOT_STEPPABLE:
                raise WouldBlock(self._why_blocked(proc))

    def run_batch(self, budget: int = 512) -> int:
        """Serve queued messages round-robin until the queue is empty or ``budget``
        steps were made; returns the number of steps."""
        runq, step = self.runq, self.step
        done = 0
        deferred = self.deferred
        for _ in range(len(deferred)):
            deferred.popleft()()
            done += 1
        while runq and done < budget:
            proc = runq.popleft()
            proc._flags &= ~SCHEDULED
            if proc._flags & NOT_STEPPABLE:
                continue  # dead, or suspended (resume schedules it again)
            mb = proc._mbox
            if not mb:
                proc._mbox = None
                continue
            if proc._flags & WATCHED:
                proc._flags |= TOUCHED
            for _ in range(min(len(mb), PER_SERVER_TURN)):
                kind, payload, caller = mb.popleft()
                step(proc, kind, payload, caller)
                done += 1
                if proc._flags & NOT_STEPPABLE:
                    break
            if proc._mbox is mb:
                if not mb:
                    proc._mbox = None
                elif not proc._flags & (NOT_STEPPABLE | SCHEDULED):
                    proc._flags |= SCHEDULED
                    runq.append(proc)
            if self.waiting:
                self.room_for(proc)
        return done

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` from the dispatcher, after the current step."""
        if not self.runq and not self.deferred:
            self.wakeup()
        self.deferred.append(fn)

    @property
    def has_work(self) -> bool:
        return bool(self.runq or self.deferred)

    # -- delivery --------------------------------------------------------------------

    def enqueue(self, proc: GenServer[Any], msg: Message, *, force: bool = False) -> None:
        mb = proc._mbox
        if mb is None:
            mb = proc._mbox = deque()
        elif not force and len(mb) >= proc._max_mailbox:
            raise self._refuse(proc)
        mb.append(msg)
        if not proc._flags & (SCHEDULED | SUSPENDED | DEAD):  # hot: skip the call
            self.schedule(proc)

    def _refuse(self, proc: GenServer[Any]) -> MailboxFull:
        name = proc._name
        self.refused[name] = self.refused.get(name, 0) + 1
        return MailboxFull(
            f"server {name!r} has {len(proc._mbox or ())} queued messages (max_mailbox="
            f"{proc._max_mailbox}); nothing was queued. Slow down (await node.call waits "
            f"for room), or raise max_mailbox on the class or its Child spec",
            name=name)

    def mailbox_full(self, proc: GenServer[Any]) -> bool:
        """Whether a message for ``proc`` would be refused now."""
        mb = proc._mbox
        return mb is not None and len(mb) >= proc._max_mailbox

    def enqueue_call(self, proc: GenServer[Any], msg: Message) -> None:
        """Queue a call; to a full mailbox it waits in line for room (a call is never
        refused: its caller waits, which is the back-pressure)."""
        line = self.waiting.get(proc._name)
        if line is None and not self.mailbox_full(proc):
            self.enqueue(proc, msg)
        elif line is None:
            self.waiting[proc._name] = deque((msg,))
        else:
            line.append(msg)

    def room_for(self, proc: GenServer[Any]) -> None:
        """Move the calls waiting for room in ``proc``'s mailbox into it, in order, as
        far as there is room; those whose callers gave up are dropped unserved."""
        name = proc._name
        line = self.waiting.get(name)
        if line is None or proc._flags & DEAD:
            return
        mb = proc._mbox
        room = proc._max_mailbox - (len(mb) if mb else 0)
        while line and room > 0:
            msg = line.popleft()
            caller = msg[2]
            if caller is not None and caller._status != 0:
                continue  # it timed out waiting: never sent, as its error says
            self.enqueue(proc, msg, force=True)
            room -= 1
        if not line:
            del self.waiting[name]

    def is_waiting(self, name: str, caller: Caller) -> bool:
        """Whether ``caller``'s call still waits for room in ``name``'s mailbox."""
        return any(msg[2] is caller for msg in self.waiting.get(name, ()))

    def schedule(self, proc: GenServer[Any]) -> None:
        """Put a server with queued messages on the run queue, once. A busy server is
        queued too: the dispatcher serves it after the current step."""
        if proc._mbox and not proc._flags & (SCHEDULED | SUSPENDED | DEAD):
            proc._flags |= SCHEDULED
            if not self.runq:
                self.wakeup()
            self.runq.append(proc)

    def cast(self, name: str, message: Any) -> None:
        """Queue a cast (from inside a step: never stepped inline)."""
        self.enqueue(self.lookup(name), (CAST, message, None))

    def send(self, name: str, message: Any) -> None:
        """Queue a message for ``handle_info`` (from inside a step)."""
        self.enqueue(self.lookup(name), (INFO, message, None))

    def cast_now(self, kind: int, name: str, message: Any) -> None:
        """A cast or send from outside any step: an idle server is stepped at once."""
        proc = self.procs.get(name)
        if proc is None:
            raise self._no_such(name)
        if proc._flags or proc._mbox is not None:
            self.enqueue(proc, (kind, message, None))
        else:
            self.step(proc, kind, message, None)

    # -- timers ----------------------------------------------------------------------

    def send_after(self, seconds: float, name: str, message: Any) -> TimerRef:
        if not seconds >= 0:
            raise ValueError(f"send_after needs seconds >= 0, got {seconds!r}")
        ref = TimerRef(self.clock() + seconds, name, message)
        timers = self._timers
        heapq.heappush(timers, (ref.when, next(self._seq), ref))
        if timers[0][2] is ref:
            self.wakeup()
        return ref

    def pending_timers(self) -> int:
        """Timers that have neither fired nor been cancelled."""
        return sum(1 for _when, _seq, ref in self._timers if not ref.cancelled)

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def fire_timers(self) -> int:
        timers = self._timers
        if not timers:
            return 0
        now = self.clock()
        fired = 0
        while timers and timers[0][0] <= now:
            ref = heapq.heappop(timers)[2]
            if ref.cancelled:
                continue
            ref.cancelled = True
            proc = self.procs.get(ref.name)
            if proc is not None:
                # Timers are never refused for a full mailbox: they were asked for.
                self.enqueue(proc, (INFO, ref.message, None), force=True)
                fired += 1
        return fired

    # -- tasks -----------------------------------------------------------------------

    def start_task(
        self, proc: GenServer[Any], fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
        tag: Any,
    ) -> TaskRef:
        if self._spawn is None:
            raise OtpyError("start_task needs a running node (open_node)")
        if proc._flags & DEAD:
            raise ServerStopped(f"server {proc._name!r} has stopped; it cannot start tasks",
                                name=proc._name)
        ref = TaskRef(tag)
        if proc._tasks is None:
            proc._tasks = set()
        proc._tasks.add(ref)
        self._spawn(proc, ref, fn, args)
        return ref

    def task_finished(self, proc: GenServer[Any], ref: TaskRef, message: Any) -> None:
        ref.done = True
        if proc._tasks is not None:
            proc._tasks.discard(ref)
        if not proc._flags & DEAD:
            self.enqueue(proc, (INFO, message, None), force=True)

    # -- starting and stopping servers ------------------------------------------------

    def start_server(
        self, cls: type[GenServer[Any]], spec: Child, sup: SupervisorRuntime, restarts: int = 0
    ) -> GenServer[Any] | None:
        """Create and ``init`` a server; None if ``init`` returned Ignore.

        Raises StartFailed (with the cause) if init raised or returned Stop."""
        name = spec.id
        proc = cls.__new__(cls)
        proc._name = name
        proc._node = self
        proc._sup = sup
        proc._spec = spec
        proc._flags = BUSY
        proc._mbox = None
        proc._restarts = restarts
        proc._tasks = None
        proc._deferred = None
        proc._max_mailbox = (cls.max_mailbox if spec.max_mailbox is None
                             else spec.max_mailbox)
        self.procs[name] = proc
        try:
            state = proc.init(spec.arg)
            if state is Ignore:
                self._unregister(proc)
                return None
            if type(state) is Stop:
                raise StartFailed(
                    f"child {name!r} ({cls.__qualname__}.init) returned Stop with reason "
                    f"{state.reason!r}", child=name, reason=state.reason)
            if type(state) in (Reply, NoReply):
                raise bad_return(proc, "init", state, "the first state, otpy.Ignore or "
                                 "otpy.Stop(reason, state)")
            check_state(cls, state, server=name, when="returned by init")
        except BaseException as exc:
            self._unregister(proc)
            if proc._tasks:
                for task in proc._tasks:
                    task.cancel()
            if isinstance(exc, StartFailed):
                raise
            if type(exc) is Overrun:
                exc = exc.timeout()
            elif not isinstance(exc, Exception):
                raise
            raise StartFailed(
                f"child {name!r} ({cls.__qualname__}) failed to start: init raised "
                f"{type(exc).__name__}: {exc}", child=name, reason=exc) from exc
        proc._state = state
        proc._flags &= SCHEDULED  # init may have cast to itself: it is queued already
        self._take_back(proc, self._stash.pop(name, None))
        return proc

    def _take_back(self, proc: GenServer[Any], stashed: deque[Message] | None) -> None:
        """Give the name's stashed mailbox (messages sent before, first) to ``proc``."""
        if stashed:
            if proc._mbox:
                stashed.extend(proc._mbox)
            proc._mbox = stashed
        self.schedule(proc)

    def _unregister(self, proc: GenServer[Any]) -> None:
        proc._flags |= DEAD
        if self.procs.get(proc._name) is proc:
            del self.procs[proc._name]
        if proc._mbox:
            stash = self._stash.get(proc._name)
            if stash is None:
                self._stash[proc._name] = proc._mbox
            else:
                stash.extend(proc._mbox)
        proc._mbox = None
        line = self.waiting.pop(proc._name, None)
        if line:  # calls waiting for room go with the mailbox, after it
            stash = self._stash.setdefault(proc._name, deque())
            stash.extend(line)

    def terminate_server(
        self, proc: GenServer[Any], reason: Any, grace: float | None = None
    ) -> None:
        """Run ``terminate(reason, state)`` and remove the server; its mailbox is kept
        for whoever takes the name within this supervision act."""
        if proc._flags & DEAD:
            return
        proc._flags |= BUSY
        try:
            proc.terminate(reason, proc._state)
        except (Exception, Overrun) as exc:
            # An overrunning terminate is abandoned: the server stops all the same.
            err = exc.timeout() if isinstance(exc, Overrun) else exc
            self.log.error("terminate_crashed", server=proc._name, reason=repr(reason),
                           exc_info=err)
        proc._flags &= ~BUSY
        self._unregister(proc)
        if proc._tasks:
            for task in list(proc._tasks):
                task.cancel(grace)
        if proc._deferred:
            deferred, proc._deferred = proc._deferred, None
            for caller in deferred:
                if caller._status != 0:
                    continue
                err_cls = ServerCrashed if isinstance(reason, BaseException) else ServerStopped
                err = err_cls(f"server {proc._name!r} stopped ({short_repr(reason)}) before it "
                              f"answered this call, which it had deferred with NoReply",
                              name=proc._name, reason=reason)
                if isinstance(reason, BaseException):
                    err.__cause__ = reason
                caller._fail(err)

    def crashed(
        self, proc: GenServer[Any], exc: BaseException, kind: int = INFO, payload: Any = None,
        caller: Caller | None = None,
    ) -> None:
        name = proc._name
        if isinstance(exc, OtpyError):
            exc.add_note(f"in server {name!r} ({type(proc).__qualname__}) serving "
                         f"{describe(kind, payload)}")
        self.log.error("server_crashed", server=name, vsn=proc.vsn,
                       message=describe(kind, payload), exc_info=exc)
        if caller is not None:
            err = ServerCrashed(
                f"server {name!r} crashed serving this call: {type(exc).__name__}: {exc}",
                name=name, reason=exc)
            err.__cause__ = exc
            caller._fail(err)
        self.exited(proc, exc)

    def stopped(self, proc: GenServer[Any], result: Stop[Any], caller: Caller | None) -> None:
        reason = result.reason
        proc._state = result.state
        if caller is not None:
            if result.reply is not NOTHING:
                caller.reply(result.reply)
            else:
                caller._fail(ServerStopped(
                    f"server {proc._name!r} stopped with reason {reason!r} without "
                    f"replying", name=proc._name, reason=reason))
        if not is_normal_reason(reason):
            self.log.error("server_stopped", server=proc._name, vsn=proc.vsn,
                           reason=repr(reason))
        self.exited(proc, reason)

    def exited(self, proc: GenServer[Any], reason: Any) -> None:
        """The server stops with ``reason``: terminate it, then let its supervisor act."""
        if proc._flags & DEAD:
            return
        with self.supervision_act():
            self.terminate_server(proc, reason)
            proc._sup.child_exited(proc._spec.id, reason)

    def supervision_act(self) -> _Act:
        return _Act(self)

    def flush_stash(self) -> None:
        """Fail the callers queued for names that no server took back."""
        while self._stash:
            name, mb = self._stash.popitem()
            proc = self.procs.get(name)
            if proc is not None:  # taken back after all (e.g. restarted by a retry)
                self._take_back(proc, mb)
                continue
            for _kind, _payload, caller in mb:
                if caller is not None:
                    caller._fail(ServerStopped(
                        f"server {name!r} stopped and was not restarted before it served "
                        f"this call", name=name))
            if mb:
                self.log.warning("messages_dropped", server=name, count=len(mb))

    # -- control ---------------------------------------------------------------------

    def suspend(self, name: str) -> None:
        self.lookup(name)._flags |= SUSPENDED

    def resume(self, name: str) -> None:
        proc = self.lookup(name)
        proc._flags &= ~SUSPENDED
        self.schedule(proc)

    def statistics(self, name: str | None = None) -> dict[str, Any]:
        """What ``node.statistics()`` shows (see there)."""
        if name is not None:
            proc = self.lookup(name)
            flags = proc._flags
            return {
                "mailbox": len(proc._mbox or ()), "max_mailbox": proc._max_mailbox,
                "refused": self.refused.get(name, 0),
                "waiting": len(self.waiting.get(name, ())), "restarts": proc._restarts,
                "vsn": type(proc).vsn, "step_timeout": budget_of(proc),
                "status": ("suspended" if flags & SUSPENDED else
                           "running" if flags & BUSY else "idle"),
            }
        return {
            "servers": len(self.procs), "supervisors": len(self.sups),
            "run_queue": len(self.runq), "timers": self.pending_timers(),
            "queued": sum(len(p._mbox) for p in self.procs.values() if p._mbox),
            "refused": sum(self.refused.values()),
            "refused_by_server": dict(self.refused),
            "waiting": sum(len(line) for line in self.waiting.values()),
        }

    def set_fatal(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
            self.on_fatal(exc)


class _Act:
    """A supervision act: stashed mailboxes are settled when the outermost one ends."""

    __slots__ = ("sched",)

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    def __enter__(self) -> None:
        self.sched._acts += 1

    def __exit__(self, *exc: object) -> None:
        self.sched._acts -= 1
        if not self.sched._acts:
            self.sched.flush_stash()

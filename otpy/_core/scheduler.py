"""Mailboxes, the run queue, calls and inline stepping: plain Python, no trio.

The scheduler owns every running server of a node. A message to an idle server (not
in a step, not suspended, nothing queued) is stepped at once; otherwise it joins the
server's FIFO mailbox (created only when needed) and the server joins the run queue,
which the node's one dispatcher drains fairly in batches. Crashes and stops are handed
to the server's supervisor synchronously, before the step that caused them returns.

Three places here are the only ones of their kind, and every edge goes through them:

- :meth:`Scheduler.resolve` decides what an address is: a server name, a
  :class:`~otpy._core.names.Pid`, or ``"name@node"``.
- :meth:`Scheduler.start_call` delivers a request to an address and hands the reply
  (or the error) to a :class:`Caller`: ``await node.call``, the MessagePack-RPC
  endpoint, the simulation and the coming HTTP and NATS edges each supply a Caller.
  It resolves the address, adapts a versioned client's request and reply, steps an idle
  server inline or queues the call, and arms the call's deadline in the timer heap.
- :meth:`Scheduler.commit` sets a server's new state: a step, ``init``, a restart and
  ``handle_continue`` all commit through it (a release commits its states in one act,
  :meth:`Scheduler.commit_all`), so that a store can record what is committed.

The edge (``_node``) plugs in the clock, the wake-up of the dispatcher, and the
spawning of trio tasks, so that this module can be driven step by step by tests.
"""

from __future__ import annotations

import difflib
import itertools
import reprlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._exceptions import (
    CallTimeout,
    MailboxFull,
    NoSuchServer,
    OtpyError,
    Overrun,
    ServerCrashed,
    ServerStopped,
    StartFailed,
    StoreError,
    WouldBlock,
)
from .events import Events
from .monitors import ACTIVE, CANCELLED, FIRED, Links, MonitorRef, ServerDown
from .names import Pid, split_remote
from .server import (
    ANSWERED,
    DEAD_FLAG,
    NOTHING,
    OBSERVED_FLAG,
    WAITING,
    Caller,
    Continue,
    GenServer,
    Ignore,
    InlineCaller,
    NoReply,
    Reply,
    Stop,
    bad_return,
    budget_of,
    is_normal_reason,
    runs_callbacks,
)
from .timers import TimerRef, Timers
from .typecheck import check_state

if TYPE_CHECKING:
    from .durable import Durability
    from .supervisor import Child, SupervisorRuntime

CALL, CAST, INFO, CONTINUE = 0, 1, 2, 3
_KIND = ("call", "cast", "info", "continue")

# GenServer._otpy_flags bits. Any of NOT_STEPPABLE keeps a server from being stepped;
# a server with any flag but OBSERVED is not idle (a message to it is queued).
BUSY = 1  # in a step: it is on the current chain of calls
SUSPENDED = 2  # node.suspend
WATCHED = 4  # a release is migrating its state: steps mark it TOUCHED (slow path only)
DEAD = DEAD_FLAG  # terminated; a new incarnation (if any) holds the name
SCHEDULED = 16  # in the run queue
TOUCHED = 32  # stepped since its migration was computed: migrate again at commit
OBSERVED = OBSERVED_FLAG  # its commits are observed (on_commit): the general path
COUNTED = 128  # its steps are counted (on_step), for a while: they take the general path
NOT_STEPPABLE = BUSY | SUSPENDED | DEAD
NOT_IDLE = ~(OBSERVED | COUNTED)

# How many of one server's messages the dispatcher serves before moving to the next.
PER_SERVER_TURN = 64
# Past this many servers, an unknown name gets no did-you-mean suggestion: it would
# cost more than serving the request (a burst of bad names must not stall the loop).
SUGGEST_MAX = 256
# Even below it, one suggestion compares the name with every server's (difflib:
# about 6 us per name), hundreds of times what a call costs. So suggestions are paid
# for: each unknown name earns one credit, a suggestion costs SUGGEST_COST credits per
# server compared (credit starts full and is capped, so a lone typo always gets its
# suggestion, and a burst of bad names gets one now and then), and the last few
# suggestions are kept for repeats of the same name.
SUGGEST_COST = 4
SUGGEST_KEEP = 16

Message = tuple[int, Any, "Caller | None"]


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


class Remote(Protocol):
    """Where addresses that name nothing on this node go: a cluster (``otpy._cluster``)
    plugs in here, so that the one resolver and the one call path stay the core's.
    Each method says whether it took the address (False: it names nothing anywhere);
    ``explain`` says why an address names nothing (None: nothing to add)."""

    def start_call(self, address: Any, request: Any, caller: Caller, vsn: str | None,
                   timeout: float | None) -> bool: ...

    def send(self, kind: int, address: Any, message: Any) -> bool: ...

    def monitor(self, watcher: GenServer[Any], address: Any) -> MonitorRef | None: ...

    def demonitor(self, ref: MonitorRef) -> bool: ...

    def explain(self, address: Any) -> str | None: ...

    def serves(self, address: Any) -> bool: ...


class _Versioned(Caller):
    """The caller of a versioned client's call: the serving class turns its reply into
    the client's version (``downgrade_reply``) before ``inner`` gets it."""

    __slots__ = ("cls", "inner", "proc", "sched", "vsn")

    def __init__(self, inner: Caller, sched: Scheduler, proc: GenServer[Any], vsn: str):
        self._status = WAITING
        self.inner = inner
        self.sched = sched
        self.proc = proc
        # The class that serves the request adapts its reply, even if an upgrade
        # swapped the code while the caller waited.
        self.cls = type(proc)
        self.vsn = vsn

    @property
    def alive(self) -> bool:
        return self._status == WAITING and self.inner._status == WAITING

    def _resolve(self, value: Any) -> None:
        if self.inner._status != WAITING:
            return
        try:
            value = self.sched.adapt_reply(self.proc, self.cls, self.vsn, value)
        except Exception as exc:
            self.inner._fail(exc)
        else:
            self.inner.reply(value)

    def _reject(self, exc: BaseException) -> None:
        self.inner._fail(exc)


class _EdgeCaller(InlineCaller):
    """``node.call_nowait``'s caller: answered within the call, but from outside the
    node, so group commit holds its reply like any client's (and call_nowait then
    raises WouldBlock)."""

    __slots__ = ()

    _inline = False


class Scheduler:
    """The registry, mailboxes, run queue, calls and timers of one node."""

    # Slots, not a __dict__: past 30 attributes CPython 3.11 gives an instance's dict
    # keys of its own, and then stops specializing attribute and method loads on it,
    # which cost node.cast ~10% more instructions (measured under callgrind).
    __slots__ = ("_acts", "_refs", "_serials", "_spawn", "_stash", "_suggest_credit",
                 "_suggested", "class_by_name", "class_upgrades", "clock", "creation",
                 "deferred", "durable", "fatal", "log", "node", "on_commit",
                 "on_commit_all", "on_fatal", "on_step", "procs", "refused", "remote",
                 "root", "runq", "standby", "stopping", "sups", "timers", "waiting",
                 "wakeup")

    def __init__(
        self,
        *,
        log: Any,
        clock: Callable[[], float],
        wakeup: Callable[[], None] = lambda: None,
        spawn: Callable[[GenServer[Any], TaskRef, Callable[..., Awaitable[Any]], tuple[Any, ...]],
                        None] | None = None,
        node: str = "nonode",
        creation: int = 0,
    ) -> None:
        # This node's name and creation (a number picked afresh each run): what its
        # pids carry, so that a pid from another node or an earlier run names nothing.
        self.node = node
        self.creation = creation
        self._serials = itertools.count(1)
        self._refs = itertools.count(1)
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
        self.log = log if isinstance(log, Events) else Events(log)
        self.clock = clock
        self.wakeup = wakeup
        self.timers = Timers(clock, wakeup)
        self._spawn = spawn
        # Mailboxes of servers terminated during a supervision act, kept for the
        # server that takes the name next; what nobody took is failed when the
        # outermost act ends (so a restart never loses a queued message).
        self._stash: dict[str, deque[Message]] = {}
        self._acts = 0
        self.root: SupervisorRuntime | None = None
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] = lambda exc: None
        # The cluster, when the node is in one: addresses that name nothing here.
        self.remote: Remote | None = None
        # Called before each commit of an OBSERVED server's state, and before a release
        # commits several (see commit and commit_all): a store records them there.
        self.on_commit: Callable[[GenServer[Any], Any], int] | None = None
        self.on_commit_all: Callable[
            [list[tuple[GenServer[Any], type[GenServer[Any]], Any]]], None] | None = None
        # The durable servers' glue to the node's store (otpy._core.durable), if any.
        self.durable: Durability | None = None
        # Called after each step of a COUNTED server (see _settle): an observer that
        # wants step counts flags a few servers for a moment, so that counting costs
        # the steps of every other server nothing.
        self.on_step: Callable[[GenServer[Any]], None] | None = None
        self.stopping = False
        # The code the installed releases run, for every start of a child (a restart, a
        # subtree's restart, restart_child, start_child): by name, for a child whose
        # spec names the given class; and class by class, for updates of a class.
        self.class_by_name: dict[str, tuple[type[GenServer[Any]], type[GenServer[Any]]]] = {}
        self.class_upgrades: dict[type[GenServer[Any]], type[GenServer[Any]]] = {}
        # Children that run on another node of the cluster: their supervisors here keep
        # their specs and do not start them (a cluster supervisor's standbys).
        self.standby: set[str] = set()
        self._suggest_credit = SUGGEST_COST * SUGGEST_MAX
        self._suggested: dict[tuple[str, int], str] = {}

    # -- addresses -------------------------------------------------------------------

    def resolve(self, address: Any) -> GenServer[Any] | None:
        """The running server ``address`` names, or None. The one place that decides
        what an address is: a server name (a ``str``; the hot paths inline this first
        case), the :class:`Pid` of a running incarnation, or ``"name@node"`` naming
        this node. Anything else is a TypeError that says what an address is."""
        if type(address) is str:
            proc = self.procs.get(address)
            if proc is None and "@" in address:
                return self._resolve_remote(address)
            return proc
        if type(address) is Pid:
            proc = self.procs.get(address.name)
            if proc is not None and proc._otpy_pid == address:
                return proc
            return None
        if isinstance(address, str):  # a str subclass: look it up as the plain name
            return self.resolve(str(address))
        raise TypeError(f"a server address is its name (a str), an otpy.Pid or "
                        f"\"name@node\", got {type(address).__qualname__} "
                        f"{short_repr(address)}")

    def _resolve_remote(self, address: str) -> GenServer[Any] | None:
        parts = split_remote(address)
        if parts is not None and parts[1] == self.node:
            return self.procs.get(parts[0])
        return None

    def resolve_any(self, address: Any) -> GenServer[Any] | SupervisorRuntime | None:
        """What ``address`` names, a server or a supervisor (monitors watch both)."""
        proc = self.resolve(address)
        if proc is not None:
            return proc
        if type(address) is Pid:
            sup = self.sups.get(address.name)
            return sup if sup is not None and sup.pid == address else None
        if isinstance(address, str):
            parts = split_remote(address)
            name = parts[0] if parts is not None and parts[1] == self.node else address
            return self.sups.get(name)
        return None

    def pid_of(self, thing: GenServer[Any] | SupervisorRuntime) -> Pid:
        """The pid of a running incarnation, made the first time anyone asks (a server
        nobody asks about costs one empty slot)."""
        if isinstance(thing, GenServer):
            pid = thing._otpy_pid
            if pid is None:
                pid = thing._otpy_pid = Pid(self.node, self.creation, thing._otpy_name,
                                            next(self._serials))
            return pid
        if thing.pid is None:
            thing.pid = Pid(self.node, self.creation, thing.name, next(self._serials))
        return thing.pid

    def whereis(self, name: str) -> Pid | None:
        """The pid of whatever runs as ``name`` now (a server or supervisor), or None."""
        if not isinstance(name, str):
            raise TypeError(f"whereis takes a name (a str), got {short_repr(name)}")
        thing = self.procs.get(name) or self.sups.get(name)
        return None if thing is None else self.pid_of(thing)

    def lookup(self, address: Any) -> GenServer[Any]:
        """The running server ``address`` names, or NoSuchServer saying why not."""
        try:  # a name: resolve's first case, inlined (an unhashable address
            proc = self.procs.get(address)  # is resolve's to refuse, below)
        except TypeError:
            proc = None
        if proc is None:
            proc = self.resolve(address)
        if proc is None:
            raise self.no_such(address)
        return proc

    def supervisor(self, name: str) -> SupervisorRuntime:
        """The running supervisor ``name``, or NoSuchServer listing the ones there are."""
        rt = self.sups.get(name)
        if rt is None:
            raise NoSuchServer(name, f"no supervisor of that name; supervisors are "
                                     f"{sorted(self.sups)[:20]!r}")
        return rt

    def no_such(self, address: Any) -> NoSuchServer:
        """The NoSuchServer error for an address that names no running server. Cheap
        enough to answer a burst of bad requests with: the did-you-mean suggestion is
        made only for a small node."""
        if self.remote is not None:
            why = self.remote.explain(address)
            if why is not None:
                return NoSuchServer(address, why)
        if type(address) is Pid:
            return NoSuchServer(address, self._gone(address))
        parts = split_remote(address) if isinstance(address, str) else None
        if parts is not None and parts[1] != self.node:
            return NoSuchServer(address, f"it names node {parts[1]!r}, and this node "
                                         f"({self.node!r}) is not in a cluster")
        if parts is not None:
            address = parts[0]
        detail = ""
        if address in self.sups:
            detail = f"{address!r} is a supervisor; call one of its children"
        elif len(self.procs) <= SUGGEST_MAX and isinstance(address, str):
            detail = self._suggest(address)
        if not detail:
            detail = "check the name, or whether its supervisor stopped it"
        return NoSuchServer(address, detail)

    def _gone(self, pid: Pid) -> str:
        """Why a pid names no running server, and who holds its name now."""
        if pid.node != self.node:
            return (f"it is a pid of node {pid.node!r}, and this node ({self.node!r}) is "
                    f"not in a cluster")
        if pid.creation != self.creation:
            return (f"it is a pid from an earlier run of node {pid.node!r}; that "
                    f"incarnation of {pid.name!r} is gone")
        now = self.procs.get(pid.name) or self.sups.get(pid.name)
        if now is None:
            return f"that incarnation of {pid.name!r} is gone, and {pid.name!r} is not running"
        if isinstance(now, GenServer) or pid != now.pid:
            return (f"that incarnation of {pid.name!r} is gone; {pid.name!r} is now "
                    f"{self.pid_of(now)}")
        return f"{pid.name!r} is a supervisor; call one of its children"

    # -- monitors --------------------------------------------------------------------

    def monitor(self, watcher: GenServer[Any], target: Any) -> MonitorRef:
        """Monitor the incarnation ``target`` names now, for ``watcher``: one
        ServerDown to its handle_info when that incarnation stops (at once, with
        reason "noproc", if nothing runs it)."""
        thing = self.resolve_any(target)
        if thing is None and self.remote is not None:  # it makes its ref with new_ref
            remote_ref = self.remote.monitor(watcher, target)
            if remote_ref is not None:
                return remote_ref
        if thing is None and type(target) is Pid and target.node != self.node:
            raise NoSuchServer(target, self._gone(target))
        ref = self.new_ref(watcher, thing)
        if thing is None:
            ref._state = FIRED
            self.enqueue(watcher, (INFO, ServerDown(ref, target, "noproc"), None), force=True)
            return ref
        links = _links(watcher)
        links.watching[ref] = thing
        _links(thing).watchers[ref] = watcher
        return ref

    def new_ref(self, watcher: Any, target: Any) -> MonitorRef:
        """A fresh monitor ref of this node, of ``watcher`` on ``target``."""
        return MonitorRef(self.node, next(self._refs), watcher, target)

    def demonitor(self, watcher: GenServer[Any], ref: Any) -> bool:
        """Stop the monitor ``ref`` of ``watcher``: True if it was active, False if it
        had fired already (its ServerDown is delivered or on its way)."""
        if type(ref) is not MonitorRef:
            raise TypeError(f"demonitor takes the otpy.MonitorRef that monitor returned, "
                            f"got {short_repr(ref)}")
        if ref._watcher is not watcher:
            raise ValueError(f"{ref!r} is a monitor of another server; a server can only "
                             f"demonitor its own monitors")
        if ref._state == CANCELLED:
            raise ValueError(f"{ref!r} was demonitored already")
        if ref._state == FIRED:
            return False
        ref._state = CANCELLED
        self._unlink(ref)
        return True

    def _unlink(self, ref: MonitorRef) -> None:
        watching = getattr(ref._watcher, "_otpy_links", None)  # None: a remote watcher
        if watching is not None:
            watching.watching.pop(ref, None)
        target = ref._target
        ref._target = None
        if getattr(target, "remote_node", None) is not None:  # a server of another node
            if self.remote is not None:
                self.remote.demonitor(ref)
            return
        links = target._otpy_links if isinstance(target, GenServer) else getattr(
            target, "links", None)
        if links is not None:
            links.watchers.pop(ref, None)

    def add_watcher(self, thing: GenServer[Any] | SupervisorRuntime, ref: MonitorRef,
                    watcher: Any) -> None:
        """Link a monitor of ``thing`` whose watcher is elsewhere (a server of another
        node, represented by an object with ``down(ref, pid, reason)``)."""
        _links(thing).watchers[ref] = watcher

    def remove_watcher(self, ref: MonitorRef) -> None:
        """Undo :meth:`add_watcher` (the remote watcher demonitored)."""
        ref._state = CANCELLED
        self._unlink(ref)

    def watch_remote(self, watcher: GenServer[Any], ref: MonitorRef) -> None:
        """Record that ``watcher`` holds ``ref``, a monitor of a server of another node
        (``ref._target`` has ``remote_node``), so that it ends with the watcher."""
        _links(watcher).watching[ref] = ref._target

    def deliver_down(self, ref: MonitorRef, pid: Any, reason: Any) -> None:
        """A monitor of a server of another node fired: one ServerDown to its watcher,
        if the monitor is still active."""
        if ref._state != ACTIVE:
            return
        ref._state = FIRED
        watcher = ref._watcher
        links = watcher._otpy_links
        if links is not None:
            links.watching.pop(ref, None)
        ref._target = None
        if not watcher._otpy_flags & DEAD:
            self.enqueue(watcher, (INFO, ServerDown(ref, pid, reason), None), force=True)

    def _down(self, thing: GenServer[Any] | SupervisorRuntime, reason: Any) -> None:
        """An incarnation stops: each monitor on it fires once; its own monitors end."""
        links = thing._otpy_links if isinstance(thing, GenServer) else thing.links
        if not links:
            return
        pid = self.pid_of(thing)
        watchers, links.watchers = links.watchers, {}
        for ref, watcher in watchers.items():
            ref._state = FIRED
            ref._target = None
            if not isinstance(watcher, GenServer):  # a server of another node watches
                watcher.down(ref, pid, reason)
                continue
            mine = watcher._otpy_links
            if mine is not None:
                mine.watching.pop(ref, None)
            if not watcher._otpy_flags & DEAD:
                self.enqueue(watcher, (INFO, ServerDown(ref, pid, reason), None), force=True)
        for ref in list(links.watching):
            ref._state = CANCELLED
            self._unlink(ref)

    def _suggest(self, name: str) -> str:
        """``did you mean 'x'?`` for an unknown name, within the budget described at
        SUGGEST_COST (and "" when over it, or when no name is close)."""
        n = len(self.procs)
        key = (name, n)
        kept = self._suggested.get(key)
        if kept is not None:
            return kept
        credit = min(self._suggest_credit + 1, SUGGEST_COST * SUGGEST_MAX)
        cost = SUGGEST_COST * n
        if credit < cost:
            self._suggest_credit = credit
            return ""
        self._suggest_credit = credit - cost
        close = difflib.get_close_matches(name, list(self.procs), n=1)
        detail = f"did you mean {close[0]!r}?" if close else ""
        if len(self._suggested) >= SUGGEST_KEEP:
            del self._suggested[next(iter(self._suggested))]
        self._suggested[key] = detail
        return detail

    # -- stepping --------------------------------------------------------------------

    @runs_callbacks("proc")
    def step(self, proc: GenServer[Any], kind: int, payload: Any, caller: Caller | None) -> None:
        """Run one callback of ``proc`` and act on its result; never raises."""
        proc._otpy_flags |= BUSY
        try:
            if kind == CALL:
                result = proc.handle_call(payload, caller, proc._otpy_state)  # type: ignore[arg-type]
            elif kind == CAST:
                result = proc.handle_cast(payload, proc._otpy_state)
            else:
                result = proc.handle_info(payload, proc._otpy_state)
        except Exception as exc:
            proc._otpy_flags &= ~BUSY
            self.crashed(proc, exc, kind, payload, caller)
            return
        except BaseException as exc:
            proc._otpy_flags &= ~BUSY
            if type(exc) is Overrun:  # the watchdog interrupted a runaway callback
                self.crashed(proc, exc.timeout(), kind, payload, caller)
                return
            raise  # KeyboardInterrupt, SystemExit, trio.Cancelled: not the server's
        flags = proc._otpy_flags = proc._otpy_flags & ~BUSY
        t = type(result)
        # The two hottest outcomes, for a server no one observes: a copy of what
        # _settle and commit do, inlined (each Python call here costs ~5% of the rate).
        if not flags:
            if kind == CALL:
                if t is Reply:
                    proc._otpy_state = result.state
                    # caller.reply(result.reply), inlined: equivalent because Caller
                    # subclasses hook _resolve, never reply.
                    if caller is not None and caller._status == WAITING:
                        caller._status = ANSWERED
                        caller._resolve(result.reply)
                    return
            elif t is not Reply and t is not NoReply and t is not Stop and t is not Continue:
                proc._otpy_state = result
                return
        self._settle(proc, kind, payload, caller, result)

    def _settle(self, proc: GenServer[Any], kind: int, payload: Any, caller: Caller | None,
                result: Any) -> None:
        """Act on a callback's result: commit the state, answer the caller, stop, crash
        on a wrong value, run a continuation."""
        if proc._otpy_flags & COUNTED and self.on_step is not None:
            self.on_step(proc)
        if proc._otpy_flags & DEAD:
            # A sibling's restart terminated this server while it was stepping (it
            # called the sibling inline): its result belongs to a dead incarnation.
            if caller is not None:
                caller._fail(ServerStopped(
                    f"server {proc._otpy_name!r} was stopped by its supervisor while "
                    f"serving this call", name=proc._otpy_name, reason="shutdown"))
            return
        then = NOTHING
        if type(result) is Continue:
            then, result = result.arg, result.result
        t = type(result)
        if t is Stop:
            state = result.state
        elif kind == CALL:
            if t is not Reply and t is not NoReply:
                self.crashed(proc, bad_return(
                    proc, "handle_call", result,
                    "otpy.Reply(reply, state), otpy.NoReply(state) or otpy.Stop(...), "
                    "maybe wrapped in otpy.Continue(result, arg)"), kind, payload, caller)
                return
            state = result.state
        elif t is Reply or t is NoReply:
            callback = ("handle_call", "handle_cast", "handle_info", "handle_continue")[kind]
            self.crashed(proc, bad_return(proc, callback, result,
                                          "the new state or otpy.Stop(reason, state)"),
                         kind, payload, caller)
            return
        else:
            state = result
        try:
            held = self.commit(proc, state)
        except Exception as exc:
            # A store could not record the state: the step crashes, so nothing of it is
            # acknowledged, and the server keeps the last state that was recorded.
            self.crashed(proc, exc, kind, payload, caller)
            return
        if t is Stop:
            self.stopped(proc, result, caller, held)
            return
        if kind == CALL and caller is not None:
            if t is Reply:
                if held and not caller._inline:
                    self._hold(proc, held, caller, result.reply)
                else:
                    caller.reply(result.reply)
            elif caller._status == WAITING:
                self._defer_caller(proc, caller)
        if then is not NOTHING:
            self.run_continue(proc, then)

    def _hold(self, proc: GenServer[Any], seq: int, caller: Caller, reply: Any) -> None:
        """Hand ``reply`` to the store's group commit: ``caller`` gets it once the record
        ``seq`` is synced (only a caller outside the node is held: an inline one needs
        its answer within the step)."""
        durable = self.durable
        assert durable is not None
        durable.hold(seq, caller, reply, proc._otpy_name)

    @runs_callbacks("proc")
    def run_continue(self, proc: GenServer[Any], arg: Any) -> None:
        """Run ``handle_continue(arg, state)`` now, before any other message: the
        server asked for it with ``otpy.Continue``. Never raises."""
        if proc._otpy_flags & DEAD:
            return
        proc._otpy_flags |= BUSY
        try:
            result = proc.handle_continue(arg, proc._otpy_state)
        except Exception as exc:
            proc._otpy_flags &= ~BUSY
            self.crashed(proc, exc, CONTINUE, arg)
            return
        except BaseException as exc:
            proc._otpy_flags &= ~BUSY
            if type(exc) is Overrun:
                self.crashed(proc, exc.timeout(), CONTINUE, arg)
                return
            raise
        proc._otpy_flags &= ~BUSY
        self._settle(proc, CONTINUE, arg, None, result)

    def commit(self, proc: GenServer[Any], state: Any) -> int:
        """Make ``state`` the server's state: the one place it changes (``step`` inlines
        this for servers that nobody observes). An observed server's state is first
        reported to ``on_commit`` (a store records it); if that raises, the state stays
        as it was and the error goes to the caller (a step turns it into its crash).
        Returns 0, or the seq of the record that the step's reply must wait for (a
        store's group commit: see Durability.hold)."""
        if proc._otpy_flags & OBSERVED and self.on_commit is not None:
            held = self.on_commit(proc, state)
            proc._otpy_state = state
            return held
        proc._otpy_state = state
        return 0

    def commit_all(self, changes: list[tuple[GenServer[Any], type[GenServer[Any]], Any]]
                   ) -> None:
        """Commit many states as one act (a release's), each ``(server, class, state)``
        with the class that runs the server from now on. The observed servers' are first
        reported together to ``on_commit_all`` (a store records them in one atomic
        record); only then are classes and states swapped, so if that raises, nothing
        changed and the error goes to the caller."""
        if self.on_commit_all is not None:
            observed = [c for c in changes if c[0]._otpy_flags & OBSERVED]
            if observed:
                self.on_commit_all(observed)
        for proc, cls, state in changes:
            proc.__class__ = cls
            proc._otpy_state = state

    @staticmethod
    def _defer_caller(proc: GenServer[Any], caller: Caller) -> None:
        # Kept so that a server that stops fails its deferred callers at once instead
        # of leaving them to their timeouts; answered ones are pruned as it grows.
        deferred = proc._otpy_deferred
        if deferred is None:
            proc._otpy_deferred = [caller]
            return
        if len(deferred) >= 32 and len(deferred) & (len(deferred) - 1) == 0:
            deferred[:] = [c for c in deferred if c._status == WAITING]
        deferred.append(caller)

    # -- calls -----------------------------------------------------------------------

    def start_call(self, address: Any, request: Any, caller: Caller, *,
                   vsn: str | None = None, timeout: float | None = None) -> None:
        """Deliver the call ``request`` to ``address``; its reply or error reaches
        ``caller``, now (an idle server is stepped inline) or later (from the
        dispatcher, or when the server answers a deferred call), and never raises.

        ``vsn``: the protocol version the client speaks (the server's
        ``upgrade_request``/``downgrade_reply`` adapt the request and the reply).
        ``timeout``: seconds until ``caller`` gets :class:`otpy.CallTimeout` if still
        unanswered (None: no deadline; the edge may still give up on its own).
        Every edge delivers calls through here."""
        try:  # a name: resolve's first case, inlined (an unhashable address
            proc = self.procs.get(address)  # is resolve's to refuse, below)
        except TypeError:
            proc = None
        if proc is None:  # not a name that runs here: what resolve makes of it
            try:
                proc = self.resolve(address)
            except TypeError as exc:
                caller._fail(exc)
                return
            if proc is None:
                remote = self.remote
                if remote is None or not remote.start_call(address, request, caller, vsn,
                                                           timeout):
                    caller._fail(self.no_such(address))
                return
        if vsn is not None:
            try:
                request = self.adapt_request(proc, vsn, request)
            except Exception as exc:
                caller._fail(exc)
                return
            caller = _Versioned(caller, self, proc, vsn)
        flags = proc._otpy_flags
        if not flags and proc._otpy_mbox is None:
            self.step(proc, CALL, request, caller)
        elif flags & NOT_IDLE or proc._otpy_mbox is not None:
            self.enqueue_call(proc, (CALL, request, caller))
        else:  # idle, and observed
            self.step(proc, CALL, request, caller)
        if timeout is not None and caller._status == WAITING:
            self.timers.arm(caller, address, timeout)

    @runs_callbacks("proc")
    def adapt_request(self, proc: GenServer[Any], vsn: str, request: Any) -> Any:
        """A versioned client's request as the running code takes it."""
        adapt = getattr(proc, "upgrade_request", None)
        if adapt is None or type(proc).vsn == vsn:
            return request
        try:
            return adapt(vsn, request)
        except Overrun as exc:
            raise exc.timeout() from None

    @runs_callbacks("proc")
    def adapt_reply(self, proc: GenServer[Any], cls: type[GenServer[Any]], vsn: str,
                    reply: Any) -> Any:
        """The reply of ``cls`` (the class that served the call) in the client's
        version ``vsn``."""
        adapt = getattr(cls, "downgrade_reply", None)
        if adapt is None or cls.vsn == vsn:
            return reply
        server = proc if type(proc) is cls else cls.__new__(cls)
        try:
            return adapt(server, vsn, reply)
        except Overrun as exc:
            raise exc.timeout() from None

    def call_timed_out(self, caller: Caller, address: Any, timeout: float) -> None:
        """Fail a call whose deadline passed (from the timer heap)."""
        name = short_repr(address)
        if self.is_waiting(address, caller):  # dropped from the line: never sent
            caller._fail(CallTimeout(
                f"server {name} kept a full mailbox for {timeout:g} s, so this call never "
                f"got into it; the request was not sent. Slow the callers down, or raise "
                f"the server's max_mailbox"))
        else:
            caller._fail(CallTimeout(
                f"server {name} did not reply within {timeout:g} s; the request may "
                f"still be served, its reply will be dropped. Pass a larger timeout= if "
                f"it is expected to take longer"))

    def call_nowait(self, address: Any, request: Any, edge: bool = False) -> Any:
        """Call ``address`` and step it inline (``self.call``); raise WouldBlock if it
        cannot answer now. ``edge``: the caller is outside the node (``node.call_nowait``),
        so a durable server's reply that group commit must hold cannot be given now
        either (inside a step, ``self.call`` gets it at once: see Durability). A
        positional default, not keyword-only: CPython looks keyword-only defaults up in
        a dict on every call, and self.call comes through here."""
        try:  # a name: resolve's first case, inlined (an unhashable address
            proc = self.procs.get(address)  # is resolve's to refuse, below)
        except TypeError:
            proc = None
        if proc is None:
            proc = self.resolve(address)
        if proc is None:
            if self.remote is not None and self.remote.serves(address):
                raise WouldBlock(
                    f"{short_repr(address)} is served by another node, which cannot answer "
                    f"within this step; cast to it, or call it from a task (start_task) "
                    f"or with 'await node.call'")
            raise self.no_such(address)
        if proc._otpy_flags:
            if proc._otpy_flags & NOT_STEPPABLE:
                raise WouldBlock(self._why_blocked(proc))
            if proc._otpy_flags & WATCHED:
                proc._otpy_flags |= TOUCHED
        if proc._otpy_mbox:
            # The call must not jump the messages already queued: serve them first.
            proc = self._drain(proc)
        caller = _EdgeCaller() if edge else InlineCaller()
        self.step(proc, CALL, request, caller)
        if caller._status == WAITING:
            caller._give_up()  # the deferred reply, if it ever comes, is dropped
            durable = self.durable
            if durable is not None and durable.held and durable.held[-1][1] is caller:
                raise WouldBlock(
                    f"server {proc._otpy_name!r} is durable and its store syncs in groups "
                    f"(fsync='group'): its reply is held until its state is on disk, so "
                    f"it cannot be given now; its state was updated. Use 'await "
                    f"node.call', which waits for the sync")
            raise WouldBlock(
                f"server {proc._otpy_name!r} deferred its reply (handle_call returned "
                f"NoReply), so it cannot answer within this step; its state was updated. "
                f"Use 'await node.call' from a task, or a cast and a reply message.")
        if caller.error is not None:
            raise caller.error
        return caller.value

    def _why_blocked(self, proc: GenServer[Any]) -> str:
        name, flags = proc._otpy_name, proc._otpy_flags
        if flags & BUSY:
            return (f"server {name!r} is already in the current chain of calls (a call to "
                    f"itself or a cycle of calls); calling it would deadlock. Use cast or "
                    f"send to reach it, or answer from its own state")
        if flags & SUSPENDED:
            return (f"server {name!r} is suspended; its messages wait until it resumes. "
                    f"Use 'await node.call' to wait, or cast")
        return f"server {name!r} has stopped"

    def _drain(self, proc: GenServer[Any]) -> GenServer[Any]:
        name = proc._otpy_name
        while True:
            if proc._otpy_flags & WATCHED:
                proc._otpy_flags |= TOUCHED
            mb = proc._otpy_mbox
            if not mb:
                proc._otpy_mbox = None
                return proc
            kind, payload, caller = mb.popleft()
            if self.waiting:
                self.room_for(proc)
            self.step(proc, kind, payload, caller)
            if proc._otpy_flags & DEAD:
                new = self.procs.get(name)
                if new is None:
                    raise self.no_such(name)
                proc = new
            if proc._otpy_flags & NOT_STEPPABLE:
                raise WouldBlock(self._why_blocked(proc))

    # -- the dispatcher's work -------------------------------------------------------

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
            proc._otpy_flags &= ~SCHEDULED
            if proc._otpy_flags & NOT_STEPPABLE:
                continue  # dead, or suspended (resume schedules it again)
            mb = proc._otpy_mbox
            if not mb:
                proc._otpy_mbox = None
                continue
            if proc._otpy_flags & WATCHED:
                proc._otpy_flags |= TOUCHED
            for _ in range(min(len(mb), PER_SERVER_TURN)):
                kind, payload, caller = mb.popleft()
                step(proc, kind, payload, caller)
                done += 1
                if proc._otpy_flags & NOT_STEPPABLE:
                    break
            if proc._otpy_mbox is mb:
                if not mb:
                    proc._otpy_mbox = None
                elif not proc._otpy_flags & (NOT_STEPPABLE | SCHEDULED):
                    proc._otpy_flags |= SCHEDULED
                    runq.append(proc)
            if self.waiting:
                self.room_for(proc)
        return done

    def serve_one(self, proc: GenServer[Any]) -> None:
        """Serve the oldest queued message of a steppable server with a mailbox: one
        message of :meth:`run_batch`, with the same bookkeeping (the simulation picks
        servers one message at a time)."""
        mb = proc._otpy_mbox
        assert mb and not proc._otpy_flags & NOT_STEPPABLE
        if proc._otpy_flags & WATCHED:
            proc._otpy_flags |= TOUCHED
        kind, payload, caller = mb.popleft()
        self.step(proc, kind, payload, caller)
        if proc._otpy_mbox is mb and not mb:
            proc._otpy_mbox = None
        if self.waiting:
            self.room_for(proc)

    def ready(self) -> list[GenServer[Any]]:
        """Servers that have a queued message they can serve now, in registry order."""
        return [p for p in self.procs.values()
                if p._otpy_mbox and not p._otpy_flags & NOT_STEPPABLE]

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` from the dispatcher, after the current step."""
        if not self.runq and not self.deferred:
            self.wakeup()
        self.deferred.append(fn)

    def run_deferred(self) -> None:
        """Run the oldest deferred function (the simulation runs them one by one)."""
        self.deferred.popleft()()

    @property
    def has_work(self) -> bool:
        return bool(self.runq or self.deferred)

    # -- delivery --------------------------------------------------------------------

    def enqueue(self, proc: GenServer[Any], msg: Message, *, force: bool = False) -> None:
        mb = proc._otpy_mbox
        if mb is None:
            mb = proc._otpy_mbox = deque()
        elif not force and len(mb) >= proc._otpy_max_mailbox:
            raise self._refuse(proc)
        mb.append(msg)
        if not proc._otpy_flags & (SCHEDULED | SUSPENDED | DEAD):  # hot: skip the call
            self.schedule(proc)

    def _refuse(self, proc: GenServer[Any]) -> MailboxFull:
        name = proc._otpy_name
        self.refused[name] = self.refused.get(name, 0) + 1
        return MailboxFull(
            f"server {name!r} has {len(proc._otpy_mbox or ())} queued messages "
            f"(max_mailbox={proc._otpy_max_mailbox}); nothing was queued. Slow down "
            f"(await node.call waits for room), or raise max_mailbox on the class or its "
            f"Child spec", name=name)

    def mailbox_full(self, proc: GenServer[Any]) -> bool:
        """Whether a message for ``proc`` would be refused now."""
        mb = proc._otpy_mbox
        return mb is not None and len(mb) >= proc._otpy_max_mailbox

    def enqueue_call(self, proc: GenServer[Any], msg: Message) -> None:
        """Queue a call; to a full mailbox it waits in line for room (a call is never
        refused: its caller waits, which is the back-pressure)."""
        line = self.waiting.get(proc._otpy_name)
        if line is None and not self.mailbox_full(proc):
            self.enqueue(proc, msg)
        elif line is None:
            self.waiting[proc._otpy_name] = deque((msg,))
        else:
            line.append(msg)

    def room_for(self, proc: GenServer[Any]) -> None:
        """Move the calls waiting for room in ``proc``'s mailbox into it, in order, as
        far as there is room; those whose callers gave up are dropped unserved."""
        name = proc._otpy_name
        line = self.waiting.get(name)
        if line is None or proc._otpy_flags & DEAD:
            return
        mb = proc._otpy_mbox
        room = proc._otpy_max_mailbox - (len(mb) if mb else 0)
        while line and room > 0:
            msg = line.popleft()
            caller = msg[2]
            if caller is not None and caller._status != WAITING:
                continue  # it timed out waiting: never sent, as its error says
            self.enqueue(proc, msg, force=True)
            room -= 1
        if not line:
            del self.waiting[name]

    def is_waiting(self, address: Any, caller: Caller) -> bool:
        """Whether ``caller``'s call still waits for room in a mailbox."""
        return any(msg[2] is caller for msg in self.waiting.get(address, ()))

    def schedule(self, proc: GenServer[Any]) -> None:
        """Put a server with queued messages on the run queue, once. A busy server is
        queued too: the dispatcher serves it after the current step."""
        if proc._otpy_mbox and not proc._otpy_flags & (SCHEDULED | SUSPENDED | DEAD):
            proc._otpy_flags |= SCHEDULED
            if not self.runq:
                self.wakeup()
            self.runq.append(proc)

    def cast(self, address: Any, message: Any) -> None:
        """Queue a cast (from inside a step: never stepped inline)."""
        try:  # a name: _target_of's first case, inlined (self.cast is hot)
            proc = self.procs.get(address)
        except TypeError:
            proc = None
        if proc is None:
            proc = self._target_of(CAST, address, message)
            if proc is None:
                return
        self.enqueue(proc, (CAST, message, None))

    def send(self, address: Any, message: Any) -> None:
        """Queue a message for ``handle_info`` (from inside a step)."""
        proc = self._target_of(INFO, address, message)
        if proc is not None:
            self.enqueue(proc, (INFO, message, None))

    def _target_of(self, kind: int, address: Any, message: Any) -> GenServer[Any] | None:
        """Where a cast or send goes: the server, or None when the message went to
        another node, or was dropped for a pid of this node whose incarnation is gone
        (as in Erlang); NoSuchServer for a name that nothing runs anywhere. (The hot
        callers look a plain name up first themselves.)"""
        proc = self.resolve(address)
        if proc is None:
            if self.remote is not None and self.remote.send(kind, address, message):
                return None
            if not (type(address) is Pid and address.node == self.node):
                raise self.no_such(address)
        return proc

    def cast_now(self, kind: int, address: Any, message: Any) -> None:
        """A cast or send from outside any step: an idle server is stepped at once."""
        try:  # a name: resolve's first case, inlined (an unhashable address
            proc = self.procs.get(address)  # is resolve's to refuse, below)
        except TypeError:
            proc = None
        if proc is None:
            proc = self._target_of(kind, address, message)
            if proc is None:
                return
        flags = proc._otpy_flags
        if (flags and flags & NOT_IDLE) or proc._otpy_mbox is not None:
            self.enqueue(proc, (kind, message, None))
        else:
            self.step(proc, kind, message, None)

    # -- timers ----------------------------------------------------------------------

    def send_after(self, seconds: float, address: Any, message: Any) -> TimerRef:
        """Deliver ``message`` to whoever ``address`` names when the timer fires."""
        self.resolve(address)  # a bad address fails now, not when the timer fires
        return self.timers.send_after(seconds, address, message)

    def pending_timers(self) -> int:
        """Timers that have neither fired nor been cancelled."""
        return self.timers.pending()

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def fire_timers(self) -> int:
        """Act on every timer and call deadline due now, in deadline order; returns the
        number of messages delivered."""
        heap = self.timers._heap
        if not heap or heap[0][0] > self.clock():
            return 0
        fired = 0
        for _when, _seq, item, address, timeout in self.timers.due():
            if type(item) is TimerRef:
                proc = self.resolve(item.name)
                if proc is not None:
                    # Timers are never refused for a full mailbox: they were asked for.
                    self.enqueue(proc, (INFO, item.message, None), force=True)
                    fired += 1
                elif self.remote is not None and self.remote.send(INFO, item.name,
                                                                  item.message):
                    fired += 1
            else:
                self.call_timed_out(item, address, timeout)  # type: ignore[arg-type]
        return fired

    # -- tasks -----------------------------------------------------------------------

    def start_task(
        self, proc: GenServer[Any], fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
        tag: Any,
    ) -> TaskRef:
        if self._spawn is None:
            raise OtpyError("start_task needs a running node (open_node)")
        if proc._otpy_flags & DEAD:
            raise ServerStopped(f"server {proc._otpy_name!r} has stopped; it cannot start "
                                f"tasks", name=proc._otpy_name)
        ref = TaskRef(tag)
        if proc._otpy_tasks is None:
            proc._otpy_tasks = set()
        proc._otpy_tasks.add(ref)
        self._spawn(proc, ref, fn, args)
        return ref

    def task_finished(self, proc: GenServer[Any], ref: TaskRef, message: Any) -> None:
        ref.done = True
        if proc._otpy_tasks is not None:
            proc._otpy_tasks.discard(ref)
        if not proc._otpy_flags & DEAD:
            self.enqueue(proc, (INFO, message, None), force=True)

    # -- starting and stopping servers ------------------------------------------------

    def code_for(self, spec: Child) -> type[GenServer[Any]]:
        """The class a child starts with: its spec's, as the installed releases left it
        (as in OTP, a release changes the child spec itself)."""
        entry = self.class_by_name.get(spec.id)
        if entry is not None and entry[0] is spec.server_class:
            return entry[1]
        cls = spec.server_class
        for _ in range(len(self.class_upgrades)):
            newer = self.class_upgrades.get(cls)
            if newer is None:
                break
            cls = newer
        return cls

    @runs_callbacks("proc")
    def start_server(
        self, cls: type[GenServer[Any]], spec: Child, sup: SupervisorRuntime, restarts: int = 0
    ) -> GenServer[Any] | None:
        """Create and ``init`` a server; None if ``init`` returned Ignore.

        Raises StartFailed (with the cause) if init raised or returned Stop. A
        continuation that ``init`` asked for runs once the server is registered (a
        crash there is a crash of the running server, as in OTP).

        A durable server with a stored state runs ``resume(state, arg)`` instead of
        ``init``; one whose stored state cannot be used (it cannot be read, migrated or
        type-checked) is not started: None, as for Ignore, after one error event (see
        Durability.take), and the stored state is left as it is."""
        name = spec.id
        durable = spec.durable if spec.durable is not None else cls.durable
        if durable and self.durable is None:
            raise StartFailed(
                f"child {name!r} ({cls.__qualname__}) is durable, but this node has no "
                f"store; open the node with open_node(..., store=PATH) (a node whose tree "
                f"has a durable child when it starts opens one by itself; a Simulation "
                f"takes store=otpy.testing.MemoryStore())",
                child=name, reason="no store")
        proc = cls.__new__(cls)
        proc._otpy_name = name
        proc._otpy_rt = self
        proc._otpy_sup = sup
        proc._otpy_spec = spec
        proc._otpy_flags = BUSY | OBSERVED if durable else BUSY
        proc._otpy_mbox = None
        proc._otpy_restarts = restarts
        proc._otpy_tasks = None
        proc._otpy_deferred = None
        proc._otpy_pid = None
        proc._otpy_links = None
        proc._otpy_max_mailbox = (cls.max_mailbox if spec.max_mailbox is None
                                  else spec.max_mailbox)
        self.procs[name] = proc
        then = NOTHING
        stored = NOTHING
        if durable:
            assert self.durable is not None
            try:
                stored = self.durable.take(proc, cls)
            except StoreError as exc:
                self._unregister(proc, "refused")
                self.durable.refuse(name, exc)
                return None
        what = "init" if stored is NOTHING else "resume"
        try:
            if stored is NOTHING:
                state = proc.init(spec.arg)
                if state is Ignore:
                    self._unregister(proc, "ignore")
                    return None
            else:
                state = proc.resume(stored, spec.arg)
            if type(state) is Continue:
                then, state = state.arg, state.result
            if type(state) is Stop:
                raise StartFailed(
                    f"child {name!r} ({cls.__qualname__}.{what}) returned Stop with reason "
                    f"{state.reason!r}", child=name, reason=state.reason)
            if type(state) in (Reply, NoReply, Continue) or state is Ignore:
                raise bad_return(proc, what, state, "the first state, otpy.Ignore, "
                                 "otpy.Continue(state, arg) or otpy.Stop(reason, state)"
                                 if what == "init" else "the state, otpy.Continue(state, "
                                 "arg) or otpy.Stop(reason, state)")
            if state is not stored:  # a stored state was checked already (take)
                check_state(cls, state, server=name, when=f"returned by {what}")
        except BaseException as exc:
            self._unregister(proc, exc)
            if proc._otpy_tasks:
                for task in proc._otpy_tasks:
                    task.cancel()
            if isinstance(exc, StartFailed):
                raise
            if type(exc) is Overrun:
                exc = exc.timeout()
            elif not isinstance(exc, Exception):
                raise
            raise StartFailed(
                f"child {name!r} ({cls.__qualname__}) failed to start: {what} raised "
                f"{type(exc).__name__}: {exc}", child=name, reason=exc) from exc
        # init may have cast to itself: it is queued already (SCHEDULED stays).
        proc._otpy_flags &= SCHEDULED | OBSERVED
        try:
            self.commit(proc, state)
        except Exception as exc:  # a durable server's first state could not be recorded
            self._unregister(proc, exc)
            if proc._otpy_tasks:
                for task in proc._otpy_tasks:
                    task.cancel()
            raise StartFailed(
                f"child {name!r} ({cls.__qualname__}) failed to start: its first state "
                f"could not be recorded: {type(exc).__name__}: {exc}", child=name,
                reason=exc) from exc
        if durable:
            assert self.durable is not None
            self.durable.started(proc)
        self._take_back(proc, self._stash.pop(name, None))
        if then is not NOTHING:
            self.run_continue(proc, then)
        return proc

    def refusal(self, name: str) -> StoreError | None:
        """Why the stored state of durable server ``name`` kept it from starting, if it
        did, at its last start."""
        return None if self.durable is None else self.durable.refusals.get(name)

    def forget_state(self, spec: Child) -> None:
        """Child ``spec`` stopped for good (its supervisor said so): if it is durable,
        its stored state goes (see Durability.forget)."""
        if self.durable is not None:
            cls = self.code_for(spec)
            if spec.durable if spec.durable is not None else cls.durable:
                self.durable.forget(spec.id)

    def _take_back(self, proc: GenServer[Any], stashed: deque[Message] | None) -> None:
        """Give the name's stashed mailbox (messages sent before, first) to ``proc``."""
        if stashed:
            if proc._otpy_mbox:
                stashed.extend(proc._otpy_mbox)
            proc._otpy_mbox = stashed
        self.schedule(proc)

    def _unregister(self, proc: GenServer[Any], reason: Any) -> None:
        proc._otpy_flags |= DEAD
        if proc._otpy_links is not None:
            self._down(proc, reason)
        name = proc._otpy_name
        if self.procs.get(name) is proc:
            del self.procs[name]
        if proc._otpy_mbox:
            stash = self._stash.get(name)
            if stash is None:
                self._stash[name] = proc._otpy_mbox
            else:
                stash.extend(proc._otpy_mbox)
        proc._otpy_mbox = None
        line = self.waiting.pop(name, None)
        if line:  # calls waiting for room go with the mailbox, after it
            stash = self._stash.setdefault(name, deque())
            stash.extend(line)

    @runs_callbacks("proc")
    def terminate_server(
        self, proc: GenServer[Any], reason: Any, grace: float | None = None
    ) -> None:
        """Run ``terminate(reason, state)`` and remove the server; its mailbox is kept
        for whoever takes the name within this supervision act."""
        if proc._otpy_flags & DEAD:
            return
        if proc._otpy_flags & OBSERVED and self.durable is not None:
            self.durable.changes.pop(proc, None)  # named by a step that never committed
        proc._otpy_flags |= BUSY
        try:
            proc.terminate(reason, proc._otpy_state)
        except (Exception, Overrun) as exc:
            # An overrunning terminate is abandoned: the server stops all the same.
            err = exc.timeout() if isinstance(exc, Overrun) else exc
            self.log.error("terminate_crashed", server=proc._otpy_name, reason=repr(reason),
                           exc_info=err)
        proc._otpy_flags &= ~BUSY
        self._unregister(proc, reason)
        if proc._otpy_tasks:
            for task in list(proc._otpy_tasks):
                task.cancel(grace)
        if proc._otpy_deferred:
            deferred, proc._otpy_deferred = proc._otpy_deferred, None
            for caller in deferred:
                if caller._status != WAITING:
                    continue
                err_cls = ServerCrashed if isinstance(reason, BaseException) else ServerStopped
                err = err_cls(f"server {proc._otpy_name!r} stopped ({short_repr(reason)}) "
                              f"before it answered this call, which it had deferred with "
                              f"NoReply", name=proc._otpy_name, reason=reason)
                if isinstance(reason, BaseException):
                    err.__cause__ = reason
                caller._fail(err)

    def crashed(
        self, proc: GenServer[Any], exc: BaseException, kind: int = INFO, payload: Any = None,
        caller: Caller | None = None,
    ) -> None:
        name = proc._otpy_name
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

    def stopped(self, proc: GenServer[Any], result: Stop[Any], caller: Caller | None,
                held: int = 0) -> None:
        """The server returned Stop (its state committed already; ``held`` as commit
        returned it): answer the caller, then let the server exit."""
        reason = result.reason
        if caller is not None:
            if result.reply is not NOTHING:
                if held and not caller._inline:
                    self._hold(proc, held, caller, result.reply)
                else:
                    caller.reply(result.reply)
            else:
                caller._fail(ServerStopped(
                    f"server {proc._otpy_name!r} stopped with reason {reason!r} without "
                    f"replying", name=proc._otpy_name, reason=reason))
        if not is_normal_reason(reason):
            self.log.error("server_stopped", server=proc._otpy_name, vsn=proc.vsn,
                           reason=repr(reason))
        self.exited(proc, reason)

    def exited(self, proc: GenServer[Any], reason: Any) -> None:
        """The server stops with ``reason``: terminate it, then let its supervisor act."""
        if proc._otpy_flags & DEAD:
            return
        with self.supervision_act():
            self.terminate_server(proc, reason)
            proc._otpy_sup.child_exited(proc._otpy_spec.id, reason)

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

    def suspend(self, address: Any) -> None:
        self.lookup(address)._otpy_flags |= SUSPENDED

    def resume(self, address: Any) -> None:
        proc = self.lookup(address)
        proc._otpy_flags &= ~SUSPENDED
        self.schedule(proc)

    def statistics(self, address: Any = None) -> dict[str, Any]:
        """What ``node.statistics()`` shows (see there)."""
        if address is not None:
            proc = self.lookup(address)
            flags, name = proc._otpy_flags, proc._otpy_name
            return {
                "mailbox": len(proc._otpy_mbox or ()), "max_mailbox": proc._otpy_max_mailbox,
                "refused": self.refused.get(name, 0),
                "waiting": len(self.waiting.get(name, ())), "restarts": proc._otpy_restarts,
                "vsn": type(proc).vsn, "step_timeout": budget_of(proc),
                "durable": bool(flags & OBSERVED) and self.durable is not None,
                "supervisor": proc._otpy_sup.name,
                "status": ("suspended" if flags & SUSPENDED else
                           "running" if flags & BUSY else "idle"),
            }
        stats = {
            "servers": len(self.procs), "supervisors": len(self.sups),
            "run_queue": len(self.runq), "timers": self.pending_timers(),
            "queued": sum(len(p._otpy_mbox) for p in self.procs.values() if p._otpy_mbox),
            "refused": sum(self.refused.values()),
            "refused_by_server": dict(self.refused),
            "waiting": sum(len(line) for line in self.waiting.values()),
        }
        if self.durable is not None:
            stats["store"] = self.durable.statistics()
        return stats

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


def _links(thing: Any) -> Links:
    """The monitor record of a server or supervisor, made on first use."""
    if isinstance(thing, GenServer):
        if thing._otpy_links is None:
            thing._otpy_links = Links()
        return thing._otpy_links
    if thing.links is None:
        thing.links = Links()
    links: Links = thing.links
    return links

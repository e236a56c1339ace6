"""Deterministic simulation: the real core under a virtual clock and a seeded scheduler.

A :class:`Simulation` starts a supervision tree on the real ``Scheduler`` and
``SupervisorRuntime`` (the same objects a node runs), with no trio loop. It then
repeats one decision: of everything that could happen next -- a server serving its
oldest queued message, a client resuming, the due timers firing, one more server migrated
by an upgrade in flight, a server's task finishing, a supervisor retrying a restart --
a seeded random generator picks one, and it runs to completion. Virtual time advances
only when nothing is ready, straight to the next timer, sleep or call timeout.

Every step is written to a trace with text that depends on nothing but the seed and
the program (no ids, addresses or hash order), so a seed replays the same run, byte
for byte, in any process.

What must stay true: the simulation adds no semantics of its own. Steps, crashes,
restarts, upgrades and timers are the core's; the simulation only chooses the order
(among orders the node could produce) and injects faults through the core's own paths.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import structlog

from .._core.names import Pid
from .._core.release import Migration, ReleaseInfo
from .._core.runtime import Runtime
from .._core.scheduler import (
    CAST,
    DEAD,
    INFO,
    SCHEDULED,
    Scheduler,
    TaskRef,
    short_repr,
)
from .._core.server import (
    NOTHING,
    WAITING,
    Caller,
    GenServer,
    InlineCaller,
    Stop,
    TaskDone,
    TaskFailed,
)
from .._core.supervisor import Child, ChildInfo, Supervisor
from .._core.timers import TimerRef
from .._exceptions import OtpyError
from .._store.base import Store
from ._ops import Call, Cast, Crash, Downgrade, Operation, Sleep, Upgrade

_KIND = ("call", "cast", "info")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Log events that a step's own trace line already tells.
_SILENT = frozenset({"server_crashed", "server_stopped"})
_TAIL = 25  # trace lines attached to an error raised by run()


class InjectedFault(Exception):
    """The error a fault injected by a :class:`Simulation` raises inside a server.

    ``sim.crash_at("kv", step=3)`` makes server ``kv`` crash with it at its third step;
    ``sim.fail_code_change("kv")`` makes its next migration fail with it."""


class SimulationError(OtpyError, RuntimeError):
    """The simulation cannot go on: too many steps without settling, or a server's task
    tried to wait for real I/O."""


def _text(value: Any) -> str:
    """A bounded repr with no memory addresses in it."""
    return _ADDRESS.sub(" at 0x?", short_repr(value))


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > 200:
        text = text[:197] + "..."
    return _ADDRESS.sub(" at 0x?", text)


def _field(value: Any) -> str:
    """A log field as the trace shows it (the core passes reprs as strings already)."""
    if isinstance(value, BaseException):
        return _error_text(value)
    return value if isinstance(value, str) else _text(value)


def _seed_text(seed: int | random.Random) -> str:
    return repr(seed) if isinstance(seed, int) else "a random.Random"


class TraceEvent(NamedTuple):
    """One line of a simulation's trace: when, how deep (a step inside the step above
    it), who acted, and what happened."""

    time: float
    depth: int
    actor: str
    text: str

    def __str__(self) -> str:
        return f"{self.time:10.3f} {'  ' * self.depth}{self.actor}: {self.text}"


# -- clients --------------------------------------------------------------------------

_NEW, _READY, _WAITING, _SLEEPING, _DONE = range(5)


class Client:
    """A simulated client started with :meth:`Simulation.spawn`.

    ``done`` says whether its generator has returned; ``result`` is what it returned.
    A client that raises stops the simulation: :meth:`Simulation.run` raises the error."""

    __slots__ = ("_caller", "_gen", "_send", "_status", "_target", "_throw", "_wake", "done",
                 "name", "result")

    def __init__(self, name: str, gen: Generator[Any, Any, Any]) -> None:
        self.name = name
        self.done = False
        self.result: Any = None
        self._gen = gen
        self._status = _NEW
        self._send: Any = None
        self._throw: BaseException | None = None
        self._wake: float | None = None  # the end of a sleep
        self._caller: _SimCaller | None = None

    def __repr__(self) -> str:
        return f"<simulated client {self.name!r}{' done' if self.done else ''}>"

    def _ready(self, value: Any = None, error: BaseException | None = None) -> None:
        self._status = _READY
        self._send, self._throw = value, error
        self._wake = None
        self._caller = None


class _SimCaller(InlineCaller):
    """A client's call: the client resumes (at a step the seed picks) once answered."""

    __slots__ = ("client", "sim")

    _inline = False  # a client outside the node, as on a node: replies may be held

    def __init__(self, sim: Simulation, client: Client) -> None:
        super().__init__()
        self.sim = sim
        self.client = client

    def _resolve(self, value: Any) -> None:
        super()._resolve(value)
        self.sim._answered(self)

    def _reject(self, exc: BaseException) -> None:
        super()._reject(exc)
        self.sim._answered(self)


# -- the core, watched -----------------------------------------------------------------


class _Step:
    __slots__ = ("line", "outcome", "proc")

    def __init__(self, proc: GenServer[Any], line: list[Any]) -> None:
        self.proc = proc
        self.line = line
        self.outcome: str | None = None


class _SimScheduler(Scheduler):
    """The real scheduler, with every step recorded and faults injected into steps."""

    sim: Simulation

    def step(self, proc: GenServer[Any], kind: int, payload: Any, caller: Caller | None) -> None:
        sim = self.sim
        name = proc._otpy_name
        n = sim._step_counts[name] = sim._step_counts.get(name, 0) + 1
        client = getattr(caller, "inner", caller)  # the client behind a versioned call
        origin = f" from {client.client.name}" if isinstance(client, _SimCaller) else ""
        line = sim._line(name, f"{_KIND[kind]} {_text(payload)}{origin}")
        frame = _Step(proc, line)
        sim._steps.append(frame)
        sim._depth += 1
        try:
            fault = sim._crash_faults.pop((name, n), None)
            if fault is not None:
                # Exactly what Scheduler.step does when a callback raises.
                self.crashed(proc, fault, kind, payload, caller)
            else:
                super().step(proc, kind, payload, caller)
        finally:
            sim._depth -= 1
            sim._steps.pop()
        outcome = frame.outcome
        if outcome is None:
            if proc._otpy_flags & DEAD:  # a sibling's restart stopped it meanwhile
                outcome = "stopped by its supervisor during this step"
            elif caller is None:
                outcome = f"state {_text(proc._otpy_state)}"
            elif caller._status == WAITING:
                outcome = f"noreply, state {_text(proc._otpy_state)}"
            elif getattr(caller, "error", None) is not None:
                outcome = f"error {_error_text(caller.error)}"  # type: ignore[attr-defined]
            else:
                outcome = f"reply {_text(getattr(caller, 'value', None))}, state " \
                          f"{_text(proc._otpy_state)}"
        line[3] += _ADDRESS.sub(" at 0x?", f" -> {outcome}")

    def crashed(
        self, proc: GenServer[Any], exc: BaseException, kind: int = INFO, payload: Any = None,
        caller: Caller | None = None,
    ) -> None:
        steps = self.sim._steps
        if steps and steps[-1].proc is proc:
            steps[-1].outcome = f"crash {_error_text(exc)}"
        else:
            self.sim._line(proc._otpy_name, f"crash {_error_text(exc)}")
        super().crashed(proc, exc, kind, payload, caller)

    def stopped(self, proc: GenServer[Any], result: Stop[Any], caller: Caller | None,
                held: int = 0) -> None:
        steps = self.sim._steps
        if steps and steps[-1].proc is proc:
            reply = "" if caller is None else (
                " without reply" if result.reply is NOTHING else f", reply {_text(result.reply)}")
            steps[-1].outcome = f"stop {_text(result.reason)}{reply}"
        super().stopped(proc, result, caller, held)


class _Migrating:
    """An upgrade or downgrade in flight, migrating one server per step."""

    __slots__ = ("client", "migration", "what")

    def __init__(self, client: Client, migration: Migration, what: str) -> None:
        self.client = client
        self.migration = migration
        self.what = what


class _Task:
    __slots__ = ("args", "fn", "proc", "ref")

    def __init__(self, proc: GenServer[Any], ref: TaskRef, fn: Callable[..., Any],
                 args: tuple[Any, ...]) -> None:
        self.proc = proc
        self.ref = ref
        self.fn = fn
        self.args = args


class _TimerDelay:
    __slots__ = ("by", "match", "name", "times")

    def __init__(self, name: str, by: float, match: Callable[[Any], bool], times: int) -> None:
        self.name = name
        self.by = by
        self.match = match
        self.times = times


_ANY: Any = object()


# -- the simulation --------------------------------------------------------------------


class Simulation:
    """A supervision tree run by the real otpy core under a virtual clock, with a seeded
    choice of what steps next, a replayable trace, and fault injection.

    ::

        class Counter(otpy.GenServer[int]):
            def init(self, arg):
                return 0

            def handle_call(self, request, caller, state):
                return otpy.Reply("ok", state + 1)

        def client(times):
            for _ in range(times):
                assert (yield otpy.testing.call("c", "incr")) == "ok"

        sim = otpy.testing.Simulation(otpy.Supervisor([otpy.Child("c", Counter)]), seed=7)
        sim.spawn(client, 2)
        sim.spawn(client, 3)
        sim.run()
        assert sim.get_state("c") == 5

    The tree starts when the simulation is made (:class:`otpy.StartFailed` as with
    ``open_node``); :meth:`close` (or leaving a ``with`` block) shuts it down in order.

    Scheduling
        :meth:`run` repeatedly picks, with ``random.Random(seed)``, one of the things
        that are ready: a server with queued messages serves its oldest one; a client
        resumes with its answer and runs to its next ``yield``; the due timers deliver
        their messages; an upgrade migrates one more server (or commits); a task started with
        ``start_task`` finishes; a supervisor retries a failed restart. Calls to an idle
        server are stepped inline, as on a node, and so are calls between servers.
        ``seed`` may also be a ``random.Random``, e.g. one drawn with hypothesis's
        ``st.randoms(use_true_random=False)``, so that a failing schedule shrinks. An
        upgrade migrates ``migration_chunk`` servers per step (default 1; a node
        migrates 200 between two turns of its loop), so that the seed interleaves
        traffic with the migration.

    Time
        Virtual time (:attr:`now`, from 0) stands still during steps and jumps, when
        nothing is ready, to the next timer, client sleep or call timeout.

    Faults
        :meth:`crash_at` (a server crashes at its n-th step), :meth:`delay_timer`,
        :meth:`fail_code_change`, and a client's ``yield otpy.testing.crash(name)``.

    Durable servers
        ``store=otpy.testing.MemoryStore()`` keeps durable servers' states (a tree with a
        durable child needs one). A second Simulation on the same store is the node
        started again after a kill -9: each durable server resumes from what was
        recorded, as on a node.

    What it does not cover
        Tasks run without trio (one that awaits trio fails), sockets and the network
        endpoints, and wall-clock time (callbacks take no virtual time; ``step_timeout``
        cannot fire).
    """

    def __init__(self, root: Supervisor, seed: int | random.Random = 0, *,
                 migration_chunk: int = 1, store: Store | None = None) -> None:
        if not isinstance(root, Supervisor):
            raise TypeError(f"Simulation needs an otpy.Supervisor as the root of the tree, "
                            f"got {root!r}")
        if not isinstance(migration_chunk, int) or migration_chunk < 1:
            raise ValueError(f"migration_chunk must be an int >= 1, got {migration_chunk!r}")
        self.seed = seed
        self._rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        self._now = 0.0
        self._lines: list[list[Any]] = []
        self._depth = 0
        self._steps: list[_Step] = []
        self._step_counts: dict[str, int] = {}
        self._crash_faults: dict[tuple[str, int], BaseException] = {}
        self._code_change_faults: dict[str, BaseException] = {}
        self._timer_delays: list[_TimerDelay] = []
        self._clients: list[Client] = []
        self._client_names = itertools.count(1)
        self._migrating: list[_Migrating] = []
        self._otpy_tasks: list[_Task] = []
        self._chunk = migration_chunk
        self._closed = False
        sched = self._sched = _SimScheduler(log=structlog.get_logger("otpy"),
                                            clock=lambda: self._now, spawn=self._spawn)
        sched.sim = self
        sched.log.observe(self._observe)
        sched.timers.delay = self._timer_due
        self._rt = Runtime(root, sched)
        self._releases = self._rt.release_handler
        self._releases.fault = self._code_change_fault
        self._active_faults: dict[str, BaseException] = {}
        self.store = store
        if store is not None:
            self._rt.use_store(store)
        self._line("sim", f"start tree {root.name!r}, seed {_seed_text(seed)}")
        self._rt.start()

    # -- the trace -------------------------------------------------------------------

    def _observe(self, level: str, event: str, fields: dict[str, Any]) -> None:
        """The node's events, as trace lines (a step's own line already tells its
        crash or stop)."""
        if event in _SILENT:
            return
        actor = fields.get("supervisor") or fields.get("server") or "node"
        shown = " ".join(f"{k}={_field(v)}" for k, v in fields.items()
                         if k not in ("supervisor", "server"))
        self._line(str(actor), f"{event} {shown}".rstrip())

    def _line(self, actor: str, text: str) -> list[Any]:
        # Whatever the text quotes (reprs made by the core, a user's exception message)
        # must not carry a memory address: the trace is the same bytes in any process.
        line = [self._now, self._depth, actor, _ADDRESS.sub(" at 0x?", text)]
        self._lines.append(line)
        return line

    @property
    def trace(self) -> list[TraceEvent]:
        """Every step so far, in order (see :meth:`trace_text`)."""
        return [TraceEvent(*line) for line in self._lines]

    def trace_text(self) -> str:
        """The trace as text, one line per event: the same seed and program give the
        same bytes, in any process."""
        return "".join(f"{TraceEvent(*line)}\n" for line in self._lines)

    # -- clients ---------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Generator[Operation, Any, Any]], *args: Any,
              name: str | None = None) -> Client:
        """Start a client: ``fn(*args)`` must be a generator function that yields
        operations (``otpy.testing.call``, ``cast``, ``send``, ``sleep``, ``upgrade``,
        ``downgrade``, ``crash``) and gets each one's result back from ``yield``, or its
        error thrown in. It first runs when the seed picks it. ``name`` (default
        ``"<fn name>-<n>"``) is how the trace shows it."""
        gen = fn(*args)
        if not isinstance(gen, Generator):
            raise TypeError(
                f"spawn needs a generator function (one that yields operations such as "
                f"otpy.testing.call(...)), but {getattr(fn, '__qualname__', fn)!r} returned "
                f"{gen!r}")
        n = next(self._client_names)
        client = Client(name or f"{getattr(fn, '__name__', 'client')}-{n}", gen)
        self._clients.append(client)
        return client

    @property
    def clients(self) -> list[Client]:
        """Every client spawned, in order."""
        return list(self._clients)

    def _answered(self, caller: _SimCaller) -> None:
        client = caller.client
        if client._caller is not caller:
            return  # a call the client gave up on (timed out): the late answer is dropped
        client._ready(caller.value if caller.error is None else None, caller.error)

    def _resume(self, client: Client) -> None:
        send, throw = client._send, client._throw
        client._send = client._throw = None
        self._depth = 0
        if client._status != _NEW:
            self._line(client.name, f"raised into it: {_error_text(throw)}" if throw
                       else "resumed" if send is None else f"got {_text(send)}")
        self._depth = 1
        try:
            op = client._gen.throw(throw) if throw is not None else client._gen.send(send)
        except StopIteration as stop:
            self._depth = 0
            client.done, client.result, client._status = True, stop.value, _DONE
            self._line(client.name, "returned" if stop.value is None
                       else f"returned {_text(stop.value)}")
            return
        except Exception as exc:
            self._depth = 0
            client.done, client._status = True, _DONE
            self._line(client.name, f"failed: {_error_text(exc)}")
            exc.add_note(f"in simulated client {client.name!r} at virtual time "
                         f"{self._now:g}, seed {_seed_text(self.seed)}")
            raise
        try:
            self._do(client, op)
        finally:
            self._depth = 0

    def _do(self, client: Client, op: Any) -> None:
        sched = self._sched
        t = type(op)
        if t is Call:
            vsn = "" if op.vsn is None else f" (vsn {op.vsn})"
            self._line_at(0, client.name, f"call {op.name} {_text(op.request)}{vsn}")
            caller = _SimCaller(self, client)
            client._status, client._caller = _WAITING, caller
            # The node's one call path: an idle server answers within this step (and
            # the answer resumes the client through _answered); the deadline is in the
            # core's timer heap, on the virtual clock.
            self._rt.start_call(op.name, op.request, caller, vsn=op.vsn, timeout=op.timeout)
        elif t is Cast:
            what = "send" if op.info else "cast"
            self._line_at(0, client.name, f"{what} {op.name} {_text(op.message)}")
            try:
                sched.cast_now(INFO if op.info else CAST, op.name, op.message)
            except OtpyError as exc:
                client._ready(error=exc)
            else:
                client._ready()
        elif t is Sleep:
            self._line_at(0, client.name, f"sleep {op.seconds:g}")
            client._status, client._wake = _SLEEPING, self._now + op.seconds
        elif t is Upgrade or t is Downgrade:
            what = (f"upgrade to release {op.release.vsn!r}" if t is Upgrade
                    else "downgrade")
            self._line_at(0, client.name, what)
            try:
                migration = self._rt.planner(op.release if t is Upgrade else None).finish()
            except OtpyError as exc:
                client._ready(error=exc)
                return
            self._active_faults = {m.name: self._code_change_faults.pop(m.name)
                                   for m in migration.moves
                                   if m.name in self._code_change_faults}
            migration.watch()
            client._status = _WAITING
            self._migrating.append(_Migrating(client, migration, what))
        elif t is Crash:
            self._line_at(0, client.name, f"crash {op.name}")
            proc = sched.procs.get(op.name)
            if proc is None:
                client._ready(error=sched.no_such(op.name))
                return
            err = op.error if op.error is not None else InjectedFault(
                f"crash of {op.name!r} injected by {client.name}")
            sched.crashed(proc, err)
            client._ready()
        else:
            self._line_at(0, client.name, f"yielded {_text(op)}")
            client._ready(error=TypeError(
                f"a simulated client must yield an operation such as "
                f"otpy.testing.call(name, request), got {op!r}"))

    def _line_at(self, depth: int, actor: str, text: str) -> None:
        saved, self._depth = self._depth, depth
        self._line(actor, text)
        self._depth = saved

    # -- the loop --------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The virtual time, in seconds since the simulation started."""
        return self._now

    def run(self, until: float | None = None, *, max_steps: int = 100_000) -> int:
        """Step until nothing is left to do, or until virtual time ``until``; return the
        number of steps taken.

        Raises what a client raised (with the seed and the end of the trace as notes),
        :class:`otpy.RestartIntensityExceeded` if the root supervisor gave up, and
        :class:`SimulationError` after ``max_steps`` steps (a tree that never settles,
        e.g. a periodic timer: pass ``until``)."""
        steps = 0
        with self._noting():
            while (ready := self._next_ready(until)):
                if steps >= max_steps:
                    raise SimulationError(
                        f"the simulation did not settle within {max_steps} steps (virtual "
                        f"time {self._now:g}); pass until= for a tree that keeps itself "
                        f"busy, or a larger max_steps")
                self._take(ready)
                steps += 1
        return steps

    def step(self) -> bool:
        """Take one step (first advancing virtual time to the next timer, sleep or
        timeout if nothing is ready); False when nothing is left to do. For a test that
        interleaves its own checks with the simulation's steps."""
        with self._noting():
            ready = self._next_ready(None)
            if not ready:
                return False
            self._take(ready)
            self._raise_fatal()
        return True

    @contextmanager
    def _noting(self) -> Iterator[None]:
        """Give an error raised while stepping the end of the trace as a note."""
        if self._closed:
            raise SimulationError("this simulation is closed")
        try:
            yield
        except BaseException as exc:
            tail = self._lines[-_TAIL:]
            exc.add_note("the last steps of the simulation:\n" + "".join(
                f"{TraceEvent(*line)}\n" for line in tail).rstrip("\n"))
            raise

    def _next_ready(self, until: float | None) -> list[tuple[str, Callable[[], None]]]:
        """What is ready now, advancing virtual time (not beyond ``until``) to the next
        timer, sleep or timeout while nothing is; empty when nothing is left."""
        while True:
            self._raise_fatal()
            ready = self._ready()
            if ready:
                return ready
            nxt = self._next_time()
            if nxt is None or (until is not None and nxt > until):
                if until is not None and until > self._now:
                    self._now = until
                return ready
            self._now = nxt

    def _take(self, ready: list[tuple[str, Callable[[], None]]]) -> None:
        _label, action = ready[self._rng.randrange(len(ready))]
        action()

    def _raise_fatal(self) -> None:
        fatal = self._sched.fatal
        if fatal is not None:
            self._closed = True
            fatal.add_note(f"the root supervisor gave up at virtual time {self._now:g}, "
                           f"seed {_seed_text(self.seed)}")
            raise fatal

    def _ready(self) -> list[tuple[str, Callable[[], None]]]:
        sched = self._sched
        # The run queue is the node dispatcher's; here the mailboxes themselves say who
        # is ready, so the queue is emptied (a server is queued again when it needs to).
        runq = sched.runq
        while runq:
            runq.popleft()._otpy_flags &= ~SCHEDULED
        ready: list[tuple[str, Callable[[], None]]] = []
        if sched.deferred:
            ready.append(("node", self._run_deferred))
        for proc in sched.ready():
            ready.append((proc._otpy_name, _bind(sched.serve_one, proc)))
        now = self._now
        for client in self._clients:
            if client._status == _SLEEPING and client._wake is not None and client._wake <= now:
                client._ready()
            if client._status in (_NEW, _READY):
                ready.append((client.name, _bind(self._resume, client)))
        for migrating in self._migrating:
            ready.append((migrating.client.name, _bind(self._migrate_step, migrating)))
        if sched.timers.any_due():
            ready.append(("timer", self._fire_due))
        for task in self._otpy_tasks:
            ready.append((task.proc._otpy_name, _bind(self._finish_task, task)))
        return ready

    def _next_time(self) -> float | None:
        deadline = self._sched.next_deadline()
        times = [] if deadline is None else [deadline]
        times += [c._wake for c in self._clients
                  if c._wake is not None and c._status == _SLEEPING]
        return min(times) if times else None

    def _run_deferred(self) -> None:
        self._line("node", "retry deferred supervision work")
        self._depth = 1
        try:
            self._sched.run_deferred()
        finally:
            self._depth = 0

    # -- timers ----------------------------------------------------------------------

    def _fire_due(self) -> None:
        """Fire every due timer in one step, in deadline order, as the node's
        dispatcher does: no step comes between two timers due at the same time."""
        self._sched.fire_timers()

    def _timer_due(self, ref: TimerRef) -> float:
        """Asked by the core's timer heap about each timer as it falls due: the seconds
        to postpone it by (an injected delay), after writing what happens to it."""
        for delay in self._timer_delays:
            if delay.times and delay.name == ref.name and delay.match(ref.message):
                delay.times -= 1
                self._line("timer", f"{ref.name} {_text(ref.message)} delayed by "
                                    f"{delay.by:g} s (injected)")
                return delay.by
        if self._sched.resolve(ref.name) is None:
            self._line("timer", f"{ref.name} {_text(ref.message)} dropped: no such server")
        else:
            self._line("timer", f"fire {ref.name} {_text(ref.message)}")
        return 0.0

    def _code_change_fault(self, name: str) -> BaseException | None:
        """Asked by the core's release handler about each server it migrates."""
        return self._active_faults.get(name)

    def _migrate_step(self, migrating: _Migrating) -> None:
        migration = migrating.migration
        moves = migration.moves
        if migration._next < len(moves):
            first = migration._next
            migration.migrate(self._chunk)
            names = ", ".join(m.name for m in moves[first:migration._next])
            self._line(migrating.client.name, f"{migrating.what}: migrated {names}")
            return
        self._migrating.remove(migrating)
        self._line(migrating.client.name, f"{migrating.what}: commit")
        self._depth = 1
        try:
            report = migration.finish()
        except OtpyError as exc:
            migrating.client._ready(error=exc)
        else:
            migrating.client._ready(report)
        finally:
            self._depth = 0
            self._active_faults = {}

    # -- tasks -----------------------------------------------------------------------

    def _spawn(self, proc: GenServer[Any], ref: TaskRef, fn: Callable[..., Any],
               args: tuple[Any, ...]) -> None:
        task = _Task(proc, ref, fn, args)

        def cancel(grace: float | None) -> None:
            if task in self._otpy_tasks:
                self._otpy_tasks.remove(task)
                ref.done = True

        ref._cancel = cancel
        self._otpy_tasks.append(task)

    def _finish_task(self, task: _Task) -> None:
        self._otpy_tasks.remove(task)
        coro = task.fn(*task.args)
        message: Any
        try:
            coro.send(None)
        except StopIteration as stop:
            message = TaskDone(task.ref.tag, stop.value)
        except Exception as exc:
            message = TaskFailed(task.ref.tag, exc)
        else:
            coro.close()
            raise SimulationError(
                f"a task of server {task.proc._otpy_name!r} ({getattr(task.fn, '__qualname__', '')}"
                f") waited for real I/O; the simulation runs each task to completion in one "
                f"step, without trio. Give the server a stub I/O function under simulation")
        self._line(task.proc._otpy_name, f"task {_text(task.ref.tag)} finished: "
                                    f"{_text(message)}")
        self._sched.task_finished(task.proc, task.ref, message)

    # -- faults ----------------------------------------------------------------------

    def crash_at(self, name: str, step: int, *, error: BaseException | None = None) -> None:
        """Make server ``name`` crash at its ``step``-th step (counting every message it
        has handled since the simulation started, restarts included, from 1).

        The step raises ``error`` (default :class:`InjectedFault`) instead of running
        the callback, so the real crash path runs: the crash is logged, the caller of a
        crashing call gets :class:`otpy.ServerCrashed`, ``terminate`` runs and the
        supervisor acts."""
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"crash_at needs step >= 1 (the n-th step), got {step!r}")
        self._crash_faults[(name, step)] = error if error is not None else InjectedFault(
            f"crash of {name!r} injected at its step {step}")

    def delay_timer(self, name: str, by: float, *, message: Any = _ANY,
                    times: int = 1) -> None:
        """Make the next ``times`` timers addressed to ``name`` (those whose message
        equals ``message``, if given) fire ``by`` seconds late."""
        if not by >= 0 or math.isinf(by):
            raise ValueError(f"delay_timer needs finite seconds >= 0, got {by!r}")
        match: Callable[[Any], bool] = (
            (lambda m: True) if message is _ANY else (lambda m: bool(m == message)))
        self._timer_delays.append(_TimerDelay(name, float(by), match, times))

    def fail_code_change(self, name: str, *, error: BaseException | None = None) -> None:
        """Make the next upgrade or downgrade that migrates server ``name`` fail there,
        as if its ``code_change`` raised ``error`` (default :class:`InjectedFault`): the
        whole release rolls back and the client gets :class:`otpy.UpgradeFailed`."""
        self._code_change_faults[name] = error if error is not None else InjectedFault(
            f"code_change of {name!r} failed (injected)")

    # -- introspection and control, as on a node ---------------------------------------

    def get_state(self, name: str) -> Any:
        """The current state of server ``name``."""
        return self._rt.get_state(name)

    def whereis(self, name: str) -> Pid | None:
        """The pid of the incarnation that runs as ``name`` now, as ``node.whereis``."""
        return self._sched.whereis(name)

    def vsn_of(self, name: str) -> str:
        """The code version server ``name`` runs."""
        return self._rt.vsn_of(name)

    def servers(self) -> list[str]:
        """The names of every running server."""
        return self._rt.servers()

    def statistics(self, name: str | None = None) -> dict[str, Any]:
        """Counters of the simulated node, or of server ``name``, as
        ``node.statistics`` (mailbox length and limit, refused messages, ...)."""
        return self._rt.statistics(name)

    def steps_of(self, name: str) -> int:
        """How many steps server ``name`` has taken (the count :meth:`crash_at` uses)."""
        return self._step_counts.get(name, 0)

    def which_children(self, sup: str = "root") -> list[ChildInfo]:
        """The children of supervisor ``sup`` in start order, as ``node.which_children``."""
        return self._rt.which_children(sup)

    def count_children(self, sup: str = "root") -> dict[str, int]:
        """Counts of ``specs``, ``active``, ``supervisors`` and ``workers``."""
        return self._rt.count_children(sup)

    def start_child(self, sup: str, child: Child | Supervisor) -> ChildInfo:
        """Add ``child`` to supervisor ``sup`` and start it (now, as one step)."""
        self._line("sim", f"start_child {sup} {child.id}")
        return self._rt.start_child(sup, child)

    def terminate_child(self, sup: str, id: str) -> None:
        """Stop child ``id`` of supervisor ``sup``."""
        self._line("sim", f"terminate_child {sup} {id}")
        self._rt.terminate_child(sup, id)

    def restart_child(self, sup: str, id: str) -> ChildInfo:
        """Start again a child of ``sup`` that is not running."""
        self._line("sim", f"restart_child {sup} {id}")
        return self._rt.restart_child(sup, id)

    def delete_child(self, sup: str, id: str) -> None:
        """Remove the spec of a child of ``sup`` that is not running."""
        self._line("sim", f"delete_child {sup} {id}")
        self._rt.delete_child(sup, id)

    def suspend(self, name: str) -> None:
        """Hold server ``name``: its messages wait (calls to it queue), none is lost."""
        self._line("sim", f"suspend {name}")
        self._rt.suspend(name)

    def resume(self, name: str) -> None:
        """Let a suspended server serve its waiting messages, in order."""
        self._line("sim", f"resume {name}")
        self._rt.resume(name)

    def releases(self) -> list[ReleaseInfo]:
        """The installed releases, oldest first."""
        return self._rt.releases()

    def call_nowait(self, name: str, request: Any) -> Any:
        """Call ``name`` now, outside any client (as ``node.call_nowait``): answers or
        raises :class:`otpy.WouldBlock`. The step is traced."""
        self._line("sim", f"call_nowait {name} {_text(request)}")
        self._depth = 1
        try:
            return self._rt.call_nowait(name, request)
        finally:
            self._depth = 0

    def close(self) -> None:
        """Shut the tree down in order (children in reverse start order), as leaving
        ``open_node`` does, and close every unfinished client."""
        if self._closed:
            return
        self._closed = True
        self._line("sim", "shut down")
        self._rt.shutdown()
        for client in self._clients:
            client._gen.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind(fn: Callable[[Any], None], arg: Any) -> Callable[[], None]:
    return lambda: fn(arg)

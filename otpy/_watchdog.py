"""The step watchdog: a callback that runs past its ``step_timeout`` is interrupted.

Every server of a node runs on one thread, so a callback that never returns would stall
them all. Erlang preempts; otpy watches instead, at no cost to a step:

- A watcher thread samples the node thread's stack every few milliseconds
  (``sys._current_frames``) and finds the *callback frames* on it: frames of a method
  of the server's class called directly by one of the places that run callbacks
  (the functions marked ``@runs_callbacks`` in the core: ``Scheduler.step``,
  ``start_server``, ``terminate_server``, ``run_continue``, the versioned-client
  adapters, a release's ``code_change``), each of which names the argument that holds
  its server, not of the helpers those call (a logger). The innermost
  one seen for longer than its server's budget is the overrun. A step writes nothing
  for this: the stack is the record.
- The thread then signals the node thread (``pthread_kill``). The signal handler runs
  there, between two bytecodes, and raises :class:`Overrun` only if the interrupted
  code is user code inside that callback, never in otpy's own frames (a cast being
  queued, a supervisor restarting): there it returns, and the thread signals again a
  moment later. So no structure of the node is ever left half-updated: the overrun
  arrives as an exception raised by the user's own code, and takes the crash path.
- ``Overrun`` is a BaseException (as ``trio.Cancelled`` is), so the callback's own
  ``except Exception`` does not swallow it; whoever ran the callback turns it into a
  crash with :class:`otpy.StepTimeout` as the reason.

What it cannot interrupt: a call into C that does not return to the interpreter (a
blocking C function that does not check for signals, a huge regex, a long
``sum(range(10**12))``-style builtin). ``time.sleep`` and blocking socket reads are
interrupted. The node must run on the main thread (Python runs signal handlers only
there), on a platform that can signal a thread, with the signal free; otherwise the
watchdog is off and says why in a ``watchdog_unavailable`` event.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from ._core.scheduler import Scheduler
from ._core.server import CALLBACK_CODES, RUNNERS, budget_of
from ._core.supervisor import Child, Supervisor
from ._exceptions import Overrun, StepTimeout

if TYPE_CHECKING:
    from ._core.server import GenServer

# The functions that call callbacks, each with the argument that holds the server
# (otpy._core.server.RUNNERS, filled by @runs_callbacks where they are defined).
_RUNNERS = RUNNERS
_OTPY = str(Path(__file__).resolve().parent)
# Ours, not a user's; None where the platform has neither (Windows): no watchdog there.
SIGNAL: int | None = (getattr(signal, "SIGRTMIN", None) or getattr(signal, "SIGUSR2", None)
                      if hasattr(signal, "pthread_kill") else None)

_dogs: list[Watchdog] = []  # running watchdogs (all on the main thread)


def _internal(code: CodeType) -> bool:
    return code.co_filename.startswith(_OTPY)


def _is_callback(frame: FrameType, runner: FrameType) -> bool:
    """Whether ``frame`` is a callback that ``runner`` (a frame of one of _RUNNERS)
    called: the code of a server class's callback, not a helper the runner calls
    itself (a logger, a user's ``__repr__`` of a crash reason)."""
    return frame.f_code in CALLBACK_CODES


def _callback_frames(frame: FrameType | None) -> list[FrameType]:
    """The callback frames on a stack, innermost first (several when a callback calls
    another server inline, or a crash restarts a sibling)."""
    found = []
    while frame is not None:
        back = frame.f_back
        if back is not None and back.f_code in _RUNNERS and _is_callback(frame, back):
            found.append(frame)
        frame = back
    return found


def _server_of(callback: FrameType) -> GenServer[Any] | None:
    """The server whose callback this is: the runner that called it names the
    argument that holds it."""
    runner = callback.f_back
    if runner is None:
        return None
    arg = _RUNNERS.get(runner.f_code)
    proc: GenServer[Any] | None = runner.f_locals.get(arg) if arg is not None else None
    return proc


def _min_budget(spec: Supervisor) -> float:
    out = math.inf
    for child in spec.children:
        if isinstance(child, Child):
            own = child.step_timeout
            out = min(out, child.server_class.step_timeout if own is None else own)
        else:
            out = min(out, _min_budget(child))
    return out


def _unavailable() -> str:
    """Why the watchdog cannot run on this thread, or "" if it can."""
    if SIGNAL is None:
        return "this platform cannot signal a thread (signal.pthread_kill)"
    if threading.current_thread() is not threading.main_thread():
        return ("the node does not run on the main thread, and Python runs signal "
                "handlers only there")
    current = signal.getsignal(SIGNAL)
    if current not in (signal.SIG_DFL, None, _on_signal):
        return (f"signal {SIGNAL} has a handler of the application's ({current!r}), "
                f"which otpy will not replace")
    return ""


class Watchdog:
    """Watches one node's thread for callbacks that overrun (see the module doc)."""

    def __init__(self, sched: Scheduler, tree: Supervisor) -> None:
        self.sched = sched
        # Sample often enough to catch the smallest budget in the tree within ~25% of
        # it (a child added later with a smaller one is caught a little later).
        self.interval = min(0.05, max(0.002, _min_budget(tree) / 4))
        self._tid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.target: FrameType | None = None  # the overrunning callback, while signalled
        self.fired: FrameType | None = None  # the callback just interrupted
        # Interruptions of each callback still on the stack: one that is interrupted
        # again (it swallowed the first, or its cleanup overran too) is ended for good.
        self.strikes: dict[FrameType, int] = {}
        self.budget = 0.0

    def start(self) -> bool:
        """Start watching the calling (node) thread; False where it cannot (the signal
        is missing or taken, or this is not the main thread)."""
        why = _unavailable()
        if why:
            self.sched.log.warning("watchdog_unavailable",
                                   reason=f"{why}; step_timeout is not enforced")
            return False
        if not _dogs:
            assert SIGNAL is not None  # _unavailable checked
            signal.signal(SIGNAL, _on_signal)
        _dogs.append(self)
        self._tid = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name="otpy-watchdog",
                                        daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.target = None
        _dogs.remove(self)
        # Put the default back, unless the application took the signal meanwhile.
        if not _dogs and SIGNAL is not None and signal.getsignal(SIGNAL) is _on_signal:
            signal.signal(SIGNAL, signal.SIG_DFL)

    def _watch(self) -> None:
        since: dict[FrameType, float] = {}  # when each callback on the stack was first seen
        tid, interval, signum = self._tid, self.interval, SIGNAL
        assert signum is not None  # start() checked
        while not self._stop.wait(interval):
            frames = _callback_frames(sys._current_frames().get(tid))
            now = time.monotonic()
            since = {f: since.get(f, now) for f in frames}
            fired, self.fired = self.fired, None
            if fired is not None and fired in since:
                # Interrupted and unwinding: its finally blocks get a budget of their own
                # before they are cut short too (then it is ended, see _on_signal).
                since[fired] = now
                self.strikes[fired] = self.strikes.get(fired, 0) + 1
            del fired
            self.strikes = {f: n for f, n in self.strikes.items() if f in since}
            self.target = self._culprit(frames, since, now)
            if self.target is not None:
                # Signalled again each interval until the handler finds the node thread
                # in the culprit's own code (or the callback ends).
                signal.pthread_kill(tid, signum)
            del frames
        since.clear()

    def _culprit(self, frames: list[FrameType], since: dict[FrameType, float],
                 now: float) -> FrameType | None:
        # The innermost callback that overran its own budget: one that calls others
        # inline in a loop is blamed, not the ones it calls; one called inline that
        # spins is blamed, not its caller.
        for frame in frames:
            proc = _server_of(frame)
            if proc is not None and now - since[frame] >= budget_of(proc):
                self.budget = budget_of(proc)
                return frame
        return None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    for dog in _dogs:
        target = dog.target
        if target is None:
            continue
        # Only in user code: the innermost callback frame must be reached from the
        # interrupted frame without passing through any of otpy's own frames.
        callback = frame
        while callback is not None and not _internal(callback.f_code):
            back = callback.f_back
            if back is not None and back.f_code in _RUNNERS:
                if _is_callback(callback, back):
                    break
                return  # a helper otpy called, not the callback: try again later
            callback = back
        else:
            return  # in otpy's own code (or outside any callback): try again later
        if callback is not target:
            continue  # in a server it called inline, or the callback ended: try again
        dog.target = None
        dog.fired = target
        error = _timeout(callback, frame, dog.budget)
        if dog.strikes.get(target, 0):
            _end(target, frame, error)
        raise Overrun(error)


def _end(callback: FrameType, frame: FrameType | None, error: StepTimeout) -> None:
    """End a callback that goes on after its interruption (a bare ``except:`` retry
    loop swallowed it, or its cleanup overran): from now on every line that the
    callback's running frames execute raises the interruption again, so it leaves them
    at the first line that no handler of theirs covers. Tracing stops, and any tracer of
    the application's (a debugger, coverage) is put back, as the callback returns.

    Only the frames that were running (the callback and what it called, down to the
    interrupted one) are traced: a function called later, or a garbage collector
    callback run meanwhile, is left alone. This costs nothing until it is needed: a
    step that keeps within its budget is never traced."""
    previous = sys.gettrace()
    running: set[FrameType] = set()
    f = frame
    while f is not None:
        if not _internal(f.f_code):
            running.add(f)
        if f is callback:
            break
        f = f.f_back

    def tracer(f: FrameType, event: str, arg: Any) -> Any:
        if f is callback and event == "return":
            sys.settrace(previous)  # the callback is over: the runner handles the crash
            for g in running:
                g.f_trace = None
            running.clear()
            return None
        if f in running:
            if event == "line":
                raise Overrun(error)
            return tracer
        return None  # a frame that started later: not traced

    for f in running:
        f.f_trace = tracer
        f.f_trace_lines = True
    sys.settrace(tracer)
def _timeout(callback: FrameType, frame: FrameType | None, budget: float) -> StepTimeout:
    proc = _server_of(callback)
    name = proc._otpy_name if proc is not None else "?"
    cls = type(proc).__qualname__ if proc is not None else "?"
    where = frame if frame is not None else callback
    err = StepTimeout(
        f"server {name!r} ({cls}.{callback.f_code.co_name}) ran longer than its "
        f"step_timeout of {budget:g} s and was interrupted at "
        f"{where.f_code.co_filename}:{where.f_lineno} in {where.f_code.co_name}. A callback "
        f"must not block the node's loop: run long work with self.start_task(...), or "
        f"split it into messages; or raise step_timeout (class attribute or Child option)",
        name=name, seconds=budget)
    return err

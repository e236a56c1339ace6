"""Where the node's time goes, per server: a sampling profiler of the node's thread.

The dashboard and ``/metrics`` show each server's share of the loop and its step time.
Timing each step would cost every step (the hottest code of a node) a clock read or
two; instead the node's thread is looked at every ``interval`` seconds and the server
whose callback runs there, if any, is noted: the innermost callback frame on its
stack, found as the step watchdog finds it (``otpy._watchdog``): by the functions that
run callbacks (``RUNNERS``) and the code objects of callbacks (``CALLBACK_CODES``). A
server seen in a fraction *f* of the samples spent about *f* of the time in its
callbacks. A step writes nothing for this.

How the thread is looked at decides whether the samples are fair:

- ``"itimer"`` (the node on the main thread, on a platform with ``setitimer``, and
  ``SIGPROF`` and its timer free): the kernel sends ``SIGPROF`` every ``interval``
  seconds of the process's CPU time (``ITIMER_PROF``), and Python runs the handler on
  the main thread at its next instruction, with the frame it interrupted: in a
  callback's code, or in otpy's or trio's. Fair, and free while the node idles (no CPU
  time, no signal). A sample stands for ``interval`` seconds of CPU time.
- ``"gil"`` (elsewhere): a thread reads the node thread's stack
  (``sys._current_frames``) every ``interval`` seconds of wall time, when it gets the
  interpreter lock, which the node's thread also gives up whenever it polls for I/O:
  the samples then lean towards those moments, so busy servers look less busy than
  they are. ``mode`` says which; the dashboard shows it.

(A thread cannot send the signal fairly itself: it needs the interpreter lock to run,
and gets it at those same moments.)

What must stay true: the sampler only reads (frames, and the runner's local that holds
the server), never raises into the code it interrupts, and keeps counts bounded by the
samples taken since the last :meth:`StepSampler.take` (one name per sample); it holds no
frame between samples. Its cost to the node is one short handler (or a GIL hand-over)
per sample: a fraction of a percent at the default 5 ms. It runs only while someone
watches (the dashboard's views start and stop it).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from ._core.server import CALLBACK_CODES, RUNNERS

DEFAULT_INTERVAL = 0.005

_active: StepSampler | None = None  # the sampler the signal handler records for


def running_server(frame: Any) -> str | None:
    """The name of the server whose callback runs innermost on a stack whose top frame
    is ``frame``, or None (no callback runs: the loop, a task, otpy itself)."""
    runners = RUNNERS
    callbacks = CALLBACK_CODES
    while frame is not None:
        back = frame.f_back
        if back is not None and frame.f_code in callbacks:
            arg = runners.get(back.f_code)
            if arg is not None:
                proc = back.f_locals.get(arg)
                name = getattr(proc, "_otpy_name", None)
                return name if isinstance(name, str) else None
        frame = back
    return None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    sampler = _active
    if sampler is not None:
        sampler.record(frame)


def _itimer_free() -> bool:
    if not hasattr(signal, "setitimer") or not hasattr(signal, "SIGPROF"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False  # Python runs handlers only on the main thread, set there
    if signal.getsignal(signal.SIGPROF) not in (signal.SIG_DFL, None):
        return False  # a profiler of the application's
    return signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


class StepSampler:
    """Samples the stack of thread ``tid`` (the caller's, in ``"itimer"`` mode) every
    ``interval`` seconds (see the module doc for ``mode``); :meth:`take` returns what
    was seen since the last take."""

    def __init__(self, tid: int, interval: float = DEFAULT_INTERVAL) -> None:
        self.tid = tid
        self.interval = interval
        self.mode = "itimer" if _active is None and tid == threading.get_ident() and \
            _itimer_free() else "gil"
        self._lock = threading.Lock()  # "gil" mode only: the signal handler must not
        self._counts: list[Any] = [0, {}, time.monotonic()]  # [samples, {name: hits}, since]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    @property
    def running(self) -> bool:
        return self._started

    def start(self) -> None:
        global _active
        if self._started:
            return
        self._started = True
        self.take()
        if self.mode == "itimer":
            _active = self
            signal.signal(signal.SIGPROF, _on_signal)
            # System calls a sample interrupts (in any thread) restart on their own.
            signal.siginterrupt(signal.SIGPROF, False)
            signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="otpy-step-sampler",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        global _active
        if not self._started:
            return
        self._started = False
        if self.mode == "itimer":
            signal.setitimer(signal.ITIMER_PROF, 0.0)
            if signal.getsignal(signal.SIGPROF) is _on_signal:
                signal.signal(signal.SIGPROF, signal.SIG_DFL)
            if _active is self:
                _active = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        self.take()

    def _run(self) -> None:
        wait, interval = self._stop.wait, self.interval
        while not wait(interval):
            self.sample_once()

    def sample_once(self) -> str | None:
        """Take one sample now, from another thread than the node's (``"gil"`` mode);
        returns the server seen, if any."""
        frame = sys._current_frames().get(self.tid)
        with self._lock:
            return self.record(frame)

    def record(self, frame: FrameType | None) -> str | None:
        """Count one sample whose stack top is ``frame``."""
        name = running_server(frame)
        counts = self._counts
        counts[0] += 1
        if name is not None:
            hits = counts[1]
            hits[name] = hits.get(name, 0) + 1
        return name

    def take(self) -> dict[str, float]:
        """About how many seconds each server's callbacks ran since the last take
        (only servers seen in a sample)."""
        now = time.monotonic()
        fresh = [0, {}, now]
        if self.mode == "gil":
            with self._lock:
                counts, self._counts = self._counts, fresh
        else:  # on the node's thread, as the handler: a swap it cannot split
            counts = self._counts
            self._counts = fresh
        samples, hits, since = counts
        if not samples:
            return {}
        # "itimer": a sample is `interval` of CPU time; "gil": a share of the wall time
        each = self.interval if self.mode == "itimer" else (now - since) / samples
        return {name: n * each for name, n in hits.items()}

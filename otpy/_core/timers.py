"""The node's one timer heap: ``send_after`` timers and the deadlines of waiting calls.

Both are entries ``(when, seq, item, address, timeout)`` of one binary heap ordered by
``(when, seq)``; ``item`` is a :class:`TimerRef` (deliver a message) or the ``Caller``
of a call that waits for its reply (fail it with ``CallTimeout``). The scheduler pops
what is due (:meth:`Timers.due`) and acts on it; the edge sleeps until
:meth:`Timers.next_deadline`.

What must stay true:

- A cancelled timer, and the deadline of a call that was answered, are dead entries:
  they are skipped when due, and the heap is rebuilt without them whenever it has grown
  to twice its size after the last rebuild, so dead entries never hold more than about
  half of it (a busy node answers most calls long before their deadline).
- Entries due at the same time come out in the order they were made.
- Arming a deadline or a timer that becomes the earliest one wakes the edge, so that it
  never sleeps past it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from .server import WAITING, Caller

_PRUNE_FLOOR = 1024


class TimerRef:
    """A pending ``send_after``; ``cancel()`` stops it if it has not fired."""

    __slots__ = ("cancelled", "message", "name", "when")

    def __init__(self, when: float, name: Any, message: Any) -> None:
        self.when = when
        self.name = name  # the address the message goes to when the timer fires
        self.message = message
        self.cancelled = False

    def cancel(self) -> bool:
        """Cancel the timer; True if it had not fired or been cancelled yet."""
        was = not self.cancelled
        self.cancelled = True
        return was

    def __lt__(self, other: TimerRef) -> bool:  # heap order on ties (never compared)
        return id(self) < id(other)


Entry = tuple[float, int, "TimerRef | Caller", Any, "float | None"]


def _alive(entry: Entry) -> bool:
    item = entry[2]
    if type(item) is TimerRef:
        return not item.cancelled
    return item._status == WAITING  # type: ignore[union-attr]


class Timers:
    """``send_after`` timers and call deadlines, in one heap (see the module doc).

    ``delay``, when set, is asked about each timer as it falls due and may postpone it
    by the seconds it returns (``otpy.testing`` injects late timers with it)."""

    def __init__(self, clock: Callable[[], float], wakeup: Callable[[], None]) -> None:
        self.clock = clock
        self.wakeup = wakeup
        self.delay: Callable[[TimerRef], float] | None = None
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._prune_at = _PRUNE_FLOOR

    def _push(self, entry: Entry) -> None:
        heap = self._heap
        if len(heap) >= self._prune_at:
            heap[:] = [e for e in heap if _alive(e)]
            heapq.heapify(heap)
            self._prune_at = max(_PRUNE_FLOOR, 2 * len(heap))
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self.wakeup()

    def send_after(self, seconds: float, address: Any, message: Any) -> TimerRef:
        """A timer that delivers ``message`` to ``address`` after ``seconds``."""
        if not seconds >= 0:
            raise ValueError(f"send_after needs seconds >= 0, got {seconds!r}")
        ref = TimerRef(self.clock() + seconds, address, message)
        self._push((ref.when, next(self._seq), ref, None, None))
        return ref

    def arm(self, caller: Caller, address: Any, timeout: float) -> None:
        """Fail ``caller`` with a timeout after ``timeout`` seconds unless it is answered
        first (the scheduler words the error: it knows why the call is still waiting)."""
        self._push((self.clock() + timeout, next(self._seq), caller, address, timeout))

    def next_deadline(self) -> float | None:
        """When the earliest live entry is due, or None."""
        heap = self._heap
        while heap and not _alive(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self) -> Iterator[Entry]:
        """Pop the live entries due now, in order; a timer is marked fired (cancelled)
        as it is popped, or postponed if ``delay`` says so."""
        heap = self._heap
        now = self.clock()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            item = entry[2]
            if type(item) is TimerRef:
                if item.cancelled:
                    continue
                later = self.delay(item) if self.delay is not None else 0.0
                if later > 0:
                    item.when += later
                    self._push((item.when, next(self._seq), item, None, None))
                    continue
                item.cancelled = True
            elif item._status != WAITING:  # type: ignore[union-attr]
                continue
            yield entry

    def pending(self) -> int:
        """Timers that have neither fired nor been cancelled (deadlines not counted)."""
        return sum(1 for e in self._heap if type(e[2]) is TimerRef and not e[2].cancelled)

    def any_due(self) -> bool:
        """Whether a live entry is due now."""
        deadline = self.next_deadline()
        return deadline is not None and deadline <= self.clock()

"""Monitors: a server learns, once, that another server's incarnation stopped.

``ref = self.monitor(target)`` in a callback; when that incarnation stops, for any
reason, the monitoring server gets ``handle_info(otpy.ServerDown(ref, pid, reason))``
exactly once. Monitoring what is not running delivers ``reason="noproc"`` at once.

The bookkeeping lives on the two ends, in a :class:`Links` record that exists only
for a server (or supervisor) that monitors or is monitored, so a server that does
neither pays one empty slot: ``watchers`` (refs of monitors on it, with the
monitoring server) and ``watching`` (refs of its own monitors, with their target).

What must stay true: a ref is active on both ends or on neither; when an incarnation
stops, each of its watchers' refs fires once and leaves both ends, and each of its own
monitors is cancelled on both ends (a stopped server monitors nothing).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .names import Pid

ACTIVE, FIRED, CANCELLED = 0, 1, 2


class MonitorRef:
    """What ``self.monitor(target)`` returns: names one monitor; pass it to
    ``self.demonitor(ref)``, and match it in the ``otpy.ServerDown`` it brings."""

    __slots__ = ("_state", "_target", "_watcher", "id", "node")

    def __init__(self, node: str, id: int, watcher: Any, target: Any) -> None:
        self.node = node
        self.id = id
        self._watcher = watcher  # the server that monitors
        self._target = target  # what it monitors (None once the monitor is over)
        self._state = ACTIVE

    def __eq__(self, other: object) -> bool:
        return type(other) is MonitorRef and (self.node, self.id) == (other.node, other.id)

    def __hash__(self) -> int:
        return hash((self.node, self.id))

    def __repr__(self) -> str:
        return f"<otpy.MonitorRef {self.id}@{self.node}>"

    @property
    def active(self) -> bool:
        """True until the monitor fires or is demonitored."""
        return self._state == ACTIVE


class ServerDown(NamedTuple):
    """The message a monitor brings to ``handle_info`` when the incarnation it watched
    stops: ``ref`` (from ``monitor``), ``pid`` (the incarnation that stopped, or the
    address that was monitored when nothing ran it) and ``reason`` (what its
    supervisor saw: the exception of a crash, ``"normal"``, ``"shutdown"``, ...;
    ``"noproc"`` when nothing ran; ``"noconnection"`` when its node is out of reach)."""

    ref: MonitorRef
    pid: Pid | str
    reason: Any


class Links:
    """The monitors on, and of, one server or supervisor (see the module doc)."""

    __slots__ = ("watchers", "watching")

    def __init__(self) -> None:
        self.watchers: dict[MonitorRef, Any] = {}  # ref -> the server that monitors
        self.watching: dict[MonitorRef, Any] = {}  # ref -> the target it monitors

    def __bool__(self) -> bool:
        return bool(self.watchers or self.watching)

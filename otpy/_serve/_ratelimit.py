"""Refusals logged without a flood: the first of a kind from one peer, then a count.

A peer that sends a thousand bad requests would otherwise make the node log a thousand
events, each many times the size of the request. :class:`Refusals` logs the first
refusal of each kind (event name, and what went wrong when the caller tells it: the
error's kind) from each peer host at once; the repeats within
``interval`` seconds are only counted, and :meth:`flush` (called by the endpoint about
once per interval) logs their count as one event of the same name with
``repeated=N`` and the fields of the last one::

    refusals = Refusals(log, interval=10.0)
    refusals.note("wire_bad_request", "10.0.0.7", kind="NoSuchMethod")   # logged
    refusals.note("wire_bad_request", "10.0.0.7", kind="NoSuchMethod")   # counted
    refusals.flush(now)          # after 10 s: one event, repeated=1

What must stay true: at most two events per kind and peer per interval (the first,
then the count); at most ``max_keys`` kinds and peers are remembered (past that, the
rest are counted under the peer ``"*"``), so a flood from many addresses is bounded
too. Kept free of trio: the caller passes the time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL = 10.0


class _Seen:
    __slots__ = ("count", "fields", "level", "since")

    def __init__(self, since: float, level: str, fields: dict[str, Any]) -> None:
        self.since = since
        self.level = level
        self.count = 0
        self.fields = fields


class Refusals:
    """Rate-limits refusal events per (event, peer host); see the module docstring."""

    __slots__ = ("_clock", "_log", "_seen", "interval", "max_keys")

    def __init__(self, log: Any, clock: Callable[[], float], *,
                 interval: float = DEFAULT_INTERVAL, max_keys: int = 1024) -> None:
        self._log = log
        self._clock = clock
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self.interval = interval
        self.max_keys = max_keys

    def note(self, event: str, peer: str | None, *, what: str = "", level: str = "warning",
             **fields: Any) -> None:
        """A refusal ``event`` (of sort ``what``) from ``peer`` (a host): logged now if
        it is the first of its kind within the interval, else counted."""
        host = peer or "-"
        key = (event, host, what)
        seen = self._seen.get(key)
        if seen is None and len(self._seen) >= self.max_keys:
            key = (event, "*", what)
            seen = self._seen.get(key)
        if seen is not None:
            seen.count += 1
            seen.fields = fields
            return
        self._seen[key] = _Seen(self._clock(), level, fields)
        getattr(self._log, level)(event, peer_host=key[1], **fields)

    def flush(self) -> None:
        """Log the count of each kind and peer whose interval is over (one event each),
        and forget those that stayed quiet for a whole interval."""
        now = self._clock()
        for key, seen in list(self._seen.items()):
            if now - seen.since < self.interval:
                continue
            if seen.count:
                event, host, _ = key
                getattr(self._log, seen.level)(event, peer_host=host, repeated=seen.count,
                                               interval=self.interval, **seen.fields)
                seen.count = 0
                seen.since = now
            else:
                del self._seen[key]

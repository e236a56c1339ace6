"""The node's events: what happened to its servers, for the log and for observers.

Every event (``server_crashed``, ``child_restarted``, ``upgrade_committed``, ...) has a
stable snake_case name and key-value fields. It goes to the node's structlog logger and
to each observer, ``observer(level, event, fields)``: the simulation's trace and the
dashboard's feed read events there, never by intercepting the logger.

What must stay true: with no observer, emitting an event costs what calling the logger
costs (the level methods *are* the logger's); an observer that raises is removed from
the list with one logged ``observer_failed`` event, so a faulty observer cannot stop a
supervision act halfway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Observer = Callable[[str, str, dict[str, Any]], None]
LEVELS = ("debug", "info", "warning", "error")


class Events:
    """``events.error("server_crashed", server=..., ...)`` and the other levels."""

    debug: Callable[..., Any]
    info: Callable[..., Any]
    warning: Callable[..., Any]
    error: Callable[..., Any]

    def __init__(self, log: Any) -> None:
        self.log = log
        self._observers: list[Observer] = []
        self._bind()

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(level, event, fields)`` for every event from now on; returns
        a function that stops it."""
        self._observers.append(observer)
        self._bind()

        def stop() -> None:
            if observer in self._observers:
                self._observers.remove(observer)
                self._bind()

        return stop

    def _bind(self) -> None:
        for level in LEVELS:
            if self._observers:
                setattr(self, level, self._emitter(level))
            else:
                setattr(self, level, getattr(self.log, level))

    def _emitter(self, level: str) -> Callable[..., None]:
        logged = getattr(self.log, level)

        def emit(event: str, **fields: Any) -> None:
            for observer in list(self._observers):
                try:
                    observer(level, event, fields)
                except Exception as exc:
                    self._observers.remove(observer)
                    self._bind()
                    self.log.error("observer_failed", observer=repr(observer),
                                   event_name=event, exc_info=exc)
            logged(event, **fields)

        return emit

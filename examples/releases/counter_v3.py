"""Counter, version 3: adds a ``"toggle"`` call; the state gains a flag,
``(old, count, enabled)``; a disabled counter does not count."""

from __future__ import annotations

from typing import Any

import otpy


class Counter(otpy.GenServer[tuple[int, int, bool]]):
    vsn = "3"

    def init(self, arg: Any) -> tuple[int, int, bool]:
        return (0, 0, True)

    def handle_call(
        self, request: Any, caller: otpy.Caller, state: tuple[int, int, bool]
    ) -> Any:
        old, count, enabled = state
        if request == "incr":
            return otpy.Reply("ok", (old, count + 1 if enabled else count, enabled))
        if request == "count":
            return otpy.Reply(count, state)
        if request == "reset":
            return otpy.Reply("ok", (old, 0, enabled))
        if request == "toggle":
            return otpy.Reply(not enabled, (old, count, not enabled))
        raise ValueError(f"counter v3: unknown request {request!r}")

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == "2":
            old, count = state
            return (old, count, True if extra is None else bool(extra))
        if old_vsn == otpy.Down("2"):
            old, count, _enabled = state
            return (old, count)
        raise ValueError(f"counter v3 cannot migrate from {old_vsn!r}")

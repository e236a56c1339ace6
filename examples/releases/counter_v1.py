"""Counter, version 1: the state is the count."""

from __future__ import annotations

from typing import Any

import otpy


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply("ok", state + 1)
        if request == "count":
            return otpy.Reply(state, state)
        raise ValueError(f"counter v1: unknown request {request!r}")

"""Counter, version 2: the state is ``(old, count)`` -- the count when version 2 was
installed, and the count -- and a ``"reset"`` call starts the count again."""

from __future__ import annotations

from typing import Any

import otpy


class Counter(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def init(self, arg: Any) -> tuple[int, int]:
        return (0, 0)

    def handle_call(self, request: Any, caller: otpy.Caller, state: tuple[int, int]) -> Any:
        old, count = state
        if request == "incr":
            return otpy.Reply("ok", (old, count + 1))
        if request == "count":
            return otpy.Reply(count, state)
        if request == "reset":
            return otpy.Reply("ok", (old, 0))
        raise ValueError(f"counter v2: unknown request {request!r}")

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == "1":  # up from version 1: state was the count
            return (state, state)
        if old_vsn == otpy.Down("1"):  # back to version 1: keep the count
            return state[1]
        raise ValueError(f"counter v2 cannot migrate from {old_vsn!r}")

    # Clients written against version 1 keep working: nothing to adapt for them,
    # the requests and replies kept their meaning.
    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        return request

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        return reply

"""A counter server: the smallest useful otpy GenServer."""

from __future__ import annotations

from typing import Any

import otpy


class Counter(otpy.GenServer[int]):
    """Counts ``"incr"`` calls; ``"count"`` reads the count; a cast adds to it."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0 if arg is None else int(arg)

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply("ok", state + 1)
        if request == "count":
            return otpy.Reply(state, state)
        raise ValueError(f"unknown request {request!r}")

    def handle_cast(self, message: Any, state: int) -> int:
        return state + int(message)


async def main() -> None:
    root = otpy.Supervisor([otpy.Child("counter", Counter)])
    async with otpy.open_node(root) as node:
        await node.call("counter", "incr")
        await node.call("counter", "incr")
        node.cast("counter", 40)
        print("count:", await node.call("counter", "count"))


if __name__ == "__main__":
    import structlog
    import trio

    # otpy never configures logging; show only its warnings and errors here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    trio.run(main)

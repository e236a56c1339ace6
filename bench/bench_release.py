"""Live upgrade speed: hold, migrate (code_change + state type check), swap and resume
N servers while 4 clients call flat out; then the downgrade.

Reports the upgrade and downgrade time, the worst stall any client saw (the longest gap
between two of its answers while the upgrade ran), and calls made / failed / lost.
Erlang/OTP 25 on this machine (quoted from the issue, not measured here): 10,000
gen_servers upgraded in 114-128 ms, worst call stall 84-188 ms under 4 clients, 0 lost.
Run: python bench/bench_release.py [N ...]
"""

from __future__ import annotations

import random
import sys
from typing import Any

import trio

import otpy

if __package__ in (None, ""):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import clock, emit, quiet_logging


class V1(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply("ok", state + 1)


class V2(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def handle_call(self, request: Any, caller: otpy.Caller, state: tuple[int, int]) -> Any:
        return otpy.Reply("ok", (state[0], state[1] + 1))

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return state[1]
        return (state, state)


class _Pass:
    """One upgrade (or downgrade) while ``clients`` tasks call random servers."""

    def __init__(self, node: otpy.Node, n: int) -> None:
        self.node, self.n = node, n
        self.made = self.answered = self.failed = 0
        self.stall = 0.0
        self.upgrading = self.stop = False

    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        last = clock()
        while not self.stop:
            self.made += 1
            try:
                await self.node.call(f"s{rng.randrange(self.n)}", "incr")
                self.answered += 1
            except otpy.OtpyError:
                self.failed += 1
            now = clock()
            if self.upgrading:
                self.stall = max(self.stall, now - last)
            last = now

    async def run(self, direction: str, clients: int) -> float:
        async with trio.open_nursery() as nursery:
            for c in range(clients):
                nursery.start_soon(self.client, c)
            await trio.sleep(0.05)
            self.upgrading = True
            t0 = clock()
            if direction == "upgrade":
                await self.node.upgrade(otpy.Release("2", [otpy.Update(V1, V2)]))
            else:
                await self.node.downgrade()
            elapsed = clock() - t0
            await trio.sleep(0.02)
            self.upgrading = False
            self.stop = True
        return elapsed


async def measure(n: int, clients: int = 4) -> list[dict[str, Any]]:
    root = otpy.Supervisor([otpy.Child(f"s{i}", V1) for i in range(n)])
    out = []
    answered = 0
    async with otpy.open_node(root) as node:
        for direction in ("upgrade", "downgrade"):
            run = _Pass(node, n)
            elapsed = await run.run(direction, clients)
            answered += run.answered
            states = [node.get_state(f"s{i}") for i in range(n)]
            total = sum(s if direction == "downgrade" else s[1] for s in states)
            assert total == answered, (total, answered)  # every answered call counted
            out.append(emit(f"{direction}_{n}_servers", elapsed * 1e3, "ms",
                            worst_stall_ms=round(run.stall * 1e3, 2), clients=clients,
                            calls=run.made, failed=run.failed,
                            lost=run.made - run.answered - run.failed))
    return out


def main(sizes: list[int]) -> list[dict[str, Any]]:
    quiet_logging()
    results = []
    for n in sizes:
        results.extend(trio.run(measure, n))
    return results


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10_000, 100_000])

"""Loading a release from files: how long the node's loop is held while a release is
read and imported, the admin endpoint's way (in a worker thread) beside the old way
(``otpy.Release.load`` on the loop), in the same run.

The release has a module whose import costs about 0.3 s of CPU (a top-level loop) and
a module of about 200 KiB of code (4,000 small functions) to read and compile. A
ticker task on the node's loop wakes every millisecond and records the longest gap
between two wake-ups while the release loads; the release is then installed, so each
round loads new content (a new digest: nothing is served from the package cache).

- ``release_load_loop_stall_thread_ms``: the longest gap, loading as the admin
  endpoint does: reading and importing in a worker thread (the GIL is shared: pure
  Python gives it back every 5 ms), compiling in a child process (``compile`` holds
  the GIL for its whole length), unmarshalling the compiled code in the thread;
- ``release_load_loop_stall_on_loop_ms``: the same, with the load on the loop;
- ``release_load_loop_stall_idle_ms``: the baseline, the same ticker for as long while
  nothing loads (what the machine itself costs: on a shared 2-core machine, tens of
  ms now and then);
- ``release_load_stall_ratio``: thread / on loop, paired within each round.

    python bench/bench_release_load.py     # JSON lines, a few seconds
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from _common import clock, emit, quiet_logging

import otpy
from otpy._release_files import ReleaseSource, load_in_thread

ROUNDS = 5
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "releases"

SLOW = '''
from typing import Any
import otpy
from helpers import double
import bulk

WORK = sum(i * i for i in range({n}))  # the costly import

class Counter(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def handle_call(self, request: Any, caller: Any, state: Any) -> Any:
        return otpy.Reply(state, state)

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        return (state, double(state))
'''


def calibrate(seconds: float) -> int:
    n = 100_000
    while True:
        t0 = clock()
        sum(i * i for i in range(n))
        if clock() - t0 > seconds / 4:
            return int(n * seconds / (clock() - t0))
        n *= 2


def write_release(directory: Path, n: int, tag: str) -> Path:
    (directory / "helpers.py").write_text("def double(n):\n    return 2 * n\n")
    (directory / "slow_v2.py").write_text(f"# {tag}\n" + SLOW.format(n=n))
    (directory / "bulk.py").write_text(f"# {tag}\n" + "".join(
        f"def f{i}(a, b):\n    return a + b * {i}\n" for i in range(4000)))
    path = directory / "r.toml"
    path.write_text(f'vsn = "2"\n[[updates]]\ntarget = "counter_v1:Counter"\n'
                    f'new = "slow_v2:Counter"\n# {tag}\n')
    return path


async def one(path: Path | None, in_thread: bool, idle: float = 0.0) -> tuple[float, float]:
    """The longest gap between two wake-ups of a 1 ms ticker while the release loads."""
    from counter_v1 import Counter  # type: ignore[import-not-found]

    root = otpy.Supervisor([otpy.Child("c0", Counter)])
    async with otpy.open_node(root) as node, trio.open_nursery() as nursery:
        worst = 0.0
        loading = True

        async def ticker() -> None:
            nonlocal worst
            last = clock()
            while loading:
                await trio.sleep(0.001)
                now = clock()
                worst = max(worst, now - last - 0.001)
                last = now

        nursery.start_soon(ticker)
        await trio.sleep(0.01)
        t0 = clock()
        if path is None:  # the baseline: nothing loads
            await trio.sleep(idle)
        elif in_thread:
            release = await load_in_thread(ReleaseSource(None, str(path)))
        else:
            release = otpy.Release.load(path)
        took = clock() - t0
        await trio.sleep(0.01)
        loading = False
        if path is not None:
            await node.upgrade(release)
        return worst * 1000, took


async def main() -> None:
    quiet_logging()
    sys.path.insert(0, str(EXAMPLES))
    n = calibrate(0.3)
    stalls: dict[bool, list[float]] = {True: [], False: []}
    idle: list[float] = []
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            pair = {}
            for in_thread in (True, False):
                directory = Path(tmp) / f"r{r}{in_thread}"
                directory.mkdir()
                path = write_release(directory, n, f"round {r} thread {in_thread}")
                pair[in_thread], took = await one(path, in_thread)
                stalls[in_thread].append(pair[in_thread])
                if in_thread:
                    idle.append((await one(None, False, took))[0])
            ratios.append(pair[True] / pair[False])
    extra: dict[str, Any] = {"rounds": ROUNDS}
    emit("release_load_loop_stall_thread_ms", statistics.median(stalls[True]), "ms",
         worst=max(stalls[True]), what="longest loop stall, load in a worker thread",
         **extra)
    emit("release_load_loop_stall_on_loop_ms", statistics.median(stalls[False]), "ms",
         worst=max(stalls[False]), what="longest loop stall, Release.load on the loop "
                                        "(the old admin path)", **extra)
    emit("release_load_loop_stall_idle_ms", statistics.median(idle), "ms",
         worst=max(idle), what="longest loop stall, nothing loading (baseline)", **extra)
    emit("release_load_stall_ratio", statistics.median(ratios), "ratio",
         all=[round(x, 4) for x in ratios], what="thread / on loop, per round", **extra)


if __name__ == "__main__":
    trio.run(main)

"""A node of durable counters in its own process, for tests to kill, starve and restart.

    python durable_node.py STORE FSYNC [FSIZE]

It serves MessagePack-RPC on a free port of 127.0.0.1 and prints ``port N`` once the
tree has started, then serves until it is killed. Servers ``c0`` .. ``c7`` are durable
counters: ``"incr"`` adds one and answers the new count, ``"get"`` answers it. With
``FSIZE`` (bytes), the process may write no file larger than that (RLIMIT_FSIZE, with
SIGXFSZ ignored, so a write past it fails as on a full disk).
"""

from __future__ import annotations

import logging
import sys

import structlog
import trio

import otpy

COUNTERS = 8


class Counter(otpy.GenServer[int]):
    """A durable counter."""

    vsn = "1"
    durable = True

    def init(self, arg: object) -> int:
        return 0

    def handle_call(self, request: object, caller: otpy.Caller, state: int) -> object:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        return otpy.Reply(state, state)


def tree() -> otpy.Supervisor:
    # A high intensity: with a full disk every step crashes, and the node should go on
    # answering (with errors) rather than stop.
    return otpy.Supervisor([otpy.Child(f"c{i}", Counter) for i in range(COUNTERS)],
                           max_restarts=1_000_000, max_seconds=1.0)


async def main(store: str, fsync: str) -> None:
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0), store=store,
                              fsync=fsync) as node:  # type: ignore[arg-type]
        assert node.address is not None
        print(f"port {node.address[1]}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if len(sys.argv) > 3:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    trio.run(main, sys.argv[1], sys.argv[2])

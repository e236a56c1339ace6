"""Wire speed: requests/s through the MessagePack-RPC client endpoint, beside a bare
trio TCP echo server of the same message size measured in the same run.

Three loads, each against otpy's endpoint and against the echo server:

- ``sequential``: one connection, one request at a time;
- ``pipelined``: one connection, 64 requests in flight (a sliding window);
- ``connections``: 16 connections, one request at a time each.

The servers run here, on one trio loop; the load comes from a separate process (plain
sockets and a selector, so the client costs as little as it can) and counts replies
by bytes: every reply has the same size. Loads alternate, several rounds: the best
of each is kept, and the otpy/echo ratio of each round is reported too (paired).
The goal of issue #5 is ``pipelined`` at >= 50% of the echo's rate.

    python bench/bench_wire.py            # JSON lines, about 20 s
"""

from __future__ import annotations

import functools
import json
import selectors
import socket
import statistics
import sys
import time
from typing import Any

import msgpack
import trio
from _common import emit, python_info, quiet_logging

import otpy

MODES = {"sequential": (1, 1), "pipelined": (1, 64), "connections": (16, 1)}
SECONDS = 1.2
WARMUP = 0.3
ROUNDS = 3
PAYLOAD = "x" * 40
# Ids 128..255 all pack in two bytes, so every request and reply has the same size.
REQUEST = msgpack.packb([0, 200, "call", ["echo", PAYLOAD]])
REPLY = msgpack.packb([1, 200, None, PAYLOAD])


class Echo(otpy.GenServer[None]):
    """Answers every call with its request."""

    vsn = "1"

    def init(self, arg: Any) -> None:
        return None

    def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
        return otpy.Reply(request, state)


# -- the load, in its own process ----------------------------------------------------


def load(port: int, mode: str, frame_size: int, reply_size: int) -> float:
    """Drive ``mode`` against 127.0.0.1:port; replies per second after a warm-up."""
    conns, window = MODES[mode]
    frame = REQUEST if frame_size == len(REQUEST) else b"\x00" * frame_size
    sel = selectors.DefaultSelector()
    pending = {}
    for _ in range(conns):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(frame * window)
        sel.register(sock, selectors.EVENT_READ)
        pending[sock] = 0
    start = time.perf_counter()
    warm_at, end = start + WARMUP, start + WARMUP + SECONDS
    done = warm_done = 0
    warm_time = start
    now = start
    while now < end:
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the server closed the connection")
            got = pending[sock] + len(data)
            k, pending[sock] = divmod(got, reply_size)
            done += k
            if k:
                sock.sendall(frame * k)
        now = time.perf_counter()
        if warm_done == 0 and now >= warm_at:
            warm_done, warm_time = done, now
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return (done - warm_done) / (now - warm_time)


# -- the servers, here ---------------------------------------------------------------


async def echo_handler(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def measure(port: int, mode: str, frame_size: int, reply_size: int) -> float:
    result = await trio.run_process(
        [sys.executable, __file__, "--load", str(port), mode, str(frame_size),
         str(reply_size)], capture_stdout=True)
    return float(result.stdout)


async def main() -> None:
    quiet_logging()
    root = otpy.Supervisor([otpy.Child("echo", Echo)])
    async with otpy.open_node(root, listen=("127.0.0.1", 0)) as node, \
            trio.open_nursery() as nursery:
        assert node.address is not None
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1"))
        echo_port = listener.socket.getsockname()[1]
        best: dict[tuple[str, str], float] = {}
        paired: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(ROUNDS):
            for mode in MODES:
                rates = {}
                for server, port, reply in (("otpy", node.address[1], len(REPLY)),
                                            ("echo", echo_port, len(REQUEST))):
                    rate = rates[server] = await measure(port, mode, len(REQUEST), reply)
                    best[server, mode] = max(best.get((server, mode), 0.0), rate)
                paired[mode].append(rates["otpy"] / rates["echo"])
        for mode in MODES:
            for server in ("otpy", "echo"):
                emit(f"wire_{mode}_{server}", round(best[server, mode]), "requests/s",
                     request_bytes=len(REQUEST), reply_bytes=len(REPLY),
                     connections=MODES[mode][0], in_flight=MODES[mode][1],
                     best_of=ROUNDS, seconds=SECONDS)
            emit(f"wire_{mode}_ratio", round(best["otpy", mode] / best["echo", mode], 3),
                 "otpy/echo", goal=0.5 if mode == "pipelined" else None,
                 paired=[round(r, 3) for r in paired[mode]],
                 paired_median=round(statistics.median(paired[mode]), 3))
        emit("wire_info", 0, "", **python_info())
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        print(json.dumps(load(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                              int(sys.argv[5]))))
    else:
        trio.run(main)

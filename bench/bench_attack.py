"""The wire under attack: what a hostile client can make a node hold, or wait for.

Each figure comes from a node in its own process (its RSS read from /proc, its
descriptor limit set to 1024 as the common ``ulimit -n``), driven from this one:

- ``attack_rss_*``: the node's RSS growth (MB) while frames that never end arrive:
  arrays of empty maps (one byte each, a dict each if decoded) in one request (the
  arrays as long as msgpack's own limit allows), 25 connections
  each holding an unfinished frame just under ``max_frame`` (of empty maps, and of one
  long string), and empty maps inside the admin endpoint's ``auth`` message, before
  any cookie. Each stops at 16 MiB sent, when the node closes the connection, or when
  the node passes 1.5 GB (then the figure is that, and the attack would go on).
- ``attack_latency_unknown_{1k,100k}``: another client's worst (and p99) call latency
  while one connection sends pipelined calls to unknown names, 64 KiB at a time, at a
  node of 1,000 and 100,000 servers (the best of three rounds' worst, each round's
  beside it); beside the same client's worst latency with no burst, in the same run.
  Target: at most 10 ms.
- ``attack_idle_connections``: 1,100 idle sockets against the node: can a new client,
  and the operator on the admin endpoint, still get in (1 yes, 0 no), and how long it
  took.

    python bench/bench_attack.py          # JSON lines, about a minute
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
from _common import emit, python_info

HERE = os.path.dirname(os.path.abspath(__file__))
COOKIE = "bench-attack-cookie"
SENT_MAX = 16 << 20
# An unfinished frame just under max_frame (1 MiB): announced 200 bytes or elements
# longer than the 1 MiB - 300 sent.
ANNOUNCED, UNDER = (1 << 20) - 200, (1 << 20) - 300
RSS_MAX = 1_500_000_000
MB = 1e6


# -- the node, in its own process ------------------------------------------------------


def node_main(servers: int) -> None:
    import logging

    import structlog
    import trio

    import otpy

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

    class Echo(otpy.GenServer[None]):
        vsn = "1"

        def init(self, arg: Any) -> None:
            return None

        def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
            return otpy.Reply(request, state)

    async def main() -> None:
        root = otpy.Supervisor([otpy.Child(f"s{i}", Echo) for i in range(servers)])
        async with otpy.open_node(root, listen=("127.0.0.1", 0),
                                  admin=("127.0.0.1", 0)) as node:
            assert node.address is not None and node.admin_address is not None
            print(node.address[1], node.admin_address[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)

    trio.run(main)


class Node:
    """A node process: its ports, its RSS."""

    def __init__(self, servers: int = 10) -> None:
        env = {**os.environ, "OTPY_COOKIE": COOKIE}
        self.proc = subprocess.Popen([sys.executable, __file__, "--node", str(servers)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        self.port, self.admin_port = map(int, self.proc.stdout.readline().split())

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- frames that never end --------------------------------------------------------------


def request_head(method: str, count: int) -> bytes:
    """``[0, 1, method, [<an array of count elements>`` (what follows fills it)."""
    return (b"\x94\x00\x01" + msgpack.packb(method) + b"\x91\xdd"
            + count.to_bytes(4, "big"))


def push(sock: socket.socket, head: bytes, body: bytes, total: int, node: Node) -> int:
    """Send ``head`` then ``body`` repeatedly up to ``total`` bytes; stop early if the
    node closes or passes RSS_MAX. Returns the bytes the node took."""
    sock.settimeout(5)
    sent = 0
    try:
        sock.sendall(head)
        while sent < total and node.rss() < RSS_MAX:
            sock.sendall(body[:total - sent])
            sent += min(len(body), total - sent)
    except OSError:
        pass
    return sent


def settled_rss(node: Node) -> int:
    """The node's RSS once it stopped growing for a second (it may still be decoding
    what the kernel buffered), or after 30 s."""
    last, still, end = node.rss(), 0, time.perf_counter() + 30
    while still < 4 and time.perf_counter() < end and last < RSS_MAX:
        time.sleep(0.25)
        now = node.rss()
        still = still + 1 if now <= last else 0
        last = max(last, now)
    return last


def attack_rss(name: str, what: str, run: Any) -> None:
    node = Node()
    try:
        time.sleep(0.2)
        before = node.rss()
        sent, socks = run(node)
        grown = settled_rss(node) - before
        emit(f"attack_rss_{name}", round(grown / MB, 1), "MB", what=what,
             sent_mb=round(sent / MB, 1), capped=node.rss() >= RSS_MAX)
        for s in socks:
            s.close()
    finally:
        node.close()


# Arrays of empty maps inside an array, each as long as msgpack's limit on main
# allowed (2**20 - 1): msgpack builds it all as it arrives.
NESTED = b"\xdd\x00\x0f\xff\xff" + b"\x80" * (2**20 - 1)


def maps_in_one_request(node: Node) -> tuple[int, list[socket.socket]]:
    sock = socket.create_connection(("127.0.0.1", node.port))
    return push(sock, request_head("call", 2**20 - 1), NESTED, SENT_MAX, node), [sock]


def unfinished_25(body: bytes, head: bytes) -> Any:
    def run(node: Node) -> tuple[int, list[socket.socket]]:
        socks, sent = [], 0
        for _ in range(25):
            sock = socket.create_connection(("127.0.0.1", node.port))
            sent += push(sock, head, body, UNDER, node)
            socks.append(sock)
        return sent, socks
    return run


def maps_in_auth(node: Node) -> tuple[int, list[socket.socket]]:
    sock = socket.create_connection(("127.0.0.1", node.admin_port))
    sock.settimeout(5)
    sock.recv(100)  # the challenge
    return push(sock, request_head("auth", 2**20 - 1), NESTED, SENT_MAX, node), [sock]


# -- another client's latency during a burst of unknown names ----------------------------


def probe(port: int, stop: threading.Event, out: list[float]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    unpacker = msgpack.Unpacker()
    request = msgpack.packb([0, 1, "call", ["s0", "ping"]])
    while not stop.is_set():
        t = time.perf_counter()
        sock.sendall(request)
        got = False
        while not got:
            unpacker.feed(sock.recv(65536))
            for _ in unpacker:
                got = True
        out.append(time.perf_counter() - t)
        time.sleep(0.001)
    sock.close()


def burst_main(port: int, seconds: float) -> None:
    """Pipelined calls to unknown names, 64 KiB of them at a time, replies read; run
    in a process of its own, so that it does not share a GIL with the probe. Prints
    the calls made."""
    sock = socket.create_connection(("127.0.0.1", port))
    unpacker = msgpack.Unpacker()
    frames: list[bytes] = []
    while sum(map(len, frames)) < 65536 - 32:
        frames.append(msgpack.packb([0, len(frames), "call", [f"bogus-{len(frames)}", 1]]))
    packet, n = b"".join(frames), len(frames)
    calls = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sock.sendall(packet)
        got = 0
        while got < n:
            unpacker.feed(sock.recv(1 << 20))
            got += sum(1 for _ in unpacker)
        calls += n
    sock.close()
    print(calls)


def probe_while(port: int, seconds: float, burst: bool) -> tuple[list[float], int]:
    """The probe's call latencies for ``seconds``, with or without a burst beside it;
    and the unknown-name calls the burst made."""
    samples: list[float] = []
    stop = threading.Event()
    load = None
    if burst:
        load = subprocess.Popen([sys.executable, __file__, "--burst", str(port),
                                 str(seconds)], stdout=subprocess.PIPE)
        time.sleep(0.2)
    t = threading.Thread(target=probe, args=(port, stop, samples))
    t.start()
    calls = int(load.communicate()[0]) if load is not None else 0
    if load is None:
        time.sleep(seconds)
    stop.set()
    t.join()
    return sorted(samples), calls


def latency(servers: int, tag: str, rounds: int = 3, seconds: float = 1.5) -> None:
    """Worst latencies over several rounds: the machine's own hiccups (other
    processes) land in some rounds and not others, so the best round's worst is the
    figure, beside each round's and the worst with no burst."""
    node = Node(servers)
    try:
        quiet, loud, calls = [], [], 0
        for _ in range(rounds):
            samples, _ = probe_while(node.port, seconds / 2, False)
            quiet.append(samples[-1])
            samples, made = probe_while(node.port, seconds, True)
            loud.append(samples)
            calls += made
        worst = [s[-1] * 1e3 for s in loud]
        best = min(range(rounds), key=lambda i: worst[i])
        emit(f"attack_latency_unknown_{tag}", round(worst[best], 2), "ms",
             each_round_ms=[round(w, 2) for w in worst],
             p99_ms=round(loud[best][int(0.99 * (len(loud[best]) - 1))] * 1e3, 2),
             median_ms=round(statistics.median(loud[best]) * 1e3, 3),
             quiet_worst_ms=round(min(quiet) * 1e3, 2), servers=servers,
             unknown_calls_per_s=round(calls / (rounds * seconds)), goal=10)
    finally:
        node.close()


# -- idle connections ----------------------------------------------------------------------


def idle_connections() -> None:
    node = Node()
    socks = []
    try:
        for _ in range(1100):
            try:
                socks.append(socket.create_connection(("127.0.0.1", node.port), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        client = admin = 0
        t = time.perf_counter()
        try:
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=5)
            sock.settimeout(5)
            sock.sendall(msgpack.packb([0, 1, "call", ["s0", "in"]]))
            client = int(msgpack.unpackb(sock.recv(100))[3] == "in")
            sock.close()
        except (OSError, ValueError):
            pass
        client_s = time.perf_counter() - t
        t = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "otpy._cli", "tree", "--node",
             f"127.0.0.1:{node.admin_port}", "--timeout", "5"],
            capture_output=True, env={**os.environ, "OTPY_COOKIE": COOKIE}, timeout=30,
            check=False)
        admin = int(result.returncode == 0)
        emit("attack_idle_connections", client + admin, "of 2 got in",
             idle_sockets=len(socks), client=client, client_s=round(client_s, 3),
             admin=admin, admin_s=round(time.perf_counter() - t, 3), node_nofile=1024)
    finally:
        for s in socks:
            s.close()
        node.close()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    attack_rss("maps_one_request", "empty maps in one unfinished request",
               maps_in_one_request)
    attack_rss("maps_25_connections", "25 connections, each an unfinished request of "
               "empty maps under max_frame",
               unfinished_25(b"\x80" * 65536, request_head("call", ANNOUNCED)))
    attack_rss("string_25_connections", "25 connections, each an unfinished request of "
               "one string under max_frame",
               unfinished_25(b"x" * 65536, b"\x94\x00\x01\xa4call\x91\xdb"
                             + ANNOUNCED.to_bytes(4, "big")))
    attack_rss("maps_admin_auth", "empty maps in the admin auth message, before any "
               "cookie", maps_in_auth)
    latency(1000, "1k")
    latency(100_000, "100k")
    idle_connections()
    emit("attack_info", 0, "", **python_info())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--node"]:
        node_main(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--burst"]:
        burst_main(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()

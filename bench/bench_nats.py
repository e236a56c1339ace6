"""NATS request/reply: otpy's sans-io trio client beside the official asyncio client,
measured in the same run against the same nats-server (issue #15 asks for the figures
before choosing).

Variants, each a bare echo (a responder that publishes each request's payload back to
its reply subject, and a requester), on two connections to one nats-server on
127.0.0.1:

- ``otpy``: ``otpy._cluster.nats_client`` on trio (synchronous callback responder,
  ``await nc.request``);
- ``natspy``: nats-py on plain asyncio (``msg.respond`` in an async callback,
  ``await nc.request``);
- ``natspy_trio``: the same nats-py code on a trio-asyncio loop, each request made from
  a trio task through ``aio_as_trio`` (what bridging it into a node would cost);
- ``bare``: a minimal trio NATS echo over raw sockets (one hard-coded subject, the
  least work a round trip through nats-server can take in Python on trio): the floor;
- ``socket``: a trio TCP echo with no nats-server at all (one hop instead of two).

Loads: ``seq`` (one request at a time) and ``c64`` (64 tasks, each one request at a
time), each in two shapes: ``local`` (responder and requester on one loop, one process)
and ``split`` (the responder in a process of its own, as a remote node would be; for
``natspy_trio`` the responder is plain nats-py: only the caller is bridged).

Each measurement runs in a fresh process (no variant inherits another's heap or
event-loop policy). Each variant runs ``ROUNDS`` rounds, interleaved; a figure is the
best round and each ratio pairs the two figures of one round (the median of the rounds is reported
too). The machine is small and shared: read ranges, not digits.

    python bench/bench_nats.py               # JSON lines, about 90 s
    python bench/bench_nats.py --profile     # where otpy's request/reply time goes

Measured here (2 cores shared with other jobs, load average 4-6; two runs, each
measurement in a fresh process, best of 3 rounds; ranges across the runs):

    requests/s            otpy      nats-py     nats-py via trio-asyncio
    sequential, split     3.7-3.8k  2.1-3.0k    1.3-1.6k
    sequential, local     4.2-5.5k  1.6-3.0k    0.65-0.69k
    64 in flight, split   33.0-33.2k  15.0-16.8k  2.1-4.4k
    64 in flight, local   13.1-18.8k  12.8-13.9k  2.4-3.1k

    sequential round trip p50 156-182 µs (p1 117-122 µs); through the writer task
    instead of sending the first message of a turn at once: p50 201-218 µs.

The choice: the sans-io client. Bridged, nats-py is 2-15x slower than this client
(every request crosses from trio to asyncio and back), and neither nats-py form
calls a synchronous callback per message from its reader, which is what the
cluster layer needs.

nats-py and trio-asyncio are in the optional ``bench`` extra
(``pip install -e '.[bench]'``); without them their variants are reported as missing.
"""

from __future__ import annotations

import asyncio
import cProfile
import importlib.util
import pstats
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _common import clock, emit, percentile, python_info, quiet_logging

from otpy._cluster.nats_client import open_client
from otpy._cluster.server import start_server_blocking

SECONDS = 1.0
WARMUP = 0.2
ROUNDS = 3
CONCURRENCY = 64
PAYLOAD = b"x" * 16
SUBJECT = "bench.echo"


# -- otpy -----------------------------------------------------------------------------------


async def otpy_responder(url: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_client(url) as responder:
        publish = responder.publish_nowait
        responder.subscribe(SUBJECT, lambda m: publish(m.reply, m.payload))  # type: ignore[arg-type]
        await responder.flush()
        task_status.started()
        await trio.sleep_forever()


async def run_otpy(url: str, concurrency: int, local: bool) -> float:
    async with trio.open_nursery() as nursery:
        if local:
            await nursery.start(otpy_responder, url)
        async with open_client(url) as requester:
            request = requester.request

            async def one() -> None:
                await request(SUBJECT, PAYLOAD)

            rate = await drive_trio(one, concurrency)
        nursery.cancel_scope.cancel()
    return rate


async def drive_trio(one: Callable[[], Awaitable[None]], concurrency: int) -> float:
    """Requests per second from ``concurrency`` trio tasks, after a warm-up."""
    counts = [0] * concurrency
    start = clock()
    warm_end, end = start + WARMUP, start + WARMUP + SECONDS
    at_warm: list[int] = []

    async def worker(i: int) -> None:
        n = 0
        while True:
            now = clock()
            if now >= end:
                break
            if now >= warm_end and not at_warm:
                at_warm.append(sum(counts))
            await one()
            n += 1
            counts[i] = n

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, i)
    return (sum(counts) - (at_warm[0] if at_warm else 0)) / (clock() - warm_end)


async def otpy_latency(url: str, direct_send: bool, n: int = 3000) -> list[float]:
    """Sorted round-trip times (µs) of ``n`` sequential requests; both ends with or
    without the immediate first send of a turn (``direct_send``)."""
    async with trio.open_nursery() as nursery:
        async def responder(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with open_client(url, direct_send=direct_send) as r:
                r.subscribe(SUBJECT, lambda m: r.publish_nowait(m.reply, m.payload))  # type: ignore[arg-type]
                await r.flush()
                task_status.started()
                await trio.sleep_forever()

        await nursery.start(responder)
        times = []
        async with open_client(url, direct_send=direct_send) as requester:
            for _ in range(n):
                t = clock()
                await requester.request(SUBJECT, PAYLOAD)
                times.append((clock() - t) * 1e6)
        nursery.cancel_scope.cancel()
    return sorted(times)


# -- the floor: minimal raw trio NATS and a plain TCP echo ------------------------------------


async def raw_connect(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.receive_some(65536)  # INFO
    await stream.send_all(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\n')
    return stream


async def bare_responder(responder: trio.SocketStream) -> None:
    """Answer each MSG (fixed-size payload) with a PUB to its reply subject."""
    msg_size = len(PAYLOAD) + 2
    buf = b""
    while True:
        buf += await responder.receive_some(65536)
        out = []
        while True:
            eol = buf.find(b"\r\n")
            if eol >= 0 and not buf.startswith(b"MSG "):  # PING, PONG
                if buf.startswith(b"PING"):
                    out.append(b"PONG\r\n")
                buf = buf[eol + 2:]
                continue
            if eol < 0 or len(buf) < eol + 2 + msg_size:
                break
            line = buf[:eol].split()
            payload = buf[eol + 2:eol + 2 + len(PAYLOAD)]
            buf = buf[eol + 2 + msg_size:]
            out.append(b"PUB %s %d\r\n%s\r\n" % (line[3], len(payload), payload))
        if out:
            await responder.send_all(b"".join(out))


async def raw_subscribe(port: int, subject: str) -> trio.SocketStream:
    stream = await raw_connect(port)
    await stream.send_all(f"SUB {subject} 1\r\nPING\r\n".encode())
    got = b""
    while b"PONG\r\n" not in got:
        got += await stream.receive_some(65536)
    return stream


async def bare_responder_task(port: int, task_status: Any = trio.TASK_STATUS_IGNORED
                              ) -> None:
    responder = await raw_subscribe(port, SUBJECT)
    task_status.started()
    async with responder:
        await bare_responder(responder)


async def run_bare(port: int, concurrency: int, local: bool) -> float:
    """Responder and requester speak the protocol with the least parsing: each message is
    one MSG line plus a fixed-size payload."""
    requester = await raw_subscribe(port, "_INBOX.bare.*")
    waiting: dict[bytes, trio.Event] = {}
    msg_size = len(PAYLOAD) + 2

    async def reply_loop() -> None:
        buf = b""
        while True:
            buf += await requester.receive_some(65536)
            while True:
                eol = buf.find(b"\r\n")
                if eol >= 0 and not buf.startswith(b"MSG "):  # PING, PONG
                    if buf.startswith(b"PING"):
                        async with send_lock:
                            await requester.send_all(b"PONG\r\n")
                    buf = buf[eol + 2:]
                    continue
                if eol < 0 or len(buf) < eol + 2 + msg_size:
                    break
                subject = buf[:eol].split()[1]
                buf = buf[eol + 2 + msg_size:]
                ev = waiting.pop(subject, None)
                if ev is not None:
                    ev.set()

    ids = iter(range(1 << 62))
    send_lock = trio.Lock()

    async def one() -> None:
        subject = b"_INBOX.bare.%d" % next(ids)
        ev = waiting[subject] = trio.Event()
        async with send_lock:
            await requester.send_all(b"PUB %s %s %d\r\n%s\r\n" % (
                SUBJECT.encode(), subject, len(PAYLOAD), PAYLOAD))
        await ev.wait()

    async with trio.open_nursery() as nursery:
        if local:
            await nursery.start(bare_responder_task, port)
        nursery.start_soon(reply_loop)
        rate = await drive_trio(one, concurrency)
        nursery.cancel_scope.cancel()
    await requester.aclose()
    return rate


async def run_socket(_port: int, concurrency: int, _local: bool) -> float:
    """A trio TCP echo of fixed-size frames, no nats-server: one hop per round trip."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, echo, listeners)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        waiters: list[trio.Event] = []
        send_lock = trio.Lock()

        async def reader() -> None:
            buf = 0
            while True:
                buf += len(await client.receive_some(65536))
                while buf >= len(PAYLOAD) and waiters:
                    buf -= len(PAYLOAD)
                    waiters.pop(0).set()

        nursery.start_soon(reader)

        async def one() -> None:
            ev = trio.Event()
            waiters.append(ev)
            async with send_lock:
                await client.send_all(PAYLOAD)
            await ev.wait()

        rate = await drive_trio(one, concurrency)
        nursery.cancel_scope.cancel()
    return rate


# -- nats-py, on asyncio and bridged into trio ------------------------------------------------


async def natspy_responder(url: str) -> Any:
    import nats  # type: ignore[import-not-found]

    responder = await nats.connect(url)

    async def handler(msg: Any) -> None:
        await msg.respond(msg.data)

    await responder.subscribe(SUBJECT, cb=handler)
    await responder.flush()
    return responder


async def natspy_pair(url: str, local: bool) -> tuple[Any, Any]:
    import nats

    responder = await natspy_responder(url) if local else None
    requester = await nats.connect(url)
    return responder, requester


def run_natspy(url: str, concurrency: int, local: bool) -> float:
    async def main() -> float:
        responder, requester = await natspy_pair(url, local)
        counts = [0] * concurrency
        loop_clock = clock
        start = loop_clock()
        warm_end, end = start + WARMUP, start + WARMUP + SECONDS
        at_warm: list[int] = []

        async def worker(i: int) -> None:
            n = 0
            while True:
                now = loop_clock()
                if now >= end:
                    break
                if now >= warm_end and not at_warm:
                    at_warm.append(sum(counts))
                await requester.request(SUBJECT, PAYLOAD, timeout=5)
                n += 1
                counts[i] = n

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        rate = (sum(counts) - (at_warm[0] if at_warm else 0)) / (loop_clock() - warm_end)
        await requester.close()
        if responder is not None:
            await responder.close()
        return rate

    return asyncio.run(main())


async def run_natspy_trio(url: str, concurrency: int, local: bool) -> float:
    import trio_asyncio  # type: ignore[import-not-found]

    async with trio_asyncio.open_loop():
        responder, requester = await trio_asyncio.aio_as_trio(natspy_pair)(url, local)
        request = trio_asyncio.aio_as_trio(requester.request)

        async def one() -> None:
            await request(SUBJECT, PAYLOAD, timeout=5)

        rate = await drive_trio(one, concurrency)
        await trio_asyncio.aio_as_trio(requester.close)()
        if responder is not None:
            await trio_asyncio.aio_as_trio(responder.close)()
    return rate


# -- a responder in its own process -------------------------------------------------------------


def respond(variant: str, url: str, port: int) -> None:
    """Run ``variant``'s responder until stdin closes (``--respond``): the responder of
    the ``split`` loads, in a process of its own as a remote node would be."""
    def wait_stdin() -> None:
        print("READY", flush=True)
        sys.stdin.read()

    if variant in ("natspy", "natspy_trio"):
        async def aio_main() -> None:
            responder = await natspy_responder(url)
            await asyncio.get_running_loop().run_in_executor(None, wait_stdin)
            await responder.close()
        asyncio.run(aio_main())
        return

    async def trio_main() -> None:
        async with trio.open_nursery() as nursery:
            if variant == "otpy":
                await nursery.start(otpy_responder, url)
            else:
                await nursery.start(bare_responder_task, port)
            await trio.to_thread.run_sync(wait_stdin)
            nursery.cancel_scope.cancel()
    trio.run(trio_main)


# -- running ----------------------------------------------------------------------------------


def missing() -> dict[str, str]:
    """The optional packages that are not installed, and what they are for."""
    out = {}
    if importlib.util.find_spec("nats") is None:
        out["nats-py"] = "natspy and natspy_trio"
    if importlib.util.find_spec("trio_asyncio") is None:
        out["trio-asyncio"] = "natspy_trio"
    return out


def measure(variant: str, url: str, port: int, concurrency: int, local: bool) -> float:
    def run() -> float:
        if variant == "natspy":
            return run_natspy(url, concurrency, local)
        fn = {"otpy": run_otpy, "bare": run_bare, "socket": run_socket,
              "natspy_trio": run_natspy_trio}[variant]
        where: Any = port if variant in ("bare", "socket") else url
        rate: float = trio.run(fn, where, concurrency, local)
        return rate

    if local:
        return run()
    proc = subprocess.Popen([sys.executable, __file__, "--respond", variant, url, str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != "READY":
            if proc.poll() is not None:
                raise RuntimeError(f"the {variant} responder exited with {proc.returncode}")
        return run()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def measure_apart(variant: str, url: str, port: int, concurrency: int, local: bool
                  ) -> float:
    """:func:`measure` in a fresh process, so that no variant inherits another's heap,
    garbage or event-loop policy (trio-asyncio installs one)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", variant, url, str(port), str(concurrency),
         "local" if local else "split"], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RATE "):
            return float(line[5:])
    raise RuntimeError(f"{variant} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip().splitlines()[-1:] or proc.stdout[-200:]}")


def main() -> None:
    quiet_logging()
    emit("nats_info", 0, "-", what="request/reply echo, both ends on one loop, loopback",
         **python_info())
    absent = missing()
    for package, used_by in absent.items():
        emit("nats_missing", 0, "-", package=package, skipped=used_by,
             fix="pip install -e '.[bench]'")
    variants = ["otpy", "bare", "socket"]
    if "nats-py" not in absent:
        variants.append("natspy")
        if "trio-asyncio" not in absent:
            variants.append("natspy_trio")
    server = start_server_blocking(jetstream=False)
    try:
        rates: dict[tuple[str, str], list[float]] = {}
        failed: dict[str, str] = {}
        loads = [(f"{load}_{shape}", conc, shape == "local")
                 for shape in ("local", "split")
                 for load, conc in (("seq", 1), ("c64", CONCURRENCY))]
        for _ in range(ROUNDS):
            for load, conc, local in loads:
                for variant in variants:
                    if variant in failed or (variant == "socket" and not local):
                        continue
                    try:
                        rate = measure_apart(variant, server.url, server.port, conc, local)
                    except Exception as exc:  # a bridge that does not work here is a result
                        failed[variant] = f"{type(exc).__name__}: {exc}"
                        traceback.print_exc(file=sys.stderr)
                        continue
                    rates.setdefault((variant, load), []).append(rate)
        for variant, error in failed.items():
            emit(f"nats_{variant}_failed", 0, "-", error=error)
        for (variant, load), values in sorted(rates.items()):
            emit(f"nats_{variant}_{load}", max(values), "req/s", rounds=values)
        lat: dict[bool, list[list[float]]] = {True: [], False: []}
        for _ in range(ROUNDS):
            for direct in (True, False):
                lat[direct].append(trio.run(otpy_latency, server.url, direct))
        for direct, runs in lat.items():
            tag = "direct" if direct else "writer"
            how = ("the first send of a turn made at once" if direct
                   else "every send through the writer task")
            for q, label in ((0.01, "p1"), (0.5, "p50"), (0.99, "p99")):
                values = [percentile(r, q) for r in runs]
                emit(f"nats_otpy_rtt_{tag}_{label}", statistics.median(values), "us",
                     what=f"sequential round trip, {label}, median of rounds; {how}",
                     rounds=values)
        for load, _, _ in loads:
            ours = rates.get(("otpy", load))
            for base in ("natspy", "natspy_trio", "bare", "socket"):
                theirs = rates.get((base, load))
                if not ours or not theirs or len(ours) != len(theirs):
                    continue
                paired = [a / b for a, b in zip(ours, theirs, strict=True)]
                emit(f"nats_otpy_vs_{base}_{load}", max(ours) / max(theirs), "x",
                     what=f"otpy / {base}, best over best", paired=paired,
                     paired_median=statistics.median(paired))
    finally:
        server.stop()


def profile() -> None:
    """Where a sequential request's time goes in otpy's client: the responder runs in a
    process of its own; the requester's process is measured for CPU per request
    (without the profiler) and then profiled (cProfile, top functions by own time)."""
    quiet_logging()
    server = start_server_blocking(jetstream=False)
    proc = subprocess.Popen([sys.executable, __file__, "--respond", "otpy", server.url,
                             str(server.port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != "READY":
            pass
        for conc in (1, CONCURRENCY):
            cpu0, wall0 = time.process_time(), clock()
            rate = trio.run(run_otpy, server.url, conc, False)
            cpu, wall = time.process_time() - cpu0, clock() - wall0
            requests = rate * SECONDS  # those counted; the warm-up ran too
            emit(f"nats_profile_cpu_per_request_c{conc}", cpu / wall * 1e6 / rate, "us",
                 what="requester process CPU per request (responder elsewhere)",
                 rate=rate, cpu_share=cpu / wall, requests=requests)
        prof = cProfile.Profile()
        prof.enable()
        rate = trio.run(run_otpy, server.url, 1, False)
        prof.disable()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        server.stop()
    print(f"otpy sequential under cProfile: {rate:.0f} req/s", file=sys.stderr)
    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--respond"]:
        quiet_logging()
        respond(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["--one"]:
        quiet_logging()
        _, _, variant, url, port, conc, shape = sys.argv
        rate = measure(variant, url, int(port), int(conc), shape == "local")
        print(f"RATE {rate}", flush=True)
    elif "--profile" in sys.argv:
        profile()
    else:
        t0 = time.perf_counter()
        main()
        emit("nats_bench_seconds", time.perf_counter() - t0, "s")

"""HTTP speed: which stack a node's HTTP endpoint is built on, and what a call through
it costs, beside a bare uvicorn app measured in the same run.

Driven by ``wrk`` (Debian's package; ``make bench`` installs it) with one thread, so
that on a 2-core machine the load has one core and the server the other. Each server
runs in its own process, started and stopped (by pid) here; every stack is measured
with 1 and with 16 keep-alive connections, several interleaved rounds, best kept.

Bare "return 200" handlers (the stack's own ceiling):

- ``uvicorn``: uvicorn + httptools on asyncio, a bare ASGI app (what a FastAPI user
  runs, without FastAPI's own cost);
- ``hypercorn_trio``: hypercorn's trio worker, the same bare ASGI app;
- ``trio_h11``: a minimal trio loop over h11;
- ``trio_httptools``: a minimal trio loop over httptools (llhttp);
- ``otpy_bare``: otpy's own server (``otpy._serve.http``) with a router that answers
  200 at once.

The call path: ``otpy_call``: ``POST /call/echo`` with a small JSON body through
otpy's endpoint to an idle server that replies with its request (wrk's Lua script sets
method, body and content type). Its ratio to ``uvicorn``'s bare figure is the goal of
issue #14 (floor 0.5x, aim >= 1x). ``json_share`` measures, in process, the time of the
JSON decoding of the request and encoding of the reply against the server's CPU time per
call.

Each stack's ``_cpu_us`` is the CPU time its server process used per request while wrk
ran (from /proc): less disturbed by other load on the machine than the rates, which
on a shared 2-core machine swing by 2x from run to run.

    python bench/bench_http.py            # JSON lines, about a minute
    python bench/bench_http.py --quick    # one round, shorter runs
    BENCH_HTTP_STACKS=uvicorn,otpy_call python bench/bench_http.py   # some stacks only

uvicorn, hypercorn and h11 come with ``pip install -e '.[bench]'``; a stack whose
package is missing is reported as ``{"bench": ..., "missing": ...}`` and skipped.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from functools import partial
from pathlib import Path
from typing import Any

from _common import emit, python_info, quiet_logging

HERE = Path(__file__).resolve().parent
ROUNDS = 3
SECONDS = 2
CONNECTIONS = (1, 16)
BODY = b'["echo", "hello", 1]'
STACKS = ("uvicorn", "hypercorn_trio", "trio_h11", "trio_httptools", "otpy_bare",
          "otpy_call")
NEEDS = {"uvicorn": "uvicorn", "hypercorn_trio": "hypercorn", "trio_h11": "h11"}
RESPONSE_200 = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n"
                b"\r\nok")


# -- the servers, each in its own process ---------------------------------------------


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: 200 "ok" to every request."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve_uvicorn(sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(asgi_app, http="httptools", loop="asyncio", lifespan="off",
                            log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def serve_hypercorn(sock: socket.socket) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.loglevel = "WARNING"
    config.accesslog = None
    trio.run(serve, asgi_app, config)  # type: ignore[arg-type]


def serve_trio_h11(sock: socket.socket) -> None:
    import h11
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    continue
                if isinstance(event, h11.EndOfMessage):
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[
                            ("content-type", "text/plain"), ("content-length", "2")]))
                        + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return

    async def main() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(handle, [listener])

    trio.run(main)


def serve_trio_httptools(sock: socket.socket) -> None:
    import httptools
    import trio

    class Protocol:
        def __init__(self) -> None:
            self.done = 0

        def on_message_complete(self) -> None:
            self.done += 1

    async def handle(stream: trio.SocketStream) -> None:
        proto = Protocol()
        parser = httptools.HttpRequestParser(proto)
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                parser.feed_data(data)
                if proto.done:
                    await stream.send_all(RESPONSE_200 * proto.done)
                    proto.done = 0
        except (trio.BrokenResourceError, httptools.HttpParserError):
            return

    async def main() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(handle, [listener])

    trio.run(main)


def serve_otpy(call: bool) -> None:
    import trio

    import otpy
    from otpy._protocol.http1 import Request, Response
    from otpy._serve.http import HttpLimits, serve_http, serve_router

    class Echo(otpy.GenServer[None]):
        vsn = "1"

        def init(self, arg: Any) -> None:
            return None

        def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
            return otpy.Reply(request, state)

    class Bare:
        def route(self, request: Request) -> Response:
            return Response(200, b"ok", "text/plain")

    async def main() -> None:
        limits = HttpLimits(max_connections=64)
        address = ("127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            if not call:
                _, port = await nursery.start(partial(serve_router, Bare(), address,
                                                      limits=limits))
                print(port, flush=True)
                return
            root = otpy.Supervisor([otpy.Child("echo", Echo)])
            async with otpy.open_node(root) as node:
                _, port = await nursery.start(partial(serve_http, node._rt, address,
                                                      limits=limits, cookie=b"bench"))
                print(port, flush=True)
                await trio.sleep_forever()

    trio.run(main)


def serve(stack: str) -> None:
    """Bind a free loopback port, print it, and serve ``stack`` on it until killed."""
    quiet_logging()
    if stack.startswith("otpy"):
        serve_otpy(call=stack == "otpy_call")
        return
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted sockets only when
    # the listener's proto says TCP (uvicorn then avoids Nagle's 40 ms stalls); trio sets
    # it on every SocketStream.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print(sock.getsockname()[1], flush=True)
    if stack == "uvicorn":
        serve_uvicorn(sock)
    elif stack == "hypercorn_trio":
        serve_hypercorn(sock)
    elif stack == "trio_h11":
        serve_trio_h11(sock)
    else:
        serve_trio_httptools(sock)


# -- the driver ----------------------------------------------------------------------

LUA_POST = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def missing(stack: str) -> str | None:
    """The package a stack needs that is not installed, if any."""
    module = NEEDS.get(stack)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return module
    return None


def run_wrk(port: int, connections: int, seconds: float, path: str,
            script: str | None) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=seconds + 30).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None:
        raise SystemExit(f"wrk printed no rate:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_errors = re.search(r"Socket errors: (.*)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_us = None
    if p99:
        p99_us = float(p99.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[p99.group(2)]
    return {"rate": float(rate.group(1)), "requests": int(total.group(1)) if total else 0,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sock_errors.group(1) if sock_errors else None,
            "p99_us": p99_us}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(stack: str, connections: int, seconds: float, script: str) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", stack],
                            stdout=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        # wrk's first connection may race the server's loop start; it is bound already,
        # so the kernel queues it: no retry needed.
        call = stack == "otpy_call"
        before = cpu_seconds(proc.pid)
        got = run_wrk(port, connections, seconds, "/call/echo" if call else "/",
                      script if call else None)
        used = cpu_seconds(proc.pid) - before
        got["cpu_us"] = used / got["requests"] * 1e6 if got["requests"] else math.nan
        return got
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def json_share(call_us: float) -> None:
    """The JSON work of one call, in process, against the server's CPU time per call."""
    from otpy._protocol.json_rules import decode_json, encode_json

    n = 20000
    request = decode_json(BODY)
    decode = min(timeit.repeat(lambda: decode_json(BODY), number=n, repeat=5)) / n * 1e6
    encode = min(timeit.repeat(lambda: encode_json(request), number=n, repeat=5)) / n * 1e6
    emit("http_json_us", round(decode + encode, 3), "us", decode_us=round(decode, 3),
         encode_us=round(encode, 3), body=BODY.decode(),
         what="JSON decode of the request body + encode of the reply, per call")
    emit("http_json_share", round((decode + encode) / call_us, 4), "fraction",
         call_us=round(call_us, 2),
         what="JSON time / the server's CPU time per call (16 connections)")


def main(quick: bool) -> None:
    quiet_logging()
    if shutil.which("wrk") is None:
        raise SystemExit("bench_http needs wrk: apt-get install -y wrk (make bench does)")
    rounds, seconds = (1, 2) if quick else (ROUNDS, SECONDS)
    stacks = []
    only = os.environ.get("BENCH_HTTP_STACKS")
    for stack in only.split(",") if only else STACKS:
        lack = missing(stack)
        if lack:
            emit(f"http_{stack}", float("nan"), "requests/s", missing=lack,
                 note=f"{lack} is not installed: pip install -e '.[bench]'")
        else:
            stacks.append(stack)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "post.lua")
        Path(script).write_text(LUA_POST % BODY.decode())
        for _ in range(rounds):
            for conns in CONNECTIONS:
                for stack in stacks:
                    got = measure(stack, conns, seconds, script)
                    key = (stack, conns)
                    runs = [*best.get(key, {}).get("runs", []), round(got["rate"])]
                    cpu = [*best.get(key, {}).get("cpu_runs", []), got["cpu_us"]]
                    if key not in best or got["rate"] > best[key]["rate"]:
                        best[key] = got
                    best[key]["runs"] = runs
                    best[key]["cpu_runs"] = cpu
                    time.sleep(0.2)
    for (stack, conns), got in sorted(best.items()):
        emit(f"http_{stack}_c{conns}", round(got["rate"]), "requests/s",
             connections=conns, runs=got["runs"], non_2xx=got["non_2xx"],
             socket_errors=got["socket_errors"], p99_us=got["p99_us"],
             seconds=seconds, tool="wrk -t1")
        emit(f"http_{stack}_c{conns}_cpu_us", round(min(got["cpu_runs"]), 2), "us",
             runs=[round(x, 2) for x in got["cpu_runs"]],
             what="the server process's CPU time per request (best of the rounds)")
    if "uvicorn" in stacks:
        for stack in stacks:
            if stack == "uvicorn":
                continue
            for conns in CONNECTIONS:
                base = best[("uvicorn", conns)]["rate"]
                emit(f"http_{stack}_c{conns}_vs_uvicorn",
                     round(best[(stack, conns)]["rate"] / base, 3), "x uvicorn bare",
                     goal=0.5 if stack == "otpy_call" else None)
    if "otpy_call" in stacks:
        json_share(min(best[("otpy_call", 16)]["cpu_runs"]))
    emit("http_info", 0, "", **python_info())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        main("--quick" in sys.argv)

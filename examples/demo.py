"""The otpy demo, run by ``make demo``: a supervision tree on one trio loop, a few
calls, a crash and its restart, told as a short account.

The tree holds the key-value store of ``kv_store.py`` and the counter of
``counter.py``::

    root (one_for_one)
    ├── counter
    ├── kv1
    └── sub (rest_for_one)
        ├── kv2
        └── kv3

Looking up the key ``"crash"`` makes a KVStore divide by zero. When kv2 crashes, its
rest_for_one supervisor restarts kv2 and the child started after it (kv3); kv1 and the
counter do not notice.

Then 500 counters are upgraded in process under load, a node in another process
(``python demo.py --serve``) is driven over TCP while the ``otpy`` command upgrades it
through its admin endpoint, a node of durable counters (``python demo.py --serve-durable
STORE``) is killed with SIGKILL under load and started again: every acknowledged
increment is still there. Last, two nodes in two processes form a cluster (``python
demo.py --cluster-node`` is the other one): a call by name crosses to the node that runs
the server, and a monitor hears when that node is killed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog
import trio
from counter import Counter
from kv_store import KVStore

import otpy


def tree() -> otpy.Supervisor:
    return otpy.Supervisor(
        [
            otpy.Child("counter", Counter),
            otpy.Child("kv1", KVStore),
            otpy.Supervisor(
                [otpy.Child("kv2", KVStore), otpy.Child("kv3", KVStore)],
                strategy="rest_for_one",
                name="sub",
            ),
        ],
        strategy="one_for_one",
        name="root",
    )


# -- telling the story ----------------------------------------------------------------


def one_line(_logger: Any, _method: str, event: dict[str, Any]) -> str:
    """Render a structlog event as one short line.

    otpy logs a crash as one event carrying the exception and its traceback; for the
    demo the exception's type and message are enough."""
    name = event.pop("event")
    exc = event.pop("exc_info", None)
    if isinstance(exc, BaseException):
        event["error"] = f"{type(exc).__name__}: {exc}"
    fields = " ".join(
        f"{key}={value}" if " " not in str(value) else f'{key}="{value}"'
        for key, value in event.items()
    )
    return f"    [{name}] {fields}"


def configure_logging() -> None:
    structlog.configure(
        processors=[one_line],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def heading(text: str) -> None:
    print(f"\n== {text}")


async def call(node: otpy.Node, name: str, request: Any) -> Any:
    """Call ``name`` and print the request and what came back."""
    print(f"Calling {name}: {request!r}")
    try:
        reply = await node.call(name, request)
    except otpy.ServerCrashed as exc:
        print(f"   -> {name} threw: {type(exc.__cause__).__name__}: {exc.__cause__}")
        return None
    print(f"   -> {reply!r}")
    return reply


def show_tree(node: otpy.Node, sup: str = "root", indent: str = "   ") -> None:
    for child in node.which_children(sup):
        restarts = f", restarted {child.restarts}x" if child.restarts else ""
        if child.kind == "supervisor":
            print(f"{indent}{child.id} (supervisor, {child.status}{restarts})")
            show_tree(node, child.id, indent + "   ")
        else:
            print(f"{indent}{child.id} ({child.status}, vsn {child.vsn}{restarts})")


# -- the chapters ---------------------------------------------------------------------


async def calls(node: otpy.Node) -> None:
    heading("Calls and casts: each one steps its server inline on the loop")
    await call(node, "counter", "incr")
    await call(node, "counter", "incr")
    print("Casting counter: 40")
    node.cast("counter", 40)
    await call(node, "counter", "count")
    await call(node, "kv1", ("store", "a", 1))
    await call(node, "kv2", ("store", "x", 1))
    await call(node, "kv3", ("store", "b", 2))
    await call(node, "kv2", ("lookup", "x"))


async def crash(node: otpy.Node) -> None:
    heading("A crash: kv2 divides by zero; rest_for_one restarts kv2 and kv3")
    await call(node, "kv2", ("lookup", "crash"))
    print("The restart happened inside that step: kv2 was never missing.")
    await call(node, "kv2", ("lookup", "x"))
    await call(node, "kv3", ("lookup", "b"))
    print("kv2 and kv3 started again from init: their data is gone.")
    print("kv1 and the counter were not touched:")
    await call(node, "kv1", ("lookup", "a"))
    await call(node, "counter", "count")


async def queued_behind_a_crash(node: otpy.Node) -> None:
    heading("Messages queued behind a crash are served by the restarted server")
    requests = [
        ("store", "y", 2),
        ("lookup", "crash"),
        ("store", "z", 3),
        ("lookup", "z"),
        ("lookup", "y"),
    ]
    replies: dict[int, str] = {}

    async def client(i: int, request: Any) -> None:
        try:
            replies[i] = repr(await node.call("kv2", request))
        except otpy.ServerCrashed as exc:
            replies[i] = f"ServerCrashed ({type(exc.__cause__).__name__})"

    print("Suspending kv2 and queueing 5 calls from 5 client tasks...")
    node.suspend("kv2")
    async with trio.open_nursery() as nursery:
        for i, request in enumerate(requests):
            nursery.start_soon(client, i, request)
            await trio.sleep(0)  # let each client queue its call, in this order
        print("Resuming kv2:")
        node.resume("kv2")
    for i, request in enumerate(requests):
        print(f"   {request!r:24} -> {replies[i]}")
    print("The calls after the crash were answered by the new kv2, in order;")
    print("('lookup', 'y') is None: 'y' was stored in the kv2 that crashed.")


RELEASES = Path(__file__).resolve().parent / "releases"


async def release_upgrade(node: otpy.Node) -> None:
    """Upgrade 500 live counters v1 -> v2 -> v3 from release files while four clients
    call them flat out, then downgrade twice; report what was kept and lost."""
    heading("A release upgrade under load")
    sys.path.insert(0, str(RELEASES))
    from counter_v1 import Counter as CounterV1

    n = 500
    await node.start_child("root", otpy.Supervisor(
        [otpy.Child(f"c{i}", CounterV1) for i in range(n)], name="counters"))
    made = failed = 0
    stop = False

    async def client(seed: int) -> None:
        nonlocal made, failed
        k = seed
        while not stop:
            k = (k * 7919 + 1) % n
            try:
                await node.call(f"c{k}", "incr")
                made += 1
            except otpy.OtpyError:
                failed += 1

    def counts() -> int:
        total = 0
        for i in range(n):
            state = node.get_state(f"c{i}")
            total += state if isinstance(state, int) else state[1]
        return total

    async with trio.open_nursery() as nursery:
        for c in range(4):
            nursery.start_soon(client, c)
        await trio.sleep(0.05)
        for step in ("v2.toml", "v3.toml", "downgrade", "downgrade"):
            before = made
            if step == "downgrade":
                report = await node.downgrade()
                what = f"downgrade from release {report['release']}"
            else:
                report = await node.upgrade(otpy.Release.load(RELEASES / step))
                what = f"upgrade to release {report['release']} ({step})"
            print(f"   {what}: {len(report['servers'])} servers now run vsn "
                  f"{node.vsn_of('c0')}, c0 state {node.get_state('c0')!r}; "
                  f"{made - before} calls answered meanwhile")
            await trio.sleep(0.05)
        stop = True
    kept = counts()
    print(f"   calls answered: {made}, failed: {failed}; the counters add up to {kept} "
          f"({'every increment kept' if kept == made else 'MISMATCH'})")
    print(f"   releases installed now: {[r.vsn for r in node.releases()]}")
    await node.terminate_child("root", "counters")
    await node.delete_child("root", "counters")


# -- over the network -------------------------------------------------------------------

N_REMOTE = 500
EXAMPLES = Path(__file__).resolve().parent


def serve() -> None:
    """``demo.py --serve``: a node of 500 counters (vsn 1) with both endpoints on free
    ports; prints the two bound addresses, then serves until its stdin closes."""
    sys.path.insert(0, str(RELEASES))
    from counter_v1 import Counter as CounterV1

    structlog.configure(
        processors=[one_line],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    root = otpy.Supervisor([otpy.Supervisor(
        [otpy.Child(f"c{i}", CounterV1) for i in range(N_REMOTE)], name="counters")])

    async def main(node: otpy.Node) -> None:
        assert node.address is not None and node.admin_address is not None
        print(*node.address, *node.admin_address, flush=True)
        await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)

    otpy.run(root, main, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))


def otpy_command(*args: str) -> list[str]:
    """The ``otpy`` console script installed beside this Python, or its module."""
    script = Path(sys.executable).parent / "otpy"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "otpy._cli", *args]  # pragma: no cover


async def read_line(stream: Any) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1024)
        if not chunk:
            raise RuntimeError("the node exited before telling its address")
        data += chunk
    return data.decode()


async def over_the_network() -> None:
    """Start a node in a subprocess, call its counters over TCP from 32 tasks on 4
    connections, and upgrade it with ``otpy upgrade`` meanwhile."""
    heading("Over the network: a node in another process, upgraded by the otpy command")
    with tempfile.TemporaryDirectory(prefix="otpy-demo-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "OTPY_COOKIE"}
        env["OTPY_COOKIE_FILE"] = os.path.join(tmp, "cookie")  # the node creates it
        proc = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--serve"], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            with trio.fail_after(30):
                host, port, admin_host, admin_port = (await read_line(proc.stdout)).split()
            mode = os.stat(env["OTPY_COOKIE_FILE"]).st_mode & 0o777
            print(f"Started `python demo.py --serve`: {N_REMOTE} counters (vsn 1), a "
                  f"client endpoint and an admin endpoint;")
            print(f"its cookie is a new file of mode {mode:o} in a temporary directory.")
            await drive_and_upgrade(host, int(port), f"{admin_host}:{admin_port}", env)
            await proc.stdin.aclose()  # the node's cue to shut its tree down
            with trio.fail_after(30):
                code = await proc.wait()
        finally:
            if proc.returncode is None:  # something above failed: do not leave it behind
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        print(f"The node shut down when its stdin closed (exit code {code}).")


async def drive_and_upgrade(host: str, port: int, admin: str, env: dict[str, str]) -> None:
    made = failed = 0
    worst = 0.0
    stop = False

    async def caller(client: otpy.Client, seed: int) -> None:
        nonlocal made, failed, worst
        k = seed
        while not stop:
            k = (k * 7919 + 1) % N_REMOTE
            start = trio.current_time()
            try:
                await client.call(f"c{k}", "incr")
                made += 1
            except otpy.OtpyError:
                failed += 1
            worst = max(worst, trio.current_time() - start)

    async def otpy_cli(*args: str) -> None:
        print(f"$ otpy {' '.join(args)}")
        # Run from the project's directory, so that the command shown is the one run.
        result = await trio.run_process(otpy_command(*args), env=env, capture_stdout=True,
                                        check=False, cwd=EXAMPLES.parent)
        for line in result.stdout.decode().splitlines():
            print(f"   {line}")
        if result.returncode:
            print(f"   (exit code {result.returncode})")

    print(f"Load: 4 TCP connections to {host}:{port}, 8 callers on each, calling "
          f"'incr' on counters in turn...")
    async with otpy.connect(host, port) as c1, otpy.connect(host, port) as c2, \
            otpy.connect(host, port) as c3, otpy.connect(host, port) as c4:
        async with trio.open_nursery() as nursery:
            for i, client in enumerate((c1, c2, c3, c4) * 8):
                nursery.start_soon(caller, client, i)
            await trio.sleep(0.3)
            before = made
            release = (RELEASES / "v2.toml").relative_to(EXAMPLES.parent)
            await otpy_cli("upgrade", str(release), "--node", admin)
            during = made - before
            await otpy_cli("state", "c0", "--node", admin)
            print("   (counter v2's state: the count when v2 came, and the count)")
            await trio.sleep(0.3)
            stop = True
        print(f"   calls over TCP: {made} made, {failed} failed; worst latency "
              f"{worst * 1000:.1f} ms; {during} answered while `otpy upgrade` ran")
        counts = [await c1.call(f"c{i}", "count") for i in range(N_REMOTE)]
        print(f"   the counters, read back over TCP, add up to {sum(counts)}")
        if failed == 0 and sum(counts) == made:
            print("   => no call failed, no increment was lost")
        else:
            print(f"   => MISMATCH: {failed} calls failed, {made - sum(counts)} increments lost")


# -- durable servers: a kill -9 under load ------------------------------------------------

N_DURABLE = 16


class DurableCounter(otpy.GenServer[int]):
    """A counter whose state is kept in the node's store (``durable = True``)."""

    vsn = "1"
    durable = True

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)  # recorded before this reply leaves
        return otpy.Reply(state, state)


def serve_durable(store: str) -> None:
    """``demo.py --serve-durable STORE``: a node of durable counters on a free port;
    prints its port, then serves until it is killed."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    root = otpy.Supervisor([otpy.Child(f"d{i}", DurableCounter) for i in range(N_DURABLE)])

    async def main(node: otpy.Node) -> None:
        assert node.address is not None
        print(node.address[1], flush=True)
        await trio.sleep_forever()

    otpy.run(root, main, listen=("127.0.0.1", 0), store=store)


async def start_durable(store: str) -> tuple[trio.Process, int]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve-durable", store], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with trio.fail_after(30):
        return proc, int(await read_line(proc.stdout))


async def kill_9_under_load() -> None:
    """Run durable counters in a node process, increment them from 16 clients, kill the
    node with SIGKILL mid-load, start it again on the same store, and compare."""
    heading("Durable servers: the node is killed with SIGKILL under load, then restarted")
    with tempfile.TemporaryDirectory(prefix="otpy-demo-store-") as tmp:
        store = os.path.join(tmp, "store")
        proc, port = await start_durable(store)
        acked = [0] * N_DURABLE
        print(f"Started `python demo.py --serve-durable STORE`: {N_DURABLE} durable counters; "
              f"16 clients increment them over TCP and note every acknowledged count.")
        try:
            async def client(i: int) -> None:
                async with otpy.connect("127.0.0.1", port) as conn:
                    while True:
                        try:
                            acked[i] = await conn.call(f"d{i}", "incr")
                        except (otpy.ConnectionLost, OSError, trio.BrokenResourceError):
                            return

            async with trio.open_nursery() as nursery:
                for i in range(N_DURABLE):
                    nursery.start_soon(client, i)
                await trio.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                with trio.fail_after(30):
                    await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        print(f"   killed with SIGKILL after {sum(acked)} acknowledged increments "
              f"(exit code {proc.returncode})")
        proc, port = await start_durable(store)
        try:
            async with otpy.connect("127.0.0.1", port) as conn:
                found = [await conn.call(f"d{i}", "get") for i in range(N_DURABLE)]
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        lost = sum(max(0, a - f) for a, f in zip(acked, found, strict=True))
        print(f"   started again on the same store: the counters hold {sum(found)} "
              f"increments (an increment in flight at the kill may be there, unacknowledged)")
        if lost == 0:
            print("   => every acknowledged increment was kept: 0 lost")
        else:
            print(f"   => MISMATCH: {lost} acknowledged increments lost")


# -- a cluster ------------------------------------------------------------------------


class Ledger(otpy.GenServer[int]):
    """A running total: ``("add", n)`` answers the new total; ``"pid"`` its pid."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "pid":
            return otpy.Reply(self.pid, state)
        _, n = request
        return otpy.Reply(state + n, state + n)


class Watcher(otpy.GenServer[list[Any]]):
    """Monitors what it is asked to; keeps the ServerDown messages it gets."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        if request == "downs":
            return otpy.Reply(state, state)
        return otpy.Reply(self.monitor(request), state)

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, (trio.current_time(), message)]


def cluster_node() -> None:
    """``demo.py --cluster-node``: node b of cluster "demo", running ``ledger`` with
    scope="cluster"; prints READY, then serves until its stdin closes (or it is
    killed)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    root = otpy.Supervisor([otpy.Child("ledger", Ledger, scope="cluster")])

    async def main(node: otpy.Node) -> None:
        print("READY", flush=True)
        await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)

    otpy.run(root, main, cluster=True, cluster_name="demo", node_name="b")


async def a_cluster() -> None:
    heading("A cluster: two nodes in two processes, one namespace")
    # Nodes started with cluster=True meet in $XDG_RUNTIME_DIR/otpy/<cluster>, through
    # the nats-server the first of them starts. Here that is a temporary directory, so
    # that this run of the demo is a cluster of its own.
    saved = os.environ.get("XDG_RUNTIME_DIR")
    with tempfile.TemporaryDirectory(prefix="otpy-demo-cluster-") as meet:
        os.environ["XDG_RUNTIME_DIR"] = meet
        proc = await trio.lowlevel.open_process([sys.executable, __file__, "--cluster-node"],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            with trio.fail_after(30):
                await read_line(proc.stdout)
            print("Started `python demo.py --cluster-node`: node b of cluster 'demo', "
                  "running 'ledger' with scope=\"cluster\".")
            print("This process is node a of the same cluster; it calls 'ledger' by name.")
            root = otpy.Supervisor([otpy.Child("watcher", Watcher)])
            async with otpy.open_node(root, cluster=True, cluster_name="demo",
                                      node_name="a") as a:
                await across(a, proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            if saved is None:
                del os.environ["XDG_RUNTIME_DIR"]
            else:
                os.environ["XDG_RUNTIME_DIR"] = saved


async def across(a: otpy.Node, proc: trio.Process) -> None:
    with trio.fail_after(30):
        while (a.cluster_info() or {}).get("names", {}).get("ledger") != "b":
            await trio.sleep(0.01)
    await a.call("watcher", "ledger")
    print("A watcher on node a monitors ledger (a monitor across nodes).")
    await call(a, "ledger", ("add", 5))
    await call(a, "ledger", ("add", 37))
    pid = await a.call("ledger", "pid")
    print(f"   ledger's pid is {pid}: it runs on node {pid.node}")
    info = a.cluster_info()
    assert info is not None
    print(f"Node a's view: members {info['members']}, names {info['names']}")
    print("Now node b is killed with SIGKILL...")
    killed = trio.current_time()
    proc.kill()
    with trio.fail_after(10):
        while not await a.call("watcher", "downs"):
            await trio.sleep(0.005)
    [(when, down)] = await a.call("watcher", "downs")
    print(f"   watcher got ServerDown(reason={down.reason!r}) "
          f"{(when - killed) * 1000:.0f} ms after the kill")
    try:
        await a.call("ledger", ("add", 1))
    except otpy.ServerStopped as exc:
        print(f"   a call to ledger now: ServerStopped, reason {exc.reason!r}")


async def main() -> None:
    configure_logging()
    print("otpy demo: one trio loop steps every server inline, in a supervision tree.")
    heading("Starting the tree: depth-first, in list order")
    async with otpy.open_node(tree()) as node:
        show_tree(node)
        await calls(node)
        await crash(node)
        await queued_behind_a_crash(node)
        await release_upgrade(node)
        heading("The tree now")
        show_tree(node)
        heading("Shutting down: children stop in reverse start order")
    await over_the_network()
    await kill_9_under_load()
    await a_cluster()
    print("\nDone.")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    elif sys.argv[1:2] == ["--serve-durable"]:
        serve_durable(sys.argv[2])
    elif sys.argv[1:] == ["--cluster-node"]:
        cluster_node()
    else:
        trio.run(main)

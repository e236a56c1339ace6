"""Many cores, one service: N otpy nodes on N cores of one machine.

    python examples/many_cores.py [NODES] [SECONDS]

One trio loop uses one core. To use N cores, run N nodes, one process each, in one
cluster: ``open_node(root, cluster=True, ...)`` (here through ``otpy.run``) makes the
nodes of one machine meet through a nats-server they share, started by the first node
that needs it and stopped by the last one that leaves.

The service is 64 counters ``c0`` .. ``c63``, each started with ``scope="cluster"`` so
that any node reaches it by name, and sharded: node ``n<i>`` starts the counters whose
number is ``i`` modulo N. Each node also runs 32 client tasks, in two phases:

1. each client calls the counters of its own node's shard: what a sharded service does
   when it routes each request to the node that owns its key (every call is local);
2. each client calls counters of every node in turn: (N - 1) / N of the calls cross to
   another node, through NATS, as msgpack.

The script prints each phase's throughput, then checks that every call incremented
exactly one counter once: the nodes' call counts add up to the counters' totals.

NODES defaults to the machine's cores (at most 8), SECONDS (per phase) to 0.5. Where
the nodes meet: ``$XDG_RUNTIME_DIR/otpy/<cluster name>`` (else
``<tmp>/otpy-<uid>/<cluster name>``); this script points ``XDG_RUNTIME_DIR`` at a
temporary directory of its own, so that each run is a cluster of its own and leaves
nothing behind. See docs/cluster.md.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import structlog
import trio

import otpy

COUNTERS = 64
CLIENTS = 32
CLUSTER = "many-cores"


class Counter(otpy.GenServer[int]):
    """Answers ``"incr"`` with the new count; ``"count"`` reads it."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        return otpy.Reply(state, state)


# -- one node (a process of its own) ---------------------------------------------------------


def node_main(index: int, nodes: int, seconds: float) -> None:
    """Node ``n<index>``: its shard of the counters, and its clients. Talks to the
    coordinator on stdin/stdout, one JSON line each way per step."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    shard = [f"c{k}" for k in range(COUNTERS) if k % nodes == index]
    every = [f"c{k}" for k in range(COUNTERS)]
    root = otpy.Supervisor([otpy.Child(name, Counter, scope="cluster") for name in shard])

    async def line() -> str:
        return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)

    async def phase(node: otpy.Node, targets: list[str]) -> int:
        calls = [0] * CLIENTS
        end = time.monotonic() + seconds

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < end:
                await node.call(targets[i % len(targets)], "incr")
                calls[k] += 1
                i += 1

        async with trio.open_nursery() as nursery:
            for k in range(CLIENTS):
                nursery.start_soon(client, k)
        return sum(calls)

    async def main(node: otpy.Node) -> None:
        with trio.fail_after(60):  # every node's shard registered: the service is up
            while len(node.cluster_info()["names"]) < COUNTERS:  # type: ignore[index]
                await trio.sleep(0.01)
        print(json.dumps({"ready": shard}), flush=True)
        results = {}
        for name, targets in (("own", shard), ("every", every)):
            await line()  # go
            results[name] = await phase(node, targets)
            print(json.dumps({name: results[name]}), flush=True)
        await line()  # every node's clients are done: count
        total = sum([await node.call(name, "count") for name in shard])
        print(json.dumps({"counted": total}), flush=True)
        await line()  # everyone has counted: leave

    otpy.run(root, main, cluster=True, cluster_name=CLUSTER, node_name=f"n{index}")


# -- the coordinator -------------------------------------------------------------------------


def rate(calls: float, seconds: float) -> str:
    per = calls / seconds
    return f"{per / 1000:.1f}k calls/s" if per >= 1000 else f"{per:.0f} calls/s"


def main() -> None:
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else min(os.cpu_count() or 1, 8)
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    print(f"Starting {nodes} nodes, one process each, in one cluster (cluster=True: they "
          f"share this machine's nats-server)")
    with tempfile.TemporaryDirectory(prefix="otpy-many-cores-") as meet:
        env = {**os.environ, "XDG_RUNTIME_DIR": meet}
        procs = [subprocess.Popen([sys.executable, __file__, "--node", str(i), str(nodes),
                                   str(seconds)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(nodes)]
        try:
            run(procs, seconds)
        finally:
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.close()  # a node that is still waiting leaves
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run(procs: list[subprocess.Popen[str]], seconds: float) -> None:
    def tell(text: str) -> None:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(text + "\n")
            proc.stdin.flush()

    def hear() -> list[dict[str, Any]]:
        answers = []
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            text = proc.stdout.readline()
            if not text:
                raise SystemExit(f"node n{i} exited with {proc.wait()}")
            answers.append(json.loads(text))
        return answers

    for i, answer in enumerate(hear()):
        shard = answer["ready"]
        print(f"   node n{i} runs {len(shard)} counters: {', '.join(shard[:4])}, ...")
    print(f"All {COUNTERS} counters are registered in the cluster; every node sees them.")
    calls = 0
    for name, what in (("own", "the counters of its own node (routed to their owner)"),
                       ("every", f"counters on every node ({len(procs) - 1} in "
                                 f"{len(procs)} calls cross to another node)")):
        print(f"== {CLIENTS} clients on each node call {what}")
        tell("go")
        counts = [answer[name] for answer in hear()]
        for i, count in enumerate(counts):
            print(f"   n{i}: {rate(count, seconds)}")
        print(f"   all {len(procs)} nodes: {rate(sum(counts), seconds)}")
        calls += sum(counts)
    tell("count")
    counted = sum(answer["counted"] for answer in hear())
    if counted != calls:
        raise SystemExit(f"{calls} calls were answered, but the counters counted {counted}")
    print("Every call incremented one counter, once.")
    tell("leave")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--node"]:
        node_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()

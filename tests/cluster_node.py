"""A cluster node in a process of its own, for tests/test_cluster_faults.py to kill,
freeze, race and feed garbage.

    python cluster_node.py URL CLUSTER NODE [--go] [--cut-after SECONDS] [--durable]
                                            [--listen]

runs ``otpy.run(tree, cluster=URL, cluster_name=CLUSTER, node_name=NODE)`` with two
:class:`Echo` servers: ``kv`` (``scope="cluster"``) and ``local`` (this node's own,
reached as ``local@NODE``). With ``--durable``, ``kv`` is a :class:`DurableCounter`
under a cluster supervisor ``svc`` (its state in the cluster's store; another node
takes it over). With ``--listen``, the node also serves MessagePack-RPC on a free port
and prints ``PORT <n>`` before ``READY``. It prints ``READY`` on stdout once the node runs; with
``--go`` it first prints ``LOADED`` and waits for a line on stdin, so that racing
processes start their nodes together. A start that fails prints the error on stderr
and exits 1. The node stops on SIGTERM, or when stdin closes (its test is gone). Log
events go to stderr, at info level and above.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
import trio

import otpy


class Echo(otpy.GenServer[dict[int, int]]):
    """Answers ``("echo", i)`` with itself, counting how often each ``i`` was served
    (``"served"`` returns the counts); ``"later"`` is never answered."""

    vsn = "1"

    def init(self, arg: Any) -> dict[int, int]:
        return {}

    def handle_call(self, request: Any, caller: otpy.Caller, state: dict[int, int]) -> Any:
        if request == "served":
            return otpy.Reply(state, state)
        if request == "later":
            return otpy.NoReply(state)
        if request == "node":
            return otpy.Reply(self.pid.node, state)
        _, i = request
        state[i] = state.get(i, 0) + 1
        return otpy.Reply(request, state)


class DurableCounter(otpy.GenServer[int]):
    """A durable counter: ``"incr"`` adds one and answers the count; ``"get"`` and
    ``"node"`` answer the count and the node it runs on."""

    vsn = "1"
    durable = True

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        if request == "node":
            return otpy.Reply(self.pid.node, state)
        return otpy.Reply(state, state)


def main() -> int:
    url, cluster, node_name, *rest = sys.argv[1:]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    options: dict[str, float] = {}
    if "--cut-after" in rest:
        options["cut_after"] = float(rest[rest.index("--cut-after") + 1])
    if "--go" in rest:
        print("LOADED", flush=True)
        sys.stdin.readline()
    if "--durable" in rest:
        # The class by its module's name, as the test's own node imports it, so that
        # a state one node records is the same class's on the other.
        from cluster_node import DurableCounter as Counter

        kv: otpy.Supervisor | otpy.Child = otpy.Supervisor(
            [otpy.Child("kv", Counter, scope="cluster")], name="svc", scope="cluster")
    else:
        kv = otpy.Child("kv", Echo, scope="cluster")
    root = otpy.Supervisor([kv, otpy.Child("local", Echo)])
    more: dict[str, Any] = {"listen": ("127.0.0.1", 0)} if "--listen" in rest else {}

    async def serve(node: otpy.Node) -> None:
        if node.address is not None:
            print(f"PORT {node.address[1]}", flush=True)
        print("READY", flush=True)
        # Until stdin closes: a node whose test died does not outlive it.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    try:
        otpy.run(root, serve, cluster=url, cluster_name=cluster, node_name=node_name,
                 cluster_options=options or None, **more)
    except otpy.OtpyError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

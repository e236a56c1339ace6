"""A cluster node in a process of its own, for tests/test_cluster_faults.py to kill,
freeze, race and feed garbage.

    python cluster_node.py URL CLUSTER NODE [--go] [--cut-after SECONDS]

runs ``otpy.run(tree, cluster=URL, cluster_name=CLUSTER, node_name=NODE)`` with two
:class:`Echo` servers: ``kv`` (``scope="cluster"``) and ``local`` (this node's own,
reached as ``local@NODE``). It prints ``READY`` on stdout once the node runs; with
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
    root = otpy.Supervisor([otpy.Child("kv", Echo, scope="cluster"),
                            otpy.Child("local", Echo)])

    async def serve(node: otpy.Node) -> None:
        print("READY", flush=True)
        # Until stdin closes: a node whose test died does not outlive it.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    try:
        otpy.run(root, serve, cluster=url, cluster_name=cluster, node_name=node_name,
                 cluster_options=options or None)
    except otpy.OtpyError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A node joins its cluster: NATS (embedded or given), membership, names, and leaving.

``open_node(root, cluster=True | "nats://host:port", cluster_name=..., node_name=...)``
uses :func:`open_cluster` around the tree: the node joins (and registers the tree's
cluster-scoped names) before the first ``init`` runs, and leaves after the last
``terminate``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio

from .._core.runtime import Runtime
from .._core.supervisor import Supervisor
from .nats_client import Client, NatsError
from .node import ClusterError, ClusterNode, cluster_specs
from .server import default_cluster_dir, open_shared_server

log = structlog.get_logger("otpy")

LEAVE_GRACE = 2.0


def default_node_name() -> str:
    """A node name unique on this machine: ``<host>-<pid>``."""
    host = re.sub(r"[^A-Za-z0-9_\-]", "-", socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{os.getpid()}"


@asynccontextmanager
async def open_cluster(rt: Runtime, cluster: str | bool, cluster_name: str,
                       root: Supervisor, **options: Any) -> AsyncIterator[ClusterNode]:
    """Join cluster ``cluster_name`` through the NATS server ``cluster`` (a URL, or True
    for the machine's shared embedded nats-server), register the cluster-scoped names
    of ``root``, and leave on exit. ``options`` go to :class:`ClusterNode`
    (``probe_interval``, ``cut_after``)."""
    shared = None
    if cluster is True:
        shared = await open_shared_server(default_cluster_dir(cluster_name))
        url = shared.url
    elif isinstance(cluster, str) and cluster:
        url = cluster
    else:
        raise TypeError(f"open_node(cluster=...) takes True (the embedded nats-server) or "
                        f"a URL such as 'nats://127.0.0.1:4222', got {cluster!r}")
    try:
        client = Client(url, name=f"otpy:{cluster_name}:{rt.sched.node}")
        try:
            await client.connect()
        except NatsError as exc:
            raise ClusterError(f"cannot reach the NATS server of cluster {cluster_name!r} "
                               f"at {url}: {exc}") from exc
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            node = ClusterNode(rt, client, cluster=cluster_name, **options)
            try:
                await node.join()
                await nursery.start(node.run)
                for name, supervisor in cluster_specs(root):
                    await node.register(name, supervisor)
                yield node
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_GRACE):
                    await node.leave()
                    await client.close()
                nursery.cancel_scope.cancel()
    finally:
        if shared is not None:
            await trio.to_thread.run_sync(shared.release)

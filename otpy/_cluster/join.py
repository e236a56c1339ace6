"""A node joins its cluster: NATS (embedded or given), membership, names, and leaving.

``open_node(root, cluster=True | "nats://host:port", cluster_name=..., node_name=...)``
uses :func:`open_cluster` around the tree: the node joins (and registers the tree's
cluster-scoped names) before the first ``init`` runs, and leaves after the last
``terminate``.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio

from .._core.runtime import Runtime
from .._core.supervisor import Supervisor
from .nats_client import Client, NatsError
from .node import (
    CUT_AFTER,
    FORGET_AFTER,
    PROBE_INTERVAL,
    ClusterError,
    ClusterNode,
    cluster_specs,
    durable_cluster_names,
    has_cluster_supervisor,
    token,
)
from .server import default_cluster_dir, open_shared_server
from .states import ClusterStates

log = structlog.get_logger("otpy")

LEAVE_GRACE = 2.0
CLUSTER_OPTIONS = {"probe_interval": PROBE_INTERVAL, "cut_after": CUT_AFTER,
                   "forget_after": FORGET_AFTER}


def check_cluster_options(options: Mapping[str, float] | None) -> dict[str, float]:
    """``open_node(cluster_options=...)`` checked: known keys, positive finite seconds,
    and ``cut_after`` longer than ``probe_interval`` (TypeError/ValueError saying
    which). Missing keys keep their defaults."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"open_node(cluster_options=...) takes a dict such as "
                        f"{{'cut_after': 1.0}}, got {options!r:.80}")
    unknown = sorted(set(options) - set(CLUSTER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown cluster option(s) {unknown}; the options are "
                        f"{sorted(CLUSTER_OPTIONS)}")
    checked = dict(CLUSTER_OPTIONS)
    for key, value in options.items():
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value <= 0):
            raise ValueError(f"cluster option {key!r} is a duration in seconds (a "
                             f"positive number), got {value!r:.80}")
        checked[key] = float(value)
    if checked["cut_after"] <= checked["probe_interval"]:
        raise ValueError(f"cluster option cut_after ({checked['cut_after']:g} s) must be "
                         f"longer than probe_interval ({checked['probe_interval']:g} s): "
                         f"a node is cut off when it misses the probes of that long")
    return {key: checked[key] for key in options}


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
                durable = durable_cluster_names(root)
                if durable or has_cluster_supervisor(root):
                    # Their states go to the cluster's bucket, so that another node
                    # resumes them; the ones this node runs are claimed before they
                    # start (see otpy._cluster.states). A cluster supervisor may be
                    # given durable children later (start_child): it needs it too.
                    states = await ClusterStates.open(client, token(cluster_name),
                                                      node=node.node, creation=node.creation)
                    await nursery.start(states.run)
                    node.states, node.state_names = states, durable
                    await states.claim_at_open(n for n in durable
                                               if n not in rt.sched.standby)
                yield node
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_GRACE):
                    if node.states is not None:
                        # What the tree's last steps recorded, acknowledged before
                        # the node leaves (its held replies wait for it).
                        await node.states.drain(LEAVE_GRACE / 2)
                        node.states.close()
                    await node.leave()
                    await client.close()
                nursery.cancel_scope.cancel()
    finally:
        if shared is not None:
            await trio.to_thread.run_sync(shared.release)

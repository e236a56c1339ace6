"""One node's part in a cluster on NATS: names, calls, casts and monitors across nodes.

The core resolves every address on its own node first; what names nothing there goes to
this module (it is the core's ``Remote``), which routes it over NATS:

- **Subjects.** Each node subscribes to ``otpy.<cluster>.node.<node>``: calls, casts
  and monitors of ``"name@node"`` and of its pids, and the other nodes' probes. A
  server started with ``scope="cluster"`` also gets ``otpy.<cluster>.name.<name>``,
  which any node reaches by name alone. A NATS request is a call, a publish a cast,
  and NATS's "no responders" is the call's :class:`otpy.NoSuchServer`, at once.
- **Registration.** Cluster-scoped names live in the JetStream KV bucket
  ``otpy-<cluster>-names``, written by compare-and-swap: a name is registered once;
  a second start anywhere fails naming the node that runs it. Every node watches the
  bucket, so it knows where each name runs without asking. Members are in
  ``otpy-<cluster>-nodes`` (a node name is used once at a time).
- **Delivery.** A message that arrives is delivered through the core's one call path
  (``Runtime.start_call`` with a caller that publishes the reply), never routed on:
  a target arrives as ``name@<this node>`` or a pid of this node.
- **Failure.** Each node probes the others every ``probe_interval`` (50 ms). A node
  whose process died stops answering at once (NATS drops its subscriptions: the probe
  gets "no responders"); one cut off silently stops answering within
  ``cut_after``. Either way, the calls in flight to it fail with
  :class:`otpy.ServerStopped` (reason ``"noconnection"``), and every monitor of its
  servers delivers ``ServerDown(..., "noconnection")``. When this node loses NATS, all
  the others are down to it.

What must stay true: nothing that arrives can crash the node (a malformed payload, a
message of another cluster: dropped with a ``cluster_message_dropped`` event, rate
limited); a request is answered at most once; a call's caller gets exactly one
answer; the core's local paths pay nothing for the cluster (it is consulted only when
an address names nothing local).
"""

from __future__ import annotations

import importlib
import re
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]
import structlog
import trio

from .._core.monitors import MonitorRef
from .._core.names import Pid, split_remote
from .._core.runtime import Runtime
from .._core.scheduler import CAST, INFO, Scheduler
from .._core.server import WAITING, Caller, GenServer
from .._exceptions import (
    CallTimeout,
    MailboxFull,
    NoSuchServer,
    OtpyError,
    ServerStopped,
    StartFailed,
    StoreError,
    remote_error,
)
from .._protocol import cluster as wire
from .._protocol.msgpack_rpc import encode_ext
from .jetstream import JetStream, KeyExists, KeyValue, KvChange, WrongRevision
from .nats_client import Client, Msg, NatsError, NoResponders, RequestTimeout
from .releases import NodeReleases, open_buckets
from .states import ClusterStates

if TYPE_CHECKING:
    from .._core.supervisor import Child

log = structlog.get_logger("otpy")

PROBE_INTERVAL = 0.05
CUT_AFTER = 5.0
REASSERT_FIRST, REASSERT_MAX = 0.25, 5.0  # pauses between re-assertions after a reconnect
FORGET_AFTER = 60.0  # seconds a member stays down before it is removed from the cluster
# A remote call with no timeout still needs one on the wire: a day.
NO_TIMEOUT = 86_400.0
_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
MAX_HELD = 10_000  # messages held while the node starts
_DROP_LOG_INTERVAL = 10.0


def token(name: str) -> str:
    """``name`` as one NATS subject token and one KV key: itself when it is made of
    letters, digits, ``_`` and ``-``; else ``=`` and its UTF-8 bytes in hex."""
    if _TOKEN.fullmatch(name):
        return name
    return "=" + name.encode().hex()


class ClusterError(OtpyError):
    """This node cannot take its place in the cluster (its name is used by a live node,
    NATS cannot be reached, JetStream is off)."""


class _Remote:
    """What a monitor of a server of another node points at (the core's
    ``ref._target``): the node, and the address as the watcher named it."""

    __slots__ = ("address", "remote_node")

    def __init__(self, node: str, address: Any) -> None:
        self.remote_node = node
        self.address = address


class _RemoteWatcher:
    """A monitor held by a server of another node: its ServerDown goes there."""

    __slots__ = ("cluster", "node")

    def __init__(self, cluster: ClusterNode, node: str) -> None:
        self.cluster = cluster
        self.node = node

    def down(self, ref: MonitorRef, pid: Any, reason: Any) -> None:
        self.cluster._remote_watchers.pop((self.node, ref.id), None)
        self.cluster._publish(self.node, wire.Down(ref.id, pid, reason))


class _NatsCaller(Caller):
    """The caller of a call that came over NATS: publishes the reply."""

    __slots__ = ("cluster", "subject")

    def __init__(self, cluster: ClusterNode, subject: str) -> None:
        self._status = WAITING
        self.cluster = cluster
        self.subject = subject  # the caller's reply subject

    def _resolve(self, value: Any) -> None:
        try:
            payload = wire.encode_reply(value)
        except wire.Unsendable as exc:
            payload = wire.encode_error("Unsendable", f"the reply {exc}")
        self.cluster._answer(self.subject, payload)

    def _reject(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.cluster._answer(self.subject, wire.encode_error(kind, str(exc) or kind))


class _Call:
    """A call this node made to another: answered once, by the reply or by its node's
    death, whichever comes first. It is its own request's waiter in the NATS client
    (``key``: the inbox, ``subject``: where it went)."""

    __slots__ = ("address", "caller", "cluster", "key", "node", "subject", "timeout")

    def __init__(self, cluster: ClusterNode, caller: Caller, node: str, address: Any,
                 timeout: float | None, subject: str) -> None:
        self.cluster = cluster
        self.caller = caller
        self.node = node
        self.address = address
        self.timeout = timeout
        self.subject = subject
        self.key = ""

    def __call__(self, result: Msg | NatsError) -> None:
        try:
            self._answer(result)
        except Exception as exc:  # the client's reader must go on
            log.error("cluster_call_answer_failed", address=repr(self.address)[:100],
                      exc_info=exc)

    def _answer(self, result: Msg | NatsError) -> None:
        calls = self.cluster._calls.get(self.node)
        if calls is not None:
            calls.discard(self)
        caller = self.caller
        if caller._status != WAITING:
            return
        if isinstance(result, Msg):
            ok, value = wire.decode_reply(result.payload)
            if ok:
                caller.reply(value)
            else:
                caller._fail(remote_error(*value))
        elif isinstance(result, NoResponders):
            caller._fail(NoSuchServer(self.address, f"nothing in cluster "
                                                    f"{self.cluster.cluster!r} serves it"))
        elif isinstance(result, RequestTimeout):
            caller._fail(CallTimeout(
                f"server {self.address!r} did not reply within {self.timeout:g} s; the "
                f"request may still be served, its reply will be dropped. Pass a larger "
                f"timeout= if it is expected to take longer"))
        else:
            self.fail_noconnection(f"the connection to the cluster failed ({result})")

    def fail_noconnection(self, why: str) -> None:
        self.caller._fail(ServerStopped(
            f"server {self.address!r} on node {self.node!r} cannot answer: {why}; the "
            f"request may or may not have been served", name=self.address,
            reason="noconnection"))


class ClusterNode:
    """A node's membership of a cluster (see the module doc); the core's Remote."""

    def __init__(self, rt: Runtime, client: Client, *, cluster: str,
                 probe_interval: float = PROBE_INTERVAL, cut_after: float = CUT_AFTER,
                 forget_after: float = FORGET_AFTER) -> None:
        self.rt = rt
        self.sched: Scheduler = rt.sched
        self.client = client
        self.js = JetStream(client)
        self.cluster = cluster
        self.node = self.sched.node
        self.creation = self.sched.creation
        self.probe_interval = probe_interval
        self.cut_after = cut_after
        self.forget_after = forget_after
        self.prefix = f"otpy.{token(cluster)}"
        self.members: dict[str, str] = {}  # node -> "up" | "down"
        # Members' entries in the members bucket (their revisions), and since when each
        # down member has been found down while this node was connected: one down for
        # forget_after is removed from the bucket (a node restarted under a new name
        # must not be probed for ever).
        self._member_revs: dict[str, int] = {}
        self._down_since: dict[str, float] = {}
        self._forgetting: set[str] = set()
        self._failed_over: set[str] = set()  # down members whose names were raced for
        self._reconnects = 0
        self._leaving = False
        self.names: dict[str, str] = {}  # cluster-scoped name -> node that runs it
        self._names_kv: KeyValue | None = None
        self._nodes_kv: KeyValue | None = None
        self._owned: dict[str, tuple[int, Any]] = {}  # our names: KV revision, sub
        self._name_revs: dict[str, int] = {}  # each name's registration's revision
        self._failover: dict[str, str] = {}  # cluster supervisor of each name that has one
        self._member_rev = 0
        self._calls: dict[str, set[_Call]] = {}  # node -> calls in flight to it
        # name -> (owner, subject, target) of a cluster-scoped name another node runs
        self._routes: dict[str, tuple[str, str, str]] = {}
        self._watching: dict[int, MonitorRef] = {}  # our monitors of remote servers
        self._remote_watchers: dict[tuple[str, int], MonitorRef] = {}
        self._probing: dict[str, float] = {}  # node -> when its probe went out
        self._last_answer: dict[str, float] = {}
        self._dropped = 0
        self._dropped_logged = 0.0
        self._node_sub: Any = None
        self._nursery: trio.Nursery | None = None
        self.releases: NodeReleases = None  # type: ignore[assignment]  # set by join
        # What arrives before the node serves (its tree starts, it catches up with the
        # cluster's releases) waits here; probes are answered at once.
        self._held: deque[Msg] | None = deque()
        self._behind: list[Msg] = []  # calls from nodes a release ahead, waiting
        # The cluster's store of durable states (otpy._cluster.states), when the tree
        # has durable cluster-scoped children, and their names.
        self.states: ClusterStates | None = None
        self.state_names: set[str] = set()
        # The specs of children added with start_child under a cluster supervisor, in
        # the bucket otpy-<cluster>-specs: every node keeps them as standbys, so that
        # such a child fails over as a child of the tree does. Until the tree runs
        # (serve), those seen wait here.
        self._specs_kv: KeyValue | None = None
        self._pending_specs: dict[str, KvChange] | None = {}
        self._dynamic: set[str] = set()  # names whose spec is in the specs bucket
        self._spec_values: dict[str, bytes] = {}  # the specs this node put there
        self._unforgotten: set[str] = set()  # deleted here, not yet in the bucket

    # -- subjects --------------------------------------------------------------------

    def node_subject(self, node: str) -> str:
        return f"{self.prefix}.node.{token(node)}"

    def name_subject(self, name: str) -> str:
        return f"{self.prefix}.name.{token(name)}"

    # -- joining and leaving ---------------------------------------------------------

    async def join(self) -> None:
        """Take this node's name in the cluster, subscribe, and learn the names and the
        members (ClusterError if a live node has the name)."""
        kv_prefix = f"otpy-{token(self.cluster).replace('=', '_')}"
        try:
            self._nodes_kv = await self.js.key_value(f"{kv_prefix}-nodes")
            self._names_kv = await self.js.key_value(f"{kv_prefix}-names")
            self._specs_kv = await self.js.key_value(f"{kv_prefix}-specs")
            self.releases = NodeReleases(self, *await open_buckets(self.js,
                                                                   token(self.cluster)))
        except NatsError as exc:
            raise ClusterError(f"cluster {self.cluster!r} needs JetStream on its NATS "
                               f"server (nats-server -js): {exc}") from exc
        self._node_sub = self.client.subscribe(self.node_subject(self.node),
                                               self._on_message)
        await self.client.flush()
        await self._claim_node_name()
        self.sched.remote = self
        self.client.add_listener(on_disconnect=self._on_disconnect,
                                 on_reconnect=self._on_reconnect)
        log.info("cluster_joined", cluster=self.cluster, node=self.node)

    async def _claim_node_name(self) -> None:
        assert self._nodes_kv is not None
        value = msgpack.packb((self.node, self.creation))
        key = token(self.node)
        for _ in range(3):  # KeyExists with no entry: created and deleted meanwhile
            try:
                self._member_rev = await self._nodes_kv.create(key, value)
                return
            except KeyExists as exc:
                existing = exc.existing
            if existing is not None:
                break
        else:
            raise ClusterError(f"the members entry of {self.node!r} in cluster "
                               f"{self.cluster!r} keeps changing; try again")
        if existing is not None:
            _node, creation = _unpack_pair(existing.value)
            if creation != self.creation and await self._alive(self.node, creation):
                raise ClusterError(
                    f"a node named {self.node!r} is already in cluster {self.cluster!r}; "
                    f"give this node another node_name")
            self._member_rev = await self._nodes_kv.update(key, value, existing.revision)

    async def _alive(self, node: str, creation: int | None = None) -> bool:
        """Whether ``node`` answers a probe now (with ``creation``: that run of it, so
        that this node, subscribed to its own subject, does not answer for an earlier
        run of itself)."""
        try:
            reply = await self.client.request(
                self.node_subject(node), wire.encode(self.cluster, wire.Ping()),
                timeout=1.0)
        except NoResponders:
            return False
        except NatsError:
            return True  # a timeout: it may be alive; do not take its name
        if creation is None:
            return True
        ok, answered = wire.decode_reply(reply.payload)
        return not ok or answered == creation

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the names and the members and probe the other nodes, until cancelled."""
        assert self._names_kv is not None and self._nodes_kv is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._watch, self._names_kv, self._name_changed)
            await nursery.start(self._watch, self._nodes_kv, self._member_changed)
            if self._specs_kv is not None:
                await nursery.start(self._watch, self._specs_kv, self._spec_changed)
            await nursery.start(self.releases.run)
            nursery.start_soon(self._probe)
            task_status.started()

    async def _watch(self, kv: KeyValue, callback: Callable[[KvChange], object],
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with kv.watch(callback=callback) as watcher:
            await watcher.ready.wait()
            task_status.started()
            await trio.sleep_forever()

    async def leave(self) -> None:
        """Give up this node's names and its place (an orderly exit)."""
        self.sched.remote = None
        self._leaving = True
        for name in list(self._owned):
            await self.unregister(name)
        if self._nodes_kv is not None and self._member_rev:
            try:
                await self._nodes_kv.delete(token(self.node), last_revision=self._member_rev)
            except NatsError:
                pass
        log.info("cluster_left", cluster=self.cluster, node=self.node)

    # -- names -----------------------------------------------------------------------

    async def register(self, name: str, supervisor: str | None = None) -> None:
        """Register ``name`` cluster-wide for this node, once, and subscribe to its
        subject. If a live node has it: StartFailed naming that node, or, for a child
        of a cluster supervisor (``supervisor``), stand by to take it over."""
        assert self._names_kv is not None
        if supervisor is not None:
            self._failover[name] = supervisor
        key, value = token(name), msgpack.packb((self.node, self.creation))
        try:
            rev = await self._create_name(key, value)
        except KeyExists as exc:
            existing = exc.existing
            if existing is None:
                raise self._taken(name, "another node") from None
            node, _creation = _unpack_pair(existing.value)
            if node != self.node and await self._alive(node):
                if supervisor is not None:
                    self._stand_by(name, node)
                    return
                raise self._taken(name, node) from None
            try:
                rev = await self._names_kv.update(key, value, existing.revision)
            except WrongRevision:
                # Another node took it over from the same dead owner first: name it,
                # not the dead one.
                winner = await self._names_kv.get(key)
                raise self._taken(name, _unpack_pair(winner.value)[0] if winner
                                  else "another node") from None
        self._own(name, rev)
        await self.client.flush()
        log.info("cluster_name_registered", name=name, node=self.node)

    async def _create_name(self, key: str, value: bytes) -> int:
        """Create ``key``; KeyExists names its owner. A key that other nodes keep
        creating and deleting under this one (KeyExists without an entry) is tried a
        few more times before it is given up as taken."""
        assert self._names_kv is not None
        for _ in range(3):
            try:
                return await self._names_kv.create(key, value)
            except KeyExists as exc:
                if exc.existing is not None:
                    raise
        return await self._names_kv.create(key, value)

    def _own(self, name: str, rev: int) -> None:
        owned = self._owned.get(name)
        # Asserted again (after a reconnect): its subscription stays, so that calls to
        # it are served throughout (a second one would deliver each message twice).
        sub = owned[1] if owned is not None else self.client.subscribe(
            self.name_subject(name), self._on_message)
        self._owned[name] = (rev, sub)
        self.names[name] = self.node
        self.sched.standby.discard(name)

    def _stand_by(self, name: str, owner: str) -> None:
        """Another node runs ``name`` (a cluster supervisor's child): keep its spec, do
        not run it here, and take it over if that node dies. A copy running here (a
        partition healed) is stopped."""
        self.sched.standby.add(name)
        owned = self._owned.pop(name, None)
        if owned is not None:
            owned[1].unsubscribe()
        sup = self._failover.get(name)
        running = self.sched.resolve(name)
        if running is not None and sup is not None and sup in self.sched.sups:
            log.warning("cluster_duplicate_stopped", name=name, runs_on=owner,
                        node=self.node)
            self.sched.supervisor(sup).terminate_child(name)
        log.info("cluster_standby", name=name, runs_on=owner, node=self.node)

    async def _take_over(self, name: str, dead: str, since: float) -> None:
        """Run ``name`` here: its node is gone. Compare-and-swap decides among the
        nodes standing by; the loser stays standby."""
        assert self._names_kv is not None
        if await self._spec_gone(name):
            return
        key, value = token(name), msgpack.packb((self.node, self.creation))
        rev = self._name_revs.get(name)
        try:
            if rev is None:
                rev = await self._names_kv.create(key, value)
            else:
                rev = await self._names_kv.update(key, value, rev)
        except (KeyExists, WrongRevision):
            return  # another standby took it
        except NatsError as exc:
            log.warning("cluster_failover_failed", name=name, reason=str(exc))
            return
        self._own(name, rev)
        sup = self._failover.get(name)
        if self.states is not None and name in self.state_names:
            # A durable server resumes from the state its dead node recorded last, and
            # that node, if it was only cut off, can no longer write it.
            try:
                stored = await self.states.claim(name)
            except StoreError as exc:
                log.error("cluster_failover_failed", name=name, reason=str(exc))
                await self.unregister(name)
                self.sched.standby.add(name)
                return
            if self.sched.durable is not None:
                self.sched.durable.offer(name, stored)
        try:
            if sup is not None and sup in self.sched.sups:
                self.sched.supervisor(sup).restart_child(name)
        except OtpyError as exc:
            log.error("cluster_failover_failed", name=name, reason=str(exc))
            return
        log.warning("cluster_failover", name=name, from_node=dead, to_node=self.node,
                    seconds=round(trio.current_time() - since, 3))

    def _fail_over(self, dead: str, since: float) -> None:
        """``dead``'s cluster names this node stands by for: race to take them."""
        if self._nursery is None:
            return
        for name, owner in list(self.names.items()):
            if owner == dead and name in self.sched.standby:
                self._nursery.start_soon(self._take_over, name, dead, since)

    def lost(self, name: str) -> None:
        """``name``'s stored state moved on under this node (the cluster store fenced
        it): another node runs it now, so this node's copy stops."""
        owner = self.names.get(name, "another node")
        if owner == self.node:
            owner = "another node"
        if name in self._failover:
            self._stand_by(name, owner)
        else:
            owned = self._owned.pop(name, None)
            if owned is not None:
                owned[1].unsubscribe()
            log.warning("cluster_name_lost", name=name, to=owner)

    def _taken(self, name: str, node: str) -> StartFailed:
        return StartFailed(f"the cluster-scoped name {name!r} is registered by node "
                           f"{node!r} of cluster {self.cluster!r}; it runs once in the "
                           f"cluster", child=name, reason="already_started")

    async def unregister(self, name: str) -> None:
        owned = self._owned.pop(name, None)
        if owned is None:
            return
        rev, sub = owned
        sub.unsubscribe()
        if self.names.get(name) == self.node:
            del self.names[name]
        if self._names_kv is not None:
            try:
                await self._names_kv.delete(token(name), last_revision=rev)
            except NatsError:
                pass

    def _name_changed(self, change: KvChange) -> None:
        name = untoken(change.key)
        if change.operation == "PUT":
            try:
                node, _creation = _unpack_pair(change.value)
            except ValueError:
                return
            self._name_revs[name] = change.revision
            self.names[name] = node
            if node != self.node and name in self._owned:
                # Another node took the name (after a partition, say): ours goes.
                log.warning("cluster_name_lost", name=name, to=node)
                if name in self._failover:
                    self._stand_by(name, node)
                else:
                    self._owned.pop(name)[1].unsubscribe()
        else:
            self._name_revs.pop(name, None)
            owner = self.names.pop(name, None)
            if owner is not None and owner != self.node and name in self.sched.standby \
                    and self._nursery is not None:
                # Its node gave it up (it stopped in order): a standby takes it.
                self._nursery.start_soon(self._take_over, name, owner,
                                         trio.current_time())

    def _member_changed(self, change: KvChange) -> None:
        node = untoken(change.key)
        if node == self.node:
            if change.operation != "PUT" and not self._leaving and \
                    self._nursery is not None:
                # Forgotten by the others while alive (cut off for longer than
                # forget_after, say): take this node's place again.
                self._nursery.start_soon(self._rejoin)
            return
        if change.operation == "PUT":
            self.members[node] = "up"
            self._member_revs[node] = change.revision
            self._down_since.pop(node, None)
            self._failed_over.discard(node)
        elif node in self.members:
            self._node_down(node, "it left the cluster")
            self.members.pop(node, None)
            self._member_revs.pop(node, None)
            self._down_since.pop(node, None)
            self._forgetting.discard(node)
            self._failed_over.discard(node)

    async def _rejoin(self) -> None:
        if self._leaving:
            return
        try:
            await self._claim_node_name()
        except Exception as exc:  # NATS, a live node of this name, a foreign entry
            log.error("cluster_rejoin_failed", node=self.node, reason=str(exc))
            return
        log.info("cluster_rejoined", node=self.node)

    def _forget_down(self, now: float) -> None:
        """Remove from the members bucket each member down for forget_after (one
        compare-and-swap on its entry: any node may do it, once)."""
        for node, since in list(self._down_since.items()):
            rev = self._member_revs.get(node)
            if (now - since >= self.forget_after and node not in self._forgetting
                    and rev is not None and self.members.get(node) == "down"
                    and self._nursery is not None):
                self._forgetting.add(node)
                self._nursery.start_soon(self._forget, node, rev, now - since)

    async def _forget(self, node: str, rev: int, down_for: float) -> None:
        """Delete ``node``'s entry if it is still the one found down (``rev``, read
        when the decision was made: an entry it wrote since, coming back, stays)."""
        try:
            if node in self._down_since and self._nodes_kv is not None:
                await self._nodes_kv.delete(token(node), last_revision=rev)
                log.info("cluster_node_forgotten", node=node,
                         down_seconds=round(down_for, 1))
                return  # stays in _forgetting until the watch delivers the delete
        except (WrongRevision, NatsError):
            pass  # another node forgot it first, or it came back: the watch says which
        self._forgetting.discard(node)

    # -- the core's Remote -----------------------------------------------------------

    def _route(self, address: Any) -> tuple[str, str, Any] | None:
        """(node, subject, target as that node reads it) for an address this node does
        not serve, or None when nothing in the cluster serves it."""
        if type(address) is str:
            if "@" not in address:  # a cluster-scoped name: the hot case
                owner = self.names.get(address)
                if owner is None or owner == self.node:
                    return None
                route = self._routes.get(address)
                if route is None or route[0] != owner:
                    # Made once per (name, owner): the subject and the target string.
                    if len(self._routes) >= 4096:
                        self._routes.clear()
                    route = self._routes[address] = (
                        owner, self.name_subject(address), f"{address}@{owner}")
                return route
            parts = split_remote(address)
            if parts is None:
                return None
            name, node = parts
            if node == self.node or node not in self.members:
                return None
            return node, self.node_subject(node), f"{name}@{node}"
        if type(address) is Pid:
            if address.node == self.node or address.node not in self.members:
                return None
            return address.node, self.node_subject(address.node), address
        return None

    def explain(self, address: Any) -> str | None:
        """None when another node serves ``address``; else why nothing does."""
        if self._route(address) is not None:
            return None
        if type(address) is str:
            parts = split_remote(address)
            if parts is not None and parts[1] != self.node:
                return f"node {parts[1]!r} is not in cluster {self.cluster!r}"
            if parts is None:
                return (f"no server of that name runs on this node, and none is registered "
                        f"in cluster {self.cluster!r}")
        if type(address) is Pid and address.node != self.node:
            return f"its node {address.node!r} is not in cluster {self.cluster!r}"
        return None  # this node's own: the core says why

    def serves(self, address: Any) -> bool:
        """Whether another node serves ``address``."""
        return self._route(address) is not None

    def start_call(self, address: Any, request: Any, caller: Caller, vsn: str | None,
                   timeout: float | None) -> bool:
        route = self._route(address)
        if route is None:
            return False
        node, subject, target = route
        try:
            payload = wire.encode_call(self.cluster, target, request, vsn, timeout,
                                       self.releases.level)
        except wire.Unsendable as exc:
            caller._fail(TypeError(f"the request to {address!r} {exc}"))
            return True
        call = _Call(self, caller, node, address, timeout, subject)
        if self.members.get(node) == "down":
            call.fail_noconnection(f"node {node!r} is down")
            return True
        try:
            self.client.request_waiter(subject, payload, call,
                                       timeout=NO_TIMEOUT if timeout is None else timeout)
        except NatsError as exc:
            call.fail_noconnection(f"this node cannot reach the cluster ({exc})")
            return True
        calls = self._calls.get(node)
        if calls is None:
            calls = self._calls[node] = set()
        calls.add(call)
        return True

    def send(self, kind: int, address: Any, message: Any) -> bool:
        route = self._route(address)
        if route is None:
            return False
        node, subject, target = route
        try:
            payload = wire.encode(self.cluster, wire.Cast(target, message, kind == INFO))
        except wire.Unsendable as exc:
            raise TypeError(f"the message to {address!r} {exc}") from None
        try:
            self.client.publish_nowait(subject, payload)
        except NatsError as exc:
            if type(exc).__name__ == "OutgoingFull":
                raise MailboxFull(f"the connection to the cluster is backed up ({exc}); "
                                  f"slow down", name=address) from None
            self._drop("cast to an unreachable node", node=node)  # as in Erlang
        return True

    def monitor(self, watcher: GenServer[Any], address: Any) -> MonitorRef | None:
        route = self._route(address)
        if route is None:
            return None
        node, subject, target = route
        ref = self.sched.new_ref(watcher, _Remote(node, address))
        self.sched.watch_remote(watcher, ref)
        self._watching[ref.id] = ref
        if self.members.get(node) == "down":
            self._remote_down(ref, address, "noconnection")
            return ref

        def answered(result: Msg | NatsError) -> None:
            if isinstance(result, Msg):
                ok, _value = wire.decode_reply(result.payload)
                if not ok:
                    self._remote_down(ref, address, "noproc")
            else:
                # "No responders" too: a node subject, or a name subject its owner holds
                # until it leaves, has no subscriber only once that node's process is
                # gone (Erlang: a monitor of a server of a node that is down fires
                # noconnection). A server that is not running is answered "noproc".
                self._remote_down(ref, address, "noconnection")

        try:
            self.client.request_nowait(subject, wire.encode(
                self.cluster, wire.Monitor(target, ref.id, self.node)), answered,
                timeout=self.cut_after)
        except NatsError:
            self._remote_down(ref, address, "noconnection")
        return ref

    def demonitor(self, ref: MonitorRef) -> bool:
        self._watching.pop(ref.id, None)
        target = ref._target
        node = getattr(target, "remote_node", None)
        if node is None:
            return False
        try:
            self.client.publish_nowait(self.node_subject(node), wire.encode(
                self.cluster, wire.Demonitor(ref.id, self.node)))
        except NatsError:
            pass  # its node is unreachable: nothing will fire there for us
        return True

    def _remote_down(self, ref: MonitorRef, pid: Any, reason: Any) -> None:
        self._watching.pop(ref.id, None)
        self.sched.deliver_down(ref, pid, reason)

    # -- what arrives ----------------------------------------------------------------

    def level_advanced(self) -> None:
        """This node applied a cluster release: serve the calls that waited for it."""
        behind, self._behind = self._behind, []
        for msg in behind:
            self._on_message(msg)

    def serve(self) -> None:
        """The node's tree runs the cluster's releases: serve what waited, then all."""
        pending, self._pending_specs = self._pending_specs, None
        for change in (pending or {}).values():
            self._spec_changed(change)
        held, self._held = self._held, None
        for msg in held or ():
            self._on_message(msg)

    # -- children added with start_child under a cluster supervisor -----------------

    async def share_spec(self, name: str, value: bytes) -> None:
        """Put a child's spec (``encode_spec``; the child was just started here under
        a cluster supervisor) in the specs bucket, so that the other nodes stand by for
        it."""
        assert self._specs_kv is not None
        await self._specs_kv.put(token(name), value)
        self._dynamic.add(name)
        self._spec_values[name] = value

    async def claim_dynamic(self, name: str) -> None:
        """A durable child start_child adds under a cluster supervisor: its state goes
        to the cluster's store, claimed here before it starts (unless another node runs
        it: then this node stands by)."""
        if self.states is None:
            raise StartFailed(f"child {name!r} is durable and cluster-scoped, but this "
                              f"node has no cluster store", child=name,
                              reason="no_store")
        self.state_names.add(name)
        if name in self.sched.standby:
            return
        stored = await self.states.claim(name)
        if self.sched.durable is not None:
            self.sched.durable.offer(name, stored)

    async def forget_spec(self, name: str) -> None:
        """A shared child's spec was deleted here. On the node that runs it (or when
        nobody does): the other nodes drop their standbys, then its name is given up;
        if NATS cannot take the delete now, the name stays this node's (so that no
        standby takes the child over) and the delete is tried again at the next
        reconnect. On a node that only stands by for it: this node's standby alone."""
        if name not in self._dynamic:
            return
        self._dynamic.discard(name)
        self._failover.pop(name, None)
        self.state_names.discard(name)
        self._spec_values.pop(name, None)
        owner = self.names.get(name)
        if owner is not None and owner != self.node and \
                self.members.get(owner) == "up":
            return  # it runs on another node: this node just stops standing by
        await self._forget_everywhere(name)

    async def _forget_everywhere(self, name: str) -> None:
        if self._specs_kv is None:
            return
        for pause in (0.1, 0.3, None):
            try:
                await self._specs_kv.delete(token(name))
                break
            except NatsError as exc:
                if pause is None:
                    log.warning("cluster_spec_not_forgotten", name=name, reason=str(exc))
                    self._unforgotten.add(name)
                    return
                await trio.sleep(pause)
        self._unforgotten.discard(name)
        await self.unregister(name)

    async def _spec_gone(self, name: str) -> bool:
        """Whether a shared child's spec was deleted (its node deleted the child): then
        this standby is dropped instead of taking it over."""
        if name not in self._dynamic or self._specs_kv is None:
            return False
        try:
            entry = await self._specs_kv.get(token(name))
        except NatsError:
            return False
        if entry is None:
            self._drop_standby(name)
            return True
        return False

    def _spec_changed(self, change: KvChange) -> None:
        if self._pending_specs is not None:
            self._pending_specs[change.key] = change
            return
        name = untoken(change.key)
        if change.operation != "PUT":
            self._drop_standby(name)
            return
        try:
            supervisor, child = decode_spec(name, change.value)
        except Exception as exc:  # not msgpack, too big, its class not importable...
            log.error("cluster_spec_refused", name=name,
                      reason=f"{type(exc).__name__}: {exc}"[:300])
            return
        sup = self.sched.sups.get(supervisor)
        if sup is None or sup.spec.scope != "cluster" or name in sup.specs:
            return  # no such cluster supervisor here, or its own (or known) child
        durable = child.durable if child.durable is not None else \
            child.server_class.durable
        if durable and self.states is None:
            log.error("cluster_spec_refused", name=name,
                      reason="it is durable and this node has no cluster store")
            return
        if (name in self.sched.procs or name in self.sched.sups
                or name in self.sched.standby or name in self._failover):
            # The name is this node's already (a local server, or a child of another
            # supervisor): nothing of it changes.
            log.error("cluster_spec_refused", name=name,
                      reason="the name is used by another server or spec on this node")
            return
        self.sched.standby.add(name)
        try:
            sup.start_child(child)  # a standby: its spec is kept, it does not start
        except OtpyError as exc:
            self.sched.standby.discard(name)
            log.error("cluster_spec_refused", name=name, reason=str(exc))
            return
        if durable:
            self.state_names.add(name)
        self._failover[name] = supervisor
        self._dynamic.add(name)
        owner = self.names.get(name)
        log.info("cluster_standby", name=name, runs_on=owner or "?", node=self.node)
        gone = owner is None or (name not in self._owned if owner == self.node else
                                 self.members.get(owner, "down") == "down")
        if gone and self._nursery is not None:
            # Nobody runs it (its node is gone, or was an earlier run of this one, or
            # all nodes restarted): race for it now rather than wait for a death.
            self._nursery.start_soon(self._take_over, name, owner or "nobody",
                                     trio.current_time())

    def _drop_standby(self, name: str) -> None:
        supervisor = self._failover.get(name)
        sup = self.sched.sups.get(supervisor) if supervisor is not None else None
        if sup is None or name not in self.sched.standby or sup.running(name) is not None:
            return
        sup.drop_spec(name)
        self.sched.standby.discard(name)
        self._failover.pop(name, None)
        self._dynamic.discard(name)
        self.state_names.discard(name)
        log.info("cluster_standby_dropped", name=name, node=self.node)

    def _on_message(self, msg: Msg) -> None:
        held = self._held
        if held is not None and not _is_ping(msg.payload):
            if len(held) < MAX_HELD:
                held.append(msg)
            else:
                self._drop("the node is starting and holds enough already",
                           subject=msg.subject)
            return
        message = wire.decode(self.cluster, msg.payload)
        if isinstance(message, wire.Bad):
            self._drop(message.reason, subject=msg.subject)
            if msg.reply:
                self._answer(msg.reply, wire.encode_error("BadRequest", message.reason))
            return
        if isinstance(message, wire.Call):
            if not msg.reply:
                self._drop("a call with no reply subject", subject=msg.subject)
                return
            level = self.releases.level
            if message.level > level and len(self._behind) < MAX_HELD:
                # Its sender committed a release this node is about to: wait for it.
                self._behind.append(msg)
                return
            target = self._local(message.target)
            vsn = message.vsn
            if vsn is None and message.level < level:
                # Its sender is a release behind: it speaks the server's older version.
                vsn = self.releases.vsn_before(target, message.level)
            timeout = message.timeout
            self.rt.start_call(target, message.request, _NatsCaller(self, msg.reply),
                               vsn=vsn,
                               timeout=None if timeout is None else min(timeout, NO_TIMEOUT))
        elif isinstance(message, wire.Cast):
            try:
                self.sched.cast_now(INFO if message.info else CAST,
                                    self._local(message.target), message.message)
            except (OtpyError, TypeError) as exc:
                self._drop(f"a cast from another node: {exc}", subject=msg.subject)
        elif isinstance(message, wire.Ping):
            if msg.reply:
                self._answer(msg.reply, wire.encode_reply(self.creation))
        elif isinstance(message, wire.Monitor):
            self._monitored(message, msg.reply)
        elif isinstance(message, wire.Demonitor):
            ref = self._remote_watchers.pop((message.watcher_node, message.ref), None)
            if ref is not None:
                self.sched.remove_watcher(ref)
        elif isinstance(message, wire.Down):
            ref = self._watching.pop(message.ref, None)
            if ref is not None:
                self.sched.deliver_down(ref, message.pid, message.reason)

    def _local(self, target: Any) -> Any:
        """A target as this node resolves it locally only (never routed on): a
        server of this node by its plain name (the core's fast lookup), anything
        else as ``name@node``, which only this node's servers answer."""
        if type(target) is str:
            parts = split_remote(target)
            name, node = parts if parts is not None else (target, self.node)
            if node != self.node:
                return target  # another node's: names nothing here
            return name if name in self.sched.procs else f"{name}@{node}"
        return target

    def _monitored(self, message: wire.Monitor, reply: str | None) -> None:
        thing = self.sched.resolve_any(self._local(message.target))
        if thing is None or (type(message.target) is Pid
                             and self.sched.pid_of(thing) != message.target):
            if reply:
                self._answer(reply, wire.encode_error("noproc", "not running"))
            return
        ref = MonitorRef(message.watcher_node, message.ref,
                         _RemoteWatcher(self, message.watcher_node), thing)
        self.sched.add_watcher(thing, ref, ref._watcher)
        self._remote_watchers[(message.watcher_node, message.ref)] = ref
        if reply:
            self._answer(reply, wire.encode_reply(self.sched.pid_of(thing)))

    def _answer(self, reply: str, payload: bytes) -> None:
        try:
            self.client.publish_nowait(reply, payload)
        except NatsError:
            self._drop("a reply to an unreachable caller")

    def _publish(self, node: str, message: wire.Message) -> None:
        try:
            self.client.publish_nowait(self.node_subject(node),
                                       wire.encode(self.cluster, message))
        except NatsError:
            self._drop("a message to an unreachable node", node=node)

    def _drop(self, why: str, **fields: Any) -> None:
        """One event per interval for what arrives and cannot be acted on."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged >= _DROP_LOG_INTERVAL:
            log.warning("cluster_message_dropped", reason=why, dropped=self._dropped,
                        **fields)
            self._dropped_logged = now
            self._dropped = 0

    # -- failure -----------------------------------------------------------------------

    async def _probe(self) -> None:
        """Probe every other member each interval: "no responders" means its process is
        gone; silence past ``cut_after`` means it is cut off.

        A probe goes out every interval even while earlier ones are unanswered: a node
        killed while a probe was on its way never answers that one, and only the next
        probe's "no responders" tells at once (waiting for the first would take
        ``cut_after``). ``_probing`` keeps when the oldest unanswered probe went out;
        at most ``cut_after / probe_interval`` are out per node."""
        while True:
            now = trio.current_time()
            for node in list(self.members):
                since = self._probing.setdefault(node, now)
                if now - since >= self.cut_after:
                    self._probing.pop(node)
                    self._node_down(node, f"it did not answer for {self.cut_after:g} s")
                    continue
                try:
                    self.client.request_nowait(
                        self.node_subject(node), wire.encode(self.cluster, wire.Ping()),
                        self._prober(node), timeout=self.cut_after)
                except NatsError:
                    pass  # this node lost NATS: _on_disconnect said so
            if self._down_since and self.client.is_connected:
                self._forget_down(now)
            await trio.sleep(self.probe_interval)

    def _prober(self, node: str) -> Callable[[Msg | NatsError], None]:
        def answered(result: Msg | NatsError) -> None:
            if isinstance(result, Msg):
                self._probing.pop(node, None)
                self._down_since.pop(node, None)
                self._failed_over.discard(node)
                if self.members.get(node) == "down":
                    self.members[node] = "up"
                    log.info("cluster_node_up", node=node)
            elif isinstance(result, NoResponders):
                self._probing.pop(node, None)
                self._node_down(node, "its process is gone")
            elif isinstance(result, RequestTimeout):
                # This probe's deadline was cut_after, and nothing has answered since
                # the oldest unanswered one went out, no later than this one.
                if node in self._probing:
                    self._probing.pop(node)
                    self._node_down(node, f"it did not answer for {self.cut_after:g} s")
            else:
                self._probing.pop(node, None)
                self._node_down(node, f"this node lost the cluster ({result})")
        return answered

    def _node_down(self, node: str, why: str) -> None:
        if node not in self.members:
            return
        if self.members[node] != "down":
            log.warning("cluster_node_down", node=node, reason=why)
        if self.client.is_connected:  # found down by this node, not by its own cut
            self._down_since.setdefault(node, trio.current_time())
            if node not in self._failed_over:
                # Once per death: also for a node that died while this one was cut
                # off (it was marked down then, with no failover possible).
                self._failed_over.add(node)
                self._fail_over(node, trio.current_time())
        self.members[node] = "down"
        for call in self._calls.pop(node, set()):
            call.fail_noconnection(f"node {node!r} is down ({why})")
        for ref in [r for r in self._watching.values()
                    if getattr(r._target, "remote_node", None) == node]:
            self._remote_down(ref, ref._target.address if ref._target else node,
                              "noconnection")
        for key in [k for k in self._remote_watchers if k[0] == node]:
            self.sched.remove_watcher(self._remote_watchers.pop(key))

    def _on_disconnect(self, reason: str) -> None:
        for node in list(self.members):
            self._node_down(node, f"this node lost NATS ({reason})")
        self._down_since.clear()  # this node's cut says nothing of theirs

    def _on_reconnect(self) -> None:
        log.info("cluster_reconnected", node=self.node)
        # Names and membership are asserted again, in case the server lost its store.
        self._reconnects += 1
        if self._nursery is not None:
            self._nursery.start_soon(self._reassert, self._reconnects)

    async def _reassert(self, reconnect: int) -> None:
        """This node's place, then each of its names, again; what NATS could not take
        (JetStream not ready just after a server restart, say) is tried again with a
        growing pause while this connection lasts (a later reconnect starts afresh)."""
        backoff = REASSERT_FIRST
        place, names = True, list(self._owned)
        specs = list(self._spec_values)
        while place or names or specs or self._unforgotten:
            if self._leaving or reconnect != self._reconnects:
                return
            if place:
                try:  # this node's place first: the others may have forgotten it
                    await self._claim_node_name()
                    place = False
                except NatsError as exc:
                    log.warning("cluster_rejoin_failed", node=self.node, reason=str(exc))
                except Exception as exc:  # a live node of this name, a foreign entry
                    log.error("cluster_rejoin_failed", node=self.node, reason=str(exc))
                    place = False
            for name in list(self._unforgotten):  # deleted here while NATS was away
                await self._forget_everywhere(name)
            if self._specs_kv is not None:  # the specs this node shared, again
                kept = []
                for name in specs:
                    value = self._spec_values.get(name)
                    if value is None:
                        continue
                    try:
                        await self._specs_kv.put(token(name), value)
                    except NatsError:
                        kept.append(name)
                specs = kept
            failed = []
            # Each keeps its subscription meanwhile: a name found taken is given up
            # (register's standby gives it up by itself).
            for name in names:
                if self._leaving or reconnect != self._reconnects:
                    return
                if name not in self._owned:
                    continue  # given up meanwhile
                try:
                    await self.register(name, self._failover.get(name))
                except NatsError as exc:
                    failed.append(name)
                    log.warning("cluster_name_not_asserted", name=name, reason=str(exc),
                                retry_in=backoff)
                except Exception as exc:  # taken by a live node, or a foreign entry
                    owned = self._owned.pop(name, None)
                    if owned is not None:
                        owned[1].unsubscribe()
                    log.warning("cluster_name_lost", name=name, reason=str(exc))
            names = failed
            if place or names or specs or self._unforgotten:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, REASSERT_MAX)

    # -- what the node shows ---------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The cluster as this node sees it: members and where each name runs."""
        return {"cluster": self.cluster, "node": self.node,
                "members": {self.node: "up", **dict(sorted(self.members.items()))},
                "names": dict(sorted(self.names.items())),
                "calls_in_flight": sum(len(c) for c in self._calls.values())}


_PING = b"\xa4ping"


def _is_ping(payload: bytes) -> bool:
    """Whether a payload is a probe (answered even while the node starts)."""
    return payload.endswith(_PING) and len(payload) < 200


def _unpack_pair(value: bytes) -> tuple[str, int]:
    """``(node, creation)`` from the names or members bucket, which any NATS client
    can write: decoded within a message's bounds (ValueError if it is not one)."""
    try:
        node, creation = wire.decode_value(value)
        return str(node), int(creation)
    except Exception as exc:
        raise ValueError(f"not an otpy registration: {exc}") from None


def untoken(key: str) -> str:
    """The name a key or subject token made by :func:`token` stands for."""
    if key.startswith("="):
        try:
            return bytes.fromhex(key[1:]).decode()
        except ValueError:
            return key
    return key


def durable_cluster_names(spec: Any) -> set[str]:
    """The ids of the durable children with ``scope="cluster"`` in a tree spec."""
    from .._core.supervisor import Child, Supervisor

    found: set[str] = set()

    def walk(sup: Supervisor) -> None:
        for child in sup.children:
            if isinstance(child, Supervisor):
                walk(child)
            elif isinstance(child, Child) and child.scope == "cluster" and (
                    child.durable if child.durable is not None
                    else child.server_class.durable):
                found.add(child.id)

    if isinstance(spec, Supervisor):
        walk(spec)
    return found


SPEC_FORMAT = 1


def class_path(cls: type) -> str:
    """``module:qualname`` of a server class, checked to import back to that class
    (TypeError saying why not)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    try:
        found = import_class(path)
    except (ImportError, AttributeError, ValueError) as exc:
        found, why = None, str(exc)
    else:
        why = "it imports as another object"
    if found is not cls:
        raise TypeError(
            f"{cls.__qualname__} cannot be found by the other nodes by its path {path!r} "
            f"({why}); a child started with start_child under a cluster supervisor is "
            f"rebuilt there from its spec: define its class at the top level of a module "
            f"that every node can import")
    return path


def import_class(path: str) -> Any:
    module, _, qualname = path.partition(":")
    if not module or not qualname or "<" in qualname:
        raise ValueError(f"{path!r} is not module:qualname of a top-level class")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def encode_spec(supervisor: str, child: Child) -> bytes:
    """A child's spec as the other nodes rebuild it (TypeError if they cannot)."""
    path = class_path(child.server_class)
    try:
        value: bytes = msgpack.packb(
            (SPEC_FORMAT, supervisor, path, child.arg, child.restart.value, child.shutdown,
             child.step_timeout, child.max_mailbox, child.durable), use_bin_type=True,
            default=encode_ext)
        return value
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"the arg of child {child.id!r} cannot be sent to the other nodes ({exc}); a "
            f"child started with start_child under a cluster supervisor is rebuilt there "
            f"from its spec: give it an arg msgpack carries (None, bool, int, float, str, "
            f"bytes, lists, dicts, pids)") from None


def decode_spec(name: str, value: bytes) -> tuple[str, Child]:
    """``(supervisor, child)`` from the specs bucket (TypeError/ValueError if not one)."""
    from .._core.supervisor import Child

    fields = wire.decode_value(value)  # bounded as any message from another node
    if type(fields) is not tuple or len(fields) != 9 or fields[0] != SPEC_FORMAT:
        raise ValueError("not an otpy child spec")
    _, supervisor, path, arg, restart, shutdown, step_timeout, max_mailbox, durable = fields
    cls = import_class(str(path))
    return str(supervisor), Child(name, cls, arg, restart=restart, shutdown=shutdown,
                                  step_timeout=step_timeout, max_mailbox=max_mailbox,
                                  scope="cluster", durable=durable)


def has_cluster_supervisor(spec: Any) -> bool:
    """Whether a tree spec has a supervisor with ``scope="cluster"``."""
    from .._core.supervisor import Supervisor

    return isinstance(spec, Supervisor) and any(
        isinstance(s, Supervisor) and s.scope == "cluster" for s in spec.walk())


def cluster_specs(spec: Any) -> list[tuple[str, str | None]]:
    """``(id, supervisor)`` of each child with ``scope="cluster"`` in a tree spec;
    ``supervisor`` names its cluster supervisor (None under a plain one: no failover)."""
    from .._core.supervisor import Child, Supervisor

    found: list[tuple[str, str | None]] = []

    def walk(sup: Supervisor) -> None:
        for child in sup.children:
            if isinstance(child, Supervisor):
                walk(child)
            elif isinstance(child, Child) and child.scope == "cluster":
                found.append((child.id, sup.name if sup.scope == "cluster" else None))

    if isinstance(spec, Supervisor):
        walk(spec)
    return found



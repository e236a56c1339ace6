"""Cluster-wide releases: one upgrade (or downgrade) for every node, all or none.

A release that a cluster installs goes through the JetStream KV bucket
``otpy-<cluster>-releases`` (numbered proposals, votes and decisions) and the object
store ``otpy-<cluster>-code`` (release bundles by digest):

1. **Ship.** The coordinator (a node, or the ``otpy`` command) puts the release's
   bundle in the object store, under its digest, if it is not there yet.
2. **Propose.** It creates ``p.<n>`` (the next number; created by compare-and-swap, so
   two coordinators cannot both propose ``n``), naming the release, its digest and the
   nodes that take part (every member that answers).
3. **Prepare.** Every node watches the bucket. A participant fetches the bundle (the
   digest is checked), loads its code off the loop, plans and migrates its own servers
   in chunks while they keep serving (a node that runs no target has nothing to move),
   and votes ``v.<n>.<node>``: ready, or what failed where.
4. **Decide.** The coordinator creates ``d.<n>``: commit if every participant voted
   ready, else abort. This compare-and-swap is *the* commit point: a participant that
   waited ``DECISION_TIMEOUT`` for it without one (the coordinator died) creates
   ``d.<n> = abort`` itself, and whichever write comes first is the decision.
5. **Commit.** Every node applies the decision: commit (its migration's synchronous
   swap, forced: a server whose state a step changed since the vote so that it can no
   longer migrate restarts on the new code) or abort (old code, old state), then acks
   ``a.<n>.<node>``.

A node that missed a decision (cut off, killed, restarted) reads the decisions it has
not applied when it starts or reconnects, and applies every committed one in order
before it serves: a node that starts comes up on the cluster's releases.

Between nodes, during the few milliseconds in which some have committed and others not,
every call carries its sender's *level* (how many cluster releases it has applied):
a node that receives a call from a node at a higher level holds it until it has
committed too; one from a lower level is adapted with the server's versioned-client
hooks (``upgrade_request`` / ``downgrade_reply``), as a client of the older version.
So no call fails because its peer is one release behind.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack  # type: ignore[import-untyped]
import structlog
import trio

from .._core.names import split_remote
from .._core.release import Migration, Release
from .._exceptions import UpgradeFailed
from .._install import commit, heap_frozen, migrate_in_chunks
from .._protocol.release_bundle import decode_bundle
from .._release_files import ReleaseSource, load_in_thread
from .jetstream import JetStream, KeyExists, KeyValue, KvChange, ObjectStore
from .nats_client import NatsError

if TYPE_CHECKING:
    from .._core.runtime import Runtime
    from .node import ClusterNode

log = structlog.get_logger("otpy")

PREPARE_TIMEOUT = 60.0
DECISION_TIMEOUT = 30.0
ACK_TIMEOUT = 10.0


class Proposal(NamedTuple):
    number: int
    vsn: str
    digest: str | None
    downgrade: bool
    coordinator: str
    participants: tuple[str, ...]


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=False,
                           max_str_len=len(data), max_bin_len=len(data),
                           max_array_len=len(data), max_map_len=len(data))


def _proposal(number: int, value: bytes) -> Proposal | None:
    try:
        vsn, digest, downgrade, coordinator, participants = _unpack(value)
        return Proposal(number, str(vsn), digest, bool(downgrade), str(coordinator),
                        tuple(str(p) for p in participants))
    except Exception:
        return None


def bundle_vsn(bundle: bytes) -> tuple[str, str]:
    """``(vsn, digest)`` of an encoded release bundle, read without importing it."""
    decoded = decode_bundle(bundle)
    data = tomllib.loads(decoded.release.data.decode("utf-8"))
    vsn = data.get("vsn")
    if not isinstance(vsn, str) or not vsn:
        raise UpgradeFailed("the release file needs a string 'vsn', e.g. vsn = \"2\"")
    return vsn, decoded.digest


class Releases:
    """What the ``otpy-<cluster>-releases`` bucket holds, as one watcher saw it."""

    def __init__(self) -> None:
        self.proposals: dict[int, Proposal] = {}
        self.votes: dict[int, dict[str, Any]] = {}
        self.decisions: dict[int, Any] = {}
        self.acks: dict[int, set[str]] = {}
        self.changed = trio.Event()

    def apply(self, change: KvChange) -> tuple[str, int] | None:
        """Record a change of the bucket; ``(kind, number)`` of what it was."""
        if change.operation != "PUT":
            return None
        parts = change.key.split(".")
        try:
            number = int(parts[1])
        except (IndexError, ValueError):
            return None
        kind = parts[0]
        try:
            if kind == "p":
                proposal = _proposal(number, change.value)
                if proposal is None:
                    return None
                self.proposals[number] = proposal
            elif kind == "v" and len(parts) == 3:
                self.votes.setdefault(number, {})[parts[2]] = _unpack(change.value)
            elif kind == "d":
                self.decisions[number] = _unpack(change.value)
            elif kind == "a" and len(parts) == 3:
                self.acks.setdefault(number, set()).add(parts[2])
            else:
                return None
        except Exception:
            return None
        changed, self.changed = self.changed, trio.Event()
        changed.set()
        return kind, number

    def next_number(self) -> int:
        return max(self.proposals, default=0) + 1

    def undecided(self) -> Proposal | None:
        for n in sorted(self.proposals):
            if n not in self.decisions:
                return self.proposals[n]
        return None

    def committed(self) -> list[Proposal]:
        """The committed releases, in order (upgrades and downgrades)."""
        return [self.proposals[n] for n in sorted(self.decisions)
                if n in self.proposals and _is_commit(self.decisions[n])]

    def newest_installed(self) -> Proposal | None:
        """The release a cluster downgrade would take back (the top of the stack)."""
        stack: list[Proposal] = []
        for p in self.committed():
            if p.downgrade:
                if stack:
                    stack.pop()
            else:
                stack.append(p)
        return stack[-1] if stack else None


def _is_commit(decision: Any) -> bool:
    return type(decision) is tuple and bool(decision) and decision[0] == "commit"


async def open_buckets(js: JetStream, cluster_token: str) -> tuple[KeyValue, ObjectStore]:
    prefix = f"otpy-{cluster_token.replace('=', '_')}"
    kv = await js.key_value(f"{prefix}-releases")
    code = await js.object_store(f"{prefix}-code")
    return kv, code


async def ship(code: ObjectStore, digest: str, bundle: bytes) -> None:
    """Put a release's bundle in the object store under its digest (once)."""
    try:
        if await code.info(digest) is not None:
            return
    except NatsError:
        pass
    await code.put(digest, bundle)


async def coordinate(kv: KeyValue, releases: Releases, *, vsn: str, digest: str | None,
                     downgrade: bool, coordinator: str, participants: Iterable[str],
                     timeout: float = PREPARE_TIMEOUT,
                     down: Callable[[str], bool] = lambda node: False) -> dict[str, Any]:
    """Propose, wait for the votes, decide, wait for the acks (see the module doc).
    Returns the report; raises UpgradeFailed (nothing changed anywhere) naming each
    node and server that failed. ``down(node)``: whether a participant is known to be
    down (a vote it owes will not come: the release aborts at once)."""
    waiting = releases.undecided()
    if waiting is not None:
        raise UpgradeFailed(f"release {waiting.vsn!r} (proposal {waiting.number}) is "
                            f"still being installed by {waiting.coordinator}; wait for it")
    nodes = tuple(sorted(set(participants)))
    number = releases.next_number()
    what = "downgrade from" if downgrade else "upgrade to"
    try:
        await kv.create(f"p.{number}", _pack((vsn, digest, downgrade, coordinator, nodes)))
    except KeyExists:
        raise UpgradeFailed("another release was proposed at the same moment; try again "
                            "once it is installed") from None
    log.info("cluster_release_proposed", release=vsn, downgrade=downgrade, number=number,
             nodes=list(nodes))
    with trio.move_on_after(timeout):
        while set(releases.votes.get(number, {})) < set(nodes) and number not in \
                releases.decisions:
            if any(down(n) for n in set(nodes) - set(releases.votes.get(number, {}))):
                break
            with trio.move_on_after(0.05):  # and look at who is down again
                await releases.changed.wait()
    votes = releases.votes.get(number, {})
    failures: dict[str, Any] = {}
    for node in nodes:
        vote = votes.get(node)
        if vote is None:
            failures[f"node {node}"] = ("it is down" if down(node) else
                                        f"no vote within {timeout:g} s (it is stuck)")
        elif not vote.get("ok"):
            failures[f"node {node}"] = (vote.get("failures") or vote.get("error")
                                        or "refused")
    moved = sum(len(v.get("servers", ())) for v in votes.values() if isinstance(v, dict))
    if not failures and not moved:
        failures["cluster"] = "no node runs a target of this release"
    decision = ("commit",) if not failures else ("abort", repr(failures)[:2000])
    try:
        await kv.create(f"d.{number}", _pack(decision))
    except KeyExists:
        pass  # a participant decided first (it gave up waiting): that is the decision
    with trio.fail_after(ACK_TIMEOUT):
        while number not in releases.decisions:
            await releases.changed.wait()
    if not _is_commit(releases.decisions[number]):
        if not failures:
            failures["cluster"] = "a node gave up waiting for the decision"
        log.error("cluster_release_aborted", release=vsn, number=number, failures=failures)
        shown = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5])
        raise UpgradeFailed(f"cluster {what} release {vsn!r} aborted, nothing changed on "
                            f"any node: {shown}",
                            {k: str(v) for k, v in failures.items()})
    with trio.move_on_after(ACK_TIMEOUT):
        while not {n for n in nodes if not down(n)} <= releases.acks.get(number, set()):
            with trio.move_on_after(0.05):  # a node that died will not ack: it catches up
                await releases.changed.wait()
    missing = sorted(set(nodes) - releases.acks.get(number, set()))
    servers = {node: list(votes[node].get("servers", ())) for node in nodes}
    log.info("cluster_release_committed", release=vsn, number=number, nodes=list(nodes),
             unconfirmed=missing)
    return {"release": vsn, "downgrade": downgrade, "number": number,
            "servers": [s for node in nodes for s in servers[node]], "nodes": servers,
            "unconfirmed": missing}


class NodeReleases:
    """One node's side of the cluster's releases: prepare and vote, apply decisions,
    catch up; and coordinate the releases this node starts."""

    def __init__(self, cluster: ClusterNode, kv: KeyValue, code: ObjectStore) -> None:
        self.cluster = cluster
        self.rt: Runtime = cluster.rt
        self.node: str = cluster.node
        self.kv = kv
        self.code = code
        self.state = Releases()
        self.level = 0  # the number of the last cluster release this node applied
        self.level_changed = trio.Event()
        self._preparing: dict[int, trio.Event] = {}  # set once this node voted
        self._prepared: dict[int, Migration] = {}  # migrations ready for the decision
        self._nursery: trio.Nursery | None = None
        self._live = False  # the watcher delivered what the bucket held when it began
        self._catching_up = trio.Lock()
        self._loaded: dict[str, Release] = {}
        # For each upgrade applied: the version each moved server ran before it.
        self._before: dict[int, dict[str, str]] = {}

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with self.kv.watch(callback=self._changed) as watcher:
                await watcher.ready.wait()
                self._live = True  # what was there already is catch_up's to apply
                task_status.started()
                await trio.sleep_forever()

    def _changed(self, change: KvChange) -> None:
        seen = self.state.apply(change)
        if seen is None or self._nursery is None or not self._live:
            return
        kind, number = seen
        if kind == "p":
            proposal = self.state.proposals[number]
            if (self.node in proposal.participants and number not in self.state.decisions
                    and number not in self._preparing and number > self.level):
                self._preparing[number] = trio.Event()
                self._nursery.start_soon(self._prepare, proposal)
        elif kind == "d":
            self._nursery.start_soon(self._decided, number)

    # -- catching up -------------------------------------------------------------------

    async def catch_up(self) -> None:
        """Apply, in order, every committed cluster release this node has not (when it
        starts, or after it reconnects); before it serves."""
        async with self._catching_up:
            for proposal in self.state.committed():
                if proposal.number <= self.level or proposal.number in self._preparing:
                    continue
                await self._apply_alone(proposal)

    async def _apply_alone(self, proposal: Proposal) -> None:
        try:
            release = None if proposal.downgrade else await self._release(proposal)
            migration = await self._migrate(release)
            with heap_frozen():
                commit(migration, force=True)
            self._advance(proposal.number, migration)
            log.info("cluster_release_caught_up", release=proposal.vsn,
                     number=proposal.number, downgrade=proposal.downgrade)
        except UpgradeFailed as exc:
            log.error("cluster_release_catch_up_failed", release=proposal.vsn,
                      number=proposal.number, reason=str(exc))
        self._advance(proposal.number)

    def _advance(self, number: int, migration: Migration | None = None) -> None:
        if migration is not None and not migration.downgrade:
            self._before[number] = {m.name: m.from_cls.vsn for m in migration.moves}
        if number > self.level:
            self.level = number
            changed, self.level_changed = self.level_changed, trio.Event()
            changed.set()
            self.cluster.level_advanced()

    def vsn_before(self, target: Any, level: int) -> str | None:
        """The version a server ran at cluster level ``level`` (what a caller of that
        level speaks), when a release since moved it; None when none did."""
        if isinstance(target, str):
            parts = split_remote(target)
            name: Any = target if parts is None else parts[0]
        else:
            name = getattr(target, "name", None)  # a pid
        for number in sorted(n for n in self._before if n > level):
            vsn = self._before[number].get(str(name))
            if vsn is not None:
                return vsn
        return None

    # -- one node's part ---------------------------------------------------------------

    async def _release(self, proposal: Proposal) -> Release:
        digest = proposal.digest
        if digest is None:
            raise UpgradeFailed(f"release {proposal.vsn!r} has no code to load")
        release = self._loaded.get(digest)
        if release is None:
            bundle = await self.code.get(digest)  # its digest is checked
            release = await load_in_thread(ReleaseSource(bundle, None))
            if release.vsn != proposal.vsn or release.digest != digest:
                raise UpgradeFailed(f"the code stored as {digest[:12]} is release "
                                    f"{release.vsn!r} ({(release.digest or '')[:12]})")
            self._loaded[digest] = release
        return release

    async def _migrate(self, release: Release | None) -> Migration:
        with heap_frozen():
            return await migrate_in_chunks(
                self.rt.release_handler.planner(release, lenient=True))

    async def _prepare(self, proposal: Proposal) -> None:
        try:
            await self._vote(proposal)
        finally:
            self._preparing[proposal.number].set()

    async def _vote(self, proposal: Proposal) -> None:
        vote: dict[str, Any]
        try:
            if proposal.downgrade:
                history = self.rt.release_handler.history
                top = history[-1].release.vsn if history else None
                if top != proposal.vsn:
                    raise UpgradeFailed(f"node {self.node!r} runs release {top!r} on top, "
                                        f"not {proposal.vsn!r}")
                release = None
            else:
                release = await self._release(proposal)
            migration = await self._migrate(release)
            failures = migration.failures()
            if failures:
                migration.abort()
                vote = {"ok": False, "failures": failures}
            else:
                self._prepared[proposal.number] = migration
                vote = {"ok": True, "servers": [m.name for m in migration.moves]}
        except UpgradeFailed as exc:
            vote = {"ok": False, "error": str(exc), "failures": exc.failures}
        except NatsError as exc:
            vote = {"ok": False, "error": f"cannot fetch the release's code: {exc}"}
        log.info("cluster_release_voted", release=proposal.vsn, number=proposal.number,
                 ready=vote["ok"])
        try:
            await self.kv.put(f"v.{proposal.number}.{self.node}", _pack(vote))
        except NatsError:
            pass  # the coordinator's timeout aborts it
        if not vote["ok"]:
            return
        # No decision in time: the coordinator is gone. Abort it (unless it decided).
        with trio.move_on_after(DECISION_TIMEOUT):
            while proposal.number not in self.state.decisions:
                await self.state.changed.wait()
            return
        try:
            await self.kv.create(f"d.{proposal.number}",
                                 _pack(("abort", f"node {self.node} gave up waiting")))
        except (KeyExists, NatsError):
            pass

    async def _decided(self, number: int) -> None:
        decision = self.state.decisions[number]
        preparing = self._preparing.get(number)
        if preparing is not None:
            await preparing.wait()  # it voted (or never will): then the decision applies
            migration = self._prepared.pop(number, None)
            if migration is None:
                return  # it voted no (nothing was kept), or cannot commit what it lost
            if _is_commit(decision):
                with heap_frozen():
                    report = commit(migration, force=True)
                log.info("cluster_release_applied", number=number,
                         servers=len(report["servers"]))
                self._advance(number, migration)
            else:
                migration.abort()
        elif _is_commit(decision) and number > self.level:
            await self.catch_up()  # a release this node did not prepare: in order
        else:
            return
        try:
            await self.kv.put(f"a.{number}.{self.node}", b"")
        except NatsError:
            pass

    # -- this node coordinates ---------------------------------------------------------

    async def upgrade(self, release: Release | None, *,
                      timeout: float = PREPARE_TIMEOUT) -> dict[str, Any]:
        """Install ``release`` on every node (None: take back the newest cluster
        release), all or none."""
        if release is None:
            newest = self.state.newest_installed()
            if newest is None:
                raise UpgradeFailed("there is no cluster release to downgrade from")
            vsn, digest, downgrade = newest.vsn, newest.digest, True
        else:
            if release.bundle is None or release.digest is None:
                raise UpgradeFailed(
                    f"release {release.vsn!r} was made in Python: a cluster-wide release "
                    f"must be loaded from its files (otpy.Release.load), so that its code "
                    f"can travel to the nodes that do not have it")
            await ship(self.code, release.digest, release.bundle)
            self._loaded[release.digest] = release
            vsn, digest, downgrade = release.vsn, release.digest, False
        members = self.cluster.members
        participants = [self.node, *(m for m, up in members.items() if up == "up")]
        return await coordinate(self.kv, self.state, vsn=vsn, digest=digest,
                                downgrade=downgrade, coordinator=self.node,
                                participants=participants, timeout=timeout,
                                down=lambda node: members.get(node) == "down")


async def release_from_outside(url: str, cluster: str, bundle: bytes | None, *,
                               timeout: float = PREPARE_TIMEOUT) -> dict[str, Any]:
    """Coordinate a cluster-wide release from outside the cluster (the ``otpy``
    command's ``--cluster URL``): ``bundle`` is the release to install (its encoded
    bundle), None takes back the newest one. The nodes that answer take part."""
    from .nats_client import open_client
    from .node import token, untoken

    async with open_client(url, name=f"otpy-command:{cluster}") as client:
        js = JetStream(client)
        prefix = f"otpy-{token(cluster).replace('=', '_')}"
        try:
            nodes = await js.key_value(f"{prefix}-nodes", create=False)
        except NatsError as exc:
            raise UpgradeFailed(f"no cluster {cluster!r} at {url}: {exc}") from None
        members = [untoken(k) for k in await nodes.keys()]
        if not members:
            raise UpgradeFailed(f"cluster {cluster!r} at {url} has no node")
        kv, code = await open_buckets(js, token(cluster))
        state = Releases()
        async with kv.watch(callback=state.apply) as watcher:
            await watcher.ready.wait()
            if bundle is None:
                newest = state.newest_installed()
                if newest is None:
                    raise UpgradeFailed(f"cluster {cluster!r} has no release to take back")
                vsn, digest, downgrade = newest.vsn, newest.digest, True
            else:
                vsn, digest = bundle_vsn(bundle)
                await ship(code, digest, bundle)
                downgrade = False
            return await coordinate(kv, state, vsn=vsn, digest=digest,
                                    downgrade=downgrade, coordinator="otpy command",
                                    participants=members, timeout=timeout)

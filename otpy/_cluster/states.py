"""Durable states that the cluster shares: an ``otpy.Store`` over a JetStream KV bucket.

A durable child with ``scope="cluster"`` under a cluster supervisor is restarted on
another node when its node dies; it must resume there from the state it recorded on
the dead one. So its states go to the cluster's bucket ``otpy-<cluster>-states``, one
key per server name, each value ``[1, writer, record, tag, pickled state]`` (msgpack;
``writer`` is ``"<node>/<creation>"``, ``record`` that writer's record number). The
node's other durable servers keep their states in its local store (:class:`SplitStore`
routes by name).

The promises of ``otpy.Store`` hold, with the network in place of the disk:

- **Recorded before visible.** :meth:`ClusterStates.put` pickles the state and queues
  it, inline in the step, and returns its seq; the flusher task publishes what is
  queued, one batch in flight at a time, each key once per batch (a later state of a
  key replaces one not yet sent). ``synced_seq`` moves past a record only once
  JetStream acknowledged it (or a later state of its key), so the runtime holds every
  reply until then (group commit): no reply a client received is lost with its node.
- **One writer per key: fencing.** Every publish carries
  ``Nats-Expected-Last-Subject-Sequence``, the key's revision as this node last saw it.
  A node that starts a server (its first start, or a takeover) first *claims* its key:
  it reads the last value and writes it again under its own name (a delete marker if
  there is none), by compare-and-swap. From then on a node that ran the server before
  (cut off by a partition, its writes queued) cannot write it: its publish fails on
  the revision, the key is *fenced* on it, the replies held for that server fail, and
  the cluster layer stops its copy. A failed expectation whose last value this node
  wrote itself (a retried publish that had been applied) is not a fence: the flusher
  takes that revision and goes on.
- **Failures.** A publish that fails for a reason other than the revision (the
  connection lost, no reply in time, JetStream unavailable) is sent again, with
  backoff, until it is acknowledged or fenced; replies wait meanwhile. At most
  ``max_pending`` records wait: past that, a step that records fails with a
  StoreError saying the cluster store is behind, so that an outage cannot grow the
  node's memory without bound.

A batch of states written by a release (:meth:`put_many`) is atomic per key, not
across keys: a node that dies in the middle leaves each key with its old state or its
new one, each tagged with the code that wrote it, and the node that resumes a server
migrates an older state through ``code_change`` as on any start.
"""

from __future__ import annotations

import base64
import pickle
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import structlog
import trio

from .._exceptions import StoreError
from .._protocol import cluster as wire
from .._store.base import Store, StoredState
from .jetstream import (
    ERR_WRONG_LAST_SEQUENCE,
    EXPECTED_LAST_SUBJECT_SEQ,
    KV_OPERATION,
    JetStream,
    JetStreamError,
    KeyValue,
    parse_ack,
)
from .nats_client import Client, Msg, NatsError

log = structlog.get_logger("otpy")

FORMAT = 1
MAX_BATCH = 1024  # records in flight at once
MAX_PENDING = 65_536  # records waiting for JetStream, at most
PUBLISH_TIMEOUT = 5.0
CLAIM_ATTEMPTS = 8
HEADROOM = 4096  # what a value leaves of the server's max_payload for its framing
_FENCE_LINE = ("another node runs {name!r} now (its stored state moved on under this "
               "node, which was cut off or stopped); this node's copy stops")


def bucket_name(cluster_token: str) -> str:
    return f"otpy-{cluster_token.replace('=', '_')}-states"


def key_of(name: str) -> str:
    """A server name as a KV key: base64url (KV keys take few characters)."""
    return "s" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


class _Record:
    """A key's latest state not yet acknowledged: ``first`` is the seq of the oldest
    record of the key that waits on it (the replies of both wait for this one)."""

    __slots__ = ("delete", "first", "name", "number", "seq", "value")

    def __init__(self, name: str, first: int, seq: int, number: int, value: bytes,
                 delete: bool) -> None:
        self.name = name
        self.first = first
        self.seq = seq
        self.number = number
        self.value = value
        self.delete = delete


class ClusterStates:
    """An ``otpy.Store`` over JetStream KV, for cluster-scoped durable servers (see the
    module doc). Runs on the node's loop: :meth:`run` is its flusher task, and
    :meth:`claim` is awaited before a server's start on this node."""

    def __init__(self, client: Client, kv: KeyValue, *, node: str, creation: int,
                 max_pending: int = MAX_PENDING) -> None:
        self.client = client
        self.kv = kv
        self.writer = f"{node}/{creation}"
        self.origin = f"the cluster's KV bucket {kv.bucket!r}"
        self.path = self.origin  # what Durability names the store by
        self.max_pending = max_pending
        payload = int(client.server_info.get("max_payload") or 1 << 20)
        self.max_value = max(1024, payload - HEADROOM)
        self._seq = 0  # the last record's seq
        self._synced = 0
        self._number = 0  # this writer's record numbers, in the values
        self._unsent: dict[str, _Record] = {}
        self._inflight: dict[str, _Record] = {}
        self._rev: dict[str, int] = {}  # key -> its revision as last seen (0: none)
        self._known: dict[str, StoredState | None] = {}  # name -> latest state recorded
        self._fenced: dict[str, str] = {}  # name -> why it is fenced
        self._claimed: list[StoredState] = []  # given back by load()
        self._on_synced: Callable[[int, StoreError | None], object] | None = None
        self._on_fenced: Callable[[str, StoreError], object] | None = None
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._closed = False
        self._stats = {"records": 0, "bytes": 0, "batches": 0, "retries": 0,
                       "fenced": 0, "claims": 0}
        self._last_sync: float | None = None

    @classmethod
    async def open(cls, client: Client, cluster_token: str, *, node: str,
                   creation: int) -> ClusterStates:
        """The store of the cluster's bucket (created if it does not exist)."""
        kv = await JetStream(client).key_value(bucket_name(cluster_token), history=1)
        return cls(client, kv, node=node, creation=creation)

    # -- the Store protocol -----------------------------------------------------------

    @property
    def synced_seq(self) -> int:
        return self._synced

    def put(self, key: str, vsn: str, state: Any) -> int:
        try:
            image = pickle.dumps(state, 5)
        except Exception as exc:
            raise StoreError(
                f"the state of {key!r} cannot be pickled ({type(exc).__name__}: {exc}); a "
                f"durable server's state must be picklable: no open files, locks, "
                f"lambdas or local classes in it", path=self.origin) from exc
        return self._queue(key, vsn, image, delete=False)

    def patch(self, key: str, vsn: str, state: Any, changed: Iterable[Hashable]) -> int:
        # A KV value is a whole state: a patch records the state (its cost is the
        # state's, which the module doc of otpy._core.durable allows a store to choose).
        for _ in changed:
            return self.put(key, vsn, state)
        return self._seq

    def put_many(self, items: Iterable[tuple[str, str, Any]]) -> int:
        seq = self._seq
        for key, vsn, state in items:
            seq = self.put(key, vsn, state)
        return seq

    def delete(self, key: str) -> int:
        return self._queue(key, "", b"", delete=True)

    def get(self, key: str) -> StoredState | None:
        return self._known.get(key)

    def on_synced(self, callback: Callable[[int, StoreError | None], object],
                  call_soon: Callable[..., object]) -> None:
        # The flusher runs on the node's loop: it calls back directly.
        self._on_synced = callback

    def on_fenced(self, callback: Callable[[str, StoreError], object]) -> None:
        """``callback(name, error)`` when a server's key turns out to be another
        node's (see the module doc): its held replies must fail, its copy stop."""
        self._on_fenced = callback

    def load(self) -> list[StoredState]:
        claimed, self._claimed = self._claimed, []
        return claimed

    def statistics(self) -> dict[str, Any]:
        return {"bucket": self.kv.bucket, "pending": self._seq - self._synced,
                "unsent_keys": len(self._unsent), "in_flight": len(self._inflight),
                "fenced_now": len(self._fenced), "last_sync": self._last_sync,
                **self._stats}

    def close(self) -> None:
        self._closed = True

    # -- recording ----------------------------------------------------------------------

    def _queue(self, name: str, vsn: str, image: bytes, *, delete: bool) -> int:
        if self._closed:
            raise StoreError(f"{self.origin} is closed; the node is stopping",
                             path=self.origin)
        why = self._fenced.get(name)
        if why is not None:
            raise StoreError(f"{why}; nothing was recorded", path=self.origin)
        if self._seq - self._synced >= self.max_pending:
            raise StoreError(
                f"{self.max_pending} records wait for {self.origin} (JetStream has not "
                f"acknowledged them: is the NATS server reachable?); the step is refused "
                f"rather than let the node's memory grow", path=self.origin)
        number = self._number + 1
        value = b"" if delete else msgpack.packb(
            [FORMAT, self.writer, number, vsn, image], use_bin_type=True)
        if len(value) > self.max_value:
            raise StoreError(
                f"the state of {name!r} is {len(value)} bytes pickled; {self.origin} takes "
                f"at most {self.max_value} (the NATS server's max_payload less "
                f"{HEADROOM}): keep the state smaller, or raise max_payload",
                path=self.origin)
        self._number = number
        seq = self._seq = self._seq + 1
        key = key_of(name)
        old = self._unsent.get(key)
        self._unsent[key] = _Record(name, old.first if old else seq, seq, number, value,
                                    delete)
        self._known[name] = None if delete else StoredState(name, vsn, seq, image, (),
                                                            self.origin)
        self._stats["records"] += 1
        self._stats["bytes"] += len(value)
        self._wake.set()
        return seq

    # -- claiming a key -------------------------------------------------------------------

    async def claim(self, name: str) -> StoredState | None:
        """Make ``name``'s key this node's before its server starts here: read its last
        value and write it again (a delete marker when there is none) by
        compare-and-swap, so that no earlier writer can write it any more. Returns
        the state to resume from (None: start from init). Raises StoreError if
        JetStream cannot be reached."""
        key = key_of(name)
        subject = self.kv.subject(key)
        self._unsent.pop(key, None)
        try:
            for _ in range(CLAIM_ATTEMPTS):
                last = await self.kv.last(key)
                rev = last[0].revision if last is not None else 0
                stored = None
                if last is not None and last[1] == "PUT":
                    stored = self._decode(name, last[0].value, rev)
                if stored is not None and not stored.error:
                    value = msgpack.packb([FORMAT, self.writer, 0, stored.vsn,
                                           stored.image], use_bin_type=True)
                    headers = {EXPECTED_LAST_SUBJECT_SEQ: str(rev)}
                else:
                    # Nothing usable (or unreadable: left for the start to refuse, and
                    # fenced all the same by a marker only when there is no value).
                    if stored is not None:
                        self._rev[key] = rev
                        break
                    value, headers = b"", {EXPECTED_LAST_SUBJECT_SEQ: str(rev),
                                           KV_OPERATION: "DEL"}
                try:
                    ack = parse_ack(await self.client.request(
                        subject, value, headers=headers, timeout=PUBLISH_TIMEOUT), subject)
                except JetStreamError as exc:
                    if exc.err_code == ERR_WRONG_LAST_SEQUENCE:
                        continue  # a late write of the earlier owner landed: read again
                    raise
                self._rev[key] = int(ack["seq"])
                break
            else:
                raise StoreError(f"could not claim the stored state of {name!r} in "
                                 f"{self.origin}: it kept changing under this node "
                                 f"({CLAIM_ATTEMPTS} attempts)", path=self.origin)
        except (NatsError, ValueError) as exc:
            raise StoreError(f"could not read the stored state of {name!r} from "
                             f"{self.origin}: {exc}", path=self.origin) from exc
        self._fenced.pop(name, None)
        self._known[name] = stored if stored is not None and not stored.error else None
        self._stats["claims"] += 1
        return stored

    async def claim_at_open(self, names: Iterable[str], limit: int = 64) -> None:
        """Claim ``names`` (this node's at its start), ``limit`` at a time; load()
        gives their states back."""
        found: list[StoredState] = []
        pending = list(names)
        sem = trio.Semaphore(limit)

        async def one(name: str) -> None:
            async with sem:
                stored = await self.claim(name)
            if stored is not None:
                found.append(stored)

        async with trio.open_nursery() as nursery:
            for name in pending:
                nursery.start_soon(one, name)
        self._claimed.extend(found)

    def _fields(self, raw: bytes) -> tuple[Any, ...] | None:
        try:  # any NATS client can write the bucket: within a message's bounds
            fields = wire.decode_value(raw)
        except ValueError:
            return None
        if (not isinstance(fields, tuple) or len(fields) != 5 or fields[0] != FORMAT
                or not isinstance(fields[1], str) or not isinstance(fields[2], int)
                or not isinstance(fields[3], str) or not isinstance(fields[4], bytes)):
            return None
        return fields

    def _decode(self, name: str, raw: bytes, rev: int) -> StoredState:
        fields = self._fields(raw)
        if fields is None:
            return StoredState(name, "", rev, b"", (), self.origin,
                               error=f"its value (revision {rev}, {len(raw)} bytes) is not "
                                     f"a state otpy wrote (format {FORMAT}); delete the key "
                                     f"{key_of(name)!r} to start the server afresh")
        return StoredState(name, fields[3], rev, fields[4], (), self.origin)

    # -- the flusher --------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Publish what is queued, one batch at a time, until cancelled."""
        task_status.started()
        backoff = 0.05
        while True:
            if not self._unsent:
                self._idle.set()
                self._wake = trio.Event()
                await self._wake.wait()
                self._idle = trio.Event()
            batch: dict[str, _Record] = {}
            for key in list(self._unsent)[:MAX_BATCH]:
                batch[key] = self._unsent.pop(key)
            self._inflight = batch
            outcomes = await self._send(batch)
            again: dict[str, _Record] = {}
            for key, record in batch.items():
                outcome = outcomes.get(key)
                if isinstance(outcome, int):
                    self._rev[key] = outcome
                elif (isinstance(outcome, JetStreamError)
                      and outcome.err_code == ERR_WRONG_LAST_SEQUENCE):
                    if not await self._moved_on(key, record):
                        again[key] = record
                else:
                    again[key] = record
            self._inflight = {}
            for key, record in again.items():  # before any later state of the key
                later = self._unsent.get(key)
                if later is not None:
                    later.first = min(later.first, record.first)
                else:
                    self._unsent[key] = record
            self._stats["batches"] += 1
            self._advance()
            if again:
                self._stats["retries"] += len(again)
                await trio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            else:
                backoff = 0.05

    async def _send(self, batch: dict[str, _Record]) -> dict[str, int | BaseException]:
        outcomes: dict[str, int | BaseException] = {}
        done = trio.Event()
        waiting = len(batch)

        def answered(key: str, subject: str) -> Callable[[Msg | NatsError], None]:
            def on(result: Msg | NatsError) -> None:
                nonlocal waiting
                if isinstance(result, Msg):
                    try:
                        outcomes[key] = int(parse_ack(result, subject)["seq"])
                    except (JetStreamError, KeyError, TypeError, ValueError) as exc:
                        outcomes[key] = exc
                else:
                    outcomes[key] = result
                waiting -= 1
                if not waiting:
                    done.set()
            return on

        for key, record in batch.items():
            subject = self.kv.subject(key)
            headers = {EXPECTED_LAST_SUBJECT_SEQ: str(self._rev.get(key, 0))}
            if record.delete:
                headers[KV_OPERATION] = "DEL"
            try:
                self.client.request_nowait(subject, record.value, answered(key, subject),
                                           headers=headers, timeout=PUBLISH_TIMEOUT)
            except NatsError as exc:
                outcomes[key] = exc
                waiting -= 1
        if waiting:
            await done.wait()
        return outcomes

    async def _moved_on(self, key: str, record: _Record) -> bool:
        """A publish of ``record`` failed on its key's revision. If the last value is
        this node's own (a publish applied although its ack was lost), take its
        revision: True if it is this very record (done), False to send it again. If
        another node wrote it, the key is fenced: True."""
        try:
            last = await self.kv.last(key)
        except NatsError:
            return False  # ask again on the next round
        if last is not None:
            if record.delete and last[1] != "PUT":
                self._rev[key] = last[0].revision  # deleted, as this record asked
                return True
            fields = self._fields(last[0].value) if last[1] == "PUT" else None
            if fields is not None and fields[1] == self.writer and fields[2] > 0:
                self._rev[key] = last[0].revision
                return bool(fields[2] >= record.number)
        self._fence(key, record)
        return True

    def _fence(self, key: str, record: _Record) -> None:
        name = record.name
        why = _FENCE_LINE.format(name=name)
        self._fenced[name] = why
        self._known.pop(name, None)
        self._unsent.pop(key, None)
        self._rev.pop(key, None)
        self._stats["fenced"] += 1
        log.warning("cluster_state_fenced", server=name, bucket=self.kv.bucket)
        if self._on_fenced is not None:
            self._on_fenced(name, StoreError(why, path=self.origin))

    def _advance(self) -> None:
        waiting = [r.first for r in self._unsent.values()]
        waiting.extend(r.first for r in self._inflight.values())
        synced = min(waiting) - 1 if waiting else self._seq
        if synced > self._synced:
            self._synced = synced
            self._last_sync = time.time()
            if self._on_synced is not None:
                self._on_synced(synced, None)

    async def drain(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every queued record is acknowledged;
        whether it was."""
        with trio.move_on_after(timeout):
            while self._unsent or self._inflight:
                await self._idle.wait()
                await trio.sleep(0)
            return True
        return False


class SplitStore:
    """One ``otpy.Store`` over two: the names in ``names`` (cluster-scoped durable
    servers) go to ``cluster`` (:class:`ClusterStates`), the others to ``local`` (the
    node's own store; None when it has no other durable server). Seqs are this store's
    own; ``synced_seq`` is the last one up to which both stores synced."""

    def __init__(self, local: Store | None, cluster: ClusterStates, names: set[str]) -> None:
        self.local = local
        self.cluster = cluster
        self.names = names
        self.path = (f"{getattr(local, 'path', type(local).__name__)} and {cluster.origin}"
                     if local is not None else cluster.origin)
        self._seq = 0
        self._waiting: list[tuple[int, Any, int]] = []  # (seq, inner store, inner seq)
        self._head = 0

    def _route(self, key: str) -> Any:
        if key in self.names:
            return self.cluster
        if self.local is None:
            raise StoreError(f"{key!r} is durable but not cluster-scoped, and this node "
                             f"has no local store: pass open_node(store=PATH)",
                             path=self.path)
        return self.local

    def _track(self, store: Any, inner: int) -> int:
        seq = self._seq = self._seq + 1
        if inner > store.synced_seq:
            self._waiting.append((seq, store, inner))
        return seq

    @property
    def synced_seq(self) -> int:
        waiting = self._waiting
        head = self._head
        while head < len(waiting) and waiting[head][2] <= waiting[head][1].synced_seq:
            head += 1
        if head == len(waiting):
            waiting.clear()
            self._head = 0
            return self._seq
        if head > 1024:
            del waiting[:head]
            head = 0
        self._head = head
        return waiting[head][0] - 1

    def put(self, key: str, vsn: str, state: Any) -> int:
        store = self._route(key)
        return self._track(store, store.put(key, vsn, state))

    def patch(self, key: str, vsn: str, state: Any, changed: Iterable[Hashable]) -> int:
        store = self._route(key)
        return self._track(store, store.patch(key, vsn, state, changed))

    def put_many(self, items: Iterable[tuple[str, str, Any]]) -> int:
        items = list(items)
        local = [i for i in items if i[0] not in self.names]
        shared = [i for i in items if i[0] in self.names]
        seq = self._seq
        if local:
            store = self._route(local[0][0])
            seq = self._track(store, store.put_many(local))
        if shared:
            seq = self._track(self.cluster, self.cluster.put_many(shared))
        return seq

    def delete(self, key: str) -> int:
        store = self._route(key)
        return self._track(store, store.delete(key))

    def get(self, key: str) -> StoredState | None:
        stored: StoredState | None = self._route(key).get(key)
        return stored

    def on_synced(self, callback: Callable[[int, StoreError | None], object],
                  call_soon: Callable[..., object]) -> None:
        def inner(_seq: int, error: StoreError | None) -> None:
            callback(self.synced_seq, error)

        if self.local is not None:
            self.local.on_synced(inner, call_soon)
        self.cluster.on_synced(inner, call_soon)

    def on_fenced(self, callback: Callable[[str, StoreError], object]) -> None:
        self.cluster.on_fenced(callback)

    def load(self) -> list[StoredState]:
        return [*(self.local.load() if self.local is not None else ()),
                *self.cluster.load()]

    def statistics(self) -> dict[str, Any]:
        stats = dict(self.local.statistics()) if self.local is not None else {}
        stats["cluster"] = self.cluster.statistics()
        return stats

    def close(self) -> None:
        self.cluster.close()
        if self.local is not None:
            self.local.close()

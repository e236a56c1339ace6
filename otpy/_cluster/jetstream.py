"""JetStream's key-value store and object store over the trio NATS client: JSON requests
on ``$JS.API.*`` subjects, in the formats the official clients use (so the ``nats`` CLI
can read what otpy writes, and the other way round).

::

    js = JetStream(nc)
    kv = await js.key_value("registry", history=5)
    rev = await kv.create("counter", b"node-a")        # KeyExists if someone has it
    await kv.update("counter", b"node-b", rev)          # WrongRevision if it moved on
    value, revision = await kv.get("counter")
    async with kv.watch(callback=print) as watcher:     # every change, as it happens
        await watcher.ready.wait()                      # current values delivered

The KV store is a stream ``KV_<bucket>`` over subjects ``$KV.<bucket>.<key>``: a put is
a publish, its revision the stream sequence, and compare-and-swap is the header
``Nats-Expected-Last-Subject-Sequence`` (``0``: the key must not exist). The server
answers a failed expectation with err_code 10071: :class:`KeyExists` for
:meth:`KeyValue.create`, :class:`WrongRevision` for :meth:`KeyValue.update`. A delete
writes a marker (header ``KV-Operation: DEL``; ``PURGE`` with ``Nats-Rollup: sub`` also
drops the key's history); a key whose last entry is a marker reads as absent and can be
created again.

Watching: an *ordered push consumer*, an ephemeral consumer with no acks whose
deliveries carry their stream and consumer sequences in the reply subject. The watcher
checks that consumer sequences follow each other; on a gap, on a missed heartbeat, or
after the client reconnects, it replaces the consumer with one that starts after the
last stream sequence it delivered. So a watcher sees every change in order, exactly
once, across reconnects (a node that was cut off learns, on reconnect, what it
missed). Its callback is synchronous, called by the client's reader.

The object store is a stream ``OBJ_<bucket>``: an object's chunks on
``$O.<bucket>.C.<nuid>`` and its description (JSON: name, size, chunks, SHA-256 digest)
on ``$O.<bucket>.M.<base64url(name)>``. :meth:`ObjectStore.get` refuses an object
larger than ``max_object_size`` before fetching it, stops at the declared size, and
checks the digest (:class:`DigestMismatch`).

Errors are this module's own (:class:`JetStreamError` and below, under the client's
``NatsError``); the cluster layer turns them into otpy's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import structlog
import trio

from .._protocol.nats import HeaderInput, Headers
from .nats_client import Client, Msg, NatsError, NoResponders, NotConnected

log = structlog.get_logger("otpy.cluster.jetstream")

API = "$JS.API"
ERR_WRONG_LAST_SEQUENCE = 10071
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
NS = 1_000_000_000

KV_OPERATION = "KV-Operation"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
ROLLUP = "Nats-Rollup"
MSG_TTL = "Nats-TTL"

DEFAULT_CHUNK = 128 * 1024
DEFAULT_MAX_OBJECT = 64 * 1024 * 1024

_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")
_BUCKET = re.compile(r"[a-zA-Z0-9_-]+")


# -- errors ---------------------------------------------------------------------------------


class JetStreamError(NatsError):
    """JetStream answered with an error (``code`` is HTTP-like, ``err_code`` JetStream's
    own), or could not be reached."""

    def __init__(self, description: str, *, code: int = 0, err_code: int = 0) -> None:
        super().__init__(description)
        self.description = description
        self.code = code
        self.err_code = err_code


class JetStreamNotEnabled(JetStreamError):
    """Nothing answers on ``$JS.API``: the server runs without JetStream."""


class BucketNotFound(JetStreamError, LookupError):
    """The KV bucket or object store does not exist (and was not to be created)."""


class KeyExists(JetStreamError):
    """:meth:`KeyValue.create` found the key taken; ``existing`` is its current entry
    (value and revision) when it could be read."""

    def __init__(self, key: str, existing: KvEntry | None) -> None:
        super().__init__(f"the key {key!r} already exists"
                         + (f" at revision {existing.revision}" if existing else ""),
                         code=400, err_code=ERR_WRONG_LAST_SEQUENCE)
        self.key = key
        self.existing = existing


class WrongRevision(JetStreamError):
    """:meth:`KeyValue.update`/``delete`` expected ``expected`` as the key's last
    revision; it is ``actual`` (None if the server did not say)."""

    def __init__(self, key: str, expected: int, actual: int | None) -> None:
        now = f"it is {actual}" if actual is not None else "it has moved on"
        super().__init__(f"expected {key!r} at revision {expected}, but {now}", code=400,
                         err_code=ERR_WRONG_LAST_SEQUENCE)
        self.key = key
        self.expected = expected
        self.actual = actual


class ObjectNotFound(JetStreamError, LookupError):
    """No object of that name in the store."""


class ObjectTooLarge(JetStreamError, ValueError):
    """An object over ``max_object_size``."""


class DigestMismatch(JetStreamError):
    """An object's chunks do not match its recorded size or SHA-256 digest."""


# -- values ---------------------------------------------------------------------------------


class KvEntry(NamedTuple):
    """A key's current value and its revision (the stream sequence of its last put)."""

    value: bytes
    revision: int


class KvChange(NamedTuple):
    """One change seen by a watcher: ``operation`` is ``"PUT"``, ``"DEL"`` or
    ``"PURGE"`` (for a delete, ``value`` is empty); ``pending`` is how many more changes
    the server had queued for this watcher when it sent this one."""

    key: str
    value: bytes
    revision: int
    operation: str
    pending: int


class ObjectInfo(NamedTuple):
    """What the object store records about one object."""

    name: str
    size: int
    chunks: int
    digest: str
    nuid: str
    mtime: str


def _ns(seconds: float) -> int:
    return int(seconds * NS)


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or key.startswith(".") or key.endswith("."):
        raise ValueError(f"expected a KV key of letters, digits and -/_=. (not starting or "
                         f"ending with '.'), got {key!r}; encode other names first")
    return key


def _check_bucket(bucket: str) -> str:
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"expected a bucket name of letters, digits, '_' and '-', got "
                         f"{bucket!r}")
    return bucket


def _version(info: dict[str, Any]) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(info.get("version", "")))
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def _operation(headers: Headers | None) -> str:
    if headers is None:
        return "PUT"
    op = headers.get_one(KV_OPERATION)
    if op in ("DEL", "PURGE"):
        return op
    if headers.get_one("Nats-Marker-Reason"):  # the server's marker for an expired key
        return "PURGE"
    return "PUT"


# -- the API ----------------------------------------------------------------------------------


class JetStream:
    """JetStream's JSON API over a connected :class:`Client`."""

    def __init__(self, client: Client, *, timeout: float = 5.0, prefix: str = API) -> None:
        self.client = client
        self.timeout = timeout
        self.prefix = prefix

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request to ``$JS.API.<subject>``; the decoded reply, or a
        :class:`JetStreamError` for ``{"error": ...}``."""
        payload = b"" if body is None else json.dumps(body).encode()
        try:
            msg = await self.client.request(f"{self.prefix}.{subject}", payload,
                                            timeout=self.timeout)
        except NoResponders:
            raise JetStreamNotEnabled("nothing answers on $JS.API: JetStream is not enabled "
                                      "on the NATS server (start it with -js)") from None
        return _reply(msg, subject)

    async def publish(self, subject: str, payload: bytes, *,
                      headers: HeaderInput | None = None) -> dict[str, Any]:
        """Publish into a stream and return its ack (``{"stream": ..., "seq": N}``)."""
        try:
            msg = await self.client.request(subject, payload, headers=headers,
                                            timeout=self.timeout)
        except NoResponders:
            raise JetStreamError(f"no stream takes {subject!r} (or JetStream is not "
                                 f"enabled)", code=503) from None
        return _reply(msg, subject)

    async def stream_info(self, stream: str) -> dict[str, Any] | None:
        """A stream's info, or None if it does not exist."""
        try:
            return await self.api(f"STREAM.INFO.{stream}")
        except JetStreamError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                return None
            raise

    async def ensure_stream(self, config: dict[str, Any]) -> dict[str, Any]:
        """Create the stream (creating an identical one is a no-op, so nodes racing to
        create it all succeed)."""
        return await self.api(f"STREAM.CREATE.{config['name']}", config)

    async def direct_get(self, stream: str, *, last_by_subject: str | None = None,
                         seq: int | None = None, next_by_subject: str | None = None
                         ) -> Msg | None:
        """A stored message read directly (``allow_direct``): the last on a subject, or
        the first at or after ``seq`` on ``next_by_subject``; None if there is none."""
        if last_by_subject is not None:
            subject, payload = f"{self.prefix}.DIRECT.GET.{stream}.{last_by_subject}", b""
        else:
            body: dict[str, Any] = {"seq": seq or 0}
            if next_by_subject is not None:
                body["next_by_subj"] = next_by_subject
            subject = f"{self.prefix}.DIRECT.GET.{stream}"
            payload = json.dumps(body).encode()
        try:
            msg = await self.client.request(subject, payload, timeout=self.timeout)
        except NoResponders:
            raise BucketNotFound(f"no stream {stream!r} answers direct gets (it does not "
                                 f"exist, or JetStream is not enabled)", code=503) from None
        status = msg.status
        if status == 404:
            return None
        if status is not None:
            h = msg.headers
            raise JetStreamError(f"direct get from {stream!r} answered {status} "
                                 f"{h.description if h else ''}", code=status)
        return msg

    async def key_value(self, bucket: str, *, create: bool = True, history: int = 1,
                        ttl: float | None = None, per_key_ttl: bool = False,
                        max_value_size: int = -1, max_bytes: int = -1,
                        storage: str = "file") -> KeyValue:
        """The KV bucket ``bucket``, created if it does not exist and ``create``
        (otherwise :class:`BucketNotFound`). ``history``: values kept per key (1-64).
        ``ttl``: entries expire after that many seconds. ``per_key_ttl``: allow
        :meth:`KeyValue.create`/``put``/``update`` with ``ttl=`` (nats-server >= 2.11,
        ``history=1``; the TTL belongs to the value, so an update without ``ttl``
        makes the key permanent; an expired key reads as absent and watchers see a
        ``PURGE``)."""
        _check_bucket(bucket)
        if not 1 <= history <= 64:
            raise ValueError(f"expected history between 1 and 64, got {history}")
        if per_key_ttl and history != 1:
            # nats-server expires by TTL only a subject's last message, and a marker TTL
            # bounds per-message TTLs unless max_msgs_per_subject is 1 (nats-server
            # #6959, #6818): measured here, a TTL'd key in a history-3 bucket never went.
            raise ValueError(f"per-key TTLs need history=1 (got {history}): the server "
                             f"expires a TTL only on a key's last value")
        stream = f"KV_{bucket}"
        info = await self.stream_info(stream)
        if info is None:
            if not create:
                raise BucketNotFound(f"no KV bucket {bucket!r}", code=404,
                                     err_code=ERR_STREAM_NOT_FOUND)
            if per_key_ttl and _version(self.client.server_info) < (2, 11, 0):
                raise JetStreamError(f"per-key TTLs need nats-server >= 2.11; this one is "
                                     f"{self.client.server_info.get('version')}")
            config: dict[str, Any] = {
                "name": stream, "subjects": [f"$KV.{bucket}.>"],
                "retention": "limits", "max_msgs_per_subject": history,
                "max_msgs": -1, "max_bytes": max_bytes, "max_msg_size": max_value_size,
                "max_age": _ns(ttl) if ttl else 0, "storage": storage,
                "discard": "new", "num_replicas": 1,
                "duplicate_window": _ns(min(ttl, 120.0)) if ttl else _ns(120.0),
                "allow_rollup_hdrs": True, "deny_delete": True, "deny_purge": False,
                "allow_direct": True, "mirror_direct": False,
            }
            if per_key_ttl:
                config["allow_msg_ttl"] = True
                # An expired key leaves a marker (seen by watchers), itself kept 15 min.
                config["subject_delete_marker_ttl"] = _ns(900.0)
            info = await self.ensure_stream(config)
        return KeyValue(self, bucket, info.get("config", {}))

    async def object_store(self, bucket: str, *, create: bool = True,
                           max_object_size: int = DEFAULT_MAX_OBJECT,
                           storage: str = "file") -> ObjectStore:
        """The object store ``bucket``, created if need be (see the module doc)."""
        _check_bucket(bucket)
        stream = f"OBJ_{bucket}"
        if await self.stream_info(stream) is None:
            if not create:
                raise BucketNotFound(f"no object store {bucket!r}", code=404,
                                     err_code=ERR_STREAM_NOT_FOUND)
            await self.ensure_stream({
                "name": stream, "subjects": [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
                "retention": "limits", "max_msgs": -1, "max_bytes": -1, "max_age": 0,
                "storage": storage, "discard": "new", "num_replicas": 1,
                "allow_rollup_hdrs": True, "allow_direct": True})
        return ObjectStore(self, bucket, max_object_size)


def parse_ack(msg: Msg, what: str) -> dict[str, Any]:
    """A JetStream answer (a publish's ack, an API reply) as a dict, or the
    :class:`JetStreamError` it carries, raised."""
    return _reply(msg, what)


def _reply(msg: Msg, what: str) -> dict[str, Any]:
    try:
        reply = json.loads(msg.payload)
    except ValueError:
        raise JetStreamError(f"JetStream answered {what} with something that is not JSON: "
                             f"{msg.payload[:80]!r}") from None
    if not isinstance(reply, dict):
        raise JetStreamError(f"JetStream answered {what} with {reply!r}; expected an object")
    error = reply.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise JetStreamError(f"JetStream answered {what} with error {error!r}")
        raise JetStreamError(f"{what}: {error.get('description', 'error')}",
                             code=int(error.get("code") or 0),
                             err_code=int(error.get("err_code") or 0))
    return reply


# -- key-value --------------------------------------------------------------------------------


class KeyValue:
    """One KV bucket (see the module doc)."""

    def __init__(self, js: JetStream, bucket: str, config: dict[str, Any]) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.config = config
        self._prefix = f"$KV.{bucket}."

    def _subject(self, key: str) -> str:
        return self._prefix + _check_key(key)

    def subject(self, key: str) -> str:
        """The subject ``key``'s values are published on (ValueError for a bad key)."""
        return self._subject(key)

    async def last(self, key: str) -> tuple[KvEntry, str] | None:
        """``key``'s last entry and its operation (``"PUT"``, ``"DEL"``, ``"PURGE"``),
        markers included; None if the key never had one (or was purged away)."""
        return await self._last(key)

    async def _put(self, key: str, value: bytes, headers: dict[str, str]) -> int:
        ack = await self.js.publish(self._subject(key), value, headers=headers or None)
        return int(ack["seq"])

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Set ``key`` whatever it was; its new revision."""
        return await self._put(key, value, _ttl_header(ttl))

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Set ``key`` only if it does not exist (or was deleted); its revision. Of any
        number of clients racing to create one key, exactly one succeeds; the others get
        :class:`KeyExists`."""
        headers = {EXPECTED_LAST_SUBJECT_SEQ: "0", **_ttl_header(ttl)}
        try:
            return await self._put(key, value, headers)
        except JetStreamError as exc:
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                raise
        # The key has entries: if the last is a delete marker, it may be created again,
        # by compare-and-swap on that marker.
        last = await self._last(key)
        if last is not None and last[1] != "PUT":
            try:
                return await self._put(key, value, {
                    EXPECTED_LAST_SUBJECT_SEQ: str(last[0].revision), **_ttl_header(ttl)})
            except JetStreamError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                    raise
            last = await self._last(key)
        existing = last[0] if last is not None and last[1] == "PUT" else None
        raise KeyExists(key, existing)

    async def update(self, key: str, value: bytes, last_revision: int, *,
                     ttl: float | None = None) -> int:
        """Set ``key`` only if its last revision is ``last_revision`` (compare-and-swap);
        the new revision, or :class:`WrongRevision`."""
        try:
            return await self._put(key, value, {EXPECTED_LAST_SUBJECT_SEQ: str(last_revision),
                                                **_ttl_header(ttl)})
        except JetStreamError as exc:
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                raise
            raise WrongRevision(key, last_revision, _actual(exc.description)) from None

    async def get(self, key: str) -> KvEntry | None:
        """``(value, revision)`` of ``key``, or None if it does not exist or was
        deleted."""
        last = await self._last(key)
        if last is None or last[1] != "PUT":
            return None
        return last[0]

    async def _last(self, key: str) -> tuple[KvEntry, str] | None:
        msg = await self.js.direct_get(self.stream, last_by_subject=self._subject(key))
        if msg is None:
            return None
        h = msg.headers
        seq = h.get_one("Nats-Sequence") if h is not None else None
        if seq is None or not seq.isdigit():
            raise JetStreamError(f"a direct get of {key!r} carried no Nats-Sequence header")
        return KvEntry(msg.payload, int(seq)), _operation(h)

    async def delete(self, key: str, *, last_revision: int | None = None,
                     purge: bool = False) -> int:
        """Delete ``key`` (a marker: watchers see ``DEL``); with ``purge``, also drop
        its history (``PURGE``). With ``last_revision``, only if that is still the last
        (:class:`WrongRevision` otherwise). The marker's revision."""
        headers = {KV_OPERATION: "PURGE" if purge else "DEL"}
        if purge:
            headers[ROLLUP] = "sub"
        if last_revision is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQ] = str(last_revision)
        try:
            return await self._put(key, b"", headers)
        except JetStreamError as exc:
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE or last_revision is None:
                raise
            raise WrongRevision(key, last_revision, _actual(exc.description)) from None

    async def keys(self) -> list[str]:
        """Every key that exists now (deleted ones left out), sorted."""
        found: dict[str, bool] = {}

        def seen(change: KvChange) -> None:
            found[change.key] = change.operation == "PUT"

        async with self.watch(callback=seen, headers_only=True) as watcher:
            with trio.fail_after(self.js.timeout):
                await watcher.ready.wait()
        return sorted(k for k, present in found.items() if present)

    def watch(self, key: str = ">", *, callback: Callable[[KvChange], object] | None = None,
              include_history: bool = False, updates_only: bool = False,
              headers_only: bool = False, heartbeat: float = 1.0,
              max_pending: int = 10_000) -> _WatchContext:
        """Watch ``key`` (wildcards ``*`` and ``>`` allowed; default every key): an async
        context manager giving a :class:`KvWatcher`. First the current value of each
        key (every kept value with ``include_history``; none with ``updates_only``),
        then ``watcher.ready`` is set, then every change as it happens. With a
        synchronous ``callback`` it is called for each :class:`KvChange`; without,
        iterate the watcher (a queue of at most ``max_pending``: beyond that the watcher
        stops with an error rather than lose changes)."""
        if key != ">":
            for token in key.split("."):
                if token not in ("*", ">"):
                    _check_key(token)
        if include_history and updates_only:
            raise ValueError("include_history and updates_only exclude each other")
        policy = "new" if updates_only else "all" if include_history else "last_per_subject"
        return _WatchContext(self, self._prefix + key, policy, callback, headers_only,
                             heartbeat, max_pending)


def _ttl_header(ttl: float | None) -> dict[str, str]:
    if ttl is None:
        return {}
    if ttl < 1:
        raise ValueError(f"a per-key TTL is at least 1 second, got {ttl}")
    return {MSG_TTL: f"{math.ceil(ttl)}s"}


def _actual(description: str) -> int | None:
    m = re.search(r"wrong last sequence: (\d+)", description)
    return int(m[1]) if m else None


# -- watching: an ordered push consumer ----------------------------------------------------


class _WatchContext:
    def __init__(self, kv: KeyValue, filter_subject: str, policy: str,
                 callback: Callable[[KvChange], object] | None, headers_only: bool,
                 heartbeat: float, max_pending: int) -> None:
        self.args = (kv, filter_subject, policy, callback, headers_only, heartbeat,
                     max_pending)
        self._cm: Any = None

    async def __aenter__(self) -> KvWatcher:
        self._cm = _run_watcher(*self.args)
        watcher: KvWatcher = await self._cm.__aenter__()
        return watcher

    async def __aexit__(self, *exc: Any) -> bool | None:
        result: bool | None = await self._cm.__aexit__(*exc)
        return result


@asynccontextmanager
async def _run_watcher(kv: KeyValue, filter_subject: str, policy: str,
                       callback: Callable[[KvChange], object] | None, headers_only: bool,
                       heartbeat: float, max_pending: int) -> AsyncIterator[KvWatcher]:
    watcher = KvWatcher(kv, filter_subject, policy, callback, headers_only, heartbeat,
                        max_pending)
    try:
        async with trio.open_nursery() as nursery:
            await watcher._create()
            nursery.start_soon(watcher._manage)
            try:
                yield watcher
            finally:
                with trio.CancelScope(shield=True):
                    await watcher._stop()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaves = group.exceptions
        if len(leaves) == 1 and not isinstance(leaves[0], BaseExceptionGroup):
            raise leaves[0] from None
        raise


class KvWatcher:
    """The changes of a watched bucket, in order, each once (see the module doc).
    ``ready`` is set once the values present when watching began were delivered."""

    def __init__(self, kv: KeyValue, filter_subject: str, policy: str,
                 callback: Callable[[KvChange], object] | None, headers_only: bool,
                 heartbeat: float, max_pending: int) -> None:
        self.kv = kv
        self.client = kv.js.client
        self.filter_subject = filter_subject
        self.policy = policy
        self.callback = callback
        self.headers_only = headers_only
        self.heartbeat = heartbeat
        self.max_pending = max_pending
        self.ready = trio.Event()
        self.resets = 0
        self.error: JetStreamError | None = None
        self._queue: deque[KvChange] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._sub: Any = None
        self._consumer: str | None = None
        self._dseq = 0  # the last consumer sequence delivered
        self._sseq = 0  # the last stream sequence delivered
        self._last_seen = trio.current_time()
        self._reset_wanted = trio.Event()
        self._stopped = False
        self._remove_listener = self.client.add_listener(on_reconnect=self._want_reset)

    # -- delivery, called by the client's reader ---------------------------------------------

    def _on_message(self, msg: Msg) -> None:
        if self._stopped:
            return
        self._last_seen = trio.current_time()
        h = msg.headers
        if h is not None and h.status == 100:
            if msg.reply:  # a flow-control request: answer it
                self._publish(msg.reply)
            stalled = h.get_one("Nats-Consumer-Stalled")
            if stalled:
                self._publish(stalled)
            last = h.get_one("Nats-Last-Consumer")
            if last is not None and last.isdigit() and int(last) != self._dseq:
                self._want_reset()  # the heartbeat says we missed something
            return
        meta = _ack_metadata(msg.reply)
        if meta is None:
            return
        sseq, dseq, pending = meta
        if dseq != self._dseq + 1:
            self._want_reset()
            return
        self._dseq, self._sseq = dseq, sseq
        change = KvChange(msg.subject[len(self.kv._prefix):], msg.payload, sseq,
                          _operation(h), pending)
        if pending == 0 and not self.ready.is_set():
            self.ready.set()
        if self.callback is not None:
            try:
                self.callback(change)
            except Exception as exc:
                log.error("kv_watch_callback_failed", bucket=self.kv.bucket, key=change.key,
                          exc_info=exc)
        elif len(self._queue) >= self.max_pending:
            self._fail(JetStreamError(f"the watcher of {self.kv.bucket!r} fell "
                                      f"{self.max_pending} changes behind (max_pending)"))
        else:
            self._queue.append(change)
            self._lot.unpark()

    def _publish(self, subject: str) -> None:
        try:
            self.client.publish_nowait(subject, b"")
        except NatsError:
            pass  # reconnecting: the consumer will be replaced anyway

    def _want_reset(self) -> None:
        self._reset_wanted.set()

    def _fail(self, error: JetStreamError) -> None:
        self.error = error
        self._stopped = True
        log.error("kv_watch_failed", bucket=self.kv.bucket, error=str(error))
        self._lot.unpark_all()

    # -- the consumer -----------------------------------------------------------------------

    async def _create(self) -> None:
        old_sub, old_consumer = self._sub, self._consumer
        if old_sub is not None:
            old_sub.unsubscribe()
        inbox = self.client.new_inbox()
        self._sub = self.client.subscribe(inbox, self._on_message)
        config: dict[str, Any] = {
            "deliver_subject": inbox, "ack_policy": "none", "max_deliver": 1,
            "filter_subject": self.filter_subject, "flow_control": True,
            "idle_heartbeat": _ns(self.heartbeat), "mem_storage": True,
            "num_replicas": 1, "replay_policy": "instant",
            "inactive_threshold": _ns(max(5.0, 5 * self.heartbeat)),
            "headers_only": self.headers_only,
        }
        if self._sseq:  # a replacement: go on after the last change delivered
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = self._sseq + 1
        else:
            config["deliver_policy"] = self.policy
        self._dseq = 0
        self._last_seen = trio.current_time()
        info = await self.kv.js.api(f"CONSUMER.CREATE.{self.kv.stream}",
                                    {"stream_name": self.kv.stream, "config": config})
        self._consumer = info.get("name")
        if self.policy == "new" or info.get("num_pending") == 0:
            self.ready.set()
        if old_consumer:
            await self._delete_consumer(old_consumer)

    async def _delete_consumer(self, name: str) -> None:
        try:
            await self.kv.js.api(f"CONSUMER.DELETE.{self.kv.stream}.{name}")
        except NatsError:
            pass  # it expires by itself (inactive_threshold)

    async def _manage(self) -> None:
        while not self._stopped:
            with trio.move_on_after(self.heartbeat):
                await self._reset_wanted.wait()
            idle = trio.current_time() - self._last_seen
            if not self._reset_wanted.is_set() and idle < 3 * self.heartbeat:
                continue
            self._reset_wanted = trio.Event()
            if not self.client.is_connected:
                continue  # on_reconnect will ask again
            try:
                await self._create()
            except (JetStreamError, NotConnected, NatsError) as exc:
                log.warning("kv_watch_reset_failed", bucket=self.kv.bucket, error=str(exc))
                continue
            self.resets += 1
            log.info("kv_watch_reset", bucket=self.kv.bucket, after_revision=self._sseq)

    async def _stop(self) -> None:
        self._stopped = True
        self._remove_listener()
        self._lot.unpark_all()
        if self._sub is not None:
            self._sub.unsubscribe()
        if self._consumer and self.client.is_connected:
            with trio.move_on_after(1.0):
                await self._delete_consumer(self._consumer)

    # -- iteration --------------------------------------------------------------------------

    def __aiter__(self) -> KvWatcher:
        return self

    async def __anext__(self) -> KvChange:
        await trio.lowlevel.checkpoint()
        while not self._queue:
            if self.error is not None:
                raise self.error
            if self._stopped:
                raise StopAsyncIteration
            await self._lot.park()
        return self._queue.popleft()


def _ack_metadata(reply: str | None) -> tuple[int, int, int] | None:
    """(stream seq, consumer seq, pending) from a push delivery's reply subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`` or the
    form with a domain and account hash in front (12+ tokens)."""
    if reply is None or not reply.startswith("$JS.ACK."):
        return None
    tokens = reply.split(".")
    if len(tokens) == 9:
        base = 2
    elif len(tokens) >= 12:
        base = 4
    else:
        return None
    try:
        return (int(tokens[base + 3]), int(tokens[base + 4]), int(tokens[base + 6]))
    except ValueError:
        return None


# -- the object store ---------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


class ObjectStore:
    """One object store bucket (see the module doc)."""

    def __init__(self, js: JetStream, bucket: str, max_object_size: int) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        self.max_object_size = max_object_size

    def _meta_subject(self, name: str) -> str:
        if not name:
            raise ValueError("expected a non-empty object name")
        return f"$O.{self.bucket}.M." + base64.urlsafe_b64encode(name.encode()).decode()

    async def put(self, name: str, data: bytes, *, chunk_size: int = DEFAULT_CHUNK
                  ) -> ObjectInfo:
        """Store ``data`` as ``name`` (replacing what was there), in chunks of
        ``chunk_size`` bytes, with its SHA-256 digest."""
        if len(data) > self.max_object_size:
            raise ObjectTooLarge(f"the object {name!r} is {len(data)} bytes; the limit is "
                                 f"max_object_size={self.max_object_size}")
        chunk_size = max(1, min(chunk_size, self.js.client.max_payload - 1024))
        meta_subject = self._meta_subject(name)
        old = await self.info(name)
        nuid = secrets.token_hex(11)
        chunk_subject = f"$O.{self.bucket}.C.{nuid}"
        chunks = 0
        try:
            for offset in range(0, len(data), chunk_size):
                await self.js.publish(chunk_subject, data[offset:offset + chunk_size])
                chunks += 1
            info = ObjectInfo(name, len(data), chunks, _digest(data), nuid,
                              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta = {"name": name, "bucket": self.bucket, "nuid": nuid, "size": info.size,
                    "chunks": chunks, "digest": info.digest, "mtime": info.mtime,
                    "options": {"max_chunk_size": chunk_size}}
            await self.js.publish(meta_subject, json.dumps(meta).encode(),
                                  headers={ROLLUP: "sub"})
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(self.js.timeout):
                await self._purge(chunk_subject)
            raise
        if old is not None and old.nuid != nuid:
            await self._purge(f"$O.{self.bucket}.C.{old.nuid}")
        return info

    async def _purge(self, subject: str) -> None:
        try:
            await self.js.api(f"STREAM.PURGE.{self.stream}", {"filter": subject})
        except NatsError as exc:
            log.warning("object_purge_failed", bucket=self.bucket, subject=subject,
                        error=str(exc))

    async def info(self, name: str) -> ObjectInfo | None:
        """What is recorded about ``name``, or None."""
        msg = await self.js.direct_get(self.stream, last_by_subject=self._meta_subject(name))
        if msg is None:
            return None
        try:
            meta = json.loads(msg.payload)
            if meta.get("deleted"):
                return None
            return ObjectInfo(str(meta["name"]), int(meta["size"]), int(meta["chunks"]),
                              str(meta["digest"]), str(meta["nuid"]),
                              str(meta.get("mtime", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JetStreamError(f"the object store's record of {name!r} is malformed: "
                                 f"{exc!r}") from None

    async def get(self, name: str) -> bytes:
        """The bytes of ``name``, checked against its recorded size and digest.
        :class:`ObjectNotFound`, :class:`ObjectTooLarge` (checked before fetching),
        :class:`DigestMismatch`."""
        info = await self.info(name)
        if info is None:
            raise ObjectNotFound(f"no object {name!r} in {self.bucket!r}", code=404)
        if info.size > self.max_object_size or info.size < 0:
            raise ObjectTooLarge(f"the object {name!r} is {info.size} bytes; the limit is "
                                 f"max_object_size={self.max_object_size}")
        subject = f"$O.{self.bucket}.C.{info.nuid}"
        parts: list[bytes] = []
        size = 0
        seq = 0
        for _ in range(info.chunks):
            msg = await self.js.direct_get(self.stream, seq=seq, next_by_subject=subject)
            if msg is None:
                break
            size += len(msg.payload)
            if size > info.size:
                break
            parts.append(msg.payload)
            h = msg.headers
            got = h.get_one("Nats-Sequence") if h is not None else None
            if got is None or not got.isdigit():
                raise JetStreamError("a chunk carried no Nats-Sequence header")
            seq = int(got) + 1
        data = b"".join(parts)
        if len(data) != info.size or len(parts) != info.chunks:
            raise DigestMismatch(f"the object {name!r} should be {info.size} bytes in "
                                 f"{info.chunks} chunks; its chunks hold {size} bytes in "
                                 f"{len(parts)}")
        if _digest(data) != info.digest:
            raise DigestMismatch(f"the object {name!r} does not match its digest "
                                 f"{info.digest}")
        return data

    async def delete(self, name: str) -> None:
        """Remove ``name`` (its record says deleted; its chunks are purged)."""
        info = await self.info(name)
        if info is None:
            raise ObjectNotFound(f"no object {name!r} in {self.bucket!r}", code=404)
        meta = {"name": name, "bucket": self.bucket, "nuid": info.nuid, "size": 0,
                "chunks": 0, "digest": "", "deleted": True,
                "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        await self.js.publish(self._meta_subject(name), json.dumps(meta).encode(),
                              headers={ROLLUP: "sub"})
        await self._purge(f"$O.{self.bucket}.C.{info.nuid}")

"""JetStream's KV and object store over the trio client (otpy._cluster.jetstream),
against a real nats-server started by the test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from _nats import FAST, restart, running_server

from otpy._cluster.jetstream import (
    DigestMismatch,
    JetStream,
    JetStreamNotEnabled,
    KeyExists,
    KeyValue,
    KvChange,
    KvEntry,
    ObjectNotFound,
    ObjectTooLarge,
    WrongRevision,
)
from otpy._cluster.nats_client import Client, open_client
from otpy._cluster.server import NatsServer

LIMIT = 5.0


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    async with open_client(nats_server.url) as nc:
        yield nc


@pytest.fixture
async def kv(client: Client) -> KeyValue:
    return await JetStream(client).key_value("reg", history=5)


# -- compare-and-swap ---------------------------------------------------------------------


async def test_create_race_has_exactly_one_winner(nats_server: NatsServer) -> None:
    """Two clients create the same key at once, many times over: each time exactly one
    succeeds, and the loser's KeyExists carries the winner's value."""
    outcomes: list[tuple[str, object]] = []
    async with open_client(nats_server.url) as a, open_client(nats_server.url) as b:
        kva = await JetStream(a).key_value("reg")
        kvb = await JetStream(b).key_value("reg")

        async def create(kv: KeyValue, key: str, who: bytes) -> None:
            try:
                await kv.create(key, who)
                outcomes.append((key, who))
            except KeyExists as exc:
                outcomes.append((key, exc.existing))

        with trio.fail_after(LIMIT):
            for i in range(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(create, kva, f"name{i}", b"a")
                    nursery.start_soon(create, kvb, f"name{i}", b"b")
    for i in range(10):
        [won] = [who for key, who in outcomes if key == f"name{i}" and isinstance(who, bytes)]
        [lost] = [e for key, e in outcomes if key == f"name{i}" and not isinstance(e, bytes)]
        assert isinstance(lost, KvEntry)
        assert won == lost.value


async def test_update_is_compare_and_swap(kv: KeyValue) -> None:
    """Two updates from the same revision: the first wins, the second gets
    WrongRevision saying the revision it found."""
    rev = await kv.create("leader", b"a")
    new = await kv.update("leader", b"b", rev)
    with pytest.raises(WrongRevision) as info:
        await kv.update("leader", b"c", rev)
    assert (rev, new) == (info.value.expected, info.value.actual)
    assert KvEntry(b"b", new) == await kv.get("leader")


async def test_get_missing_and_deleted(kv: KeyValue) -> None:
    """A key never written, and a deleted one, read as None; a deleted key can be
    created again."""
    assert await kv.get("nope") is None
    await kv.create("gone", b"1")
    await kv.delete("gone")
    assert await kv.get("gone") is None
    rev = await kv.create("gone", b"2")
    assert KvEntry(b"2", rev) == await kv.get("gone")


async def test_purged_key_can_be_created_again(kv: KeyValue) -> None:
    """A purge drops the key's history; create works on it."""
    await kv.put("p", b"1")
    await kv.put("p", b"2")
    await kv.delete("p", purge=True)
    assert await kv.get("p") is None
    await kv.create("p", b"3")
    assert b"3" == (await kv.get("p") or KvEntry(b"", 0)).value


async def test_delete_with_last_revision(kv: KeyValue) -> None:
    """A conditional delete of a key that moved on is refused."""
    rev = await kv.create("d", b"1")
    await kv.put("d", b"2")
    with pytest.raises(WrongRevision):
        await kv.delete("d", last_revision=rev)
    assert await kv.get("d") is not None


async def test_keys_leaves_out_deleted_ones(kv: KeyValue) -> None:
    """keys() lists the keys that exist now."""
    assert [] == await kv.keys()
    for key in ("b", "a", "c"):
        await kv.put(key, b"x")
    await kv.delete("b")
    assert ["a", "c"] == await kv.keys()


async def test_bad_key_is_refused(kv: KeyValue) -> None:
    """A key with characters KV keys cannot hold raises ValueError before anything is
    sent."""
    with pytest.raises(ValueError, match="encode other names first"):
        await kv.put("a b", b"")


async def test_per_key_ttl_expires_and_watchers_see_it(client: Client) -> None:
    """A key created with a TTL is gone after it, and a watcher sees a PURGE."""
    kv = await JetStream(client).key_value("lease", per_key_ttl=True)
    changes: list[KvChange] = []
    async with kv.watch(callback=changes.append) as watcher:
        await watcher.ready.wait()
        await kv.create("node-a", b"alive", ttl=1)
        with trio.fail_after(LIMIT):
            while not any(c.operation == "PURGE" for c in changes):
                await trio.sleep(0.05)
    assert await kv.get("node-a") is None
    assert ["PUT", "PURGE"] == [c.operation for c in changes]


async def test_per_key_ttl_needs_history_one(client: Client) -> None:
    """The server expires only a key's last value, so TTLs with history are refused."""
    with pytest.raises(ValueError, match="history=1"):
        await JetStream(client).key_value("lease", per_key_ttl=True, history=2)


async def test_without_jetstream_says_so(tmp_path: Path) -> None:
    """A server without JetStream: JetStreamNotEnabled, not a timeout."""
    with running_server(tmp_path, jetstream=False) as server:
        async with open_client(server.url) as nc:
            with trio.fail_after(LIMIT), pytest.raises(JetStreamNotEnabled, match="-js"):
                await JetStream(nc).key_value("reg")


# -- watching -------------------------------------------------------------------------------


async def test_watch_gives_current_values_then_changes(kv: KeyValue) -> None:
    """A watcher gets each key's current value, sets ``ready``, then every change in
    order, deletes included."""
    await kv.put("x", b"1")
    await kv.put("x", b"2")
    await kv.put("y", b"1")
    changes: list[KvChange] = []
    async with kv.watch(callback=changes.append) as watcher:
        with trio.fail_after(LIMIT):
            await watcher.ready.wait()
        initial = [(c.key, c.value) for c in changes]
        await kv.put("z", b"1")
        await kv.delete("x")
        with trio.fail_after(LIMIT):
            while len(changes) < 4:
                await trio.sleep(0.005)
    assert [("x", b"2"), ("y", b"1")] == initial
    assert [("z", "PUT"), ("x", "DEL")] == [(c.key, c.operation) for c in changes[2:]]


async def test_watch_as_async_iterator(kv: KeyValue) -> None:
    """Without a callback, a watcher is iterated."""
    await kv.put("a", b"1")
    async with kv.watch("a") as watcher:
        await kv.put("a", b"2")
        got = []
        with trio.fail_after(LIMIT):
            async for change in watcher:
                got.append(change.value)
                if len(got) == 2:
                    break
    assert [b"1", b"2"] == got


async def test_watch_updates_only(kv: KeyValue) -> None:
    """updates_only: nothing of the past, ready at once, then the changes."""
    await kv.put("old", b"1")
    changes: list[KvChange] = []
    async with kv.watch(callback=changes.append, updates_only=True) as watcher:
        assert watcher.ready.is_set()
        await kv.put("new", b"1")
        with trio.fail_after(LIMIT):
            while not changes:
                await trio.sleep(0.005)
    assert ["new"] == [c.key for c in changes]


async def test_watch_replaces_a_lost_consumer_and_misses_nothing(kv: KeyValue) -> None:
    """The watcher's consumer is deleted behind its back: heartbeats stop, the watcher
    makes a new consumer starting after the last change it delivered, and the changes
    made meanwhile arrive, once each, in order."""
    changes: list[KvChange] = []
    async with kv.watch(callback=changes.append, heartbeat=0.1) as watcher:
        await watcher.ready.wait()
        await kv.put("k", b"1")
        with trio.fail_after(LIMIT):
            while not changes:
                await trio.sleep(0.005)
        await kv.js.api(f"CONSUMER.DELETE.{kv.stream}.{watcher._consumer}")
        await kv.put("k", b"2")
        await kv.put("k", b"3")
        with trio.fail_after(LIMIT):
            # The new consumer's first deliveries may come before its creation's reply.
            while len(changes) < 3 or watcher.resets < 1:
                await trio.sleep(0.01)
    assert [b"1", b"2", b"3"] == [c.value for c in changes]


async def test_watch_survives_a_server_restart(tmp_path: Path) -> None:
    """The server is killed and restarted (same port, same store): the watcher's client
    reconnects, the watcher resumes after its last change, and a change made after the
    restart arrives once."""
    changes: list[KvChange] = []
    with running_server(tmp_path) as server:
        async with open_client(server.url, **FAST) as a:
            kv = await JetStream(a).key_value("reg")
            async with kv.watch(callback=changes.append, heartbeat=0.1) as watcher:
                await watcher.ready.wait()
                await kv.put("k", b"before")
                server.kill()
                server = restart(server)
                with trio.fail_after(LIMIT):
                    while not a.is_connected:
                        await trio.sleep(0.01)
                    while True:
                        try:
                            await kv.put("k", b"after")
                            break
                        except Exception:  # JetStream may need a moment after a restart
                            await trio.sleep(0.05)
                    while len(changes) < 2:
                        await trio.sleep(0.01)
        server.stop()
    assert [b"before", b"after"] == [c.value for c in changes]


# -- the object store --------------------------------------------------------------------------


async def test_object_round_trip_in_chunks(client: Client) -> None:
    """An object larger than a chunk is stored in chunks and read back whole."""
    store = await JetStream(client).object_store("releases")
    data = bytes(range(256)) * 1000
    info = await store.put("r2.tar", data, chunk_size=40_000)
    assert (256_000, 7) == (info.size, info.chunks)
    assert data == await store.get("r2.tar")
    await store.put("r2.tar", b"replaced")
    assert b"replaced" == await store.get("r2.tar")


async def test_object_digest_is_checked(client: Client) -> None:
    """An object whose record names another digest is refused on get."""
    js = JetStream(client)
    store = await js.object_store("releases")
    await store.put("code", b"the real code")
    meta_subject = store._meta_subject("code")
    meta = json.loads((await js.direct_get(store.stream, last_by_subject=meta_subject)
                       or pytest.fail("no record")).payload)
    meta["digest"] = "SHA-256=" + "A" * 43 + "="
    await js.publish(meta_subject, json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})
    with pytest.raises(DigestMismatch, match="does not match its digest"):
        await store.get("code")


async def test_object_size_is_capped(client: Client) -> None:
    """Over max_object_size: put refuses it, and get refuses before fetching it."""
    js = JetStream(client)
    big = await js.object_store("releases", max_object_size=1000)
    with pytest.raises(ObjectTooLarge):
        await big.put("x", b"y" * 1001)
    await (await js.object_store("releases")).put("x", b"y" * 1001)
    with pytest.raises(ObjectTooLarge, match="1001 bytes"):
        await big.get("x")


async def test_object_missing_and_deleted(client: Client) -> None:
    """get of a name never stored, or deleted, raises ObjectNotFound."""
    store = await JetStream(client).object_store("releases")
    with pytest.raises(ObjectNotFound):
        await store.get("nothing")
    await store.put("tmp", b"1")
    await store.delete("tmp")
    with pytest.raises(ObjectNotFound):
        await store.get("tmp")

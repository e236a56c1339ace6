"""Durable servers on a node: resume, migration at rest, lifecycle, store errors, group
commit, releases, and kill -9 under load (real files, real SQLite, real processes)."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import otpy
from otpy._cli import main as cli_main
from otpy._cookie import COOKIE_ENV
from otpy._protocol.store_records import BATCH, Decoder
from otpy.testing import MemoryStore

HERE = Path(__file__).resolve().parent
NODE = str(HERE / "durable_node.py")


class Counter(otpy.GenServer[int]):
    """A durable counter that tells what it ran (``seen``)."""

    vsn = "1"
    durable = True
    seen: list[str] = []

    def init(self, arg: Any) -> int:
        Counter.seen.append("init")
        return 0 if arg is None else arg

    def resume(self, state: int, arg: Any) -> int:
        Counter.seen.append(f"resume {state}")
        return state

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        if request == "crash":
            raise RuntimeError("boom")
        if request == "stop":
            return otpy.Stop("normal", state, reply="bye")
        if request == "unpicklable":
            return otpy.Reply("never acknowledged", threading.Lock())  # type: ignore[arg-type]
        return otpy.Reply(state, state)


class Accounts(otpy.GenServer[dict[str, int]]):
    """A durable mapping state that names the keys each step changes, and changes its
    state in place (the idiom for a large state)."""

    vsn = "1"
    durable = True

    def init(self, arg: Any) -> dict[str, int]:
        return {f"acct{i}": 0 for i in range(arg or 0)}

    def handle_call(self, request: Any, caller: otpy.Caller, state: dict[str, int]) -> Any:
        op, key, *rest = request
        if op == "set":
            state[key] = rest[0]
            self.changed(key)
        elif op == "drop":
            del state[key]
            self.changed(key)
        elif op == "set then crash":
            state[key] = rest[0]  # changed in place, then the step crashes
            raise RuntimeError("crash after a change in place")
        elif op == "read":
            self.changed()  # changed nothing: nothing is recorded
            return otpy.Reply(state.get(key), state)
        return otpy.Reply("ok", state)


@pytest.fixture(autouse=True)
def _fresh_seen() -> Iterator[None]:
    Counter.seen = []
    yield


def tree(*children: otpy.Child) -> otpy.Supervisor:
    return otpy.Supervisor(list(children) or [otpy.Child("c", Counter)])


def stored(path: Path) -> dict[str, tuple[str, Any]]:
    """What the store at ``path`` holds: ``{key: (tag, state)}``."""
    store = otpy.SqliteStore(path)
    try:
        return {s.key: (s.vsn, s.state()) for s in store.load()}
    finally:
        store.close()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- resume ---------------------------------------------------------------------------


async def test_a_durable_server_resumes_its_state_after_a_node_restart(tmp_path: Path) -> None:
    """The state a step returned is there when the node starts again: ``resume`` runs
    with it, not ``init``."""
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        assert [1, 2, 3] == [await node.call("c", "incr") for _ in range(3)]
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        assert 3 == node.get_state("c")
        assert 4 == await node.call("c", "incr")
    assert ["init", "resume 3"] == Counter.seen


async def test_a_crash_restart_resumes_from_the_last_recorded_state(tmp_path: Path) -> None:
    """A step that changed its state in place and then crashed is not retried and leaves
    nothing behind: the restarted server resumes from what was recorded last, not from
    the live state the crashed step had changed."""
    root = tree(otpy.Child("kv", Accounts, arg=2))
    async with otpy.open_node(root, store=tmp_path / "s") as node:
        assert "ok" == await node.call("kv", ("set", "acct0", 10))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("kv", ("set then crash", "acct1", 99))
        assert {"acct0": 10, "acct1": 0} == node.get_state("kv")
        assert 1 == node.which_children()[0].restarts
    assert {"acct0": 10, "acct1": 0} == stored(tmp_path / "s")["kv"][1]


async def test_the_message_that_crashed_a_server_is_not_retried(tmp_path: Path) -> None:
    """After a crash the server resumes from its last recorded state and goes on with
    the next message."""
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        await node.call("c", "incr")
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        assert 2 == await node.call("c", "incr")
    assert ["init", "resume 1"] == Counter.seen


class Ticker(otpy.GenServer[int]):
    """Counts ticks of a periodic timer armed from init and from resume alike."""

    vsn = "1"
    durable = True

    def init(self, arg: Any) -> Any:
        return otpy.Continue(0, "arm")

    def resume(self, state: int, arg: Any) -> Any:
        return otpy.Continue(state, "arm")

    def handle_continue(self, arg: Any, state: int) -> int:
        self.send_after(1.0, self.pid, "tick")
        return state

    def handle_info(self, message: Any, state: int) -> int:
        if message == "crash":
            raise RuntimeError("crash")
        self.send_after(1.0, self.pid, "tick")
        return state + 1


async def test_timers_armed_in_init_are_armed_again_by_resume(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The documented idiom: init and resume both return Continue(state, "arm"), so the
    periodic timer runs again after a node restart and after a crash restart."""
    root = tree(otpy.Child("t", Ticker))
    async with otpy.open_node(root, store=tmp_path / "s") as node:
        await trio.sleep(3.5)
        assert 3 == node.get_state("t")
    async with otpy.open_node(root, store=tmp_path / "s") as node:
        await trio.sleep(2.5)
        assert 5 == node.get_state("t")
        node.send("t", "crash")  # resumes from 5; the old incarnation's timer dies
        await trio.sleep(1.2)
        assert 6 == node.get_state("t")
        await trio.sleep(1.0)
        assert 7 == node.get_state("t")


class Refuser(Counter):
    """Refuses to resume (resume returns Stop): its start fails, its state stays."""

    def resume(self, state: int, arg: Any) -> Any:
        return otpy.Stop("will not resume", state)


async def test_resume_may_refuse_with_stop_and_the_state_stays(tmp_path: Path) -> None:
    """Stop from resume fails the start, as from init; the stored state is kept."""
    async with otpy.open_node(tree(otpy.Child("c", Refuser)), store=tmp_path / "s") as node:
        await node.call("c", "incr")
    with pytest.raises(otpy.StartFailed, match=r"Refuser.resume\) returned Stop"):
        async with otpy.open_node(tree(otpy.Child("c", Refuser)), store=tmp_path / "s"):
            pass  # pragma: no cover
    assert 1 == stored(tmp_path / "s")["c"][1]


# -- migration at rest ------------------------------------------------------------------


class CounterV2(otpy.GenServer[tuple[int, str]]):
    """Version 2 of Counter: the count and who last changed it."""

    vsn = "2"
    durable = True

    def init(self, arg: Any) -> tuple[int, str]:
        return (0, "init")

    def handle_call(self, request: Any, caller: otpy.Caller, state: tuple[int, str]) -> Any:
        return otpy.Reply(state, state)

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == "1":
            return (state, "migrated")
        if old_vsn == otpy.Down("1"):
            return state[0]
        raise ValueError(f"cannot migrate from vsn {old_vsn!r}")


class BrokenV2(CounterV2):
    """A version 2 whose migration fails."""

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        raise ValueError("this migration is broken")


class WrongTypeV2(CounterV2):
    """A version 2 whose migration returns a state of the wrong type."""

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        return ["not", "a", "tuple"]


async def test_an_older_stored_state_is_migrated_through_code_change(tmp_path: Path) -> None:
    """A node started on newer code migrates each older state through code_change on
    load, records it with its new vsn, and does not migrate it again next time."""
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        await node.call("c", "incr")
    async with otpy.open_node(tree(otpy.Child("c", CounterV2)), store=tmp_path / "s") as node:
        assert (1, "migrated") == await node.call("c", "get")
    tag, state = stored(tmp_path / "s")["c"]
    assert ((1, "migrated"), "2") == (state, tag.rsplit(" ", 1)[1])


@pytest.mark.parametrize("newer_class, expected", [
    (BrokenV2, "code_change raised ValueError: this migration is broken"),
    (WrongTypeV2, "does not match the declared state type tuple[int, str]"),
])
async def test_a_state_that_cannot_be_migrated_is_refused_and_left_untouched(
        tmp_path: Path, logs: list[dict[str, Any]], newer_class: type, expected: str) -> None:
    """A failing migration (code_change raises, or returns the wrong type) fails that
    server's start with one event naming the store; the others start, and the stored
    state stays as it was."""
    path = tmp_path / "s"
    async with otpy.open_node(tree(otpy.Child("c", Counter), otpy.Child("d", Counter)),
                              store=path) as node:
        await node.call("c", "incr")
    before = stored(path)
    root = tree(otpy.Child("c", newer_class), otpy.Child("d", Counter))
    async with otpy.open_node(root, store=path) as node:
        assert ["not running", "running"] == [c.status for c in node.which_children()]
        with pytest.raises(otpy.NoSuchServer):
            await node.call("c", "get")
        assert 0 == await node.call("d", "get")
    [event] = events(logs, "durable_state_refused")
    assert "c" == event["server"]
    assert str(path) in event["error"]
    assert expected in event["error"]
    assert before == stored(path)


async def test_a_state_of_a_newer_vsn_is_refused(tmp_path: Path,
                                                 logs: list[dict[str, Any]]) -> None:
    """Older code cannot read a state that newer code recorded: that server does not
    start, the error says which vsns and what to do, and the state stays as it was."""
    path = tmp_path / "s"
    async with otpy.open_node(tree(otpy.Child("c", CounterV2)), store=path) as node:
        await node.call("c", "get")
    before = stored(path)
    async with otpy.open_node(tree(), store=path) as node:
        assert [] == node.servers()
    [event] = events(logs, "durable_state_refused")
    assert "is of vsn 2, newer than the vsn 1" in event["error"]
    assert "Start the node with the code of vsn 2" in event["error"]
    assert before == stored(path)


class Renamed:
    """A picklable value whose class is then removed, so it no longer unpickles."""


async def test_a_state_that_cannot_be_unpickled_is_refused(tmp_path: Path,
                                                           logs: list[dict[str, Any]]) -> None:
    """A stored state whose class the running code no longer has fails that server's
    start with the path and the unpickling error; the others start."""
    path = tmp_path / "s"

    class Holder(otpy.GenServer[Any]):
        vsn = "1"
        durable = True

        def init(self, arg: Any) -> Any:
            return Renamed()

    root = tree(otpy.Child("h", Holder), otpy.Child("c", Counter))
    async with otpy.open_node(root, store=path):
        pass
    global Renamed
    saved = Renamed
    del Renamed
    try:
        async with otpy.open_node(root, store=path) as node:
            assert ["c"] == node.servers()
    finally:
        Renamed = saved  # type: ignore[misc]
    [event] = events(logs, "durable_state_refused")
    assert f"in {path} cannot be unpickled" in event["error"]


async def test_a_child_id_reused_by_another_class_is_refused(
        tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """Another class with the same vsn (or without a code_change) does not take over a
    stored state: its start is refused with the class that recorded it and how to
    clear it; delete_child clears it, and a new child of that id starts afresh."""
    path = tmp_path / "s"
    async with otpy.open_node(tree(otpy.Child("c", Counter)), store=path) as node:
        await node.call("c", "incr")

    class Other(otpy.GenServer[int]):
        vsn = "1"
        durable = True

        def init(self, arg: Any) -> int:
            return 100

        def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
            return otpy.Reply(state, state)

    async with otpy.open_node(tree(otpy.Child("c", Other)), store=path) as node:
        assert [] == node.servers()
        [event] = events(logs, "durable_state_refused")
        assert "was recorded by test_durable:Counter (vsn 1)" in event["error"]
        assert "delete_child" in event["error"]
        with pytest.raises(otpy.StartFailed, match="recorded by test_durable:Counter"):
            await node.restart_child("root", "c")
        await node.delete_child("root", "c")
        await node.start_child("root", otpy.Child("c", Other))
        assert 100 == await node.call("c", "get")


# -- the lifecycle of a stored state -------------------------------------------------------


async def test_a_temporary_child_that_ends_has_its_state_deleted(tmp_path: Path) -> None:
    """A temporary child ends for good when it stops: its stored state goes."""
    root = tree(otpy.Child("c", Counter, restart="temporary"), otpy.Child("k", Counter))
    async with otpy.open_node(root, store=tmp_path / "s") as node:
        await node.call("c", "incr")
        assert "bye" == await node.call("c", "stop")
    assert ["k"] == list(stored(tmp_path / "s"))


async def test_a_transient_child_that_stops_normally_has_its_state_deleted(
        tmp_path: Path) -> None:
    """A transient child that stops normally is not restarted: its stored state goes,
    and starting it again begins from init."""
    root = tree(otpy.Child("c", Counter, restart="transient"))
    async with otpy.open_node(root, store=tmp_path / "s") as node:
        await node.call("c", "incr")
        await node.call("c", "stop")
        assert {} == stored_in(node)
        await node.restart_child("root", "c")
        assert 0 == await node.call("c", "get")
    assert ["init", "init"] == Counter.seen


def stored_in(node: otpy.Node) -> dict[str, Any]:
    """What a node's store holds now, read back through get() as a restart does."""
    store = node.store
    return {key: s.state() for key in ("c", "k", "kv", "t")
            if (s := store.get(key)) is not None}


async def test_a_permanent_child_that_stops_normally_resumes(tmp_path: Path) -> None:
    """A permanent child is restarted whatever its reason: it resumes its state."""
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        await node.call("c", "incr")
        await node.call("c", "stop")
        assert 1 == await node.call("c", "get")
    assert ["init", "resume 1"] == Counter.seen


async def test_terminate_child_keeps_the_state_and_restart_child_resumes_it(
        tmp_path: Path) -> None:
    """terminate_child stops the server but keeps its state: restart_child resumes it."""
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        await node.call("c", "incr")
        await node.terminate_child("root", "c")
        assert {"c": 1} == stored_in(node)
        await node.restart_child("root", "c")
        assert 2 == await node.call("c", "incr")
    assert ["init", "resume 1"] == Counter.seen


async def test_delete_child_deletes_the_state(tmp_path: Path) -> None:
    """delete_child removes the child for good, and its stored state with it."""
    root = tree(otpy.Child("c", Counter), otpy.Child("k", Counter))
    async with otpy.open_node(root, store=tmp_path / "s") as node:
        await node.call("c", "incr")
        await node.terminate_child("root", "c")
        await node.delete_child("root", "c")
        assert {"k": 0} == stored_in(node)
    assert ["k"] == list(stored(tmp_path / "s"))


# -- patches ------------------------------------------------------------------------------


async def test_a_server_that_names_its_changed_keys_records_only_them(tmp_path: Path) -> None:
    """With self.changed(key), a step of a 10,000-key state records a few bytes (a
    patch), not the state; a restart rebuilds the state from the patches; and
    self.changed() with no key records nothing at all."""
    path = tmp_path / "s"
    async with otpy.open_node(tree(otpy.Child("kv", Accounts, arg=10_000)),
                              store=path) as node:
        first = node.statistics()["store"]["bytes"]
        for i in range(100):
            await node.call("kv", ("set", f"acct{i}", i))
        await node.call("kv", ("drop", "acct7"))
        per_step = (node.statistics()["store"]["bytes"] - first) / 101
        records = node.statistics()["store"]["records"]
        assert 5 == await node.call("kv", ("read", "acct5"))
        assert records == node.statistics()["store"]["records"]
    assert per_step < 100 < first
    state = stored(path)["kv"][1]
    assert (9_999, 99, None) == (len(state), state["acct99"], state.get("acct7"))


async def test_changed_on_a_server_that_is_not_durable_does_nothing() -> None:
    """self.changed is a hint to the store: without one it is ignored."""
    async with otpy.open_node(tree(otpy.Child("kv", Accounts, arg=2, durable=False))) as node:
        assert "ok" == await node.call("kv", ("set", "acct0", 5))
        assert node.store is None
        assert 5 == node.get_state("kv")["acct0"]


# -- store errors -------------------------------------------------------------------------


async def test_a_state_that_cannot_be_recorded_crashes_the_step(tmp_path: Path) -> None:
    """A step whose state the store refuses (it cannot be pickled) crashes: the caller
    gets ServerCrashed whose cause is the StoreError, nothing was acknowledged, and the
    server goes on from its last recorded state."""
    async with otpy.open_node(tree(), store=tmp_path / "s") as node:
        await node.call("c", "incr")
        with pytest.raises(otpy.ServerCrashed) as info:
            await node.call("c", "unpicklable")
        assert isinstance(info.value.__cause__, otpy.StoreError)
        assert "cannot be pickled" in str(info.value.__cause__)
        assert 1 == node.get_state("c")
        assert 2 == await node.call("c", "incr")


async def test_a_failing_store_crashes_every_step_and_acknowledges_nothing() -> None:
    """While the store cannot record (a full disk), each durable step fails as a crash;
    once it records again, the servers go on from what was recorded."""
    store = MemoryStore()
    root = otpy.Supervisor([otpy.Child("c", Counter)], max_restarts=100)
    async with otpy.open_node(root, store=store) as node:
        await node.call("c", "incr")
        store.failing = True
        for _ in range(3):
            with pytest.raises(otpy.ServerCrashed) as info:
                await node.call("c", "incr")
            assert isinstance(info.value.__cause__, otpy.StoreError)
        store.failing = False
        assert 2 == await node.call("c", "incr")
    assert {"c": 2} == store.states()


async def test_a_store_that_cannot_be_opened_is_a_clear_error_at_start(
        tmp_path: Path) -> None:
    """A store the node cannot create (here under a regular file; a read-only disk is
    the same error) stops open_node before the tree starts, with a StoreError that says
    what to do."""
    (tmp_path / "file").write_text("")
    with pytest.raises(otpy.StoreError, match="give the node another store=PATH"):
        async with otpy.open_node(tree(), store=tmp_path / "file" / "s"):
            pass  # pragma: no cover
    assert [] == Counter.seen


def start_node(store: Path, fsync: str = "never", *extra: str
               ) -> tuple[subprocess.Popen[bytes], int]:
    """Start tests/durable_node.py; return the process and its port."""
    proc = subprocess.Popen([sys.executable, NODE, str(store), fsync, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20.0)
    line = proc.stdout.readline() if ready else b""
    if not line.startswith(b"port "):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the node did not start: {line!r} {err[-2000:]!r}")
    return proc, int(line.split()[1])


@contextmanager
def node_process(store: Path, fsync: str = "never", *extra: str
                 ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc, port = start_node(store, fsync, *extra)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


async def counts(port: int) -> list[int]:
    async with otpy.connect("127.0.0.1", port) as client:
        return [await client.call(f"c{i}", "get") for i in range(8)]


async def test_a_full_disk_crashes_steps_and_loses_no_acknowledged_write(
        tmp_path: Path) -> None:
    """A node that cannot write past a file size limit (as on a full disk) answers
    ServerCrashed for each step it cannot record; after a restart with room, every
    acknowledged write is there."""
    path = tmp_path / "s"
    acked = [0] * 8
    errors: list[str] = []
    with node_process(path, "never", "131072") as (_, port):
        async with otpy.connect("127.0.0.1", port) as client:
            for n in range(10_000):
                try:
                    acked[n % 8] = await client.call(f"c{n % 8}", "incr")
                except otpy.RemoteError as exc:
                    errors.append(exc.kind)
                    if len(errors) >= 20:
                        break
    assert {"ServerCrashed"} == set(errors)
    assert sum(acked) > 100
    with node_process(path) as (_, port):
        assert acked == await counts(port)


async def load(port: int, i: int, acked: list[int], in_flight: list[int]) -> None:
    """Increment counter ``c<i>`` until the node goes away, noting each acknowledged
    count, and whether a call is in flight."""
    async with otpy.connect("127.0.0.1", port) as conn:
        while True:
            in_flight[i] = 1
            try:
                acked[i] = await conn.call(f"c{i}", "incr")
            except (otpy.ConnectionLost, OSError, trio.BrokenResourceError):
                return
            in_flight[i] = 0


async def test_kill_9_under_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """Clients call durable counters while the node is killed with SIGKILL at a random
    moment (once in each fsync mode); after each restart every counter holds every
    increment that was acknowledged, and at most the one in flight besides."""
    path = tmp_path / "s"
    rng = random.Random(1313)
    acked = [0] * 8
    for fsync in ("never", "group", "always"):
        in_flight = [0] * 8
        with node_process(path, fsync) as (proc, port):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(load, port, i, acked, in_flight)
                await trio.sleep(rng.uniform(0.2, 0.6))
                os.kill(proc.pid, signal.SIGKILL)
                with trio.fail_after(10):
                    await trio.to_thread.run_sync(proc.wait)
        with node_process(path) as (_, port):
            found = await counts(port)
        lost = sum(max(0, a - f) for a, f in zip(acked, found, strict=True))
        assert 0 == lost
        assert all(f - a <= fl for a, f, fl in zip(acked, found, in_flight, strict=True))
        assert sum(acked) > 0
        acked = found


# -- group commit -------------------------------------------------------------------------


class Gate:
    """An fdatasync that waits, in the syncer thread, until the test opens it."""

    def __init__(self) -> None:
        self.armed = False  # the store's own syncs at open pass
        self.entered = threading.Event()
        self.open = threading.Event()
        self.fail = False

    def __call__(self, fd: int) -> None:
        if not self.armed:
            os.fsync(fd)
            return
        self.entered.set()
        self.open.wait(10)
        if self.fail:
            raise OSError(5, "Input/output error")
        os.fsync(fd)


async def test_group_commit_shows_a_reply_only_after_its_fdatasync(tmp_path: Path) -> None:
    """With fsync="group", a durable step's reply is held until the syncer's fdatasync
    covering its record has returned."""
    gate = Gate()
    store = otpy.SqliteStore(tmp_path / "s", fsync="group", _fdatasync=gate)
    gate.armed = True
    got: list[int] = []
    try:
        async with otpy.open_node(tree(), store=store) as node:
            async with trio.open_nursery() as nursery:
                async def call() -> None:
                    got.append(await node.call("c", "incr"))
                nursery.start_soon(call)
                assert await trio.to_thread.run_sync(gate.entered.wait, 10)
                for _ in range(50):
                    await trio.lowlevel.checkpoint()
                assert [] == got
                assert 1 == node.get_state("c")
                assert 1 == node.statistics()["store"]["held_replies"]
                gate.open.set()
            assert [1] == got
    finally:
        gate.open.set()
        store.close()


async def test_a_failed_sync_fails_the_held_replies(tmp_path: Path) -> None:
    """If the fdatasync of a group fails, the replies held for it fail with a
    StoreError: nothing is acknowledged that the disk may not hold."""
    gate = Gate()
    store = otpy.SqliteStore(tmp_path / "s", fsync="group", _fdatasync=gate)
    gate.armed = gate.fail = True
    errors: list[BaseException] = []
    try:
        async with otpy.open_node(tree(), store=store) as node:
            async with trio.open_nursery() as nursery:
                async def call() -> None:
                    try:
                        await node.call("c", "incr")
                    except otpy.StoreError as exc:
                        errors.append(exc)
                nursery.start_soon(call)
                assert await trio.to_thread.run_sync(gate.entered.wait, 10)
                gate.open.set()
            [error] = errors
            assert "could not be made durable" in str(error)
            with pytest.raises(otpy.ServerCrashed):
                await node.call("c", "incr")
    finally:
        store.close()


class Relay(otpy.GenServer[int]):
    """Not durable: calls the durable counter inline and answers what it said."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(self.call("c", request), state)


async def test_group_commit_and_calls_that_cannot_wait(tmp_path: Path) -> None:
    """With fsync="group", node.call_nowait to a durable server cannot give the reply
    (it waits for the sync): WouldBlock, the state updated. Inside the node, self.call
    gets its answer at once (the calling step needs it)."""
    root = tree(otpy.Child("c", Counter), otpy.Child("relay", Relay))
    async with otpy.open_node(root, store=tmp_path / "s", fsync="group") as node:
        with pytest.raises(otpy.WouldBlock, match="held until its state is on disk"):
            node.call_nowait("c", "incr")
        assert 1 == node.get_state("c")
        assert 2 == await node.call("relay", "incr")
        assert 3 == await node.call("c", "incr")


# -- releases -----------------------------------------------------------------------------


async def test_an_upgrade_records_its_states_in_one_batch(tmp_path: Path) -> None:
    """A live upgrade of durable servers records every migrated state, with its new vsn,
    in one atomic batch; a node started on the new code resumes them as they are."""
    path = tmp_path / "s"
    root = tree(*(otpy.Child(f"c{i}", Counter) for i in range(3)))
    async with otpy.open_node(root, store=path) as node:
        for i in range(3):
            await node.call(f"c{i}", "incr")
        await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
        kinds = log_kinds(path)
        assert (1, "migrated") == await node.call("c0", "get")
    assert [BATCH, 1, 1, 1] == kinds[-4:]
    async with otpy.open_node(tree(*(otpy.Child(f"c{i}", CounterV2) for i in range(3))),
                              store=path) as node:
        assert [(1, "migrated")] * 3 == [await node.call(f"c{i}", "get") for i in range(3)]


def log_kinds(path: Path) -> list[int]:
    """The kinds of the records in the store's log not yet compacted, in order."""
    kinds = []
    for seg in sorted(path.glob("log-*")):
        kinds += [r.kind for r in Decoder(header=True).feed(seg.read_bytes())]
    return kinds


async def test_an_upgrade_whose_states_cannot_be_recorded_changes_nothing() -> None:
    """If the store cannot record a release's states, the release rolls back: every
    server keeps its old code and state."""
    store = MemoryStore()
    async with otpy.open_node(tree(), store=store) as node:
        await node.call("c", "incr")
        store.failing = True
        with pytest.raises(otpy.UpgradeFailed, match="the store could not record"):
            await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
        store.failing = False
        assert ("1", 2) == (node.vsn_of("c"), await node.call("c", "incr"))


async def test_a_downgrade_records_the_older_states(tmp_path: Path) -> None:
    """A downgrade records the states the newer code migrated back: a node started on
    the older code resumes them."""
    path = tmp_path / "s"
    async with otpy.open_node(tree(), store=path) as node:
        await node.call("c", "incr")
        await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
        await node.downgrade()
    async with otpy.open_node(tree(), store=path) as node:
        assert 1 == await node.call("c", "get")


# -- damaged files, and the node's own edges ------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
async def test_a_damaged_log_still_opens_with_one_event(
        tmp_path: Path, logs: list[dict[str, Any]], damage: str) -> None:
    """A log cut short by a kill -9 mid-write, or with a flipped byte: the node starts,
    with one event saying what was dropped, on the records before the damage."""
    path = tmp_path / "s"
    store = otpy.SqliteStore(path)
    for i in range(1, 6):
        store.put("c", "test_durable:Counter 1", i)
    store.close(compact=False)
    [segment] = path.glob("log-*")
    data = segment.read_bytes()
    if damage == "truncated":
        segment.write_bytes(data[:-3])
    else:
        segment.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    async with otpy.open_node(tree(), store=path) as node:
        assert 4 == await node.call("c", "get")
    assert 1 == len(events(logs, "store_tail_dropped"))


async def test_statistics_and_the_otpy_command_show_the_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """node.statistics()["store"] and `otpy stats` show the store's figures."""
    monkeypatch.setenv(COOKIE_ENV, "durable-test-cookie")
    async with otpy.open_node(tree(), store=tmp_path / "s", admin=("127.0.0.1", 0)) as node:
        await node.call("c", "incr")
        stats = node.statistics()["store"]
        assert (2, 0, str(tmp_path / "s")) == (stats["records"], stats["pending"],
                                               stats["path"])
        assert node.admin_address is not None
        address = f"127.0.0.1:{node.admin_address[1]}"
        code = await trio.to_thread.run_sync(cli_main, ["stats", "--node", address])
    assert 0 == code
    shown = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
                 if line.startswith("store."))
    assert ("2", "0") == (shown["store.records"], shown["store.pending"])
    assert json.loads(shown["store.path"]) == str(tmp_path / "s")


async def test_the_default_store_is_under_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]) -> None:
    """A tree with a durable child and no store= keeps it in ./otpy-store/<node name>/,
    and says where (the absolute path) when it opens."""
    monkeypatch.chdir(tmp_path)
    async with otpy.open_node(tree(), node_name="alpha") as node:
        await node.call("c", "incr")
    expected = str(tmp_path / "otpy-store" / "alpha")
    assert [expected] == [e["store"] for e in events(logs, "store_opened")]
    assert 1 == stored(Path(expected))["c"][1]


async def test_a_tree_without_durable_children_opens_no_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No durable child, no store: nothing is created; and a durable child started
    later fails clearly."""
    monkeypatch.chdir(tmp_path)
    async with otpy.open_node(tree(otpy.Child("c", Counter, durable=False))) as node:
        assert node.store is None
        with pytest.raises(otpy.StartFailed, match="this node has no store"):
            await node.start_child("root", otpy.Child("d", Counter))
    assert [] == list(tmp_path.iterdir())


async def test_a_store_given_as_an_object_is_left_open(tmp_path: Path) -> None:
    """open_node(store=<a Store>) uses it and leaves closing it to its owner."""
    store = otpy.SqliteStore(tmp_path / "s")
    try:
        async with otpy.open_node(tree(), store=store) as node:
            await node.call("c", "incr")
        assert 3 == store.put("c", "x", 0)
    finally:
        store.close()


async def test_bad_store_options_are_clear_errors(tmp_path: Path) -> None:
    """fsync= names a mode; store= is a path or an otpy.Store; fsync= goes with a path."""
    with pytest.raises(ValueError, match=r"fsync=\.\.\.\) must be one of 'never', 'group'"):
        async with otpy.open_node(tree(), store=tmp_path / "s", fsync="sometimes"):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="takes a directory"):
        async with otpy.open_node(tree(), store=42):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="applies to a store the node opens"):
        async with otpy.open_node(tree(), store=MemoryStore(), fsync="group"):
            pass  # pragma: no cover

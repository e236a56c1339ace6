"""The embedded store (``otpy.SqliteStore``) on real files, real SQLite and real
processes: what it records comes back, across compaction, a kill -9 at any point, a
damaged log tail, a full disk and a read-only directory; group commit acknowledges only
what ``fdatasync`` has covered."""

from __future__ import annotations

import ast
import collections
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import otpy
from otpy._protocol.store_records import PUT, encode_record, segment_header
from otpy._store import SqliteStore, StoredState
from otpy._store.files import list_segments

sys.path.insert(0, str(Path(__file__).parent))
import store_child

OTPY_DIR = str(Path(otpy.__file__).parent)
CHILD = str(Path(store_child.__file__))


def states_of(store: SqliteStore) -> dict[str, Any]:
    return {s.key: s.state() for s in store.load()}


def reopen(path: Path, **options: Any) -> tuple[dict[str, Any], SqliteStore]:
    store = SqliteStore(path, **options)
    return states_of(store), store


def log_files(path: Path) -> list[Path]:
    return [p for _, p in list_segments(path)]


# -- recording and reading back -----------------------------------------------------


def test_put_and_delete_round_trip(tmp_path: Path) -> None:
    """What was put comes back with its vsn and seq after a reopen; a deleted key does
    not; the last put of a key wins."""
    with SqliteStore(tmp_path / "s") as store:
        assert 1 == store.put("a", "1", {"x": 1})
        assert 2 == store.put("b", "2", [1, 2, 3])
        assert 3 == store.put("a", "1", {"x": 2})
        assert 4 == store.put("c", "1", "gone soon")
        assert 5 == store.delete("c")
    store = SqliteStore(tmp_path / "s")
    loaded = sorted(store.load(), key=lambda s: s.key)
    assert [("a", "1", 3, {"x": 2}), ("b", "2", 2, [1, 2, 3])] == [
        (s.key, s.vsn, s.seq, s.state()) for s in loaded]
    assert 6 == store.put("c", "1", 0)
    store.close()


def test_the_log_is_replayed_when_it_was_not_compacted(tmp_path: Path) -> None:
    """Records still in the log at open (the process died before compacting them) are
    read back as well as those in SQLite."""
    with SqliteStore(tmp_path / "s") as store:
        store.put("old", "1", "in sqlite")
    store = SqliteStore(tmp_path / "s")
    store.put("new", "1", "in the log")
    store.close(compact=False)
    assert 1 == len(log_files(tmp_path / "s"))
    states, store = reopen(tmp_path / "s")
    assert {"old": "in sqlite", "new": "in the log"} == states
    store.close()
    assert [] == log_files(tmp_path / "s")


def test_patches_rebuild_a_mapping_state(tmp_path: Path) -> None:
    """patch() records the entries named as changed (set, or removed when absent), and
    the state comes back as it was, from the log and from SQLite alike."""
    state = {str(i): i for i in range(1000)}
    store = SqliteStore(tmp_path / "s")
    store.put("kv", "1", state)
    state["5"] = "five"
    del state["6"]
    state["new"] = [1]
    store.patch("kv", "1", state, ["5", "6", "new"])
    store.close(compact=False)
    states, store = reopen(tmp_path / "s")
    assert {"kv": state} == states
    store.close()
    states, store = reopen(tmp_path / "s")
    assert {"kv": state} == states
    store.close()


def test_a_patch_never_changes_the_live_state(tmp_path: Path) -> None:
    """Recording a patch reads the state and never writes it: a key named as changed
    but absent from a defaultdict is recorded as removed, not inserted by the lookup."""
    state: collections.defaultdict[str, int] = collections.defaultdict(int, a=1)
    with SqliteStore(tmp_path / "s") as store:
        store.put("kv", "1", state)
        store.patch("kv", "1", state, ["gone"])
    assert {"a": 1} == state
    states, store = reopen(tmp_path / "s")
    store.close()
    assert {"kv": {"a": 1}} == states


def test_a_patch_costs_the_change_not_the_state(tmp_path: Path) -> None:
    """A patch of one entry of a 10,000-entry dict writes a record the size of that
    entry, until the patches outweigh the state: then the whole state is written once,
    so recovery never applies more patches than that."""
    state = {f"key{i}": i for i in range(10_000)}
    store = SqliteStore(tmp_path / "s")
    store.put("kv", "1", state)
    image = store.statistics()["bytes"]
    sizes = []
    for i in range(6000):
        state[f"key{i}"] = -i
        before = store.statistics()["bytes"]
        store.patch("kv", "1", state, [f"key{i}"])
        sizes.append(store.statistics()["bytes"] - before)
    store.close(compact=False)
    assert 100 > sorted(sizes)[len(sizes) // 2]
    assert 1 <= sum(size > image // 2 for size in sizes) <= 2
    store = SqliteStore(tmp_path / "s")
    [stored] = store.load()
    assert sum(map(len, stored.patches)) <= image
    assert state == stored.state()
    store.close()


def test_a_patch_with_a_new_vsn_or_no_earlier_record_writes_the_whole_state(
        tmp_path: Path) -> None:
    """The first record of a key, and the first after a code change, are whole states,
    so a patch never applies to a state of another version."""
    with SqliteStore(tmp_path / "s") as store:
        store.patch("kv", "1", {"a": 1}, ["a"])
        store.patch("kv", "2", {"a": 1, "b": 2}, ["b"])
        assert store.seq == store.patch("kv", "2", {"a": 1, "b": 2}, [])
    store = SqliteStore(tmp_path / "s")
    [stored] = store.load()
    assert ("2", (), {"a": 1, "b": 2}) == (stored.vsn, stored.patches, stored.state())
    store.close()


def test_compaction_while_appending_loses_nothing(tmp_path: Path) -> None:
    """With small segments, the compactor absorbs sealed segments while puts, patches and
    deletes go on appending: every record is in the final state."""
    store = SqliteStore(tmp_path / "s", segment_bytes=4096)
    states: dict[str, Any] = {}
    for i in range(1, 5001):
        kind, key, entry = store_child.step(states, i)
        if kind == "delete":
            store.delete(key)
        elif kind == "put":
            store.put(key, "1", states[key])
        else:
            store.patch(key, "1", states[key], [entry])
        if i == 2500:  # let a compaction finish, so that the rest overlaps the next ones
            deadline = time.monotonic() + 10
            while store.statistics()["compactions"] == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
    stats = store.statistics()
    store.close(compact=False)
    assert 0 < stats["compacted_records"] < 5000
    states_back, store = reopen(tmp_path / "s")
    assert store_child.replay(5000) == states_back
    assert 5000 == store.seq
    store.close()


def test_a_segment_absorbed_but_not_deleted_is_not_replayed(tmp_path: Path) -> None:
    """A crash between the compaction's commit and the segment's deletion leaves a
    segment SQLite already holds: at open it is deleted, not replayed over newer
    states."""
    store = SqliteStore(tmp_path / "s")
    store.put("a", "1", "old")
    [first] = log_files(tmp_path / "s")
    saved = first.read_bytes()
    store.close()
    with SqliteStore(tmp_path / "s") as store:
        store.put("a", "1", "new")
    first.write_bytes(saved)
    states, store = reopen(tmp_path / "s")
    assert {"a": "new"} == states
    assert not first.exists()
    store.close()


# -- damaged logs -------------------------------------------------------------------


def write_then_abandon(path: Path, n: int) -> Path:
    """n puts into a fresh store, left in its log; the segment's path."""
    store = SqliteStore(path)
    for i in range(1, n + 1):
        store.put(f"k{i}", "1", i)
    store.close(compact=False)
    return log_files(path)[0]


def test_a_truncated_tail_is_dropped_with_one_event(tmp_path: Path) -> None:
    """A log cut in the middle of its last record (a kill -9 mid-write) opens with every
    record before it, one ``store_tail_dropped`` event, and the cut bytes kept aside."""
    segment = write_then_abandon(tmp_path / "s", 5)
    os.truncate(segment, segment.stat().st_size - 3)
    with capture_logs() as logs:
        states, store = reopen(tmp_path / "s")
    assert {f"k{i}": i for i in range(1, 5)} == states
    [event] = [e for e in logs if e["log_level"] == "warning"]
    assert "store_tail_dropped" == event["event"]
    assert event["reason"].startswith("the last record is incomplete (")
    assert 4 == event["kept_seq"]
    [kept] = event["kept_in"]
    assert event["dropped_bytes"] == Path(kept).stat().st_size
    assert 5 == store.put("k5", "1", "again")
    store.close()
    states, store = reopen(tmp_path / "s")
    assert "again" == states["k5"]
    store.close()


def test_a_flipped_byte_in_the_last_record_drops_only_that_record(tmp_path: Path) -> None:
    """A byte flipped inside the last record (a torn page) fails its CRC: that record is
    dropped, the others are kept."""
    segment = write_then_abandon(tmp_path / "s", 5)
    data = bytearray(segment.read_bytes())
    data[-4] ^= 0xFF
    segment.write_bytes(bytes(data))
    with capture_logs() as logs:
        states, store = reopen(tmp_path / "s")
    store.close()
    assert {f"k{i}": i for i in range(1, 5)} == states
    assert [("store_tail_dropped", "a record fails its CRC check")] == [
        (e["event"], e["reason"]) for e in logs if e["log_level"] == "warning"]


def test_a_batch_cut_short_is_dropped_whole(tmp_path: Path) -> None:
    """An atomic batch (put_many) whose last record was cut by a kill -9 mid-write is
    dropped whole at recovery, with one event: the store never holds part of it."""
    path = tmp_path / "s"
    store = SqliteStore(path)
    store.put("a", "1", 0)
    assert 5 == store.put_many([("a", "2", 1), ("b", "2", 1), ("c", "2", 1)])  # 2: the batch
    store.close(compact=False)
    [segment] = log_files(path)
    os.truncate(segment, segment.stat().st_size - 2)
    with capture_logs() as logs:
        states, store = reopen(path)
    assert {"a": 0} == states
    [event] = [e for e in logs if e["log_level"] == "warning"]
    assert event["reason"].startswith("an atomic batch of records")
    assert 1 == event["kept_seq"]
    assert 2 == store.put("b", "1", "after")
    store.close()


def test_a_batch_that_cannot_be_pickled_records_nothing(tmp_path: Path) -> None:
    """put_many pickles every state before it writes: one bad state, no record."""
    store = SqliteStore(tmp_path / "s")
    with pytest.raises(otpy.StoreError, match="'b' cannot be pickled"):
        store.put_many([("a", "1", 1), ("b", "1", threading.Lock())])
    assert (0, None) == (store.seq, store.get("a"))
    store.close()


def test_get_reads_what_is_recorded_now(tmp_path: Path) -> None:
    """get() gives a key's state as recorded now, from the log not yet compacted and
    from SQLite alike (a whole state in one, its patches in the other)."""
    store = SqliteStore(tmp_path / "s", segment_bytes=4096)
    state = {"x": 0, "pad": "p" * 3000}
    store.put("k", "1", state)
    for i in range(1, 400):
        state["x"] = i
        store.patch("k", "1", state, ["x"])
    deadline = time.monotonic() + 10
    while store.statistics()["compactions"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.statistics()["compactions"] > 0
    assert (399, "1") == (store.get("k").state()["x"], store.get("k").vsn)
    assert store.get("other") is None
    store.delete("k")
    assert store.get("k") is None
    store.close()


def test_damage_in_an_older_segment_drops_what_follows(tmp_path: Path) -> None:
    """The store recovers a prefix of its history, never a mix: damage in an older
    segment drops the records after it, later segments included, in one event."""
    path = tmp_path / "s"
    with SqliteStore(path):
        pass
    one = segment_header(1) + b"".join(
        encode_record(PUT, i, "k", "1", pickle.dumps(i, 5)) for i in (1, 2, 3))
    two = segment_header(2) + encode_record(PUT, 4, "k", "1", pickle.dumps(4, 5))
    second_record = len(segment_header(1)) + len(encode_record(PUT, 1, "k", "1",
                                                                pickle.dumps(1, 5)))
    damaged = bytearray(one)
    damaged[second_record + 25] ^= 0x01
    (path / "log-0000000001").write_bytes(bytes(damaged))
    (path / "log-0000000002").write_bytes(two)
    with capture_logs() as logs:
        states, store = reopen(path)
    assert {"k": 1} == states
    assert 2 == store.put("k", "1", "next")
    store.close()
    [event] = [e for e in logs if e["log_level"] == "warning"]
    assert ("store_tail_dropped", 1, 1, second_record) == (
        event["event"], event["later_segments"], event["kept_seq"], event["offset"])
    assert len(one) - second_record + len(two) == event["dropped_bytes"]
    assert 2 == len(event["kept_in"])


def test_a_foreign_file_named_like_a_segment_is_set_aside(tmp_path: Path) -> None:
    """A file that is not an otpy log (wrong header) cannot stop the store opening."""
    with SqliteStore(tmp_path / "s") as store:
        store.put("a", "1", 1)
    (tmp_path / "s" / "log-0000000099").write_bytes(b"not a log at all")
    with capture_logs() as logs:
        states, store = reopen(tmp_path / "s")
    assert {"a": 1} == states
    assert 2 == store.put("a", "1", 2)
    store.close()
    [event] = [e for e in logs if e["event"] == "store_tail_dropped"]
    assert "does not start with an otpy log header" in event["reason"]


# -- kill -9 --------------------------------------------------------------------------


def test_kill_9_at_random_points_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """A process appends puts, patches and deletes (small segments, so compaction runs
    all along) and prints each seq once its call returned; it is killed with SIGKILL
    at a random moment. After each kill the store holds at least every acknowledged
    record, and exactly the states of some prefix of the workload."""
    path = tmp_path / "s"
    rng = random.Random(1309)
    acked = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, CHILD, OTPY_DIR, "workload", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        out = b""
        try:
            kill_at = None
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 0.5)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    assert chunk, f"the writer exited early: {out[-200:]!r}"
                    out += chunk
                if kill_at is None and b"ready\n" in out:
                    kill_at = time.monotonic() + rng.uniform(0.02, 0.25)
                if kill_at is not None and time.monotonic() >= kill_at:
                    break
            os.kill(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out += rest
        assert -signal.SIGKILL == proc.returncode
        seqs = [int(line) for line in out.split(b"\n")[1:] if line]
        assert seqs, "no record was acknowledged before the kill"
        acked = seqs[-1]
        states, store = reopen(path, segment_bytes=4096)
        assert store.seq >= acked
        assert store_child.replay(store.seq) == states
        store.close()


# -- group commit ---------------------------------------------------------------------


async def test_group_commit_acknowledges_only_what_fdatasync_covered(
        tmp_path: Path) -> None:
    """Under trio, 64 writers put and wait for their seq to be synced: each is released
    on the loop thread, only after an ``fdatasync`` that started once its record was in
    the file (its segment's inode, at least its end offset) has returned."""
    completed: list[tuple[int, int]] = []  # (inode, size at the start) of done syncs

    def observed_fdatasync(fd: int) -> None:
        st = os.fstat(fd)
        os.fdatasync(fd)
        completed.append((st.st_ino, st.st_size))

    store = SqliteStore(tmp_path / "s", fsync="group", segment_bytes=16384,
                        _fdatasync=observed_fdatasync)
    loop_thread = threading.get_ident()
    waiting: dict[int, trio.Event] = {}
    bad: list[str] = []

    def on_synced(seq: int, error: otpy.StoreError | None) -> None:
        if threading.get_ident() != loop_thread:
            bad.append("the callback ran off the loop thread")
        for s in [s for s in waiting if s <= seq]:
            waiting.pop(s).set()

    store.on_synced(on_synced, trio.lowlevel.current_trio_token().run_sync_soon)
    checked = 0

    async def writer(w: int) -> None:
        nonlocal checked
        for j in range(30):
            # The record goes to the newest segment, which the put may seal and the
            # compactor delete at once: hold it open to see where the record ends.
            fd = os.open(log_files(store.path)[-1], os.O_RDONLY)
            try:
                seq = store.put(f"w{w}", "1", (w, j, "x" * 50))
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if seq > store.synced_seq:
                waiting[seq] = event = trio.Event()
                with trio.fail_after(10):
                    await event.wait()
            if not any(ino == st.st_ino and size >= st.st_size for ino, size in completed):
                bad.append(f"seq {seq} acknowledged before a sync covered it")
            checked += 1

    async with trio.open_nursery() as nursery:
        for w in range(64):
            nursery.start_soon(writer, w)
    stats = store.statistics()
    store.close()
    assert [] == bad
    assert (64 * 30, 0) == (checked, stats["pending"])
    assert stats["syncs"] >= 1


def test_always_mode_syncs_before_returning(tmp_path: Path) -> None:
    """With ``fsync="always"`` a put returns with its record synced: ``synced_seq`` is
    its seq at once and no reply ever needs holding."""
    synced: list[int] = []
    store = SqliteStore(tmp_path / "s", fsync="always",
                        _fdatasync=lambda fd: (os.fdatasync(fd), synced.append(fd))[0])
    before = len(synced)
    seq = store.put("a", "1", 1)
    assert (seq, before + 1) == (store.synced_seq, len(synced))
    store.close()


# -- faults at open and while running ------------------------------------------------


def open_as_nobody(path: Path) -> str:
    """Open a store at ``path`` in a forked child that dropped root for uid 65534, and
    return what it says (this process's interpreter may live where nobody can run it, so
    a fresh one would not do)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                SqliteStore(path).close()
                said = "opened"
            except otpy.StoreError as exc:
                said = f"StoreError: {exc}"
            os.write(w, said.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    assert (pid, 0) == os.waitpid(pid, 0)
    return said


def test_a_read_only_directory_is_a_clear_error_at_open(tmp_path: Path) -> None:
    """A store in a directory this process cannot write fails to open with a
    StoreError naming the path and how to fix it (checked as an unprivileged user when
    the tests run as root, whom permissions do not stop)."""
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="otpy-ro-"))  # root's, mode 0755 for others
        try:
            base.chmod(0o755)
            message = open_as_nobody(base / "store")
        finally:
            base.rmdir()
    else:
        base = tmp_path / "ro"
        base.mkdir(mode=0o555)
        try:
            with pytest.raises(otpy.StoreError) as info:
                SqliteStore(base / "store")
        finally:
            base.chmod(0o755)
        message = f"StoreError: {info.value}"
    assert message.startswith(f"StoreError: cannot open the store {base / 'store'}: ")
    assert "Permission denied" in message
    assert "give the node another store=PATH" in message


def test_a_file_size_limit_fails_the_put_and_keeps_every_acknowledged_record(
        tmp_path: Path) -> None:
    """Writing past RLIMIT_FSIZE fails like a full disk (EFBIG instead of ENOSPC): the
    put raises a StoreError saying what happened and that nothing was recorded; the
    partial record is cut off, so the store reopens with every acknowledged record and
    no damaged tail."""
    path = tmp_path / "s"
    result = subprocess.run([sys.executable, CHILD, OTPY_DIR, "fsize", str(path), "65536"],
                            capture_output=True, text=True, timeout=30)
    assert 0 == result.returncode, result.stderr
    lines = result.stdout.splitlines()
    acked = int(lines[-4])
    assert lines[-3].startswith("StoreError: could not record the state of ")
    assert "[Errno 27] File too large; nothing was recorded" in lines[-3]
    stats = ast.literal_eval(lines[-2].removeprefix("stats: "))
    assert (acked, 1) == (stats["seq"], stats["write_errors"])
    assert lines[-1].startswith("again: could not record")
    with capture_logs() as logs:
        states, store = reopen(path)
    store.close()
    assert [] == [e for e in logs if e["log_level"] == "warning"]
    assert store_child.replay(acked) == states


def test_a_second_process_cannot_open_the_same_store(tmp_path: Path) -> None:
    """One writer per store: another process opening it gets a StoreError naming the
    pid that holds it."""
    store = SqliteStore(tmp_path / "s")
    try:
        result = subprocess.run(
            [sys.executable, CHILD, OTPY_DIR, "open", str(tmp_path / "s")],
            capture_output=True, text=True, timeout=30)
    finally:
        store.close()
    assert (f"StoreError: the store {tmp_path / 's'} is open in another process "
            f"(pid {os.getpid()})") in result.stdout


def test_a_database_that_is_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    """A ``state.sqlite`` that SQLite cannot read is refused at open, naming the file
    and how to start afresh (the log may be recovered; a database cannot be guessed)."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(otpy.StoreError, match=r"its state\.sqlite is not a database this "
                                              r"otpy can read"):
        SqliteStore(tmp_path / "s")
    with SqliteStore(tmp_path / "t"):  # and the lock of the refused one was let go
        pass
    (tmp_path / "s" / "state.sqlite").unlink()
    with SqliteStore(tmp_path / "s") as store:
        assert [] == store.load()


def test_an_unpicklable_state_is_refused_and_nothing_recorded(tmp_path: Path) -> None:
    """A state pickle cannot carry is a StoreError that says so; no seq is used up."""
    with SqliteStore(tmp_path / "s") as store:
        with pytest.raises(otpy.StoreError, match="'a' cannot be pickled"):
            store.put("a", "1", {"f": lambda: 1})
        assert 1 == store.put("a", "1", 1)


def test_a_record_larger_than_max_record_is_refused(tmp_path: Path) -> None:
    """The store's bound on a record holds when writing as when reading."""
    with SqliteStore(tmp_path / "s", max_record=1024) as store:
        with pytest.raises(otpy.StoreError, match="more than the store's max_record of 1024"):
            store.put("a", "1", "x" * 2000)
        assert 0 == store.seq


def test_a_state_that_no_longer_unpickles_fails_alone(tmp_path: Path) -> None:
    """A state whose class the code no longer has raises a StoreError naming the key
    when it is read, and leaves the other keys readable."""
    with SqliteStore(tmp_path / "s") as store:
        store.put("ok", "1", 1)
        store.put("bad", "1", 2)
    good = pickle.dumps(1, 5)
    bad = pickle.dumps(2, 5).replace(b"K\x02", b"c__no_such_module__\nThing\n)R")
    stored = StoredState("bad", "1", 2, bad, (), str(tmp_path / "s"))
    with pytest.raises(otpy.StoreError, match="the stored state of 'bad'"):
        stored.state()
    assert 1 == StoredState("ok", "1", 1, good, (), "x").state()


def test_load_is_once_and_statistics_say_what_happened(tmp_path: Path) -> None:
    """load() gives the states found at open once; statistics() counts records, bytes,
    syncs and compactions."""
    store = SqliteStore(tmp_path / "s", fsync="group", segment_bytes=4096)
    assert [] == store.load()
    with pytest.raises(otpy.StoreError, match="already called"):
        store.load()
    for i in range(200):
        store.put("k", "1", "x" * 100 + str(i))
    deadline = time.monotonic() + 10
    while store.statistics()["compactions"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    while store.synced_seq < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = store.statistics()
    store.close()
    assert (200, 200, 0) == (stats["records"], stats["synced_seq"], stats["pending"])
    assert stats["bytes"] > 200 * 100
    assert stats["compactions"] >= 1 and stats["syncs"] >= 1
    assert isinstance(stats["last_sync"], float)
    with pytest.raises(otpy.StoreError, match="is closed"):
        store.put("k", "1", 0)


def test_sqlite_store_is_a_store(tmp_path: Path) -> None:
    """The embedded engine implements the public ``otpy.Store`` protocol."""
    with SqliteStore(tmp_path / "s") as store:
        assert isinstance(store, otpy.Store)


def test_the_store_folder_imports_no_trio_and_no_core() -> None:
    """``otpy._store`` is driven by the edge: it imports neither trio nor the core."""
    folder = Path(OTPY_DIR) / "_store"
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names
                      if n.split(".")[0] in ("trio", "anyio", "asyncio") or "_core" in n]
    assert [] == found


@pytest.fixture(autouse=True)
def _quiet_structlog() -> Any:
    """Keep the store's info events off the test output (capture_logs still sees them)."""
    yield
    structlog.reset_defaults()


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from("abc"),
              st.dictionaries(st.sampled_from("wxyz"), st.integers(0, 9), max_size=4)),
    st.tuples(st.just("patch"), st.sampled_from("abc"),
              st.lists(st.tuples(st.sampled_from("wxyz"), st.none() | st.integers(0, 9)),
                       max_size=3)),
    st.tuples(st.just("delete"), st.sampled_from("abc"), st.none()),
    st.tuples(st.just("batch"), st.lists(st.sampled_from("abc"), unique=True, max_size=3),
              st.integers(0, 9)),
    st.tuples(st.just("get"), st.none(), st.none()),
    st.tuples(st.just("reopen"), st.booleans(), st.none()),
), max_size=40)


def got(store: SqliteStore) -> dict[str, Any]:
    """What ``get`` says of each key now."""
    return {k: s.state() for k in "abc" if (s := store.get(k)) is not None}


@settings(max_examples=25, deadline=None)
@given(ops)
def test_any_history_reads_back_as_the_model_says(history: list[tuple[Any, ...]]) -> None:
    """Puts, patches (sets and removals), deletes and atomic batches, with reopens that
    compact or leave the log (segments of 4 KiB, so both SQLite and the log hold parts):
    every reopen gives back exactly the states a dict model holds, and so does get()
    at any point."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        model: dict[str, dict[str, int]] = {}
        store = SqliteStore(path, segment_bytes=4096, snapshot_ratio=0.5)
        for kind, key, arg in history:
            if kind == "put":
                model[key] = {**arg, "pad": "p" * 1000}  # patches are smaller than this
                store.put(key, "1", model[key])
            elif kind == "patch":
                state = model.setdefault(key, {})
                for entry, value in arg:
                    if value is None:
                        state.pop(entry, None)
                    else:
                        state[entry] = value
                store.patch(key, "1", state, [entry for entry, _ in arg])
            elif kind == "delete":
                model.pop(key, None)
                store.delete(key)
            elif kind == "batch":
                for k in key:
                    model[k] = {"w": arg, "pad": "b" * 500}
                store.put_many([(k, "1", model[k]) for k in key])
            elif kind == "get":
                assert model == got(store)
            else:
                store.close(compact=key)
                store = SqliteStore(path, segment_bytes=4096, snapshot_ratio=0.5)
                assert model == states_of(store)
        stats = store.statistics()
        store.close()
        store = SqliteStore(path)
        assert model == states_of(store)
        store.close()
        note(f"{stats}")
        event(f"segments sealed: {stats['compactions'] + stats['log_segments'] > 1}")

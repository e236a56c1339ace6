"""``SqliteStore``: an append-only log written inline, compacted into SQLite by a thread.

The loop thread appends each record to the newest log segment with one ``os.write``
(1 µs; a record in the page cache survives a kill -9 of the process) and returns. Behind
it, two threads that never touch the servers' live state:

- the **compactor** takes each sealed segment (the loop seals one when it passes
  ``segment_bytes`` and starts the next) together with the segment's *index*, which the
  loop built while writing it: for each key, its last whole state and the patches after
  it, as the very ``bytes`` objects it pickled. The compactor writes that index into
  SQLite in one transaction (committed with ``synchronous=FULL``), records the segment
  as absorbed in the same transaction, then deletes the segment. It parses nothing,
  unpickles nothing and runs no user code, so it holds the GIL only to build rows
  (SQLite releases it while it works) and cannot fail on a state it cannot read;
- the **syncer** (``fsync="group"`` only) ``fdatasync``\\ s whatever was written since its
  last round, advances :attr:`SqliteStore.synced_seq` and tells the loop through the
  ``call_soon`` it was given, so the runtime releases the replies it held.

What must stay true:

- a call that returned a seq wrote its whole record to the kernel; a call that raised
  wrote nothing that recovery would read (a short write is cut back with ``ftruncate``;
  if even that fails the store refuses every later record);
- seqs grow by one per record, and a segment is deleted only after a committed SQLite
  transaction holds its records, so at any crash the records are in SQLite or in a
  segment still on disk (a segment at or below the absorbed one is skipped at open);
- in ``"group"`` mode ``synced_seq`` never passes a record before ``fdatasync`` of its
  segment (and, for a new segment, of the directory) has returned;
- ``patch`` costs what the change costs: it writes the changed entries, and writes the
  whole state instead only once the patches since the last whole state outweigh it
  (``snapshot_ratio``), so that recovery applies at most that much on top of an image.

Store files are as trusted as the node's code: states are pickled, and unpickling runs
code. Never open a store that someone else could have written.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import structlog

from .._exceptions import StoreError
from .._protocol.store_records import (
    BATCH,
    DEFAULT_MAX_RECORD,
    DELETE,
    HEADER_SIZE,
    PATCH,
    PREFIX_SIZE,
    PUT,
    Damage,
    Record,
    encode_batch,
    encode_record,
    whole_batches,
)
from . import db
from .base import FSYNC_MODES, FsyncMode, StoredState, SyncedCallback, make_patch
from .files import (
    DirectoryLock,
    create_segment,
    fsync_dir,
    list_segments,
    read_segment,
    segment_path,
    set_aside,
)

DEFAULT_SEGMENT_BYTES = 8 << 20
COMPACTION_RETRY = 5.0  # seconds between attempts after a failed compaction
MAX_BATCH = 64  # sealed segments absorbed in one transaction, at most

_dumps = pickle.dumps
_write = os.write
_FDATASYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class _Sealed:
    """Segments the loop no longer writes, waiting for the compactor: their combined
    index, the last of them, and the last seq in them."""

    __slots__ = ("index", "last_seq", "number", "paths", "records", "size")

    def __init__(self, paths: list[Path], number: int, index: db.Index, last_seq: int,
                 records: int, size: int) -> None:
        self.paths = paths
        self.number = number
        self.index = index
        self.last_seq = last_seq
        self.records = records
        self.size = size


def index_records(records: list[Record], index: db.Index) -> None:
    """Add decoded records, in order, to a segment's index (recovery's path; the loop
    builds the same while writing)."""
    for kind, seq, key, vsn, payload, _ in records:
        if kind == PUT:
            index[key] = [payload, vsn, seq, None]
        elif kind == DELETE:
            index[key] = [None, None, seq, None]
        elif kind == BATCH:
            continue  # the records it announces follow it: they are indexed as they come
        else:
            entry = index.get(key)
            if entry is None:
                index[key] = [None, vsn, seq, [(seq, payload)]]
            else:
                if entry[3] is None:
                    entry[3] = []
                entry[3].append((seq, payload))
                entry[2] = seq


_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__


class SqliteStore:
    """The embedded durable store: an append-only log in a directory, compacted into a
    SQLite database there by a background thread.

    ::

        store = otpy.SqliteStore(directory)         # opens, recovers, locks
        seq = store.put("counter", "1", 41)          # in the kernel when it returns
        store.close()
        store = otpy.SqliteStore(directory)
        [stored] = store.load()
        assert (stored.key, stored.vsn, stored.state()) == ("counter", "1", 41)

    ``fsync`` chooses what a power loss may take (a kill -9 of the process takes nothing
    a call returned, in every mode):

    - ``"never"`` (default): records reach the disk when the kernel writes them back
      (within ~30 s on Linux defaults) or at compaction; a power loss may take the
      records of that window, never an older one, and recovery keeps a consistent
      prefix;
    - ``"group"``: a syncer thread ``fdatasync``\\ s each batch of records; replies must
      be held until ``synced_seq`` covers them (:meth:`on_synced`);
    - ``"always"``: each record is ``fdatasync``\\ ed before the call returns, on the
      loop thread: as safe as ``"group"``, and every durable step waits for the disk.

    Other options: ``segment_bytes`` (a segment is sealed and compacted past this size),
    ``max_record`` (the largest record, so pickled state, it writes or reads: a bigger
    length in a damaged file is refused, never allocated), ``snapshot_ratio`` (a patch
    is written as the whole state once patches since the last one exceed this many times
    its size), ``log`` (a structlog logger).

    Opening raises :class:`~otpy.StoreError` if the directory cannot be created or
    written, or another process has the store open. A damaged log tail (a kill -9
    mid-write, a torn page) never stops it from opening: the records before it are kept,
    the rest is moved into ``damaged/`` and one ``store_tail_dropped`` event says what.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: FsyncMode = "never",
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 max_record: int = DEFAULT_MAX_RECORD, snapshot_ratio: float = 1.0,
                 log: Any = None, _fdatasync: Callable[[int], None] | None = None) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(map(repr, FSYNC_MODES))}, "
                             f"got {fsync!r}")
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {segment_bytes}")
        if not 64 <= max_record < 1 << 32:
            raise ValueError(f"max_record must be between 64 and 2**32-1, got {max_record}")
        if not snapshot_ratio > 0:
            raise ValueError(f"snapshot_ratio must be positive, got {snapshot_ratio}")
        self.path = Path(path).absolute()
        """The store's directory."""
        self.fsync: FsyncMode = fsync
        """``"never"``, ``"group"`` or ``"always"``: what a power loss may take."""
        self._group = fsync == "group"
        self._always = fsync == "always"
        self._segment_bytes = segment_bytes
        self._max_record = max_record
        self._ratio = snapshot_ratio
        self._sync = _fdatasync or _FDATASYNC
        self.log = log if log is not None else structlog.get_logger("otpy.store").bind(
            store=str(self.path))
        self._closed = False
        self._failure: StoreError | None = None
        # Figures (statistics()).
        self._records = 0
        self._bytes = 0
        self._write_errors = 0
        self._syncs = 0
        self._last_sync: float | None = None
        self._compactions = 0
        self._compacted_records = 0
        self._last_compaction: float | None = None
        self._compaction_error: str | None = None
        self._db_bytes = 0
        self._sealed_bytes = 0  # grown by the loop
        self._absorbed_bytes = 0  # grown by the compactor
        # Cross-thread handoffs: deques (append/popleft are atomic) and events.
        self._sealed: collections.deque[_Sealed] = collections.deque()
        self._retired: collections.deque[int] = collections.deque()
        self._wake = threading.Event()
        self._compact_wake = threading.Event()
        self._sync_wanted = False
        self._stop_syncer = False
        self._stop_compactor = False
        self._abandon = False  # close(compact=False): the compactor stops at once
        self._listener: tuple[SyncedCallback, Callable[..., object]] | None = None
        self._recovered: list[StoredState] | None = None
        self._reader: sqlite3.Connection | None = None  # get()'s, on the loop thread
        self._fd = -1
        self._dirfd = -1  # the syncer's, to make new segments' entries durable

        t0 = time.perf_counter()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = DirectoryLock(self.path)
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            raise self._open_error(exc) from exc
        try:
            self._open(t0)
        except BaseException:
            for fd in (self._fd, self._dirfd):
                if fd >= 0:
                    os.close(fd)
            self._lock.release()
            raise
        self._compactor = threading.Thread(target=self._compact_loop, daemon=True,
                                           name=f"otpy-store-compactor {self.path.name}")
        self._compactor.start()
        self._syncer: threading.Thread | None = None
        if self._group:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name=f"otpy-store-syncer {self.path.name}")
            self._syncer.start()
        if self._sealed:
            self._compact_wake.set()

    # -- opening and recovery -------------------------------------------------------

    def _open_error(self, exc: BaseException) -> StoreError:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                exc, sqlite3.OperationalError):
            return StoreError(
                f"cannot open the store {self.path}: its {db.DB_NAME} is not a database "
                f"this otpy can read ({type(exc).__name__}: {exc}); move it away to "
                f"start afresh, or give the node another store=PATH", path=self.path)
        return StoreError(
            f"cannot open the store {self.path}: {type(exc).__name__}: {exc}. A store "
            f"needs a directory this process can create and write (a read-only or full "
            f"disk cannot hold one); fix its permissions, free space, or give the node "
            f"another store=PATH", path=self.path)

    def _open(self, t0: float) -> None:
        try:
            conn = db.connect(self.path)
            try:
                absorbed, last_seq = db.read_meta(conn)
                entries, too_large, self._db_patched = db.read_entries(conn,
                                                                       self._max_record)
            finally:
                conn.close()
            from_db = len(entries) + len(too_large)
            segments = list_segments(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise self._open_error(exc) from exc
        replayed = 0
        next_seq = last_seq + 1
        damage: tuple[int, Path, Damage] | None = None
        live = []
        highest = absorbed
        for number, path in segments:
            highest = max(highest, number)
            if number <= absorbed:
                # Absorbed before a crash kept it from being deleted.
                try:
                    path.unlink()
                except OSError as exc:
                    raise self._open_error(exc) from exc
            else:
                live.append((number, path))
        # The segments left from before are replayed into one index, handed to the
        # compactor as one batch: recovery does per record only what the loop did.
        index: db.Index = {}
        kept: list[Path] = []
        size = 0
        dropped_segments: list[Path] = []
        for number, path in live:
            if damage is not None:
                dropped_segments.append(path)
                continue
            try:
                records, dmg = read_segment(path, number, next_seq, self._max_record)
                records, cut = whole_batches(records, HEADER_SIZE)
                if cut is not None:
                    why = ("an atomic batch of records (a release's states) is cut short, "
                           "so none of it is kept")
                    dmg = Damage(cut, why if dmg is None else f"{why} ({dmg.reason})",
                                 path.stat().st_size - cut)
            except OSError as exc:
                raise self._open_error(exc) from exc
            index_records(records, index)
            replayed += len(records)
            if records:
                next_seq = records[-1].seq + 1
            if dmg is not None:
                damage = (number, path, dmg)
                if dmg.offset < HEADER_SIZE:
                    continue  # nothing of it is kept: it is set aside whole
            kept.append(path)
            size += records[-1].end if records else HEADER_SIZE
        db.merge(entries, index)
        if kept:
            self._sealed.append(_Sealed(kept, int(kept[-1].name[4:]), index,
                                        next_seq - 1, replayed, size))
            self._sealed_bytes += size
        if damage is not None:
            self._set_aside(damage, dropped_segments, next_seq - 1)

        self._seq = next_seq - 1
        self._synced = self._seq
        # What patch() needs to know of a key (its vsn, image size, patch bytes since)
        # is learnt from its first put after open, not built here for every key: the
        # first patch of a key after a restart writes its whole state once.
        self._track: dict[str, list[Any]] = {}
        origin = str(self.path)
        recovered = [
            _new_tuple(StoredState, (key, vsn, seq, image,
                                     tuple([p for _, p in patches]) if patches else (),
                                     origin, ""))
            for key, image, vsn, seq, patches in entries.values()]
        for key, size in too_large.items():
            recovered.append(StoredState(
                key, "", 0, b"", (), origin,
                error=f"its image is {size} bytes, more than the store's max_record of "
                      f"{self._max_record}; open the store with a larger max_record"))
        self._recovered = recovered

        self._segment = highest + 1
        try:
            self._fd = create_segment(self.path, self._segment)
            if self._group or self._always:
                self._sync(self._fd)
                fsync_dir(self.path)
            if self._group:
                self._dirfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._open_error(exc) from exc
        self._offset = HEADER_SIZE
        self._limit = self._segment_bytes
        self._first_seq = self._seq + 1
        self._index: db.Index = {}
        self._db_bytes = sum(os.stat(p).st_size for p in (
            self.path / db.DB_NAME, self.path / (db.DB_NAME + "-wal")) if p.exists())
        self.log.info("store_opened", fsync=self.fsync, keys=len(recovered),
                      from_sqlite=from_db, log_records=replayed, log_segments=len(live),
                      seq=self._seq, seconds=round(time.perf_counter() - t0, 4))

    def _set_aside(self, damage: tuple[int, Path, Damage], later: list[Path],
                   kept_seq: int) -> None:
        _, path, dmg = damage
        kept: list[str] = []
        try:
            kept.append(str(set_aside(self.path, path, dmg.offset)))
            for p in later:
                kept.append(str(set_aside(self.path, p, 0)))
            fsync_dir(self.path)
        except OSError as exc:
            raise self._open_error(exc) from exc
        later_bytes = sum(os.path.getsize(p) for p in kept[1:])
        self.log.warning(
            "store_tail_dropped", segment=path.name, offset=dmg.offset, reason=dmg.reason,
            dropped_bytes=dmg.dropped + later_bytes, later_segments=len(later),
            kept_in=kept, kept_seq=kept_seq)

    # -- recording (the loop thread) ------------------------------------------------

    @property
    def synced_seq(self) -> int:
        """Records up to this seq are as durable as the fsync mode promises: in
        ``"never"`` and ``"always"`` mode every record a call returned, in ``"group"``
        mode those already ``fdatasync``\\ ed."""
        return self._synced

    @property
    def seq(self) -> int:
        """The seq of the latest record written."""
        return self._seq

    def load(self) -> list[StoredState]:
        """Every key's state as the store held it when it was opened (once)."""
        recovered = self._recovered
        if recovered is None:
            raise StoreError(f"load() of the store {self.path} was already called: it "
                             f"gives the states found at open once", path=self.path)
        self._recovered = None
        return recovered

    def put(self, key: str, vsn: str, state: Any) -> int:
        """Record ``state`` (pickled now) as ``key``'s whole state of code version
        ``vsn``; return the record's seq. Raises :class:`~otpy.StoreError` (nothing
        recorded) if the state cannot be pickled, is larger than ``max_record``, or
        cannot be written."""
        try:
            data = _dumps(state, 5)
        except Exception as exc:
            raise StoreError(
                f"the state of {key!r} cannot be pickled ({type(exc).__name__}: {exc}); a "
                f"durable server's state must be picklable: no open files, locks, "
                f"lambdas or local classes in it", path=self.path) from exc
        seq = self._seq + 1
        self._append(encode_record(PUT, seq, key, vsn, data), seq, key)
        self._index[key] = [data, vsn, seq, None]
        self._track[key] = [vsn, len(data), 0]
        if self._offset >= self._limit:
            self._rotate()
        return seq

    def patch(self, key: str, vsn: str, state: Any, changed: Iterable[Hashable]) -> int:
        """Record that the entries ``changed`` of the mapping ``state`` were set (or,
        absent from it, removed) since ``key``'s last record; return the record's seq.
        Writes the whole state instead for a key with no record yet, a new ``vsn``, or
        once the patches since the last whole state outweigh it. An empty ``changed``
        records nothing and returns the latest seq."""
        track = self._track.get(key)
        if track is None or track[0] != vsn:
            return self.put(key, vsn, state)
        try:
            change = make_patch(state, changed)
        except TypeError as exc:
            raise TypeError(f"patch() of {key!r} needs a mapping state whose entries the "
                            f"changed keys name, got {type(state).__name__} ({exc}); "
                            f"use put() for other states") from exc
        if not change[0] and not change[1]:
            return self._seq
        try:
            data = _dumps(change, 5)
        except Exception as exc:
            raise StoreError(
                f"a change of {key!r} cannot be pickled ({type(exc).__name__}: {exc}); a "
                f"durable server's state must be picklable", path=self.path) from exc
        if track[2] + len(data) > track[1] * self._ratio:
            return self.put(key, vsn, state)
        seq = self._seq + 1
        self._append(encode_record(PATCH, seq, key, vsn, data), seq, key)
        track[2] += len(data)
        entry = self._index.get(key)
        if entry is None:
            self._index[key] = [None, vsn, seq, [(seq, data)]]
        else:
            if entry[3] is None:
                entry[3] = [(seq, data)]
            else:
                entry[3].append((seq, data))
            entry[2] = seq
        if self._offset >= self._limit:
            self._rotate()
        return seq

    def put_many(self, items: Iterable[tuple[str, str, Any]]) -> int:
        """Record the whole state of each ``(key, vsn, state)`` as one atomic batch: after
        a crash at any instant, recovery finds all of them or none (a batch is written
        with one ``write``, opened by a record that counts the records that follow, and a
        batch cut short is dropped whole). Returns the seq of the last record (the
        latest seq when ``items`` is empty). Raises :class:`~otpy.StoreError`, and
        records nothing, if a state cannot be pickled or is too large, or the batch
        cannot be written. A release commits its durable servers' states with it."""
        datas: list[tuple[str, str, bytes]] = []
        for key, vsn, state in items:
            try:
                datas.append((key, vsn, _dumps(state, 5)))
            except Exception as exc:
                raise StoreError(
                    f"the state of {key!r} cannot be pickled ({type(exc).__name__}: "
                    f"{exc}); a durable server's state must be picklable: no open files, "
                    f"locks, lambdas or local classes in it", path=self.path) from exc
        if not datas:
            return self._seq
        first = self._seq + 1
        recs = [encode_batch(first, len(datas))]
        for i, (key, vsn, data) in enumerate(datas, 1):
            rec = encode_record(PUT, first + i, key, vsn, data)
            if len(rec) - PREFIX_SIZE > self._max_record:
                raise self._too_large(len(rec) - PREFIX_SIZE, key)
            recs.append(rec)
        last = first + len(datas)
        self._append(b"".join(recs), last, f"a batch of {len(datas)} states",
                     len(recs))
        index, track = self._index, self._track
        for i, (key, vsn, data) in enumerate(datas, 1):
            index[key] = [data, vsn, first + i, None]
            track[key] = [vsn, len(data), 0]
        if self._offset >= self._limit:
            self._rotate()
        return last

    def get(self, key: str) -> StoredState | None:
        """The state recorded for ``key`` now: what :meth:`load` would give for it if the
        process were killed at this instant (None if it has none). For a server restarted
        after a crash, whose live state may hold changes that were never recorded.

        It looks in the log not yet compacted first (in memory), and reads SQLite (one
        row and its patches) only when the key's last whole state is older: call it
        for a restart, not in every step."""
        if self._closed:
            raise self._refusal()
        # Newest first: the segment being written, then the sealed ones not yet absorbed
        # (a snapshot: the compactor only ever removes the oldest).
        suffix: list[tuple[int, db.Entry]] = []
        indexes = [(self._segment, self._index)]
        indexes += [(s.number, s.index) for s in reversed(self._sealed)]
        for number, index in indexes:
            entry = index.get(key)
            if entry is not None:
                suffix.append((number, entry))
                if entry[0] is not None or entry[1] is None:
                    break  # a whole state or a deletion: nothing older matters
        suffix.reverse()  # oldest first
        base: db.Row | None = None
        if not suffix or (suffix[0][1][0] is None and suffix[0][1][1] is not None):
            # Patches only (or nothing) in memory: the whole state is in SQLite. Segments
            # the compactor absorbed since the snapshot are in what SQLite says as well.
            try:
                if self._reader is None:
                    self._reader = db.connect(self.path)
                absorbed, base, too_large = db.read_one(self._reader, key,
                                                        self._max_record)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"cannot read the stored state of {key!r} from {self.path}:"
                                 f" {type(exc).__name__}: {exc}", path=self.path) from exc
            if too_large is not None:
                return StoredState(
                    key, "", 0, b"", (), str(self.path),
                    error=f"its image is {too_large} bytes, more than the store's "
                          f"max_record of {self._max_record}; open the store with a "
                          f"larger max_record")
            suffix = [(n, e) for n, e in suffix if n > absorbed]
        for _, (image, vsn, seq, patches) in suffix:
            if image is not None:
                base = (key, image, vsn, seq, list(patches) if patches else None)
            elif vsn is None:
                base = None
            elif base is not None:
                base = (key, base[1], vsn, seq, [*(base[4] or ()), *patches])
        if base is None:
            return None
        _, image, vsn, seq, patches = base
        return StoredState(key, vsn, seq, image,
                           tuple([p for _, p in patches]) if patches else (),
                           str(self.path), "")

    def delete(self, key: str) -> int:
        """Record that ``key`` has no state any more; return the record's seq."""
        seq = self._seq + 1
        self._append(encode_record(DELETE, seq, key, ""), seq, key)
        self._index[key] = [None, None, seq, None]
        self._track.pop(key, None)
        if self._offset >= self._limit:
            self._rotate()
        return seq

    def _too_large(self, size: int, key: str) -> StoreError:
        return StoreError(
            f"the record of {key!r} would be {size} bytes, more than the store's "
            f"max_record of {self._max_record}; keep the state smaller, record changes "
            f"with patch(), or open the store with a larger max_record", path=self.path)

    def _append(self, rec: bytes, seq: int, key: str, records: int = 0) -> None:
        """Write ``rec`` (one record, or with ``records`` > 0 that many records checked
        already, a batch) whose last seq is ``seq``."""
        if self._failure is not None or self._closed:
            raise self._refusal()
        size = len(rec)
        if not records and size - PREFIX_SIZE > self._max_record:
            raise self._too_large(size - PREFIX_SIZE, key)
        fd = self._fd
        try:
            written = _write(fd, rec)
            while written < size:  # a short write: a full disk or a file size limit
                more = _write(fd, memoryview(rec)[written:])
                if more <= 0:
                    raise OSError(28, "no progress appending to the log")
                written += more
        except OSError as exc:
            raise self._write_failed(exc, key) from exc
        self._offset += size
        self._seq = seq
        self._records += records or 1
        self._bytes += size
        if self._group:
            if not self._sync_wanted:
                self._sync_wanted = True
                self._kick()
        else:
            if self._always:
                try:
                    self._sync(fd)
                except OSError as exc:
                    self._failure = StoreError(
                        f"fdatasync of the store's log {segment_path(self.path, self._segment)}"
                        f" failed ({exc}); what the disk holds is unknown, so the store "
                        f"refuses every later record: restart the node", path=self.path)
                    self.log.critical("store_sync_failed", error=str(exc))
                    raise self._failure from exc
                self._syncs += 1
                self._last_sync = time.time()
            self._synced = seq

    def _write_failed(self, exc: OSError, key: str) -> StoreError:
        self._write_errors += 1
        where = segment_path(self.path, self._segment)
        try:
            os.ftruncate(self._fd, self._offset)
        except OSError as cut:
            self._failure = StoreError(
                f"appending to the store's log {where} failed ({exc}) and the partial "
                f"record could not be cut off ({cut}); the store refuses every later "
                f"record: restart the node once the disk is fixed", path=self.path)
            self.log.critical("store_write_failed", key=key, error=str(exc), usable=False)
            return self._failure
        if self._write_errors == 1 or self._write_errors % 1000 == 0:
            self.log.error("store_write_failed", key=key, error=str(exc), usable=True,
                           failures=self._write_errors)
        return StoreError(
            f"could not record the state of {key!r} in {where}: {exc}; nothing was "
            f"recorded. Free space on that disk (or raise the file size limit): the store "
            f"goes on once writes succeed", path=self.path)

    def _refusal(self) -> StoreError:
        if self._closed:
            return StoreError(f"the store {self.path} is closed", path=self.path)
        assert self._failure is not None
        return StoreError(f"the store {self.path} failed earlier and records nothing "
                          f"more: {self._failure}", path=self.path)

    def _rotate(self, *, final: bool = False) -> None:
        """Seal the segment being written and (unless ``final``) start the next."""
        number = self._segment + 1
        fd = -1
        if not final:
            try:
                fd = create_segment(self.path, number)
                if self._always:
                    self._sync(fd)
                    fsync_dir(self.path)
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                # Go on appending to this segment; try again a little later.
                self._limit = self._offset + max(self._segment_bytes // 4, 1 << 16)
                self.log.error("store_rotation_failed", segment=number, error=str(exc))
                return
        old_fd = self._fd
        sealed = _Sealed([segment_path(self.path, self._segment)], self._segment,
                         self._index, self._seq, self._seq - self._first_seq + 1,
                         self._offset)
        # The old fd goes to the syncer before self._fd moves on, so that a sync round
        # that read the new fd always finds the old one among the retired.
        if self._group and not final:
            self._retired.append(old_fd)
        else:
            os.close(old_fd)
        if not final:
            self._fd = fd
            self._segment = number
            self._offset = HEADER_SIZE
            self._limit = self._segment_bytes
            self._first_seq = self._seq + 1
            self._index = {}
        else:
            self._fd = -1
        self._sealed_bytes += sealed.size
        self._sealed.append(sealed)
        self._compact_wake.set()

    # -- group commit ---------------------------------------------------------------

    def on_synced(self, callback: SyncedCallback, call_soon: Callable[..., object]) -> None:
        """In ``"group"`` mode, call ``call_soon(callback, synced_seq, None)`` from the
        syncer thread each time ``synced_seq`` advances (``call_soon`` must be safe to
        call from another thread: trio's ``TrioToken.run_sync_soon``); if a sync fails,
        ``call_soon(callback, synced_seq, error)`` once. Other modes never call it: a
        record is as durable as they promise when its call returns."""
        self._listener = (callback, call_soon)

    def _kick(self) -> None:
        """Wake the syncer once the loop has run what is runnable now: through
        ``call_soon`` (the same that :meth:`on_synced` was given), whose callbacks run
        after the current batch of tasks. So the puts of every writer that one sync
        released go into the next sync together, instead of the first of them starting
        a sync of one record while the others queue behind it."""
        listener = self._listener
        if listener is not None:
            try:
                listener[1](self._wake.set)
                return
            except Exception:  # the loop is gone: wake the syncer directly
                pass
        self._wake.set()

    def _notify(self, seq: int, error: StoreError | None) -> None:
        listener = self._listener
        if listener is None:
            return
        callback, call_soon = listener
        try:
            call_soon(callback, seq, error)
        except Exception as exc:  # the loop is gone (trio.RunFinishedError)
            self._listener = None
            self.log.debug("store_listener_dropped", error=repr(exc))

    def _sync_loop(self) -> None:
        dirfd = self._dirfd
        try:
            while True:
                if not self._stop_syncer:
                    self._wake.wait()
                # Clear the flag before reading the target: a record written after
                # this point wakes the next round, one written before is covered.
                self._sync_wanted = False
                self._wake.clear()
                target = self._seq
                fd = self._fd
                retired = []
                while self._retired:
                    retired.append(self._retired.popleft())
                try:
                    for old in retired:
                        self._sync(old)
                    if retired:
                        os.fsync(dirfd)
                    if target > self._synced:
                        self._sync(fd)
                except OSError as exc:
                    self._failure = StoreError(
                        f"fdatasync of the store's log in {self.path} failed ({exc}); "
                        f"records after seq {self._synced} may not be on disk and what the "
                        f"disk holds is unknown, so the store refuses every later record: "
                        f"restart the node", path=self.path)
                    self.log.critical("store_sync_failed", error=str(exc),
                                      synced_seq=self._synced)
                    self._notify(self._synced, self._failure)
                    return
                finally:
                    for old in retired:
                        os.close(old)
                if target > self._synced:
                    self._synced = target
                    self._syncs += 1
                    self._last_sync = time.time()
                    self._notify(target, None)
                if self._stop_syncer and self._synced >= self._seq and not self._retired:
                    return
        finally:
            os.close(dirfd)

    # -- compaction (its own thread) ------------------------------------------------

    def _compact_loop(self) -> None:
        conn = None
        try:
            while True:
                self._compact_wake.wait(COMPACTION_RETRY if self._compaction_error else None)
                self._compact_wake.clear()
                while self._sealed and not self._abandon:
                    # Everything sealed so far, in one transaction (one fsync): when the
                    # loop seals faster than one commit takes, batches grow instead of
                    # the backlog.
                    batch = list(itertools.islice(self._sealed, MAX_BATCH))
                    t0 = time.perf_counter()
                    try:
                        if conn is None:
                            conn = db.connect(self.path)
                        db.absorb(conn, [s.index for s in batch], batch[-1].number,
                                  batch[-1].last_seq, self._db_patched)
                    except Exception as exc:
                        if self._compaction_error is None:
                            self.log.error("store_compaction_failed",
                                           segment=batch[0].number,
                                           error=f"{type(exc).__name__}: {exc}",
                                           retry_seconds=COMPACTION_RETRY)
                        self._compaction_error = f"{type(exc).__name__}: {exc}"
                        break
                    self._compaction_error = None
                    for sealed in batch:
                        self._sealed.popleft()
                        for path in sealed.paths:
                            try:
                                path.unlink()
                            except FileNotFoundError:
                                pass
                            except OSError as exc:  # absorbed all the same: skipped at open
                                self.log.warning("store_segment_not_deleted",
                                                 segment=path.name, error=str(exc))
                        self._absorbed_bytes += sealed.size
                        self._compacted_records += sealed.records
                    self._compactions += 1
                    self._last_compaction = time.time()
                    try:
                        self._db_bytes = sum(
                            os.stat(self.path / (db.DB_NAME + suffix)).st_size
                            for suffix in ("", "-wal"))
                    except OSError:
                        pass
                    self.log.debug("store_compacted", segments=len(batch),
                                   records=sum(s.records for s in batch),
                                   keys=sum(len(s.index) for s in batch),
                                   seconds=round(time.perf_counter() - t0, 4))
                if self._stop_compactor:
                    return
        finally:
            if conn is not None:
                conn.close()

    # -- the rest -------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """The store's figures (no I/O): ``records`` and ``bytes`` appended since open,
        ``seq``, ``synced_seq``, ``pending`` (records not yet as durable as the mode
        promises), ``syncs`` and ``last_sync`` (a time.time(), or None), ``log_bytes``
        and ``log_segments`` (not yet compacted), ``compactions``,
        ``compacted_records``, ``last_compaction``, ``compaction_error``, ``db_bytes``
        (after the last compaction), ``write_errors``, ``failure``."""
        return {
            "path": str(self.path),
            "fsync": self.fsync,
            "records": self._records,
            "bytes": self._bytes,
            "seq": self._seq,
            "synced_seq": self._synced,
            "pending": self._seq - self._synced,
            "syncs": self._syncs,
            "last_sync": self._last_sync,
            "log_bytes": self._sealed_bytes - self._absorbed_bytes + max(self._offset, 0),
            "log_segments": len(self._sealed) + (0 if self._closed else 1),
            "compactions": self._compactions,
            "compacted_records": self._compacted_records,
            "last_compaction": self._last_compaction,
            "compaction_error": self._compaction_error,
            "db_bytes": self._db_bytes,
            "write_errors": self._write_errors,
            "failure": str(self._failure) if self._failure else None,
        }

    def close(self, *, compact: bool = True) -> None:
        """Sync what is pending, compact every segment into SQLite (unless ``compact`` is
        false: then the log is left for the next open to replay, as after a crash), stop
        the threads and release the store's lock. Blocks for a compaction at most;
        idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._syncer is not None:
            self._stop_syncer = True
            self._wake.set()
            self._syncer.join()
        while self._retired:  # left by a syncer that stopped on a failed sync
            os.close(self._retired.popleft())
        if compact and self._offset > HEADER_SIZE:
            self._rotate(final=True)
        else:
            os.close(self._fd)
            self._fd = -1
            if self._offset <= HEADER_SIZE:
                try:
                    segment_path(self.path, self._segment).unlink()
                except OSError:
                    pass
        self._offset = 0
        self._abandon = not compact
        self._stop_compactor = True
        self._compact_wake.set()
        self._compactor.join()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._lock.release()
        self.log.debug("store_closed", seq=self._seq, log_segments=len(self._sealed))

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<otpy.SqliteStore {str(self.path)!r} fsync={self.fsync!r} seq={self._seq}>"

"""The SQLite side of the store: the compacted images and patches, and what has been
absorbed from the log.

Schema (WAL journal; every compaction commits with ``synchronous=FULL``)::

    meta(name, value)           format = 1; absorbed = the last segment absorbed;
                                last_seq = the seq of its last record
    images(key, vsn, seq, data) a key's last whole state (pickled), seq = its latest record
    patches(key, seq, data)     patches recorded after that image, applied in seq order

An *index* is what one log segment says about each key, built from the bytes already
pickled (the loop's, or recovery's): ``key -> [image | None, vsn | None, seq, patches |
None]`` where ``patches`` is a list of ``(seq, data)``; ``[None, None, seq, None]`` is a
deletion, ``[None, vsn, seq, [...]]`` patches onto the image before. :func:`absorb`
writes the indexes of one or more consecutive segments into SQLite in one transaction
together with the meta row that says they are absorbed, so a crash at any point leaves
either the segments to replay or their records committed, never half of it; a segment
at or below ``absorbed`` is skipped (and deleted) at the next open.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

DB_NAME = "state.sqlite"
FORMAT = 1
CHUNK = 256  # rows per statement (at most 4 parameters a row, SQLite allows 32766)

Entry = list[Any]  # [image | None, vsn | None, seq, patches | None]
Index = dict[str, Entry]
Row = tuple[Any, ...] | list[Any]  # (key, image, vsn, seq, patches | None)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    key TEXT PRIMARY KEY, vsn TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS patches (
    key TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (key, seq));
"""


def connect(directory: Path) -> sqlite3.Connection:
    """Open (creating if needed) the store's database, in WAL mode, synchronous FULL."""
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
        (fmt,) = conn.execute("SELECT value FROM meta WHERE name='format'").fetchone()
        if fmt != FORMAT:
            raise sqlite3.DatabaseError(
                f"the store's format is {fmt}, this otpy reads format {FORMAT}")
    except BaseException:
        conn.close()
        raise
    return conn


def read_meta(conn: sqlite3.Connection) -> tuple[int, int]:
    """``(absorbed segment, last seq absorbed)``; (0, 0) for a new store."""
    meta = dict(conn.execute("SELECT name, value FROM meta"))
    return int(meta.get("absorbed", 0)), int(meta.get("last_seq", 0))


def read_entries(conn: sqlite3.Connection, max_record: int
                 ) -> tuple[dict[str, Row], dict[str, int], set[str]]:
    """Every key's row ``(key, image, vsn, seq, patches | None)``, ``patches`` a list of
    ``(seq, data)``; the keys whose image is larger than ``max_record`` (left on disk,
    not read: the bound on what a store can make the node hold), with its size; and the
    keys that have patch rows.

    Rows stay the tuples SQLite made unless patches or the log change them: for 100k
    keys, 100k fewer lists for the garbage collector to walk while the node starts."""
    too_large = dict(conn.execute(
        "SELECT key, length(data) FROM images WHERE length(data) > ?", (max_record,)))
    entries: dict[str, Row] = {row[0]: row for row in conn.execute(
        "SELECT key, data, vsn, seq, NULL FROM images WHERE length(data) <= ?",
        (max_record,))}
    patched: set[str] = set()
    for key, seq, data in conn.execute(
            "SELECT key, seq, data FROM patches ORDER BY key, seq"):
        patched.add(key)
        row = entries.get(key)
        if row is None:
            continue  # a patch of a key whose image was too large, or never written
        if type(row) is tuple:
            entries[key] = row = [key, row[1], row[2], row[3], []]
        assert isinstance(row, list)
        row[4].append((seq, data))
        row[3] = max(row[3], seq)
    return entries, too_large, patched


def read_one(conn: sqlite3.Connection, key: str, max_record: int
             ) -> tuple[int, Row | None, int | None]:
    """In one read transaction: the last segment absorbed, ``key``'s row as
    :func:`read_entries` gives it (None if it has no image), and the size of its image if
    that is larger than ``max_record`` (then the row is None: it is left on disk)."""
    conn.execute("BEGIN")
    try:
        absorbed, _ = read_meta(conn)
        found = conn.execute("SELECT length(data) FROM images WHERE key = ?",
                             (key,)).fetchone()
        if found is None:
            return absorbed, None, None
        if found[0] > max_record:
            return absorbed, None, found[0]
        image, vsn, seq = conn.execute("SELECT data, vsn, seq FROM images WHERE key = ?",
                                       (key,)).fetchone()
        patches = conn.execute("SELECT seq, data FROM patches WHERE key = ? ORDER BY seq",
                               (key,)).fetchall()
        return absorbed, (key, image, vsn, seq, patches or None), None
    finally:
        conn.execute("COMMIT")


def merge(entries: dict[str, Row], index: Index) -> None:
    """Apply a segment's index onto the rows :func:`read_entries` gave, in memory, as
    :func:`absorb` does in SQLite. The index's own lists are copied, never shared: the
    compactor writes that index after this."""
    for key, (image, vsn, seq, patches) in index.items():
        if image is not None:
            entries[key] = (key, image, vsn, seq, list(patches) if patches else None)
        elif vsn is None:
            entries.pop(key, None)
        else:
            row = entries.get(key)
            if row is None:
                continue  # patches with no image before them: nothing to apply them to
            entries[key] = (key, row[1], row[2], seq, [*(row[4] or ()), *patches])


def absorb(conn: sqlite3.Connection, indexes: list[Index], segment: int,
           last_seq: int, patched: set[str]) -> None:
    """Commit the indexes of consecutive segments, oldest first, and mark the segments up
    to ``segment`` (whose last record is ``last_seq``) absorbed, in one transaction.

    ``patched`` holds the keys that have patch rows in SQLite (the compactor's own set,
    first read at open): a key written whole has its patch rows deleted only if it has
    any, sparing most rows a B-tree lookup. It is updated once the commit succeeded."""
    added: set[str] = set()
    cleared: set[str] = set()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for index in indexes:
            _write_index(conn, index, patched, added, cleared)
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                         [("absorbed", segment), ("last_seq", last_seq)])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    patched -= cleared
    patched |= added


def _many(conn: sqlite3.Connection, head: str, width: int, rows: list[tuple[Any, ...]],
          tail: str = "") -> None:
    """Run ``head VALUES (?, ...), (?, ...) tail`` over ``rows``, CHUNK rows per
    statement. One statement per chunk rather than executemany's one step per row: the
    sqlite3 module gives the GIL back around each step, and each time it wants it back it
    may wait for the loop thread (up to the interpreter's switch interval); a chunk is
    one such wait for CHUNK rows."""
    group = "(" + ", ".join("?" * width) + ")"
    for i in range(0, len(rows), CHUNK):
        chunk = rows[i:i + CHUNK]
        conn.execute(f"{head} VALUES {', '.join([group] * len(chunk))} {tail}",
                     [x for row in chunk for x in row])


def _delete(conn: sqlite3.Connection, table: str, keys: list[str]) -> None:
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i:i + CHUNK]
        conn.execute(f"DELETE FROM {table} WHERE key IN ({', '.join('?' * len(chunk))})",
                     chunk)


def _write_index(conn: sqlite3.Connection, index: Index, patched: set[str],
                 added: set[str], cleared: set[str]) -> None:
    images: list[tuple[Any, ...]] = []
    unpatch: list[str] = []
    deleted: list[str] = []
    patch_rows: list[tuple[Any, ...]] = []
    touched: list[tuple[Any, ...]] = []
    for key, (image, vsn, seq, patches) in index.items():
        if image is not None:
            images.append((key, vsn, seq, image))
            if key in patched or key in added:
                unpatch.append(key)
                cleared.add(key)
                added.discard(key)
        elif vsn is None:
            deleted.append(key)
            cleared.add(key)
            added.discard(key)
            continue
        else:
            touched.append((seq, key))
        if patches:
            patch_rows += [(key, s, data) for s, data in patches]
            added.add(key)
    _delete(conn, "images", deleted)
    _delete(conn, "patches", deleted)
    _delete(conn, "patches", unpatch)
    _many(conn, "INSERT INTO images", 4, images,
          "ON CONFLICT (key) DO UPDATE SET vsn = excluded.vsn, seq = excluded.seq, "
          "data = excluded.data")
    if touched:
        conn.executemany("UPDATE images SET seq=? WHERE key=?", touched)
    _many(conn, "INSERT OR REPLACE INTO patches", 3, patch_rows)

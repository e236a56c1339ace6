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

from .files import iter_chunks

DB_NAME = "state.sqlite"
FORMAT = 1
CHUNK = 512  # rows per executemany: the compactor gives the GIL back between chunks

Entry = list[Any]  # [image | None, vsn | None, seq, patches | None]
Index = dict[str, Entry]

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


def read_entries(conn: sqlite3.Connection, max_record: int) -> tuple[dict[str, Entry],
                                                                     dict[str, int]]:
    """Every key's image and patches, as entries; and the keys whose image is larger than
    ``max_record`` (left on disk, not read: the bound on what a store can make the node
    hold), with their size."""
    entries: dict[str, Entry] = {}
    too_large: dict[str, int] = {}
    intern: dict[str, str] = {}
    rows = conn.execute(
        "SELECT key, vsn, seq, CASE WHEN length(data) <= ? THEN data END, length(data) "
        "FROM images", (max_record,))
    for key, vsn, seq, data, size in rows:
        if data is None:
            too_large[key] = size
            continue
        entries[key] = [data, intern.setdefault(vsn, vsn), seq, None]
    for key, seq, data in conn.execute(
            "SELECT key, seq, data FROM patches ORDER BY key, seq"):
        entry = entries.get(key)
        if entry is None:
            continue  # a patch of a key whose image was too large, or never written
        if entry[3] is None:
            entry[3] = []
        entry[3].append((seq, data))
        entry[2] = max(entry[2], seq)
    return entries, too_large


def merge(entries: dict[str, Entry], index: Index) -> None:
    """Apply one segment's index onto ``entries`` in memory, as :func:`absorb` does in
    SQLite."""
    for key, (image, vsn, seq, patches) in index.items():
        if image is not None:
            entries[key] = [image, vsn, seq, list(patches) if patches else None]
        elif vsn is None:
            entries.pop(key, None)
        else:
            entry = entries.get(key)
            if entry is None:
                continue  # patches with no image before them: nothing to apply them to
            if entry[3] is None:
                entry[3] = []
            entry[3].extend(patches)
            entry[2] = seq


def absorb(conn: sqlite3.Connection, indexes: list[Index], segment: int,
           last_seq: int) -> None:
    """Commit the indexes of consecutive segments, oldest first, and mark the segments up
    to ``segment`` (whose last record is ``last_seq``) absorbed, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for index in indexes:
            _write_index(conn, index)
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                         [("absorbed", segment), ("last_seq", last_seq)])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _write_index(conn: sqlite3.Connection, index: Index) -> None:
    images: list[tuple[Any, ...]] = []
    cleared: list[tuple[Any, ...]] = []
    deleted: list[tuple[Any, ...]] = []
    patch_rows: list[tuple[Any, ...]] = []
    touched: list[tuple[Any, ...]] = []
    for key, (image, vsn, seq, patches) in index.items():
        if image is not None:
            images.append((key, vsn, seq, image))
            cleared.append((key,))
        elif vsn is None:
            deleted.append((key,))
            continue
        else:
            touched.append((seq, key))
        if patches:
            patch_rows += [(key, s, data) for s, data in patches]
    for chunk in iter_chunks(deleted, CHUNK):
        conn.executemany("DELETE FROM images WHERE key=?", chunk)
        conn.executemany("DELETE FROM patches WHERE key=?", chunk)
    for chunk in iter_chunks(cleared, CHUNK):
        conn.executemany("DELETE FROM patches WHERE key=?", chunk)
    for chunk in iter_chunks(images, CHUNK):
        conn.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)", chunk)
    for chunk in iter_chunks(touched, CHUNK):
        conn.executemany("UPDATE images SET seq=? WHERE key=?", chunk)
    for chunk in iter_chunks(patch_rows, CHUNK):
        conn.executemany("INSERT OR REPLACE INTO patches VALUES (?, ?, ?)", chunk)

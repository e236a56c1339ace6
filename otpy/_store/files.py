"""The store directory's files: its lock, the log segments, and the damaged tails set
aside at recovery.

Layout of a store directory (created with mode 0700: states may hold secrets)::

    LOCK                  held with flock() by the one process that has the store open
    state.sqlite (+ -wal, -shm)   the compacted images and patches (see ``db``)
    log-0000000007        log segments, numbered from 1; the highest is written to
    damaged/              what recovery cut off a damaged log, kept for inspection

A segment is only ever appended to, by the process holding the lock, and only the
highest-numbered one; once sealed it is read by the compactor and deleted after its
records are committed to SQLite.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from pathlib import Path

from .._exceptions import StoreError
from .._protocol.store_records import Damage, Decoder, Record, segment_header

SEGMENT_RE = re.compile(r"^log-(\d{10})$")
LOCK_NAME = "LOCK"
DAMAGED_DIR = "damaged"
READ_SIZE = 1 << 20


def segment_path(directory: Path, number: int) -> Path:
    """The path of segment ``number``."""
    return directory / f"log-{number:010d}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """The segments present, in order."""
    found = []
    for entry in os.scandir(directory):
        match = SEGMENT_RE.match(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            found.append((int(match[1]), Path(entry.path)))
    return sorted(found)


def create_segment(directory: Path, number: int) -> int:
    """Create segment ``number`` with its header; return its fd, open for appending."""
    path = segment_path(directory, number)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                 0o600)
    try:
        header = segment_header(number)
        if os.write(fd, header) != len(header):
            raise OSError(errno.ENOSPC, "short write of a segment header", str(path))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a created or removed segment) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_segment(path: Path, number: int, next_seq: int, max_record: int
                 ) -> tuple[list[Record], Damage | None]:
    """Decode a whole segment: its records, and its damaged tail if any."""
    decoder = Decoder(segment=number, next_seq=next_seq, max_record=max_record)
    records: list[Record] = []
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE):
            records += decoder.feed(chunk)
    return records, decoder.close()


def set_aside(directory: Path, path: Path, offset: int) -> Path:
    """Move the bytes of ``path`` from ``offset`` on into ``damaged/`` and cut the
    segment there (a segment wholly damaged is moved); return where they went."""
    damaged = directory / DAMAGED_DIR
    damaged.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = damaged / f"{path.name}.{offset}.{stamp}"
    if offset == 0:
        os.replace(path, target)
        return target
    with open(path, "rb") as src, open(target, "xb") as dst:
        src.seek(offset)
        while chunk := src.read(READ_SIZE):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.truncate(path, offset)
    return target


class DirectoryLock:
    """An exclusive ``flock`` on ``LOCK``: one process per store. The kernel drops it
    when the process dies, kill -9 included, so a stale lock never blocks a restart."""

    def __init__(self, directory: Path) -> None:
        path = directory / LOCK_NAME
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise StoreError(
                f"the store {directory} is open in another process (pid {holder}); a "
                f"store has one writer: stop that node, or give this one another "
                f"store=PATH", path=directory) from None
        except BaseException:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (closing its fd)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

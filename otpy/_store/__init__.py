"""Durable state: where durable servers' states are recorded so that they outlive the
node's process.

Rule of this folder: a store is called synchronously from the node's loop thread, inline
in a server's step, so no method a step calls may wait for the disk (save what
``fsync="always"`` asks for); slow work (``fdatasync`` for group commit, compaction into
SQLite) runs on the store's own threads, which work only from bytes already serialized
and never touch the servers' live Python objects. Nothing here imports trio or the core
(``otpy._core``): the edge hands a store what it needs (a thread-safe ``call_soon``).
The record format is the sans-io codec ``otpy._protocol.store_records``.

- ``base``: the ``Store`` protocol every store implements, and ``StoredState``;
- ``engine``: ``SqliteStore``, the embedded store (an append-only log + SQLite);
- ``files``: the store directory, its lock and log segments; ``db``: its SQLite side.
"""

from .base import FSYNC_MODES as FSYNC_MODES
from .base import FsyncMode as FsyncMode
from .base import Store as Store
from .base import StoredState as StoredState
from .engine import SqliteStore as SqliteStore

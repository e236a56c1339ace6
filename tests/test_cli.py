"""The ``otpy`` command, driving a node that runs in a subprocess over its admin
endpoint: the tree, state, calls, an upgrade and a downgrade, and the errors and exit
codes for refused connections and failed authentication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def node_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A node in a subprocess: counters c0 (count 3) and sub/c1, echo (which replies with
    the types of what it got), admin on a free port."""
    script = tmp_path_factory.mktemp("node") / "node.py"
    script.write_text(NODE_SCRIPT)
    env = {**os.environ, "OTPY_COOKIE": COOKIE}
    proc = subprocess.Popen([sys.executable, str(script), str(RELEASES)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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


def test_console_script_is_installed(node_port: int) -> None:
    """The ``otpy`` console script runs the same program (checked end to end once)."""
    script = Path(sys.executable).parent / "otpy"
    if not script.exists():
        pytest.skip("the otpy console script is not installed in this environment")
    result = subprocess.run([str(script), "releases", "--node", f"127.0.0.1:{node_port}"],
                            env={**os.environ, "OTPY_COOKIE": COOKIE}, capture_output=True,
                            text=True, timeout=30, check=False)
    assert (0, "") == (result.returncode, result.stderr)

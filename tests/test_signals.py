"""Stopping a node from outside: SIGTERM (what docker, systemd and Kubernetes send) and
SIGINT (Ctrl-C) stop the tree in order, every terminate runs, one event says why, no
traceback, exit status 0; a second signal forces the exit (128 + the signal).

Each test runs ``otpy.run`` in a real subprocess and signals it by its pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

NODE = textwrap.dedent(
    """
    import sys, time, trio, otpy

    LOG = open(sys.argv[1], "a", buffering=1)

    class Noted(otpy.GenServer[int]):
        def init(self, arg):
            LOG.write(f"init {self.name}\\n")
            if self.name == "slow":
                self.start_task(self.linger)
            return 0

        async def linger(self):
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    LOG.write("slow task lingers\\n")
                    await trio.sleep(float(sys.argv[2]))

        def terminate(self, reason, state):
            LOG.write(f"terminate {self.name} {reason}\\n")

    async def main(node):
        print("READY", flush=True)
        await trio.sleep_forever()

    otpy.run(otpy.Supervisor([otpy.Child("a", Noted), otpy.Child("b", Noted),
                              otpy.Child("slow", Noted, shutdown=0.1)]), main)
    LOG.write("run returned\\n")
    """
)


def start(tmp_path: Path, linger: float = 0.0) -> tuple[subprocess.Popen[str], Path]:
    script, log = tmp_path / "node.py", tmp_path / "log.txt"
    script.write_text(NODE)
    proc = subprocess.Popen([sys.executable, str(script), str(log), str(linger)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(50):  # the node's start events come first
        if "READY" == proc.stdout.readline().strip():
            return proc, log
    raise AssertionError("the node never said READY")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_tree_in_order(tmp_path: Path, signum: int) -> None:
    """SIGTERM or SIGINT: every terminate runs, children in reverse start order, one
    ``node_stopping`` event naming the signal, no traceback, exit status 0."""
    proc, log = start(tmp_path)
    os.kill(proc.pid, signum)
    code, out, err = stop(proc)
    lines = log.read_text().splitlines()
    assert ["terminate slow shutdown", "terminate b shutdown", "terminate a shutdown",
            "run returned"] == [x for x in lines if x.startswith(("terminate", "run"))]
    assert 0 == code
    assert "Traceback" not in err and "Traceback" not in out
    assert 1 == out.count("node_stopping")
    assert signal.Signals(signum).name in out


def test_a_second_signal_forces_the_exit(tmp_path: Path) -> None:
    """While the tree stops (a task lingers past its grace), a second signal ends the
    process at once with status 128 + the signal."""
    proc, log = start(tmp_path, linger=60.0)
    os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "lingers" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code, out, err = stop(proc)
    assert 128 + signal.SIGTERM == code
    assert time.monotonic() - started < 5
    assert "node_forced_exit" in out
    assert "Traceback" not in err


def test_run_raises_what_main_raises_bare() -> None:
    """The signal watcher that runs beside the node does not wrap main's exception in
    an ExceptionGroup: ``run`` raises it as ``main`` did (in the main thread, where the
    watcher runs)."""
    import otpy

    class Idle(otpy.GenServer[int]):
        def init(self, arg: object) -> int:
            return 0

    async def main(node: otpy.Node) -> None:
        raise LookupError("from main")

    with pytest.raises(LookupError, match="from main"):
        otpy.run(otpy.Supervisor([otpy.Child("idle", Idle)]), main)

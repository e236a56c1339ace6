"""Releases loaded from files: code identified by its content, code directories that
import as a unit, bounded reading of hostile files, and loading off the loop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import otpy

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
sys.path.insert(0, str(RELEASES))

from counter_v1 import Counter as CounterV1  # noqa: E402

UPDATE = '[[updates]]\ntarget = "counter_v1:Counter"\nnew = "{new}"\n'

# counter v2 as a template: its code_change is a parameter.
COUNTER_V2 = textwrap.dedent(
    """
    from typing import Any
    import otpy

    class Counter(otpy.GenServer[tuple[int, int]]):
        vsn = "2"

        def handle_call(self, request: Any, caller: Any, state: Any) -> Any:
            return otpy.Reply(state, state)

        def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
            return {migrate}
    """)


def write_release(directory: Path, vsn: str, modules: dict[str, str], *,
                  new: str = "counter_v2:Counter", name: str = "r.toml") -> Path:
    """A release file ``name`` in ``directory`` with ``modules`` (file name: source)
    beside it; one update of counter_v1:Counter to ``new``."""
    directory.mkdir(parents=True, exist_ok=True)
    for file, source in modules.items():
        (directory / file).parent.mkdir(parents=True, exist_ok=True)
        (directory / file).write_text(source)
    path = directory / name
    path.write_text(f'vsn = "{vsn}"\ncode = "."\n' + UPDATE.format(new=new))
    return path


def counters(n: int = 1) -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child(f"c{i}", CounterV1) for i in range(n)])


# -- 7. code is identified by its content --------------------------------------------


async def test_a_fixed_module_is_loaded_anew_after_a_refused_upgrade(
        tmp_path: Path) -> None:
    """The issue's trial: a release's code_change returns a state of the wrong type, the
    upgrade is refused, the module is fixed on disk, the same release is loaded again:
    the fixed code runs (before, the first module was served from a cache keyed by the
    vsn and the state was corrupted)."""
    path = write_release(tmp_path, "2", {"counter_v2.py": COUNTER_V2.format(
        migrate="(state, 'not an int')")})
    async with otpy.open_node(counters()) as node:
        await node.call("c0", "incr")
        with pytest.raises(otpy.UpgradeFailed, match="StateTypeError"):
            await node.upgrade(otpy.Release.load(path))
        (tmp_path / "counter_v2.py").write_text(COUNTER_V2.format(migrate="(state, state)"))
        await node.upgrade(otpy.Release.load(path))
        assert (1, 1) == node.get_state("c0")


def test_release_vsns_that_look_alike_share_nothing(tmp_path: Path) -> None:
    """Releases "2.1" and "2_1" with different code each get their own (they shared a
    cache key)."""
    one = write_release(tmp_path / "a", "2.1", {"counter_v2.py": COUNTER_V2.format(
        migrate="(state, 1)")})
    two = write_release(tmp_path / "b", "2_1", {"counter_v2.py": COUNTER_V2.format(
        migrate="(state, 2)")})
    classes = [otpy.Release.load(p).updates[0].new_class for p in (one, two)]
    assert [(0, 1), (0, 2)] == [cls.code_change(None, "1", 0, None) for cls in classes]


def test_a_release_has_the_digest_of_its_content(tmp_path: Path) -> None:
    """``Release.digest`` names the content of the release file and its code directory's
    modules: loading the same files again gives the same digest, a change in any module
    another (and a release made in Python has none)."""
    path = write_release(tmp_path, "2", {"counter_v2.py": COUNTER_V2.format(
        migrate="(state, state)"), "helper.py": "X = 1\n"})
    first = otpy.Release.load(path).digest
    assert first is not None and 64 == len(first)
    assert first == otpy.Release.load(path).digest
    (tmp_path / "helper.py").write_text("X = 2\n")
    assert first != otpy.Release.load(path).digest
    assert None is otpy.Release("2", [otpy.Update(CounterV1, CounterV1)]).digest


async def test_the_same_vsn_with_other_code_is_refused_saying_so(tmp_path: Path) -> None:
    """Installing a vsn that is installed already, with code that differs from the
    installed one, is refused with a message that says the code differs."""
    original = COUNTER_V2.format(migrate="(state, state)")
    path = write_release(tmp_path, "2", {"counter_v2.py": original})
    async with otpy.open_node(counters(2)) as node:
        await node.upgrade(otpy.Release.load(path))
        (tmp_path / "counter_v2.py").write_text(COUNTER_V2.format(migrate="(state, 0)"))
        with pytest.raises(otpy.UpgradeFailed, match="installed with different code"):
            await node.upgrade(otpy.Release.load(path))
        (tmp_path / "counter_v2.py").write_text(original)
        with pytest.raises(otpy.UpgradeFailed) as info:
            await node.upgrade(otpy.Release.load(path))
        assert "already installed" in str(info.value)
        assert "different code" not in str(info.value)


# -- 9. a release's code directory imports as a unit ---------------------------------

WITH_SIBLINGS = textwrap.dedent(
    """
    from typing import Any
    import otpy
    {imports}

    class Counter(otpy.GenServer[tuple[int, int]]):
        vsn = "2"

        def handle_call(self, request: Any, caller: Any, state: Any) -> Any:
            return otpy.Reply(state, state)

        def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
            return (state, {expr})
    """)


@pytest.mark.parametrize(("imports", "expr"), [
    ("import helpers", "helpers.double(state)"),
    ("from helpers import double", "double(state)"),
    ("from . import helpers", "helpers.double(state)"),
    ("from .helpers import double", "double(state)"),
    ("import shared.maths", "shared.maths.double(state)"),
    ("from shared.maths import double", "double(state)"),
])
def test_release_modules_import_their_siblings(tmp_path: Path, imports: str,
                                                expr: str) -> None:
    """A module of the release imports the other modules of its code directory, as it
    would if that directory were the script's: absolute, relative, and a subpackage."""
    path = write_release(tmp_path, "2", {
        "counter_v2.py": WITH_SIBLINGS.format(imports=imports, expr=expr),
        "helpers.py": "def double(n):\n    return 2 * n\n",
        "shared/maths.py": "def double(n):\n    return 2 * n\n",
    })
    cls = otpy.Release.load(path).updates[0].new_class
    assert (5, 10) == cls.code_change(None, "1", 5, None)


def test_sibling_modules_of_two_releases_are_isolated(tmp_path: Path) -> None:
    """Two releases with a sibling of the same name each import their own, and neither
    name reaches sys.modules or sys.path for the rest of the program."""
    classes = []
    for n in (2, 3):
        path = write_release(tmp_path / f"r{n}", str(n), {
            "counter_v2.py": WITH_SIBLINGS.format(imports="from helpers import factor",
                                                  expr="state * factor"),
            "helpers.py": f"factor = {n}\n",
        })
        classes.append(otpy.Release.load(path).updates[0].new_class)
    assert [(1, 2), (1, 3)] == [cls.code_change(None, "1", 1, None) for cls in classes]
    assert "helpers" not in sys.modules
    assert not any(str(tmp_path) in entry for entry in sys.path)


# -- 10. hostile files are refused, not read ------------------------------------------


def load_in_subprocess(path: Path) -> str:
    """``Release.load(path)`` in a child process with 1 GiB of address space and 30 s:
    what it raised (type: message), so that a memory blow-up fails the test instead of
    the suite."""
    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        import otpy
        try:
            otpy.Release.load({str(path)!r})
        except BaseException as exc:
            print(type(exc).__name__ + ": " + str(exc))
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30, check=False)
    return result.stdout + result.stderr


def without_hanging(load: Callable[[], Any], fifo: Path) -> BaseException:
    """What ``load()`` raised, run in a thread; if it still waits after 10 s (blocked
    opening ``fifo``), the FIFO gets a writer, which frees it, and the test fails."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            load()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"loading waited on the FIFO {fifo}")
    [exc] = raised
    return exc


def test_a_release_file_that_is_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO as the release file is refused at once (it hung until a writer came)."""
    os.mkfifo(tmp_path / "r.toml")
    exc = without_hanging(lambda: otpy.Release.load(tmp_path / "r.toml"), tmp_path / "r.toml")
    assert isinstance(exc, otpy.UpgradeFailed) and "not a regular file" in str(exc)


def test_a_release_file_that_is_dev_zero_is_refused(tmp_path: Path) -> None:
    """/dev/zero (here through a symlink) is refused, not read until memory runs out."""
    (tmp_path / "r.toml").symlink_to("/dev/zero")
    out = load_in_subprocess(tmp_path / "r.toml")
    assert "UpgradeFailed" in out and "not a regular file" in out


def test_a_directory_as_the_release_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r.toml").mkdir()
    with pytest.raises(otpy.UpgradeFailed, match="not a regular file"):
        otpy.Release.load(tmp_path / "r.toml")


def test_a_module_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    """A module file of the code directory is read with the same care."""
    path = write_release(tmp_path, "2", {})
    os.mkfifo(tmp_path / "counter_v2.py")
    exc = without_hanging(lambda: otpy.Release.load(path), tmp_path / "counter_v2.py")
    assert isinstance(exc, otpy.UpgradeFailed) and "not a regular file" in str(exc)


def test_an_oversized_release_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('vsn = "2"\n' + "# padding\n" * 200_000)
    with pytest.raises(otpy.UpgradeFailed, match="more than 983040 bytes"):
        otpy.Release.load(path)


def test_an_oversized_module_is_refused(tmp_path: Path) -> None:
    path = write_release(tmp_path, "2", {
        "counter_v2.py": COUNTER_V2.format(migrate="(state, state)") + "#" * (1 << 20)})
    with pytest.raises(otpy.UpgradeFailed, match="larger than 262144 bytes"):
        otpy.Release.load(path)


def test_modules_that_together_exceed_the_release_bound_are_refused(
        tmp_path: Path) -> None:
    path = write_release(tmp_path, "2", {f"m{i}.py": "#" * 250_000 for i in range(4)})
    with pytest.raises(otpy.UpgradeFailed, match="more than 983040 bytes"):
        otpy.Release.load(path)


def test_a_code_directory_of_too_many_modules_is_refused(tmp_path: Path) -> None:
    """A code directory with more modules than a release may hold (a project's root,
    say) is refused, saying to give the release a directory of its own."""
    path = write_release(tmp_path, "2", {f"m{i}.py": "" for i in range(300)} | {
        "counter_v2.py": COUNTER_V2.format(migrate="(state, state)")})
    with pytest.raises(otpy.UpgradeFailed, match="code directory that holds only"):
        otpy.Release.load(path)


# -- loading off the loop ------------------------------------------------------------


def test_a_traceback_through_release_code_shows_its_source(tmp_path: Path) -> None:
    """Release modules are imported from memory, yet a traceback through them shows
    their source lines (their loader gives the source) and their file in the release."""
    import traceback

    path = write_release(tmp_path, "2", {"counter_v2.py": COUNTER_V2.format(
        migrate="state['no such key']")})
    cls = otpy.Release.load(path).updates[0].new_class
    with pytest.raises(TypeError) as info:
        cls.code_change(None, "1", 0, None)
    shown = "".join(traceback.format_exception(info.value))
    assert "counter_v2.py" in shown and "return state['no such key']" in shown


def test_modules_loaded_for_the_node_are_compiled_in_a_child_process(
        tmp_path: Path) -> None:
    """Off the loop, the modules are compiled by a child process (compile holds the GIL
    for its whole length, which would stall the loop even from a worker thread); a
    module that does not compile is left to fail where it is imported."""
    from otpy import _release_files
    from otpy._protocol.release_bundle import make_bundle

    bundle = make_bundle("r.toml", b'vsn = "2"\n', [("good.py", b"x = 1\n"),
                                                    ("bad.py", b"def (\n")])
    package = _release_files._Package(bundle)
    _release_files._precompile(package, 30.0)
    assert ["good.py"] == sorted(package.codes)
    path = write_release(tmp_path, "2", {"counter_v2.py": COUNTER_V2.format(
        migrate="(state, state)")})
    release = _release_files.ReleaseSource(None, str(path)).load()
    assert (3, 3) == release.updates[0].new_class.code_change(None, "1", 3, None)

"""The shape of the package: one public surface, documented, and a core free of trio."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import otpy
import otpy.testing

PACKAGE_DIR = Path(otpy.__file__).parent

# The plain-Python core and the sans-io codecs (STYLE.md): they must run, and be driven
# by tests, without trio and without I/O. Every module of those folders is checked.
SANS_IO_DIRS = ["_core", "_protocol"]
CORE_MODULES = ["_exceptions", *sorted(
    f"{d}.{p.stem}" if p.stem != "__init__" else d
    for d in SANS_IO_DIRS for p in (PACKAGE_DIR / d).glob("*.py"))]
# Modules that would mean I/O, threads or an event loop, none of which the core may use.
IO_MODULES = {"trio", "anyio", "asyncio", "socket", "ssl", "select", "selectors",
              "threading", "subprocess", "sqlite3", "signal", "http", "urllib", "os",
              "pathlib", "io", "tomllib", "importlib"}
# otpy.testing drives that core with no loop at all, so it must not need trio either;
# nor hypothesis, which only check_code_change imports (a test dependency).
TESTING_MODULES = ["testing", "testing._ops", "testing._simulation", "testing._migration",
                   "testing._store"]


def test_all_is_sorted() -> None:
    """``otpy.__all__`` is kept sorted."""
    assert sorted(otpy.__all__) == otpy.__all__


def test_all_has_no_duplicates() -> None:
    """Each public name is listed once in ``otpy.__all__``."""
    assert len(set(otpy.__all__)) == len(otpy.__all__)


def test_all_names_exist() -> None:
    """Every name in ``otpy.__all__`` is importable from ``otpy``."""
    assert [] == [name for name in otpy.__all__ if not hasattr(otpy, name)]


def test_all_is_complete() -> None:
    """Every public attribute of ``otpy`` (other than submodules) is in ``__all__``."""
    public = {
        name
        for name, value in vars(otpy).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert [] == sorted(public - set(otpy.__all__))


@pytest.mark.parametrize("name", otpy.__all__)
def test_public_name_has_a_docstring(name: str) -> None:
    """Every public name carries its own docstring."""
    doc = getattr(otpy, name).__doc__
    assert isinstance(doc, str)
    assert doc.strip() != ""


def test_testing_all_is_sorted_complete_and_documented() -> None:
    """``otpy.testing`` keeps the same standard: ``__all__`` sorted and complete, and
    every public name and the module itself documented, the module with an example."""
    public = {name for name, value in vars(otpy.testing).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert sorted(otpy.testing.__all__) == otpy.testing.__all__
    assert sorted(public) == otpy.testing.__all__
    undocumented = [name for name in otpy.testing.__all__
                    if not (getattr(otpy.testing, name).__doc__ or "").strip()]
    assert [] == undocumented
    assert "Simulation(" in (otpy.testing.__doc__ or "")


def test_package_has_a_docstring() -> None:
    """The package itself says what it is."""
    assert otpy.__doc__ is not None
    assert "otpy" in otpy.__doc__


def test_package_ships_py_typed() -> None:
    """``py.typed`` marks the package as typed for its users' type checkers."""
    assert (PACKAGE_DIR / "py.typed").is_file()


def test_core_modules_never_import_trio() -> None:
    """The core modules and otpy.testing import without trio (checked in a fresh
    interpreter, loading them without ``otpy/__init__.py``, which pulls in the trio
    edge), and otpy.testing without hypothesis."""
    assert {"_core.server", "_core.scheduler", "_core.supervisor"} <= set(CORE_MODULES)
    present = CORE_MODULES + TESTING_MODULES
    script = textwrap.dedent(
        f"""
        import importlib, sys, types
        package = types.ModuleType("otpy")
        package.__path__ = [{str(PACKAGE_DIR)!r}]
        sys.modules["otpy"] = package
        for module in {present!r}:
            importlib.import_module("otpy." + module)
        print(sorted(m for m in sys.modules
                     if m.partition(".")[0] in ("trio", "hypothesis")))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert "" == result.stderr
    assert "[]" == result.stdout.strip()


@pytest.mark.parametrize("folder", SANS_IO_DIRS)
def test_sans_io_folders_import_no_io(folder: str) -> None:
    """No module of ``_core`` or ``_protocol`` imports trio, sockets, threads, files
    databases or signals (read from their import statements, so an import inside a
    function counts too)."""
    found = []
    for path in sorted((PACKAGE_DIR / folder).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and
                     not node.level else [])
            found += [f"{path.name}: {n}" for n in names if n.partition(".")[0] in IO_MODULES]
    assert [] == found


def test_pyproject_license_is_an_spdx_expression() -> None:
    """The license is a PEP 639 SPDX string with a setuptools that reads it, so that
    ``pip install`` prints no deprecation of the old ``{ text = ... }`` table."""
    import tomllib

    data = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())
    assert "Apache-2.0" == data["project"]["license"]
    assert ["setuptools>=77"] == data["build-system"]["requires"]


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (relative imports as written, e.g. ``._serve``)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_the_cookie_is_read_without_trio_or_the_endpoints() -> None:
    """``_cookie`` is plain file I/O, and the ``otpy`` command reads the cookie through
    it rather than through the node's endpoint module."""
    assert [] == [n for n in _imports(PACKAGE_DIR / "_cookie.py")
                  if n.partition(".")[0] == "trio" or "_serve" in n]
    assert [] == [n for n in _imports(PACKAGE_DIR / "_cli.py") if "_serve" in n]

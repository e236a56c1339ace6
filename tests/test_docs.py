"""Every example in README.md and docs/ runs, and so does every program in examples/.

The ``python`` blocks of one Markdown file are joined, in order, into one program, so
that a block can use what an earlier block defined; the program runs in a fresh
interpreter. Lines outside the blocks become blank lines, so a traceback's line
numbers are the Markdown file's own. A ``text`` block right after an
``<!-- expected output -->`` comment must appear in the program's output: its lines in
order, each whole (other lines, such as log events, may come between; a log line's
timestamp matches any time). The README's shows the whole output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
OUTPUT_MARK = "<!-- expected output -->"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[^`\s]*)")
# Languages that would be Python under another name: an example in one of them would
# escape this test, so each must be spelled ``python``.
PYTHON_ALIASES = {"py", "python3", "pycon", "py3", "ipython"}
# A log line's leading timestamp: shown output matches whatever time the run printed.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


@dataclass
class Block:
    lang: str
    start: int  # 0-based index of the first line inside the fence
    lines: list[str]
    expected_output: bool


def parse_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    previous = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, lang = len(match["indent"]), match["lang"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            body.append(lines[j][indent:])
            j += 1
        if j == len(lines):
            raise AssertionError(f"unclosed ``` fence opened on line {i + 1}")
        blocks.append(Block(lang, i + 1, body, previous == OUTPUT_MARK))
        previous = ""
        i = j + 1
    return blocks


def program_of(path: Path) -> tuple[str, list[list[str]]]:
    """The file's Python blocks as one program, and its expected outputs."""
    text = path.read_text()
    lines = [""] * len(text.splitlines())
    expected: list[list[str]] = []
    for block in parse_blocks(text):
        where = f"{path.name}, line {block.start}"
        assert block.lang, f"{where}: give the ``` fence a language (python, text, sh...)"
        assert block.lang not in PYTHON_ALIASES, (
            f"{where}: write ```python, not ```{block.lang}, so that the example is run")
        if block.lang == "python":
            lines[block.start : block.start + len(block.lines)] = block.lines
        elif block.expected_output:
            expected.append([line.rstrip() for line in block.lines])
    return "\n".join(lines) + "\n", expected


def find_in_order(output: str, wanted: list[str], where: str) -> None:
    """Each wanted line must be a whole line of ``output``, in order (a log line's
    timestamp matching any time)."""
    got = [TIMESTAMP.sub("<time> ", line.rstrip()) for line in output.splitlines()]
    position = 0
    for line in (TIMESTAMP.sub("<time> ", line) for line in wanted):
        try:
            position = got.index(line, position) + 1
        except ValueError:
            raise AssertionError(
                f"{where}: expected the line {line!r} (after line {position} of the "
                f"output), but it is not there. The output was:\n{output}"
            ) from None


def run_python(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a speed check
    )


def test_the_docs_exist() -> None:
    """README.md, the tutorial and the design page are all picked up by this test."""
    names = {path.relative_to(ROOT).as_posix() for path in DOCS}
    assert {"README.md", "docs/tutorial.md", "docs/design.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_markdown_examples_run(path: Path, tmp_path: Path) -> None:
    """Every python block of the file runs, and its shown output is what it prints."""
    source, expected = program_of(path)
    if not source.strip():
        assert not expected, f"{path.name} shows expected output but has no python block"
        return
    script = tmp_path / f"{path.stem}_md.py"
    script.write_text(source)
    result = run_python([str(script)], tmp_path)
    assert result.returncode == 0, (
        f"the python blocks of {path.name} failed (line numbers are the file's):\n"
        f"{result.stdout}\n{result.stderr}"
    )
    for block in expected:
        find_in_order(result.stdout, block, path.name)


def test_readme_and_tutorial_have_examples() -> None:
    """The two pages a newcomer reads first show runnable code with its output."""
    for path in (ROOT / "README.md", ROOT / "docs" / "tutorial.md"):
        blocks = parse_blocks(path.read_text())
        assert any(b.lang == "python" for b in blocks), f"{path.name} has no python block"
        assert any(b.expected_output for b in blocks), f"{path.name} shows no output"


def test_parse_blocks_keeps_line_numbers_and_output_marks() -> None:
    """The parser maps blocks to their Markdown lines and sees the output mark."""
    text = "# t\n\n```python\nx = 1\n```\n\n<!-- expected output -->\n```text\n1\n```\n"
    blocks = parse_blocks(text)
    assert [(b.lang, b.start, b.lines, b.expected_output) for b in blocks] == [
        ("python", 3, ["x = 1"], False),
        ("text", 8, ["1"], True),
    ]


# Lines each example must print, in order (whole lines, trailing spaces ignored).
EXAMPLE_LINES: dict[str, list[str]] = {
    "counter.py": ["count: 42"],
    "kv_store.py": [
        "Calling kv2: ('store', 'x', 1)",
        "   -> 1",
        "Calling kv2: ('lookup', 'crash')",
        "    KV store terminating: kv3 ('shutdown')",
        "    KV store starting: kv2",
        "    KV store starting: kv3",
        "   -> kv2 threw: integer division or modulo by zero",
        "Calling kv2: ('lookup', 'x')",
        "   -> None",
    ],
    "many_cores.py": [  # as many nodes as the machine has cores: lines that do not vary
        "All 64 counters are registered in the cluster; every node sees them.",
        "Every call incremented one counter, once.",
    ],
    "demo.py": [
        "== Calls and casts: each one steps its server inline on the loop",
        "Calling counter: 'count'",
        "   -> 42",
        "Calling kv2: ('lookup', 'crash')",
        "    KV store terminating: kv3 ('shutdown')",
        "    KV store starting: kv2",
        "    KV store starting: kv3",
        "   -> kv2 threw: ZeroDivisionError: integer division or modulo by zero",
        "Calling kv2: ('lookup', 'x')",
        "   -> None",
        "Calling kv1: ('lookup', 'a')",
        "   -> 1",
        "Calling counter: 'count'",
        "   -> 42",
        "== Messages queued behind a crash are served by the restarted server",
        "   ('store', 'y', 2)        -> 'ok'",
        "   ('lookup', 'crash')      -> ServerCrashed (ZeroDivisionError)",
        "   ('store', 'z', 3)        -> 'ok'",
        "   ('lookup', 'z')          -> 3",
        "   ('lookup', 'y')          -> None",
        "      kv2 (running, vsn 1, restarted 2x)",
        "    KV store terminating: kv1 ('shutdown')",
        "== Over the network: a node in another process, upgraded by the otpy command",
        "its cookie is a new file of mode 600 in a temporary directory.",
        "   release 2 installed: 500 servers (c0, c1, c2, c3, c4 and 495 more)",
        "   => no call failed, no increment was lost",
        "The node shut down when its stdin closed (exit code 0).",
        "== A cluster: two nodes in two processes, one namespace",
        "Calling ledger: ('add', 37)",
        "   -> 42",
        "Node a's view: members {'a': 'up', 'b': 'up'}, names {'ledger': 'b'}",
        "   a call to ledger now: ServerStopped, reason 'noconnection'",
        "Done.",
    ],
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: Path, tmp_path: Path) -> None:
    """The example exits 0 and prints its key lines in order."""
    result = run_python([str(path)], tmp_path)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
    find_in_order(result.stdout, EXAMPLE_LINES.get(path.name, []), path.name)


def test_demo_crash_is_one_log_line() -> None:
    """The demo renders each crash as one short line, not a traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True, text=True, timeout=120,
    )
    crashes = [line for line in result.stdout.splitlines() if "[server_crashed]" in line]
    assert len(crashes) == 2, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert all("server=kv2" in line and "ZeroDivisionError" in line for line in crashes)


def test_readme_shows_everything_its_example_prints(tmp_path: Path) -> None:
    """The README's first example shows its whole output, otpy's debug events (which
    structlog's defaults print) included: a newcomer who runs it sees what the page
    shows (a log line's timestamp may be any time)."""
    source, expected = program_of(ROOT / "README.md")
    script = tmp_path / "readme.py"
    script.write_text(source)
    result = run_python([str(script)], tmp_path)
    assert 0 == result.returncode, result.stderr
    shown = [TIMESTAMP.sub("<time> ", line) for block in expected for line in block]
    printed = [TIMESTAMP.sub("<time> ", line.rstrip()) for line in result.stdout.splitlines()]
    assert shown == printed


def test_docs_await_every_async_method_of_the_node() -> None:
    """A coroutine method of the node (``upgrade``, ``downgrade``, ``call``...) is never
    shown without its ``await``, in prose or in code."""
    import inspect

    import otpy

    names = sorted(n for n, v in vars(otpy.Node).items()
                   if inspect.iscoroutinefunction(v) and not n.startswith("_"))
    pattern = re.compile(rf"\bnode\.({'|'.join(names)})\(")
    missing = []
    for path in DOCS:
        text = path.read_text()
        for match in pattern.finditer(text):
            if not text[:match.start()].rstrip(" `(\n").endswith("await"):
                line = text.count("\n", 0, match.start()) + 1
                missing.append(f"{path.name}:{line}: {match.group(0)}")
    assert [] == missing

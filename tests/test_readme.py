"""README.md and docs/ run as written: each page's bash and python blocks, in order, in a fresh folder, at smoke
size.

Marks are HTML comments on the lines just before a block, so nobody reading the rendered README sees them:

    <!-- readme: skip -->               not run here (a full GPU recipe, a server)
    <!-- readme: smoke OLD => NEW -->   run with every OLD replaced by NEW (OLD must occur in the block)
    <!-- readme: timeout SECONDS -->    this block's time limit (default 300 s: it catches a hang, not slowness)

The fresh folder is a copy of the repository (30 MB, without the outputs of earlier runs), so what a block writes
(data/, runs/, models/mine, grid.png) never lands in the repository, and its `.venv` links to the running
Python's environment. Bash blocks run with `set -euo pipefail` and that environment's bin/ first on PATH, as after
`source .venv/bin/activate`; each python block runs in its own interpreter.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 300
# What a fresh clone lacks: outputs of earlier runs, caches and the environment (linked separately).
NOT_COPIED = {".git", ".venv", "data", "runs", "outputs", "cache", "build", "dist"}
MARK = re.compile(r"<!--\s*readme:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    document: str  # the Markdown file, e.g. "README.md"
    language: str  # "bash" or "python"
    line: int  # line of the opening fence in it
    code: str  # as the README shows it
    skip: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    substitutions: list[tuple[str, str]] = field(default_factory=list)

    def smoke_code(self) -> str:
        """The code with the smoke substitutions made; a substitution whose OLD is not in the block is an error,
        so that a mark cannot silently stop applying when the command changes."""
        code = self.code
        for old, new in self.substitutions:
            if old not in code:
                raise ValueError(f"{self.where}: smoke mark {old!r} does not occur in its block")
            code = code.replace(old, new)
        return code

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def parse_blocks(markdown: str, document: str = "README.md") -> list[Block]:
    """The bash and python blocks of a Markdown text, in order, with the marks just above each."""
    blocks, marks, lines = [], [], markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{document}:{i + 1}: code block never closed")
            if fence.group(1) in ("bash", "python"):
                block = Block(document, fence.group(1), i + 1, "\n".join(lines[i + 1 : end]) + "\n")
                for mark in marks:
                    apply_mark(block, mark)
                blocks.append(block)
            elif marks:
                raise ValueError(f"{document}:{i + 1}: readme marks above a block that is not bash or python")
            marks, i = [], end + 1
            continue
        mark = MARK.search(line)
        if mark:
            marks.append(mark.group(1))
        elif line.strip():
            marks = []  # a mark belongs to the block right below it, blank lines aside
        i += 1
    return blocks


def apply_mark(block: Block, mark: str) -> None:
    kind, _, rest = mark.partition(" ")
    if kind == "skip" and not rest:
        block.skip = True
    elif kind == "timeout" and rest.isdigit():
        block.timeout_s = float(rest)
    elif kind == "smoke" and " => " in rest:
        old, new = rest.split(" => ", 1)
        block.substitutions.append((old, new))
    else:
        raise ValueError(f"{block.where}: unknown readme mark {mark!r}")


def copy_checkout(repo: Path, folder: Path) -> None:
    """Copy the repository's files into `folder`, as a fresh clone holds them."""
    for source in repo.iterdir():
        if source.name in NOT_COPIED or source.name.startswith((".pytest", ".ruff")):
            continue
        if source.is_dir():
            shutil.copytree(source, folder / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, folder / source.name)
    (folder / ".venv").symlink_to(Path(sys.prefix))


def block_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(folder)
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    return env


def run_block(block: Block, folder: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run one block and return its wall-clock and CPU seconds; a failure or a time-out fails the test, naming
    the block's line and its last output."""
    code = block.smoke_code()
    command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
    start, cpu = time.monotonic(), _children_cpu_s()
    # In its own process group, so that a time-out stops what the block started too (accelerate's workers).
    process = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=block.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        timed_out = True
    if timed_out:
        pytest.fail(
            f"{block.where}: the {block.language} block did not finish in {block.timeout_s:.0f} s "
            f"(raise it with <!-- readme: timeout N --> or shrink it with a smoke mark)\n{code}\n{_tail(output)}",
            pytrace=False,
        )
    if process.returncode != 0:
        pytest.fail(
            f"{block.where}: the {block.language} block failed (exit status {process.returncode})\n"
            f"{code}\n{_tail(output)}",
            pytrace=False,
        )
    return time.monotonic() - start, _children_cpu_s() - cpu


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(output: bytes, lines: int = 30) -> str:
    text = output.decode(errors="replace").replace("\r", "\n")  # progress bars redraw with \r
    return "--- last output ---\n" + "\n".join(text.splitlines()[-lines:])


def test_marks_are_parsed_and_checked():
    text = (
        "<!-- readme: smoke 8000 => 2 -->\n<!-- readme: timeout 30 -->\n```bash\nrun --steps 8000\n```\n"
        "Prose.\n\n<!-- readme: skip -->\n\n```python\nprint(1)\n```\n```text\nnot code\n```\n"
        "<!-- readme: skip -->\nProse between a mark and its block drops the mark.\n```bash\necho\n```\n"
    )
    first, second, third = parse_blocks(text, "docs/page.md")
    assert (first.where, first.language, first.timeout_s, first.skip) == ("docs/page.md:3", "bash", 30.0, False)
    assert first.smoke_code() == "run --steps 2\n"
    assert second.skip and second.language == "python" and not third.skip
    stale = parse_blocks("<!-- readme: smoke --steps 9 => --steps 1 -->\n```bash\nrun --steps 8\n```\n")[0]
    with pytest.raises(ValueError, match="does not occur"):
        stale.smoke_code()
    with pytest.raises(ValueError, match="unknown readme mark"):
        parse_blocks("<!-- readme: skipp -->\n```bash\necho\n```\n")


def test_a_failing_or_hanging_block_fails_naming_its_line(tmp_path):
    env = block_env(tmp_path)
    failing, hanging, python = parse_blocks(
        "\n```bash\necho start\nfalse\necho never\n```\n"
        "<!-- readme: timeout 1 -->\n```bash\nsleep 30 &\nwait\n```\n"
        "```python\nraise SystemExit('wrong flag')\n```\n"
    )
    with pytest.raises(pytest.fail.Exception, match=r"README.md:2: the bash block failed \(exit status 1\)"):
        run_block(failing, tmp_path, env)
    with pytest.raises(pytest.fail.Exception, match=r"README.md:8: the bash block did not finish in 1 s"):
        run_block(hanging, tmp_path, env)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)README.md:12: the python block failed.*wrong flag"):
        run_block(python, tmp_path, env)


DOCUMENTS = ["README.md", *sorted(f"docs/{page.name}" for page in (REPO / "docs").glob("*.md"))]


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_page_runs_top_to_bottom(document, tmp_path):
    blocks = parse_blocks((REPO / document).read_text(), document)
    if document == "README.md":
        assert sum(not block.skip for block in blocks) >= 10, "the README harness found too few blocks to run"
    folder = tmp_path / "clone"
    folder.mkdir()
    copy_checkout(REPO, folder)
    env = block_env(folder)
    for block in blocks:
        if not block.skip:
            wall_s, cpu_s = run_block(block, folder, env)
            print(f"{block.where}: the {block.language} block took {wall_s:.1f} s ({cpu_s:.1f} s of CPU)")

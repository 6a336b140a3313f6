"""The code blocks of the README and the documentation pages: find, run, check, rewrite.

    python tests/docs_blocks.py            # run every page's Python blocks; exit 1 if an
                                           # output block is stale
    python tests/docs_blocks.py --write    # rewrite the stale output blocks (make docs-outputs)
    python tests/docs_blocks.py --write --recorded   # also rerun the recorded example runs
                                                     # (minutes; make docs-outputs RECORDED=1)

Conventions (CONTRIBUTING.md, "The documentation"):

* every ```` ```python ```` block runs, the blocks of one page in order in one namespace;
* a Python block whose title names a test file (```` ```python title="4 processes:
  tests/test_megatron_schedule.py" ````), or whose first line is a comment naming one
  (``# needs torchrun: tests/test_megatron_schedule.py``), needs several processes, a GPU
  or a download: it is not run here, and that test (which must exist) runs the same thing;
* a Python block written as a console session (``>>>`` prompts) runs as a doctest: the
  outputs written in it are checked (``...`` matches anything);
* a ```` ```text ```` block right after a Python block (blank lines between at most) is
  that block's printed output, compared exactly (trailing spaces and libraries' log
  records aside: :data:`LOG_RECORD`);
* a ```` ```console ```` block whose first line is ``$ <command>`` is a recorded run of an
  example (timings and all): ``--write --recorded`` runs the command again and replaces
  the block with its output, and ends the block with a ``# recorded:`` line naming the
  machine, the load average, the wall time, the commit and the date; the test checks
  that the script it names exists. A block that shows ``...`` in place of some lines keeps
  doing so: the rerun keeps the output lines whose first two words are those of a line
  the block shows (``step  10``, ``teacher:``) and puts ``...`` where it drops some.

``tests/test_docs.py`` runs this in ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import doctest
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
TITLE = re.compile(r"""title=(["'])(?P<title>.*?)\1""")
OWNER = re.compile(r"(?P<file>tests/[\w/.-]+\.py)(?:::(?P<test>\w+))?")


@dataclass
class Block:
    """One fenced code block: ``lines[start:end]`` of its page are its content."""

    path: Path
    lang: str
    title: str
    indent: str
    fence_line: int  # 0-based index of the opening fence
    start: int
    end: int
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.fence_line + 1}"

    @property
    def owner(self) -> tuple[str, str | None] | None:
        """``(test file, test name or None)`` named by the title (or by a comment on the
        block's first line), or None."""
        first = self.code.split("\n", 1)[0]
        m = OWNER.search(self.title) or (OWNER.search(first) if first.startswith("#") else None)
        return (m["file"], m["test"]) if m else None


def pages() -> list[Path]:
    """The README, CONTRIBUTING.md and every Markdown page under ``docs/``."""
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    return found + sorted((ROOT / "docs").rglob("*.md"))


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order (nested fences respected)."""
    lines = path.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        j = i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if (close and not close["info"].strip() and close["fence"][0] == fence[0]
                    and len(close["fence"]) >= len(fence)):
                break
            j += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:j]]
        t = TITLE.search(info)
        found.append(Block(path, info.split()[0].lstrip(".") if info else "",
                           t["title"] if t else "", indent, i, i + 1, j,
                           "\n".join(body) + "\n"))
        i = j + 1
    return found


def pairs(path: Path) -> list[tuple[Block, Block | None]]:
    """Each Python block of a page with its output block (or None)."""
    found = blocks(path)
    lines = path.read_text().split("\n")
    out = []
    for k, b in enumerate(found):
        if b.lang != "python":
            continue
        nxt = found[k + 1] if k + 1 < len(found) else None
        gap = lines[b.end + 1:nxt.fence_line] if nxt else ["x"]
        adjacent = nxt is not None and nxt.lang == "text" and not any(x.strip() for x in gap)
        out.append((b, nxt if adjacent else None))
    return out


def run_page(path: Path) -> list[tuple[Block, Block | None, str]]:
    """Run a page's runnable Python blocks in order, in one namespace; for each, the block,
    its output block and what it printed. An exception names the block's line."""
    namespace: dict = {"__name__": "__docs__"}
    results = []
    for block, output in pairs(path):
        if block.owner:
            continue
        if block.code.lstrip().startswith(">>>"):
            run_doctest(block, namespace)
            results.append((block, output, ""))
            continue
        stdout = io.StringIO()
        code = compile(block.code, block.where, "exec")
        try:
            with contextlib.redirect_stdout(stdout):
                exec(code, namespace)
        except Exception as e:
            raise RuntimeError(
                f"{block.where}: the block raised {type(e).__name__}: {e}. If it needs several "
                "processes, a GPU or a download, name the test that runs the same thing in its "
                'title (```python title="torchrun: tests/test_x.py") or first-line comment'
            ) from e
        results.append((block, output, stdout.getvalue()))
    return results


def run_doctest(block: Block, namespace: dict) -> None:
    """Run a ``>>>`` block in the page's namespace; RuntimeError with doctest's report if
    an output differs."""
    test = doctest.DocTestParser().get_doctest(block.code, namespace, block.where,
                                               block.where, block.start)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    runner.run(test, out=report.write, clear_globs=False)
    if runner.failures:
        raise RuntimeError(f"{block.where}: the session's outputs differ:\n{report.getvalue()}")


# A log record a library writes to stdout (DeepSpeed, imported by accelerate and TRL):
# ``[2026-12-07 18:21:37,589] [WARNING] [real_accelerator.py:213:get_accelerator] ...``.
# Whether it lands in a block's output depends on what the process imported before.
LOG_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+\] \[[A-Z]+\] ")


def normalise(text: str) -> str:
    """Text as compared: trailing spaces, trailing blank lines and libraries' log records
    (:data:`LOG_RECORD`) dropped."""
    lines = [line.rstrip() for line in text.rstrip().split("\n") if not LOG_RECORD.match(line)]
    return "\n".join(lines)


def stale(results) -> list[str]:
    """A message per output block that differs from what its code printed (or a printing
    block without one)."""
    problems = []
    for block, output, printed in results:
        if output is None:
            if printed.strip():
                problems.append(f"{block.where}: prints but has no ```text block after it")
            continue
        if normalise(output.code) != normalise(printed):
            problems.append(f"{output.where}: stale output; the code prints:\n{printed}"
                            f"the page shows:\n{output.code}")
    return problems


def rewrite(path: Path, results) -> bool:
    """Replace the page's stale output blocks with what the code printed."""
    lines = path.read_text().split("\n")
    changed = False
    for _block, output, printed in sorted(
            (r for r in results if r[1] is not None), key=lambda r: -r[1].start):
        if normalise(output.code) == normalise(printed):
            continue
        new = [output.indent + line if line else line
               for line in normalise(printed).split("\n")]
        lines[output.start:output.end] = new
        changed = True
    if changed:
        path.write_text("\n".join(lines))
    return changed


def recorded(path: Path) -> list[Block]:
    """The page's recorded runs: ```console blocks starting with ``$ <command>``."""
    return [b for b in blocks(path) if b.lang == "console" and b.code.startswith("$ ")]


def command(block: Block) -> str:
    """The command of a recorded run (its first line, without ``$ ``)."""
    return block.code.split("\n", 1)[0][2:].strip()


RECORDED = "# recorded: "  # the last line of a recorded run: machine, load, commit


def rerun(path: Path, block: Block) -> None:
    """Run a recorded run's command again (from the repository root, this interpreter's
    environment first on PATH) and put its output in the block, elided as the block was,
    with a ``# recorded:`` line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    load, start = os.getloadavg()[0], time.monotonic()
    out = subprocess.run(command(block), shell=True, cwd=ROOT, env=env, check=True,
                         stdout=subprocess.PIPE, text=True, timeout=1800).stdout
    wall = time.monotonic() - start
    lines = path.read_text().split("\n")
    shown = block.code.rstrip("\n").split("\n")[1:]
    new = [f"$ {command(block)}", *elide(normalise(out).lstrip("\n").split("\n"), shown),
           RECORDED + provenance(load, os.getloadavg()[0], wall)]
    lines[block.start:block.end] = [block.indent + x if x else x for x in new]
    path.write_text("\n".join(lines))
    print(f"reran {block.where}: {command(block)}")


def _key(line: str) -> tuple[str, ...]:
    return tuple(line.split()[:2])


def elide(output: list[str], shown: list[str]) -> list[str]:
    """``output`` as a block that showed ``shown`` shows it: all of it if ``shown`` has no
    ``...`` line; otherwise the lines whose first two words are those of a shown line,
    with ``...`` for each run of dropped lines."""
    shown = [x for x in shown if not x.startswith(RECORDED)]
    if "..." not in (x.strip() for x in shown):
        return output
    keep = {_key(x) for x in shown if x.strip() != "..."}
    out: list[str] = []
    for line in output:
        if _key(line) in keep:
            out.append(line)
        elif not out or out[-1] != "...":
            out.append("...")
    return out


def provenance(load_start: float, load_end: float, wall: float) -> str:
    """Where and when a recorded run ran: CPU, cores, load average (1 min) at its start
    and end, wall time, torch, commit (``+``: with uncommitted changes to the code a run
    runs, ``eaopd_mp/`` or ``examples/``) and date."""
    import platform

    import torch

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "eaopd_mp", "examples"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", ""
    return (f"{cpu}, {os.cpu_count()} cores, load average {load_start:.1f} at the start and "
            f"{load_end:.1f} at the end, wall {wall:.0f} s; torch {torch.__version__}, "
            f"commit {commit}{'+' if dirty else ''}, {datetime.date.today().isoformat()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite stale output blocks")
    p.add_argument("--recorded", action="store_true",
                   help="with --write: also rerun the recorded example runs (slow)")
    p.add_argument("pages", nargs="*", type=Path, help="default: every page")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    status = 0
    for path in [q.resolve() for q in args.pages] or pages():
        if args.write and args.recorded:
            for block in reversed(recorded(path)):  # bottom up: earlier lines stay put
                rerun(path, block)
        if not any(not b.owner for b, _ in pairs(path)):
            continue
        results = run_page(path)
        if args.write:
            if rewrite(path, results):
                print(f"rewrote {path.relative_to(ROOT)}")
        else:
            for problem in stale(results):
                print(problem)
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

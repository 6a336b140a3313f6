"""The documentation: its examples run, its outputs are current, its links resolve, and
every public function has a docstring (the API reference is generated from them).

The code blocks are found and run by ``tests/docs_blocks.py`` (its docstring has the
conventions); ``make docs-outputs`` rewrites a stale output block.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_blocks  # noqa: E402

ROOT = docs_blocks.ROOT
RUNNABLE = [p for p in docs_blocks.pages()
            if any(not b.owner for b, _ in docs_blocks.pairs(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run_and_print_what_the_page_shows(page):
    results = docs_blocks.run_page(page)
    problems = docs_blocks.stale(results)
    assert not problems, "\n\n".join(problems) + "\n\n(make docs-outputs rewrites them)"


def test_blocks_not_run_here_name_an_existing_test():
    owned = [b for p in docs_blocks.pages() for b, _ in docs_blocks.pairs(p) if b.owner]
    assert owned, "expected the multi-process blocks (Megatron) to be marked"
    for block in owned:
        path, name = block.owner
        assert (ROOT / path).is_file(), f"{block.where}: {path} does not exist"
        if name:
            assert re.search(rf"^def {name}\b", (ROOT / path).read_text(), re.M), \
                f"{block.where}: no test {name} in {path}"


def test_recorded_runs_name_scripts_that_exist_and_where_they_ran():
    runs = [b for p in docs_blocks.pages() for b in docs_blocks.recorded(p)]
    assert runs, "expected the examples' recorded runs"
    for block in runs:
        scripts = [w for w in docs_blocks.command(block).split() if w.endswith(".py")]
        modules = re.findall(r"-m (\S+)", docs_blocks.command(block))
        assert scripts or modules, f"{block.where}: no script in {docs_blocks.command(block)}"
        for script in scripts:
            assert (ROOT / script).is_file(), f"{block.where}: {script} does not exist"
        last = block.code.rstrip("\n").split("\n")[-1]
        assert last.startswith(docs_blocks.RECORDED), \
            f"{block.where}: a recorded run ends with where it ran (make docs-outputs RECORDED=1)"


def test_every_python_block_is_run_or_owned():
    """A Python block is either run here or names the test that runs it: nothing else."""
    for page in docs_blocks.pages():
        for block in docs_blocks.blocks(page):
            if block.lang in ("py", "python3", "pycon"):
                pytest.fail(f"{block.where}: write ```python so that the block runs")


def test_extractor_pairs_outputs_and_detects_a_stale_one(tmp_path, monkeypatch):
    """The checker can fail: a wrong output, and a printing block without one."""
    monkeypatch.setattr(docs_blocks, "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 2\nprint(x + 1)\n```\n\n```text\n4\n```\n\n"
                    "```python title=\"2 processes: tests/test_x.py\"\nraise SystemExit\n```\n\n"
                    "```python\n# torchrun: tests/test_x.py::test_y\nraise SystemExit\n```\n\n"
                    "```python\nprint('no output block')\n```\n")
    problems = docs_blocks.stale(docs_blocks.run_page(page))
    assert len(problems) == 2
    assert "stale output" in problems[0] and "3" in problems[0]
    assert "no ```text block" in problems[1]
    docs_blocks.rewrite(page, docs_blocks.run_page(page))
    assert "```text\n3\n```" in page.read_text()
    page.write_text("```python\nprint('[2026-12-07 18:21:37,589] [WARNING] [x.py:1:f] log')\n"
                    "print(1)\n```\n\n```text\n1\n```\n")
    assert docs_blocks.stale(docs_blocks.run_page(page)) == []  # a library's log record
    page.write_text("```python\n>>> 1 + 1\n2\n```\n")
    docs_blocks.run_page(page)
    page.write_text("```python\n>>> 1 + 1\n3\n```\n")
    with pytest.raises(RuntimeError, match="outputs differ"):
        docs_blocks.run_page(page)
    page.write_text("```python\nraise ValueError('boom')\n```\n")
    with pytest.raises(RuntimeError, match=r"page.md:1: the block raised ValueError: boom"):
        docs_blocks.run_page(page)


def test_a_recorded_run_keeps_its_elision_and_names_its_machine(tmp_path, monkeypatch):
    """A rerun shows the lines the block showed (by their first two words), ``...`` for
    the rest, and ends with where it ran; a block without ``...`` shows everything."""
    output = ["header a=1", "step   1 loss 4.0", "step   2 loss 3.0", "step   3 loss 2.0",
              "step   4 loss 1.0", "done in 3 s"]
    shown = ["header a=1 b=0", "step   1 loss 9", "...", "step   4 loss 9", "done in 9 s",
             docs_blocks.RECORDED + "elsewhere"]
    assert docs_blocks.elide(output, shown) == [
        "header a=1", "step   1 loss 4.0", "...", "step   4 loss 1.0", "done in 3 s"]
    assert docs_blocks.elide(output, ["step   1 loss 9"]) == output
    monkeypatch.setattr(docs_blocks, "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```console\n$ python -c \"print('step 1'); print('step 2')\"\n"
                    "step 1\n...\n```\n")
    docs_blocks.rerun(page, docs_blocks.recorded(page)[0])
    lines = page.read_text().split("\n")
    assert lines[2:4] == ["step 1", "..."], lines
    assert lines[4].startswith("# recorded: ") and "load average" in lines[4], lines
    assert " cores, " in lines[4] and "commit " in lines[4], lines


# ---------------------------------------------------------------- the front page and links

def test_readme_is_a_front_page_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    start = text[:text.index("## Quickstart")].count("\n")
    first = next(b for b in docs_blocks.blocks(ROOT / "README.md")
                 if b.lang == "bash" and b.fence_line > start)
    commands = [line.split("#")[0].strip() for line in first.code.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"], commands
    assert "pip install" in quick


def slug(heading: str) -> str:
    """The anchor MkDocs (toc) and GitHub give a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"[ ]+", "-", text.strip())


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m[1]) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "CONTRIBUTING.md"],
                         ids=lambda p: p.name)
def test_links_outside_the_site_resolve(page):
    """The README and CONTRIBUTING.md are not built by MkDocs (whose --strict checks the
    pages under docs/): their relative links and anchors are checked here."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: broken link {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {file}"


def test_slug_matches_mkdocs_for_code_in_headings():
    assert slug("Choosing `h_max` with a large vocabulary") == \
        "choosing-h_max-with-a-large-vocabulary"
    assert slug("Tensor parallelism: one collective per chunk") == \
        "tensor-parallelism-one-collective-per-chunk"


def test_site_nav_lists_every_page_and_only_existing_ones():
    """mkdocs build --strict (make docs, CI) checks the same; this keeps make test honest
    without the docs venv."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def files(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from files(value) if isinstance(value, list) else [value]

    in_nav = set(files(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert in_nav <= on_disk, f"nav names missing pages: {in_nav - on_disk}"
    assert on_disk <= in_nav, f"pages missing from the nav: {on_disk - in_nav}"


# ---------------------------------------------------------------- the API reference

# The modules users import; a function or class is public if it is in the module's
# ``__all__`` (or, without one, defined there under a name without a leading underscore).
USER_MODULES = ("eaopd_mp", "eaopd_mp.parallel", "eaopd_mp.megatron", "eaopd_mp.hf",
                "eaopd_mp.trl", "eaopd_mp.engines", "eaopd_mp.served", "eaopd_mp.layouts",
                "eaopd_mp.topk")
GUIDES = ("README.md", "docs/index.md", "docs/guides")


def _public(module: types.ModuleType) -> dict[str, object]:
    return {name.rsplit(".", 1)[1]: obj for name, obj in public_objects(module)
            if name.count(".") == module.__name__.count(".") + 1}


def _resolve(dotted: str):
    """The object ``eaopd_mp.a.b`` names (a module, or an attribute of the longest
    importable prefix), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def code_spans(path: Path) -> list[str]:
    """The page's Python blocks and inline code spans."""
    text = path.read_text()
    spans = [b.code for b in docs_blocks.blocks(path) if b.lang == "python"]
    return spans + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def named_in_code(spans: list[str], public: dict[int, str]) -> dict[str, str]:
    """``{name as written: public name}`` for every public object the code spans name:
    ``eaopd_mp.x.y`` spelled out, imported (``from eaopd_mp.x import y``), through its
    module's short name (``hf.eaopd_loss``) or bare as a span of its own (``y`` or
    ``y(...)``)."""
    short = {m.rsplit(".", 1)[1]: m for m in USER_MODULES[1:]}
    by_name = {}
    for module in USER_MODULES:
        for name, obj in _public(importlib.import_module(module)).items():
            by_name.setdefault(name, obj)
    found = {}

    def add(written, obj):
        if id(obj) in public:
            found[written] = public[id(obj)]

    for span in spans:
        for m in re.finditer(r"\beaopd_mp(?:\.\w+)+", span):
            add(m[0], _resolve(m[0]))
        for m in re.finditer(r"from (eaopd_mp[\w.]*) import \(?([\w,\s]+)\)?", span):
            for name in re.findall(r"\w+", m[2]):
                add(f"{m[1]}.{name}", _resolve(f"{m[1]}.{name}"))
        for m in re.finditer(rf"(?<![\w.])({'|'.join(short)})\.(\w+)", span):
            add(m[0], _resolve(f"{short[m[1]]}.{m[2]}"))
        if (m := re.fullmatch(r"(\w+)(\(.*\))?", span.strip())) and m[1] in by_name:
            add(m[1], by_name[m[1]])
    return found


def documented(api: str) -> set[int]:
    """The objects ``docs/api.md`` documents: each ``::: name``, and a module's public
    members unless its options say ``members: false``."""
    out = set()
    for m in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n)*)", api, re.M):
        obj = _resolve(m[1])
        out.add(id(obj))
        if isinstance(obj, types.ModuleType) and "members: false" not in m[2]:
            out.update(id(o) for o in _public(obj).values())
    return out


def undocumented_in_guides(pages: list[Path], api: str) -> list[str]:
    public = {}
    for module in USER_MODULES:
        for name, obj in _public(importlib.import_module(module)).items():
            public.setdefault(id(obj), f"{module}.{name}")
    have = documented(api)
    missing = {}
    for page in pages:
        for written, name in named_in_code(code_spans(page), public).items():
            if id(_resolve(name)) not in have:
                where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name
                missing.setdefault(name, f"{where} names `{written}`")
    return [f"{name} ({where})" for name, where in sorted(missing.items())]


def guide_pages() -> list[Path]:
    return [p for g in GUIDES for p in ([ROOT / g] if g.endswith(".md")
                                        else sorted((ROOT / g).glob("*.md")))]


def test_the_api_reference_covers_every_public_name_the_guides_use():
    """Every public function or class of the user-facing modules that the README or a
    guide names in code has its entry in docs/api.md."""
    missing = undocumented_in_guides(guide_pages(), (ROOT / "docs" / "api.md").read_text())
    assert not missing, "docs/api.md lacks:\n" + "\n".join(missing)


def test_the_api_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Call `context_parallel_index(s, cp, r)` or `hf.lm_head`, and\n\n"
                    "```python\nfrom eaopd_mp.engines import head_eaopd_loss\n"
                    "eaopd_mp.megatron.EaopdOutput\n```\n")
    missing = undocumented_in_guides([page], "::: eaopd_mp.hf.lm_head\n")
    assert [m.split(" ")[0] for m in missing] == [
        "eaopd_mp.engines.head_eaopd_loss", "eaopd_mp.megatron.EaopdOutput",
        "eaopd_mp.megatron.context_parallel_index"], missing


def test_no_page_uses_the_deprecated_sharded_module():
    """``eaopd_mp.sharded`` is an alias kept for old code: the docs name the modules that
    hold the code (``eaopd_mp.engines``, ``eaopd_mp.layouts``)."""
    for page in [*docs_blocks.pages(), *sorted((ROOT / "eaopd_mp").rglob("*.py"))]:
        if page.name == "sharded.py":
            continue
        text = page.read_text()
        assert not re.search(r"eaopd_mp\.sharded\b|import sharded\b|\bsharded\.\w+\(", text), \
            f"{page.relative_to(ROOT)} uses eaopd_mp.sharded"


# ---------------------------------------------------------------- docstrings

INTEGRATIONS = ("eaopd_mp.parallel", "eaopd_mp.megatron", "eaopd_mp.hf", "eaopd_mp.trl",
                "eaopd_mp.engines", "eaopd_mp.served", "eaopd_mp.layouts", "eaopd_mp.topk")


def public_objects(module: types.ModuleType):
    """``module.__all__``, or the public functions and classes it defines; and the public
    methods those classes define themselves."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v))
                 and v.__module__ == module.__name__]
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and not attr.startswith("_"):
                    yield f"{module.__name__}.{name}.{attr}", member


def undocumented(module: types.ModuleType) -> list[str]:
    return [name for name, obj in public_objects(module)
            if not (obj.__doc__ or "").strip()]


@pytest.mark.parametrize("name", ("eaopd_mp",) + INTEGRATIONS)
def test_every_public_function_has_a_docstring(name):
    module = importlib.import_module(name)
    assert list(public_objects(module)), name
    assert undocumented(module) == []


def test_docstring_check_can_fail():
    module = types.ModuleType("fake")

    def documented():
        """Yes."""

    def bare():
        pass

    class Thing:
        """A class."""

        def method(self):
            pass

    for obj in (documented, bare, Thing):
        obj.__module__ = "fake"
        setattr(module, obj.__name__, obj)
    assert undocumented(module) == ["fake.bare", "fake.Thing.method"]

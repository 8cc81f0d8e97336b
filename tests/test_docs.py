"""The documentation is tested like code.

* Every fenced ``python`` block in ``docs/**/*.md`` and ``README.md`` runs. Blocks of
  one page run in order and share one namespace (and one temporary working
  directory), as a reader would run them. Markers, in an HTML comment on the lines
  just before a block (several may follow each other):

  - ``<!-- skip: REASON -->``: not run, reported as skipped with REASON (e.g.
    ``needs data``). An info string that says so works too:
    ```` ```python title="needs data" ````.
  - ``<!-- slow: REASON -->``: run, but marked ``slow`` (``make test-fast`` leaves it out).
  - ``<!-- requires: mod1 mod2 -->``: skipped unless these modules import.

* Every public name of ``dan_layers.__all__`` and ``dan_layers.functional.__all__`` has
  a ``::: dan_layers.X`` directive in ``docs/api/``, and every directive names
  something public that exists.
* ``mkdocs.yml`` uses only current mkdocstrings keys; local links in the pages
  point to files that exist; and (slow) ``mkdocs build --strict`` succeeds.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_DIR = DOCS / "api"
README = ROOT / "README.md"

PYTHON_LANGS = {"python", "py", "python3"}
FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>.*?)[ \t]*$")
COMMENT_RE = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
DIRECTIVE_RE = re.compile(r"^:::[ \t]+(?P<target>[\w.]+)", re.MULTILINE)
# markdown links and images whose target is a relative path: [text](target) / ![alt](target)
LINK_RE = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


# --------------------------------------------------------------------------------------
# Extracting the snippets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """One fenced python block of a markdown file."""

    page: Path
    line: int  # 1-based line number of the block's first code line
    code: str
    skip: str | None = None
    slow: str | None = None
    requires: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        try:
            name = self.page.relative_to(ROOT).as_posix()
        except ValueError:
            name = self.page.name
        return f"{name}:{self.line}"


def _markers(comments: list[str], info: str) -> dict[str, Any]:
    """Read skip / slow / requires markers from preceding comments and the info string."""
    found: dict[str, Any] = {"skip": None, "slow": None, "requires": ()}
    for body in comments:
        key, _, value = body.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "skip":
            found["skip"] = value or "marked skip"
        elif key == "slow":
            found["slow"] = value or "marked slow"
        elif key == "requires":
            found["requires"] = tuple(value.replace(",", " ").split())
    if "needs data" in info.lower():
        title = re.search(r'title\s*=\s*"([^"]*)"', info)
        found["skip"] = found["skip"] or (title.group(1) if title else "needs data")
    return found


def extract_snippets(text: str, page: Path) -> list[Snippet]:
    """All fenced python blocks of a markdown text, with their markers."""
    lines = text.splitlines()
    snippets: list[Snippet] = []
    i = 0
    while i < len(lines):
        match = FENCE_RE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"]
        lang = info.lstrip("{").lstrip(".").split(" ")[0].split("}")[0].lower() if info else ""
        # find the closing fence: same character, at least as long, nothing after it
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if lang in PYTHON_LANGS:
            # comments on the lines just before the fence (blank lines in between allowed)
            comments: list[str] = []
            k = i - 1
            while k >= 0:
                comment = COMMENT_RE.match(lines[k])
                if comment:
                    comments.append(comment["body"])
                elif lines[k].strip():
                    break
                k -= 1
            body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
            snippets.append(
                Snippet(page=page, line=i + 2, code="\n".join(body) + "\n", **_markers(comments, info))
            )
        i = j + 1
    return snippets


def _pages() -> list[Path]:
    pages = sorted(DOCS.rglob("*.md"))
    if README.exists():
        pages.append(README)
    return pages


def _snippet_params() -> list[Any]:
    params: list[Any] = []
    for page in _pages():
        for snippet in extract_snippets(page.read_text(encoding="utf-8"), page):
            marks = [pytest.mark.slow] if snippet.slow else []
            params.append(pytest.param(snippet, id=snippet.id, marks=marks))
    if not README.exists():
        params.append(
            pytest.param(None, id="README.md", marks=pytest.mark.skip(reason="README.md does not exist yet"))
        )
    return params


# --------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------


def _unavailable(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


class _PageState:
    """Namespace, working directory and progress of one page's blocks."""

    def __init__(self, workdir: Path) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.workdir = workdir
        self.done: set[int] = set()
        self.failed: str | None = None


_STATES: dict[Path, _PageState] = {}


def _run(snippet: Snippet, state: _PageState) -> None:
    # pad with newlines so that tracebacks give the line number in the markdown file
    source = "\n" * (snippet.line - 1) + snippet.code
    exec(compile(source, str(snippet.page), "exec"), state.namespace)


@pytest.mark.parametrize("snippet", _snippet_params())
def test_snippet_runs(snippet: Snippet, tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    if snippet.skip:
        pytest.skip(snippet.skip)
    missing = _unavailable(snippet.requires)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")

    page_snippets = extract_snippets(snippet.page.read_text(encoding="utf-8"), snippet.page)
    if snippet.page not in _STATES:
        _STATES[snippet.page] = _PageState(tmp_path_factory.mktemp(snippet.page.stem))
    state = _STATES[snippet.page]
    monkeypatch.chdir(state.workdir)
    monkeypatch.syspath_prepend(str(state.workdir))

    # blocks run in page order: catch up on earlier ones this session has not run
    # (e.g. with -k, or when slow ones were deselected)
    for earlier in page_snippets:
        if earlier.line >= snippet.line:
            break
        if earlier.line in state.done or earlier.skip or _unavailable(earlier.requires):
            continue
        if state.failed:
            break
        try:
            _run(earlier, state)
        except BaseException as exc:  # noqa: BLE001 - report which block broke the page
            state.failed = f"{earlier.id}: {type(exc).__name__}: {exc}"
        state.done.add(earlier.line)
    if state.failed:
        pytest.fail(f"an earlier block of this page failed ({state.failed})")

    try:
        _run(snippet, state)
    except BaseException as exc:
        state.failed = f"{snippet.id}: {type(exc).__name__}: {exc}"
        raise
    finally:
        state.done.add(snippet.line)


# --------------------------------------------------------------------------------------
# The extractor itself
# --------------------------------------------------------------------------------------


def test_extractor_reads_markers() -> None:
    text = "\n".join(
        [
            "# Title",
            "```python",
            "a = 1",
            "```",
            "",
            "<!-- skip: needs data -->",
            "```python",
            "open('missing')",
            "```",
            '```python title="needs data"',
            "open('missing')",
            "```",
            "<!-- slow: a few seconds -->",
            "<!-- requires: onnx, onnxruntime -->",
            "```py",
            "b = a + 1",
            "```",
            "```bash",
            "echo not python",
            "```",
            "!!! note",
            "    ```python",
            "    if a:",
            "        c = 3",
            "    ```",
            "````markdown",
            "```python",
            "not_run = True",
            "```",
            "````",
        ]
    )
    snippets = extract_snippets(text, Path("page.md"))
    assert [s.line for s in snippets] == [3, 8, 11, 16, 23]
    assert snippets[0].code == "a = 1\n" and snippets[0].skip is None
    assert snippets[1].skip == "needs data"
    assert snippets[2].skip == "needs data"
    assert snippets[3].slow == "a few seconds" and snippets[3].requires == ("onnx", "onnxruntime")
    assert snippets[4].code == "if a:\n    c = 3\n"


# --------------------------------------------------------------------------------------
# API reference coverage
# --------------------------------------------------------------------------------------


def _documented() -> dict[str, list[str]]:
    """``{target: [page, ...]}`` for every ``::: target`` directive of the API pages."""
    found: dict[str, list[str]] = {}
    for page in sorted(API_DIR.glob("*.md")):
        for match in DIRECTIVE_RE.finditer(page.read_text(encoding="utf-8")):
            found.setdefault(match["target"], []).append(page.name)
    return found


def _public_names() -> set[str]:
    dan_layers = pytest.importorskip("dan_layers")
    functional = importlib.import_module("dan_layers.functional")
    # the module itself and the version string are not API objects to render
    names = {f"dan_layers.{n}" for n in dan_layers.__all__ if n not in {"functional", "__version__"}}
    names |= {f"dan_layers.functional.{n}" for n in functional.__all__}
    return names


def test_every_public_name_has_an_api_entry() -> None:
    missing = sorted(_public_names() - set(_documented()))
    assert not missing, f"public names without a '::: name' directive in docs/api/: {missing}"


def test_every_api_entry_is_public_and_exists() -> None:
    documented = _documented()
    assert documented, "no '::: name' directives found in docs/api/"
    for target, pages in documented.items():
        assert len(pages) == 1, f"{target} is documented more than once: {pages}"
        module_name, _, name = target.rpartition(".")
        assert module_name.startswith("dan_layers"), f"{target}: not part of dan_layers"
        try:
            parent = importlib.import_module(module_name)
        except ImportError as exc:
            raise AssertionError(f"{target} ({pages[0]}): cannot import {module_name}: {exc}") from exc
        assert hasattr(parent, name), f"{target} ({pages[0]}): {module_name} has no {name!r}"
        public = getattr(parent, "__all__", None)
        assert public is not None and name in public, (
            f"{target} ({pages[0]}): {name!r} is not in {module_name}.__all__"
        )


SPHINX_ROLE_RE = re.compile(r":(?:func|class|meth|mod|attr|obj|data|exc|ref):`")


def test_docstrings_use_markdown_cross_references() -> None:
    """mkdocstrings renders Markdown: a Sphinx role such as :func:`x` shows up verbatim.

    Write ``[`x`][dan_layers.functional.x]`` (a cross-reference that autorefs resolves)
    or plain ``x`` in double backticks instead. Checked on the docstrings that the API
    reference renders: public classes, functions and methods of dan_layers.
    """
    import ast

    offenders = []
    for path in sorted((ROOT / "dan_layers").glob("*.py")):
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=False) or ""
            for match in SPHINX_ROLE_RE.finditer(doc):
                line = node.body[0].lineno + doc[: match.start()].count("\n")
                offenders.append(f"{path.relative_to(ROOT)}:{line} ({node.name})")
    assert not offenders, f"Sphinx roles in rendered docstrings: {offenders}"


# --------------------------------------------------------------------------------------
# Site configuration and links (no mkdocs needed)
# --------------------------------------------------------------------------------------


def _config() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_mkdocs_config() -> None:
    config = _config()
    nav_files = _nav_files(config["nav"])
    for name in nav_files:
        assert (DOCS / name).is_file(), f"nav entry {name} does not exist"
    site_pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "scripts" not in p.parts}
    assert site_pages == set(nav_files), f"pages not in the nav: {sorted(site_pages - set(nav_files))}"

    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in config["plugins"]}
    assert "search" in plugins
    python = plugins["mkdocstrings"]["mkdocstrings"]["handlers"]["python"]
    assert set(python) <= {"paths", "options", "inventories"}, "legacy rendering:/selection: keys"
    assert python["paths"] == ["."]
    assert python["options"]["docstring_style"] == "google"

    scripts = config["extra_javascript"]
    assert not any("polyfill" in s for s in scripts)
    assert any("mathjax@3" in s for s in scripts) and "javascripts/mathjax.js" in scripts
    assert (DOCS / "javascripts" / "mathjax.js").is_file()
    extensions = {next(iter(e)) if isinstance(e, dict) else e: e for e in config["markdown_extensions"]}
    assert extensions["pymdownx.arithmatex"]["pymdownx.arithmatex"]["generic"] is True
    assert set(config["validation"]) == {"omitted_files", "absolute_links", "unrecognized_links", "anchors"}
    assert set(config["validation"].values()) == {"warn"}


def test_local_links_and_images_exist() -> None:
    broken = []
    for page in DOCS.rglob("*.md"):
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for match in LINK_RE.finditer(text):
            target = match["target"].split("#")[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # same-page anchor, or an external URL
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {match['target']}")
    assert not broken, f"broken links: {broken}"


# --------------------------------------------------------------------------------------
# The real build
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    assert (site / "index.html").is_file()
    losses = (site / "api" / "losses" / "index.html").read_text(encoding="utf-8")
    assert "AffinityLoss" in losses and "PartitionLoss" in losses, "API page rendered without objects"

"""The documentation is tested like code.

- Every ```python block in the README and under docs/ runs, as written, in a
  fresh process. Fragments that are not meant to run use another info string
  (```text, ```sh).
- A block with a title (```python title="shop.py") is a file of its page's
  folder: it is written into the working directory of every block run from a
  page of that folder, so a tutorial can build one module and use it on its
  later pages. A titled block runs as ``python shop.py``.
- A block preceded by ``<!-- docs: typed -->``, and every block under
  docs/tutorial/, must pass ``mypy --strict``; all of them are checked in one
  mypy run.
- ``<!-- docs: not-run -->`` before a block leaves it to a dedicated test
  (it needs several processes, say); tests/test_tutorial.py runs those.
- The site builds with ``mkdocs build --strict``, and the generated reference
  pages agree with the code.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(
    r"(?:^<!-- docs: (?P<flags>[\w ,-]+) -->\n)?^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```",
    re.S | re.M,
)
TITLE = re.compile(r'title="([^"]+)"')
TYPED_FOLDERS = ("tutorial",)


@dataclass(frozen=True)
class Block:
    """One ```python block of a page."""

    page: Path
    index: int
    code: str
    title: str | None
    flags: frozenset[str]

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}#{self.index}"

    @property
    def folder(self) -> Path:
        return self.page.parent

    @property
    def typed(self) -> bool:
        return "typed" in self.flags or self.folder.name in TYPED_FOLDERS

    @property
    def runs(self) -> bool:
        return "not-run" not in self.flags


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def blocks_of(page: Path) -> list[Block]:
    found = []
    for i, m in enumerate(FENCE.finditer(page.read_text())):
        title = TITLE.search(m["info"])
        flags = frozenset(f.strip() for f in (m["flags"] or "").split(","))
        found.append(Block(page, i + 1, m["code"], title[1] if title else None, flags))
    return found


def blocks() -> list[Block]:
    return [b for page in pages() for b in blocks_of(page)]


def files_for(block: Block) -> dict[str, str]:
    """The titled blocks of ``block``'s folder: the files its project has."""
    return {b.title: b.code for b in blocks() if b.title and b.folder == block.folder}


def run_block(block: Block, cwd: Path, env: dict[str, str] | None = None) -> str:
    for name, code in files_for(block).items():
        (cwd / name).write_text(code)
    argv = [sys.executable, block.title] if block.title else [sys.executable, "-c", block.code]
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=120, env=env or os.environ.copy()
    )
    assert done.returncode == 0, f"{block.name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


RUN = [b for b in blocks() if b.runs]


def test_the_readme_has_runnable_examples() -> None:
    assert sum(1 for b in RUN if b.page.name == "README.md") >= 2


def test_pages_below_docs_are_collected() -> None:
    assert any(b.folder.name == "tutorial" for b in RUN)


def test_blocks_not_run_here_are_run_by_a_test_of_their_own() -> None:
    others = [f.read_text() for f in (ROOT / "tests").glob("test_*.py") if f.name != "test_docs.py"]
    for b in blocks():
        if not b.runs:
            assert b.title, f"{b.name}: a not-run block needs a title its test can find it by"
            assert any(f'"{b.title}"' in text for text in others), f"no test runs {b.name}"


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_snippet_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path)


def test_typed_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """One mypy run over every typed block: a directory per docs folder holds its
    blocks and its titled files (on MYPYPATH, so ``import shop`` resolves)."""
    typed = [b for b in blocks() if b.typed]
    assert len(typed) >= 5
    dirs: dict[Path, Path] = {}
    names: dict[str, Block] = {}
    for b in typed:
        if b.folder not in dirs:
            dirs[b.folder] = d = tmp_path / f"d{len(dirs)}"
            d.mkdir()
            for title, code in files_for(b).items():
                (d / title).write_text(code)
        path = dirs[b.folder] / (b.title or f"block_{len(names)}.py")
        path.write_text(b.code)
        names[str(path)] = b
    cache = ROOT / ".mypy_cache" / "docs-examples"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--python-version", "3.11"),
            *("--cache-dir", str(cache), *names),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPYPATH": os.pathsep.join(map(str, dirs.values()))},
    )
    report = done.stdout
    for path, b in names.items():
        report = report.replace(path, b.name).replace(Path(path).name, b.name)
    assert done.returncode == 0, report


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "reference" / "cli" / "index.html").exists()


def test_every_export_is_in_the_api_reference() -> None:
    """Each name of ``sagakit.__all__`` has its own entry, or is an error (all of
    sagakit.errors is rendered in one entry)."""
    import sagakit
    from sagakit import errors

    page = (DOCS / "reference" / "api.md").read_text()
    entries = set(re.findall(r"^::: ([\w.]+)$", page, re.M))
    assert "sagakit.errors" in entries
    missing = [
        name
        for name in sagakit.__all__
        if name != "__version__" and f"sagakit.{name}" not in entries and name not in vars(errors)
    ]
    assert not missing, f"not in docs/reference/api.md: {missing}"


def test_every_setting_is_on_the_settings_page() -> None:
    import sagakit

    page = (DOCS / "reference" / "settings.md").read_text()
    for f in fields(sagakit.Settings):
        assert f"`{f.name}`" in page, f"Settings.{f.name} is not documented"


def _section(page: str, heading: str) -> str:
    """The text of ``page`` from the heading that contains ``heading`` to the next."""
    start = page.index(heading)
    end = page.find("\n#", start + len(heading))
    return page[start : end if end >= 0 else None]


def test_every_url_option_is_on_the_urls_page() -> None:
    from sagakit.store import postgres
    from sagakit.transport import nats, rabbitmq, redis

    page = (DOCS / "reference" / "urls.md").read_text()
    sections = {
        "### `postgresql://": [*postgres.URL_OPTIONS, *postgres.LIBPQ_OPTIONS],
        "### `amqp://": [*rabbitmq.OPTIONS, *rabbitmq.DRIVER_OPTIONS],
        "### `nats://": list(nats.OPTIONS),
        "### `redis://": list(redis.OPTIONS),
    }
    for heading, names in sections.items():
        text = _section(page, heading)
        missing = [n for n in names if f"`{n}`" not in text]
        assert not missing, f"{heading}: {missing} not documented"


def test_every_console_endpoint_is_on_the_http_api_page() -> None:
    from sagakit.console.web.openapi import document

    page = (DOCS / "reference" / "http-api.md").read_text()
    for path, methods in document()["paths"].items():
        for method, op in methods.items():
            row = next((ln for ln in page.splitlines() if f"`{method.upper()} {path}`" in ln), None)
            assert row is not None, f"{method.upper()} {path} is not documented"
            for p in op.get("parameters", []):
                assert f"`{p['name']}`" in row or f"{{{p['name']}}}" in row, (path, p["name"])


def _hooks() -> Any:
    """tools/mkdocs_hooks.py, which generates parts of pages at build time."""
    path = ROOT / "tools" / "mkdocs_hooks.py"
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_lists_every_subcommand() -> None:
    from sagakit.cli import parser

    hooks = _hooks()
    page = (DOCS / "reference" / "cli.md").read_text()
    assert hooks.CLI_MARKER in page
    built = hooks.on_page_markdown(page, None, None, None)
    for words, _, _ in hooks._walk(parser(), ["sagakit"]):
        assert f"`{' '.join(words)}`" in built
    for flag in ("--service", "--metrics-port", "--reason", "--older-than", "--role"):
        assert f"`{flag}" in built


def test_the_readme_links_to_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert len(links) >= 20
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def test_every_metric_and_span_attribute_is_on_the_telemetry_page() -> None:
    mkdocs_hooks = _hooks()
    from sagakit import App
    from sagakit.observe.telemetry import Telemetry, register_twophase

    page = (DOCS / "reference" / "telemetry.md").read_text()
    assert mkdocs_hooks.METRICS_MARKER in page
    built = mkdocs_hooks.on_page_markdown(page, None, None, None)
    telemetry = Telemetry(tracing=False, metrics=True)
    app = App("memory://")
    app.instrument(telemetry)
    assert telemetry.metrics is not None
    register_twophase(telemetry.metrics, app)
    names = {m.name for m in telemetry.metrics.registry.collect()}
    assert len(names) >= 20
    missing = [n for n in names if f"`{n}" not in built]
    assert not missing, f"metrics missing from docs/reference/telemetry.md: {missing}"
    source = (ROOT / "src" / "sagakit" / "observe" / "tracing.py").read_text()
    keys = set(re.findall(r'"((?:sagakit|messaging|error)\.[\w.]+)"', source))
    assert len(keys) >= 15
    undocumented = [k for k in sorted(keys) if f"`{k}`" not in page]
    assert not undocumented, f"span attributes missing from the page: {undocumented}"

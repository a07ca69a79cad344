"""Every ```python block in the README and docs runs, as written, in a fresh process.

Illustrative fragments that are not meant to run use another info string
(```text, ```sh).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    found = []
    docs = [*sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("how-to/*.md"))]
    for path in [ROOT / "README.md", *docs]:
        for i, code in enumerate(FENCE.findall(path.read_text())):
            found.append((f"{path.relative_to(ROOT)}#{i + 1}", code))
    return found


def test_the_readme_has_runnable_examples() -> None:
    assert sum(1 for name, _ in snippets() if name.startswith("README")) >= 2


@pytest.mark.parametrize(("name", "code"), snippets(), ids=[n for n, _ in snippets()])
def test_snippet_runs(name: str, code: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"

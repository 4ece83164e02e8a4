"""The documentation runs as written: every ```python block of README.md and docs/*.md is executed in a fresh
namespace (one test per block, id FILE:LINE), every relative Markdown link points to a file that exists, and the
README stays a one-page overview.

A block whose first line is `# slow` is marked `slow` (run by `make test-all`, not by `make test`).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, *sorted((ROOT / "results").glob("*/README.md"))]
SLOW_MARKER = "# slow"
README_MAX_LINES = 200

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(path: Path, language: str = "python") -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of each fenced block in `language`."""
    blocks, lines, start, fence_language = [], [], None, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if start is None and match:
            start, fence_language, lines = number, match.group(1), []
        elif start is not None and line.strip() == "```":
            if fence_language == language:
                blocks.append((start, "\n".join(lines) + "\n"))
            start = None
        elif start is not None:
            lines.append(line)
    assert start is None, f"{path.name}: the code block opened at line {start} is never closed"
    return blocks


def snippet_params() -> list:
    params = []
    for page in PAGES:
        for line, code in code_blocks(page):
            name = f"{page.relative_to(ROOT)}:{line}"
            marks = [pytest.mark.slow] if code.lstrip().startswith(SLOW_MARKER) else []
            params.append(pytest.param(name, code, id=name, marks=marks))
    return params


@pytest.mark.parametrize("name,code", snippet_params())
def test_python_snippet_runs(name, code, monkeypatch):
    monkeypatch.chdir(ROOT)          # snippets may name repository paths (configs/...)
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)   # links inside code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                 # URLs and in-page anchors
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_readme_is_one_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_code_fences_use_known_languages():
    """A fence typo such as ```pyhton would silently skip a snippet."""
    for page in PAGES:
        languages = {FENCE.match(line).group(1) for line in page.read_text().splitlines()
                     if FENCE.match(line) and line.strip() != "```"}
        assert languages <= {"python", "bash", "text"}, f"{page.name}: unexpected fence languages {languages}"

"""The recipes of docs/fwdgrad.md run as written: each python block of its "Recipes" section is executed in a fresh
namespace (one test per recipe, named by its heading). The recipes hold their own assertions (the NNX MLP learns
the digits, LoRA leaves outside the mask do not move, the server rebuilds a worker's estimate bit for bit), so the
page is the single source of both the code and what it shows."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "fwdgrad.md"
RECIPE = re.compile(r"^### (.+?)\n.*?^```python\n(.*?)^```", re.S | re.M)


def recipes() -> list[tuple[str, str]]:
    """(heading, code) of each recipe: the first python block under each ### heading of the Recipes section."""
    text = PAGE.read_text()
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    return RECIPE.findall(section)


def test_the_page_has_the_three_recipes():
    assert [heading.split(".")[0] for heading, _ in recipes()] == ["1", "2", "3"]


@pytest.mark.parametrize("heading,code", [pytest.param(h, c, id=h.split(".")[0]) for h, c in recipes()])
def test_recipe_runs_as_written(heading, code):
    exec(compile(code, f"docs/fwdgrad.md: {heading}", "exec"), {"__name__": "__recipe__"})

"""The house's import layers, written down once: a module may import from its own layer and the layers below, never
from a layer above. Every module of the package must have a layer, so a new module takes a decision.

    0 base      errors, pytrees, signatures, metrics, memory, checkpoint, plots, task
    1 core      fwdgrad, data, models, nn, peft                 math, data and models; know nothing of federation
    2 tasks     lm_tasks                                         a pretrained model + PEFT + head as a Task
    3 engine    fl, central                                      algorithms, the round engine, centralized training
    4 config    build                                            config sections -> library objects
    5 runners   runners                                          a config in, a run out
    6 entry     main, launch, report                             command lines

Imports inside functions count (a lazy import is still a dependency).
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "spryjax"
LAYERS = {
    "base": ["errors", "pytrees", "signatures", "metrics", "memory", "checkpoint", "plots", "task"],
    "core": ["fwdgrad", "data", "models", "nn", "peft"],
    "tasks": ["lm_tasks"],
    "engine": ["fl", "central"],
    "config": ["build"],
    "runners": ["runners"],
    "entry": ["main", "launch", "report"],
}
RANK = {f"spryjax.{name}": rank for rank, names in enumerate(LAYERS.values()) for name in names}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The rank of the longest LAYERS entry that `module` is or lies under."""
    for prefix in sorted(RANK, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANK[prefix]
    return None


def spryjax_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every spryjax import in the file; `from spryjax.data import text` names spryjax.data.text
    when that is a module, else spryjax.data."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "spryjax"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "spryjax":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else node.module))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert [module_name(p) for p in SOURCES if module_name(p) != "spryjax" and
            layer_of(module_name(p)) is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    here = layer_of(module_name(path))
    if here is None:   # the package's own __init__
        return
    upward = [f"line {line}: {module} (layer {layer_of(module)} > {here})"
              for line, module in spryjax_imports(path) if (layer_of(module) or 0) > here]
    assert upward == [], f"{module_name(path)} imports from a layer above its own"


def test_a_layer_check_can_fail(tmp_path):
    """The checker finds an upward import: a lazy `from spryjax import build` in a core module."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from spryjax import build\n")
    assert spryjax_imports(probe) == [(2, "spryjax.build")]
    assert layer_of("spryjax.build") > layer_of("spryjax.data.probe")


def test_the_engine_and_the_offline_text_task_do_not_import_datasets():
    """`datasets` is imported only where a Hub or file load needs it (the GPU image lacks it)."""
    code = ("import sys, ml_collections; from spryjax import build; import spryjax.runners.federated, "
            "spryjax.runners.central, spryjax.launch.worker, spryjax.report; "
            "build.dataset(ml_collections.ConfigDict({'name': 'text', 'task': 'rotten_tomatoes', "
            "'tokenizer': 'minilm', 'max_length': 16}), 0); print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

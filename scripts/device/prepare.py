"""Writes the device bundle: everything scripts/device/run.sh needs on a GPU machine without network, in one folder.

    python scripts/device/prepare.py DIR [--seeds 8] [--smoke] [--no-wheels]     (scripts/device/prepare.sh calls it)

DIR/
  minilm/            the packaged MiniLM-L6 (`hf.packaged_model()`): config.json, the tokenizer files, and
                     model.safetensors with every float tensor rounded to bf16 (43 MiB instead of 87 MiB); it loads
                     with `hf.load_pretrained(DIR/minilm, dtype=jnp.float32)`, so the GPU run's fp32 base weights
                     are the bf16-rounded ones
  rt_minilm.npz      the offline text task exactly as `build.dataset(config.data, seed)` makes it for
                     configs/spry_rt_minilm.py, seeds 0..S-1, tokenized (`spryjax.data.arrays`; a config reads it
                     with data.name="arrays", data.path=DIR/rt_minilm.npz)
  wheels/            the Python packages the GPU image lacks (ml-collections; pure Python)
  MANIFEST.json      what is where, the sources, the sizes

--smoke writes a tiny model instead (MiniLM's tensors cut to 1 layer of width 32: valid but meaningless weights,
same vocabulary and layout), so that `run.sh --smoke` runs the same code on a CPU in minutes; it skips the wheels.
The bundle must stay under MAX_BYTES: the device tool carries at most 64 MiB with the working tree.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bundle_config import DATA_FILE, MODEL_DIR, WHEEL_DIR  # scripts/device/; puts the repo root on sys.path
from configs import spry_rt_minilm
from spryjax import build
from spryjax.data import arrays
from spryjax.errors import ArgumentParser, InputError, run_command
from spryjax.models import hf

MAX_BYTES = 60 * 2**20
# Packages the GPU image (Python 3.12, jax 0.11.2) lacks; their own requirements (absl-py, PyYAML) are there.
WHEELS = ("ml-collections==1.1.0",)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def write_model(folder: Path, source: Path, *, tiny: bool = False) -> None:
    """`source`'s config and tokenizer copied, its weights rounded to bf16 (non-float tensors kept); `tiny`: each
    tensor cut to the TINY shape (the first rows and columns; layers past the first dropped)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    import ml_dtypes

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, folder / name)
    cut = {config["hidden_size"]: TINY["hidden_size"], config["intermediate_size"]: TINY["intermediate_size"]}
    tensors = {}
    with safe_open(source / hf.SINGLE_FILE, framework="np") as f:
        for name in f.keys():
            if tiny and name.startswith("encoder.layer.") and int(name.split(".")[2]) >= TINY["num_hidden_layers"]:
                continue
            array = f.get_tensor(name)
            if tiny:
                array = array[tuple(slice(0, cut.get(d, d)) for d in array.shape)]
            tensors[name] = (array.astype(ml_dtypes.bfloat16) if np.issubdtype(array.dtype, np.floating)
                             else np.ascontiguousarray(array))
    save_file(tensors, str(folder / hf.SINGLE_FILE), metadata={"format": "pt"})
    if tiny:
        (folder / "config.json").write_text(json.dumps({**config, **TINY}, indent=2))


def write_data(path: Path, seeds: range) -> dict:
    """The Spry task's Dataset of each seed (configs/spry_rt_minilm.py's data section), saved to `path`."""
    section = spry_rt_minilm.get_config().data
    arrays.save(path, {seed: build.dataset(section, seed) for seed in seeds}, source=section.to_dict())
    return section.to_dict()


def download_wheels(folder: Path) -> list[str]:
    """WHEELS for CPython 3.12 on x86-64 Linux, without their dependencies (the image has those)."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS],
                   check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(folder: Path, *, seeds: int = 8, smoke: bool = False, wheels: bool = True) -> dict:
    """Writes the bundle (see the module docstring) and returns its manifest."""
    source = hf.packaged_model()
    folder.mkdir(parents=True, exist_ok=True)
    write_model(folder / MODEL_DIR, source, tiny=smoke)
    data_source = write_data(folder / DATA_FILE, range(seeds))
    wheel_names = download_wheels(folder / WHEEL_DIR) if wheels and not smoke else []
    manifest = {
        "model": {"folder": MODEL_DIR, "source": str(source), "dtype": "bfloat16", "tiny": TINY if smoke else None,
                  "source_sha256": hashlib.sha256((source / hf.SINGLE_FILE).read_bytes()).hexdigest()},
        "data": {"file": DATA_FILE, "seeds": list(range(seeds)), "config_data": data_source},
        "wheels": wheel_names, "smoke": smoke,
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()},
    }
    manifest["total_bytes"] = folder_bytes(folder)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    if folder_bytes(folder) > MAX_BYTES:
        raise InputError(f"{folder}: {folder_bytes(folder) / 2**20:.1f} MiB, more than the "
                         f"{MAX_BYTES / 2**20:.0f} MiB a device call can carry")
    return manifest


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--seeds", type=int, default=8, help="data of seeds 0..N-1 (the device run uses 8)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, no wheels (CPU smoke runs)")
    parser.add_argument("--no-wheels", action="store_true")
    args = parser.parse_args()
    manifest = prepare(Path(args.folder), seeds=args.seeds, smoke=args.smoke, wheels=not args.no_wheels)
    for name, size in manifest["files"].items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{manifest['total_bytes'] / 2**20:8.2f} MiB  total in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/device/prepare.py"))

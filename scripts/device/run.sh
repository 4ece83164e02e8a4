#!/usr/bin/env bash
# One GPU lease: the Spry table, engine throughput, a vectorized sweep and the MiniLM client step, in priority
# order, within --budget seconds (default 480) counted from this script's start (scripts/device/gpu_run.py's
# docstring has the parts, the time estimates and what is dropped first).
#
#   scripts/device/run.sh BUNDLE OUTDIR [--smoke] [gpu_run.py options]
#
# BUNDLE: scripts/device/prepare.sh's folder. OUTDIR: at most 8 files, written as each part finishes
# (summary.md, log.txt, spry_runs.json, spry_accuracy.png, throughput.json, vectorized.json, client_step.json).
# PYTHON picks the interpreter (default python3: the GPU image's, with jax); the repository goes on PYTHONPATH
# and the bundle's wheels into a scratch folder, so nothing needs the network.
set -uo pipefail
start=$(date +%s.%N)
if [ $# -lt 2 ]; then
  echo "usage: $0 BUNDLE OUTDIR [--smoke] [gpu_run.py options]" >&2
  exit 2
fi
bundle=$(cd "$1" && pwd) || exit 2
out=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
site=${TMPDIR:-/tmp}/spryjax_device_site
if compgen -G "$bundle/wheels/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$bundle"/wheels/*.whl || exit 1
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export SPRYJAX_PROGRESS=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$py" -c 'import jax, flax, optax, orbax.checkpoint, transformers, safetensors, ml_collections, matplotlib
print("python", __import__("sys").version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "transformers", transformers.__version__, "devices", jax.devices())' \
  2>&1 | tee -a "$out/log.txt"
"$py" "$repo/scripts/device/gpu_run.py" "$bundle" "$out" --start "$start" "$@" 2>&1 | tee -a "$out/log.txt"
exit "${PIPESTATUS[0]}"

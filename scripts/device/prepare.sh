#!/usr/bin/env bash
# Writes the device bundle into DIR (at most 60 MiB; see scripts/device/prepare.py): the packaged MiniLM with bf16
# weights, the offline text task tokenized for seeds 0..7, the wheels the GPU image lacks. Runs here, offline but
# for the wheels (pip download), on CPU.
#
#   scripts/device/prepare.sh DIR [--smoke] [--seeds N] [--no-wheels]
#
# PYTHON picks the interpreter (default: the repository's .venv).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DIR [--smoke] [--seeds N] [--no-wheels]" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
exec "$py" "$repo/scripts/device/prepare.py" "$@"

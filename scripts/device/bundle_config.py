"""configs/spry_rt_minilm.py read from a device bundle (scripts/device/prepare.sh): the task already tokenized
(data.name="arrays") and the bf16-rounded MiniLM of the bundle, nothing from the offline asset packages.

    python -m spryjax.main --config=scripts/device/bundle_config.py:METHOD,BUNDLE[,smoke] --workdir=...

METHOD is a key of configs/spry_rt_minilm.py's METHODS; `smoke` shrinks the federation to 8 clients, 2 per round
(the CPU smoke run of scripts/device/run.sh --smoke). Expected results: those of configs/spry_rt_minilm.py, up to
the base weights' bf16 rounding.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root

from configs import spry_rt_minilm  # noqa: E402

DATA_FILE, MODEL_DIR, WHEEL_DIR = "rt_minilm.npz", "minilm", "wheels"
SMOKE_CLIENTS, SMOKE_COHORT = 8, 2


def config(method: str, bundle: str, *, smoke: bool = False) -> ml_collections.ConfigDict:
    """spry_rt_minilm's config of `method` with its data and model read from the bundle folder `bundle`."""
    config = spry_rt_minilm.get_config(method)
    config.data = ml_collections.ConfigDict({"name": "arrays", "path": os.path.join(bundle, DATA_FILE)})
    config.model.path = os.path.join(bundle, MODEL_DIR)
    if smoke:
        config.fl.num_clients, config.fl.clients_per_round = SMOKE_CLIENTS, SMOKE_COHORT
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    method, bundle, *options = arg.split(",")
    return config(method, bundle, smoke="smoke" in options)

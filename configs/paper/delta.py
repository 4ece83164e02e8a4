"""The hierarchical delta-attention paper's comparison (arXiv 2011.10916): the delta-attention model against MulT
(Tsai et al., ACL 2019), late fusion and the no-delta ablation on CMU-MOSEI, CMU-MOSI and IEMOCAP, read from
MulT's aligned feature pickles (docs/paper_configs.md says which setting is the paper's or ours).

Run one cell:   python -m spryjax.main --config=configs/paper/delta.py:TASK[,MODEL] --config.data.path=FILE.pkl
The table:      python -m spryjax.launch --config=configs/paper/delta.py --workdir=runs/paper_delta [--dry-run]
                (get_sweep: TASKS × MODELS, each task reading its pickle from data/; `:TASK` narrows it to one
                task's models, which may read another file: --config.data.path=FILE.pkl)
TASK:   mosei (6 emotions, the label the argmax of their intensities: the paper's), mosi (sentiment, Acc-2),
        iemocap (4 emotions, the argmax of "present")
MODEL:  delta_attention (the default), mult, late_fusion, delta_no_delta
Data:   MulT's aligned pickles (text GloVe-300, audio COVAREP-74, vision FACET-35 for MOSEI / 47 for MOSI and
        IEMOCAP, 50 steps): mosei_senti_data.pkl, mosi_data.pkl, iemocap_data.pkl, read from data/ by default.
        MulT's MOSEI release holds sentiment only; the emotion labels need CMU-MOSEI's six intensities per
        example (a label of 6 or 7 values).
Settings (ours where the paper is silent): centralized training as in the paper, Adam lr 1e-3, 20 epochs, batch
32, MulT's splits (train / test); delta-attention with width 64, 4 heads, differences at scales 1 and 2, dropout
0.1; MulT at its published size (width 30, 5 heads, 5 crossmodal layers).
Expect: not run here (no data offline); the paper reports accuracy close to MulT's with about half its
parameters.
"""
from typing import NamedTuple

import ml_collections

from configs.paper import parse_cell, table_cells

from spryjax.launch.sweep import product


class Task(NamedTuple):
    file: str            # MulT's pickle
    label_mode: str


TASKS = {"mosei": Task("mosei_senti_data.pkl", "emotion"), "mosi": Task("mosi_data.pkl", "binary"),
         "iemocap": Task("iemocap_data.pkl", "emotion")}
_DELTA = {"features": 64, "num_heads": 4, "scales": (1, 2), "dropout": 0.1}
MODELS = {"delta_attention": _DELTA, "delta_no_delta": {k: v for k, v in _DELTA.items() if k != "scales"},
          "mult": {}, "late_fusion": {"features": 64, "num_heads": 4, "dropout": 0.1}}


def _parse(arg: str) -> tuple[str, str]:
    """"TASK,MODEL" (or "TASK": delta-attention) -> (task, model)."""
    return parse_cell(arg, TASKS, MODELS, "delta_attention", "MODEL")


def get_config(arg: str = "mosei,delta_attention") -> ml_collections.ConfigDict:
    task_name, model = _parse(arg)
    task = TASKS[task_name]
    config = ml_collections.ConfigDict()
    config.experiment = "central"
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": task_name, "path": f"data/{task.file}",
                                             "label_mode": task.label_mode, "eval_split": "test"})
    config.model = ml_collections.ConfigDict({"name": model, **MODELS[model]})
    config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
    config.train = ml_collections.ConfigDict({"epochs": 20, "batch_size": 32})
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """The table: TASKS × MODELS; `arg` "TASK" or "TASK,MODEL" narrows it."""
    return product(config_arg=[f"{task},{model}" for task, model in table_cells(arg, TASKS, MODELS, "MODEL")])

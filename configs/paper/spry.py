"""The Spry paper's main table ("Thinking Forward", Panchal et al., NeurIPS 2024, arXiv 2405.15551): every task ×
model × method at the paper's settings, the baselines at their released ones (docs/paper_configs.md has the
table and says which setting is the paper's, the release's or ours).

Run one cell:   python -m spryjax.main --config=configs/paper/spry.py:TASK[,METHOD] [--config.fl.alpha=0.1]
The table:      python -m spryjax.launch --config=configs/paper/spry.py --workdir=runs/paper [--dry-run]
                (get_sweep: TASKS × METHODS × Dirichlet α ∈ {0.1, 1.0}; `:TASK` or `:TASK,METHOD` narrows it)
TASK:   ag_news, sst2, snli, mnli, yahoo, yelp (RoBERTa-large), multirc (Llama2-7B), squad_v2_opt6.7b,
        squad_v2_opt13b (OPT-6.7B / 13B; F1)
METHOD: spry (the default), fedavg, fedyogi, fedsgd, fedmezo, baffle_plus, fwdllm_plus (configs/spry_rt_minilm.py's
        sections)

Settings: 1,500 rounds (FwdLLM+ 3,000, as released); one local epoch; client AdamW lr 1e-4 with weight decay 0.01
(FedAvg and FedYogi on AG News 1e-3, BAFFLE+ on Yelp 1e-5, as released); FedYogi server (FedAvg: averaging);
LoRA r = 1, α = 1, dropout 0.1 on query/value plus the task head; batch 8 (OPT-13B: 4); sequence 64 (SQuAD v2:
384 in windows of stride 128; MultiRC: 512, ours); Dirichlet α ∈ {0.1, 1.0} label skew with equal-size clients
(SQuAD v2: skewed over the questions' articles, as released), 20% of each client held out; clients per round and
in total as released. Llama2-7B and OPT are 4-bit (int4, round-to-nearest in GPTQ's groups of 128; the paper's
were GPTQ) computing in bf16; RoBERTa-large is fp32. Spry's logs add the released "finetuned" accuracy (5 epochs
on each evaluated client's own chunk) at the last evaluation.
Models and data come from the Hugging Face Hub (FacebookAI/roberta-large, meta-llama/Llama-2-7b-hf,
facebook/opt-6.7b, facebook/opt-13b; the datasets of spryjax/data/text.py); Llama 2 needs an accepted licence.
Expect: not run here (no network, no accelerator); the paper reports Spry within 0.6–6.2 points of backprop and
5.2–13.5 points above the zero-order methods.
"""
from typing import NamedTuple

import ml_collections

from configs import fl_section
from configs.paper import parse_cell, table_cells
from configs.spry_rt_minilm import ADAMW_1E3, METHODS, RELEASED, RELEASED_ADAMW

from spryjax.launch.sweep import product

ROBERTA, LLAMA, OPT_6_7B, OPT_13B = ("FacebookAI/roberta-large", "meta-llama/Llama-2-7b-hf", "facebook/opt-6.7b",
                                     "facebook/opt-13b")


class Task(NamedTuple):
    data: dict                    # config.data but the tokenizer (the model's)
    model: str                    # the Hub model
    num_clients: int              # clients in total (the released run_job.sh)
    clients_per_round: int
    batch_size: int = 8
    eval_batch_size: int = 64


def _text(task: str, test_split: str) -> dict:
    return {"name": "text", "task": task, "max_length": 64, "test_split": test_split}


_SQUAD = {"name": "squad_v2", "max_length": 384, "stride": 128}
TASKS = {
    "ag_news": Task(_text("ag_news", "test"), ROBERTA, 1000, 100),
    "sst2": Task(_text("sst2", "validation"), ROBERTA, 100, 10),      # GLUE's test split has no labels
    "snli": Task(_text("snli", "test"), ROBERTA, 1000, 10),
    "mnli": Task(_text("mnli", "validation_matched"), ROBERTA, 1000, 10),
    "yahoo": Task(_text("yahoo", "test"), ROBERTA, 1000, 10),
    "yelp": Task(_text("yelp", "test"), ROBERTA, 1000, 10),
    # 512 tokens, ours: the paper gives none for MultiRC (the release's 64 keeps a paragraph's first ~50 words)
    "multirc": Task({"name": "multirc", "max_length": 512}, LLAMA, 100, 10, eval_batch_size=16),
    "squad_v2_opt6.7b": Task(_SQUAD, OPT_6_7B, 500, 10, eval_batch_size=16),
    "squad_v2_opt13b": Task(_SQUAD, OPT_13B, 500, 10, batch_size=4, eval_batch_size=16),
}
TABLE_METHODS = ("spry", "fedavg", "fedyogi", "fedsgd", "fedmezo", "baffle_plus", "fwdllm_plus")
FINETUNE_EPOCHS = 5   # the released "Test Generalized Accuracy": 5 epochs of finetuning on the evaluated client


def model_section(task: Task) -> ml_collections.ConfigDict:
    """LoRA r = 1, α = 1, dropout 0.1 on query/value and the task head; Llama and OPT 4-bit (int4) in bf16."""
    peft = {"method": "lora", "rank": 1, "alpha": 1.0, "dropout": 0.1, "target_modules": ("query", "value"),
            "train_head": True}
    name = "extractive_qa" if task.data["name"] == "squad_v2" else "text_classifier"
    model = {"name": name, "path": task.model, "peft": peft}
    model.update({"dtype": "float32"} if task.model == ROBERTA else {"dtype": "bfloat16", "quantize": "int4"})
    return ml_collections.ConfigDict(model)


def algorithm_section(task_name: str, method: str) -> tuple[str, ml_collections.ConfigDict]:
    """(where the settings come from, config.algorithm): METHODS[method] at the task's batch sizes, with the
    released per-task learning rates."""
    settings_from, section = METHODS[method]
    task = TASKS[task_name]
    section = {**section, "batch_size": task.batch_size, "eval_batch_size": task.eval_batch_size}
    if method == "spry":
        section["finetune_epochs"] = FINETUNE_EPOCHS
    if task_name == "ag_news" and method in ("fedavg", "fedyogi"):
        section["client_optimizer"] = ADAMW_1E3
    if task_name == "yelp" and method == "baffle_plus":
        section["client_optimizer"] = {**RELEASED_ADAMW, "learning_rate": 1e-5}
    return settings_from, ml_collections.ConfigDict(section)


def _parse(arg: str) -> tuple[str, str]:
    """"TASK,METHOD" (or "TASK": Spry) -> (task, method)."""
    return parse_cell(arg, TASKS, TABLE_METHODS, "spry")


def get_config(arg: str = "sst2,spry") -> ml_collections.ConfigDict:
    task_name, method = _parse(arg)
    task = TASKS[task_name]
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.method = method
    settings_from, config.algorithm = algorithm_section(task_name, method)
    config.settings_from = f"paper (task, model, data, LoRA, rounds); {settings_from} ({method})" + (
        "" if settings_from == RELEASED else "; see configs/spry_rt_minilm.py")
    config.seed = 0
    config.num_rounds = 3000 if method == "fwdllm_plus" else 1500
    config.data = ml_collections.ConfigDict({**task.data, "tokenizer": task.model})
    config.model = model_section(task)
    # Evaluation (ours; the release evaluates 10 sampled clients): 10 clients every 50 rounds for the curve, every
    # client at the last round.
    config.fl = fl_section(num_clients=task.num_clients, clients_per_round=task.clients_per_round, alpha=1.0,
                           eval_every=50, interim_eval_clients=10, checkpoint_every=50)
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """The table: TASKS × TABLE_METHODS × α ∈ {0.1, 1.0}, one seed; `arg` "TASK" or "TASK,METHOD" narrows it."""
    cells = [f"{task},{method}" for task, method in table_cells(arg, TASKS, TABLE_METHODS)]
    return product(config_arg=cells, **{"fl.alpha": [0.1, 1.0]})

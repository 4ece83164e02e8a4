"""Config files, one `get_config()` each; the sections several of them share live here.

A section's `name` picks a builder from a table of spryjax/build.py and its other fields are that builder's keyword
options (see docs/design.md, "Configs"); options a config leaves out take the defaults in the builder's signature.
"""
import ml_collections
from ml_collections import config_dict


def own_file_fields() -> dict:
    """The text section's fields for your own file (`data.name=text_classification`, spryjax/data/
    text_classification.py), unset (None) until given: path, text_column, text_pair_column, label_column,
    client_column. With `data.name=text` they stay unset."""
    unset = lambda: config_dict.placeholder(str)   # one each: fields sharing a placeholder would be linked
    return {field: unset() for field in ("path", "text_column", "text_pair_column", "label_column", "client_column")}


def rt_minilm_sections() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(data, model) of the offline real text task: Rotten Tomatoes snippets tokenized for MiniLM-L6 (≤ 64
    tokens; Rotten Tomatoes holds out 20% of the movies by default), LoRA r=1 (α=1, dropout 0.1: the released
    code's) on query/value plus a linear head on mean-pooled features, an fp32 base (`quantize`: int8, int4 or nf4
    for a quantized one). The data section also holds the fields of your own file (`own_file_fields`), so
    `--config.data.name=text_classification --config.data.path=...` reads one."""
    data = ml_collections.ConfigDict({
        "name": "text", "task": "rotten_tomatoes", "tokenizer": "minilm", "max_length": 64, **own_file_fields()})
    model = ml_collections.ConfigDict({
        "name": "text_classifier", "path": "minilm", "dtype": "float32", "head": "mean",
        "quantize": config_dict.placeholder(str), "quantize_embeddings": False,
        "peft": {"method": "lora", "rank": 1, "alpha": 1.0, "dropout": 0.1, "target_modules": ("query", "value"),
                 "train_head": True}})
    return data, model


def fl_section(**overrides) -> ml_collections.ConfigDict:
    """config.fl of a federated run: how examples become clients, and how rounds are run and evaluated.

    Defaults: 100 Dirichlet(α=1) clients with equal example counts, 20% of each client's examples held out, 10
    clients per round, the engine's `auto` strategy, evaluation and checkpoints every 10 rounds. Every field is
    present, so each can be overridden from the command line (`--config.fl.alpha=0.1`); fields that may be unset
    are typed placeholders (None: the library's meaning of "not given", e.g. all clients for eval_clients).
    """
    unset = lambda: config_dict.placeholder(int)   # one each: fields sharing a placeholder would be linked
    fl = ml_collections.ConfigDict({
        "partition": "dirichlet", "num_clients": 100, "alpha": 1.0, "examples_per_client": unset(),
        "equal_size": True, "min_examples": 2, "max_examples_per_client": unset(), "test_fraction": 0.2,
        "clients_per_round": 10, "strategy": "auto", "client_chunk_size": unset(), "eval_every": 10,
        "eval_clients": unset(), "interim_eval_clients": unset(), "full_eval_every": unset(),
        "checkpoint_every": 10})
    fl.update(overrides)
    return fl

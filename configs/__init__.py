"""Config files, one `get_config()` each; the sections several of them share live here."""
import ml_collections


def rt_minilm_sections() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(data, model) of the offline real text task: Rotten Tomatoes snippets tokenized for MiniLM-L6 (≤ 64
    tokens, 20% held out), LoRA r=1 (α=1) on query/value plus a linear head on mean-pooled features, fp32."""
    data = ml_collections.ConfigDict({
        "name": "text", "task": "rotten_tomatoes", "tokenizer": "minilm", "max_length": 64, "test_fraction": 0.2})
    model = ml_collections.ConfigDict({
        "name": "text_classifier", "path": "minilm", "dtype": "float32", "head": "mean",
        "peft": {"method": "lora", "rank": 1, "alpha": 1.0, "dropout": 0.0, "target_modules": ("query", "value"),
                 "train_head": True}})
    return data, model

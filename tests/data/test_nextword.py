"""spryjax.data.nextword: TFF's token layout, the offline Rotten Tomatoes next-word task, LEAF Reddit files, and
one-line errors."""
import json
import pickle

import numpy as np
import pytest

from spryjax.data import nextword, partition
from spryjax.data.rotten_tomatoes import load_rotten_tomatoes
from spryjax.errors import InputError


def test_words_keep_apostrophes_and_hyphens_inside_words():
    assert nextword.words("It's a WELL-made film!") == ["it's", "a", "well-made", "film", "!"]


def test_encode_shifts_by_one_with_specials():
    vocab = {"a": 1, "b": 2}                    # V = 3: oov 4, bos 5, eos 6
    out = nextword.encode([["a", "zzz", "b"], ["b"] * 9], vocab, vocab_size=3, seq_len=5)
    np.testing.assert_array_equal(out["x"], [[5, 1, 4, 2, 6], [5, 2, 2, 2, 2]])
    np.testing.assert_array_equal(out["label"], [[1, 4, 2, 6, 0], [2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(out["length"], [5, 5])
    short = nextword.encode([["a"]], vocab, vocab_size=3, seq_len=5)
    np.testing.assert_array_equal(short["x"], [[5, 1, 6, 0, 0]])
    np.testing.assert_array_equal(short["label"], [[1, 6, 0, 0, 0]])
    assert short["length"].tolist() == [3]


def test_build_vocab_ranks_by_count_then_alphabet():
    assert nextword.build_vocab([["b", "a", "c", "a"], ["b", "d"]], 3) == {"a": 1, "b": 2, "c": 3}


def test_rt_nextword_splits_each_movie_and_builds_the_vocab_from_train_only():
    data = nextword.rt_nextword(vocab_size=300, seq_len=12)
    rt = load_rotten_tomatoes()
    assert data.num_classes == 304 and data.sequence_keys == ("x", "label")
    assert len(data.train["x"]) + len(data.test["x"]) == len(rt.text)
    assert np.unique(data.train["client"]).size == np.unique(data.test["client"]).size == np.unique(rt.client).size
    # independent rebuild of the recipe: movie parts, per-movie split, vocabulary from the training snippets
    parts, _ = partition.natural(rt.client)
    train_idx, _ = partition.train_test_split(parts, 0.2, seed=0)
    first = train_idx[0]
    vocab = nextword.build_vocab((nextword.words(rt.text[i]) for p in train_idx for i in p), 300)
    expected = nextword.encode([nextword.words(rt.text[i]) for i in first], vocab, vocab_size=300, seq_len=12)
    rows = np.flatnonzero(data.train["client"] == 0)
    np.testing.assert_array_equal(data.train["x"][rows], expected["x"])
    np.testing.assert_array_equal(data.train["label"][:, :-1], data.train["x"][:, 1:])
    assert np.all(data.train["x"][:, 0] == 302)                        # every sentence starts with BOS
    assert data.train["length"].max() == 12


def leaf_reddit(folder):
    (folder / "vocab").mkdir(parents=True)
    (folder / "train").mkdir()
    (folder / "test").mkdir()
    vocab = {"vocab": {"<PAD>": 0, "<UNK>": 1, "<BOS>": 2, "<EOS>": 3, "hi": 4, "there": 5}, "size": 6,
             "unk_symbol": 1, "pad_symbol": 0}
    with open(folder / "vocab" / "reddit_vocab.pck", "wb") as f:
        pickle.dump(vocab, f)
    seq = lambda *tokens: list(tokens) + ["<PAD>"] * (4 - len(tokens))
    user = lambda x, y: {"x": [x], "y": [{"target_tokens": y, "count_tokens": [[1] * 4] * len(y)}]}
    train = {"users": ["u1", "u2"], "num_samples": [1, 1], "user_data": {
        "u1": user([seq("<BOS>", "hi", "there")], [seq("hi", "there", "<EOS>")]),
        "u2": user([seq("<BOS>", "yo"), seq("<BOS>", "hi")], [seq("yo", "<EOS>"), seq("hi", "<EOS>")])}}
    test = {"users": ["u2"], "num_samples": [1], "user_data": {
        "u2": user([seq("<BOS>", "there")], [seq("there", "<EOS>")])}}
    (folder / "train" / "data.json").write_text(json.dumps(train))
    (folder / "test" / "data.json").write_text(json.dumps(test))


def test_reddit_reads_leaf_json(tmp_path):
    leaf_reddit(tmp_path)
    data = nextword.load_reddit(path=tmp_path)
    assert data.num_classes == 6
    np.testing.assert_array_equal(data.train["x"], [[2, 4, 5, 0], [2, 1, 0, 0], [2, 4, 0, 0]])
    np.testing.assert_array_equal(data.train["label"], [[4, 5, 3, 0], [1, 3, 0, 0], [4, 3, 0, 0]])
    np.testing.assert_array_equal(data.train["client"], [0, 1, 1])
    np.testing.assert_array_equal(data.test["client"], [1])
    np.testing.assert_array_equal(data.train["length"], [3, 2, 2])


def test_stackoverflow_reads_tff_files(tmp_path):
    """Users in sorted order, the first `max_sentences_per_client` sentences each, the word_count vocabulary."""
    import h5py
    sentences = {"u2": [b"hello world", b"hello there"], "u1": [b"world"]}
    for split, users in (("train", sentences), ("test", {"u2": [b"there world"]})):
        with h5py.File(tmp_path / f"stackoverflow_{split}.h5", "w") as f:
            for user, lines in users.items():
                f.create_dataset(f"examples/{user}/tokens", data=lines)
    (tmp_path / "stackoverflow.word_count").write_text("hello 9\nworld 5\nthere 1\n")
    data = nextword.load_stackoverflow(path=tmp_path, vocab_size=2, seq_len=4, max_sentences_per_client=1)
    assert data.train["client"].tolist() == [0, 1] and data.test["client"].tolist() == [1]
    vocab = {"hello": 1, "world": 2}   # ids after the padding id 0; "there" is out of the 2-word vocabulary
    expected = nextword.encode([["world"], ["hello", "world"]], vocab, vocab_size=2, seq_len=4)
    np.testing.assert_array_equal(data.train["x"], expected["x"])


def test_loaders_fail_with_one_line_errors(tmp_path):
    cases = [
        (lambda: nextword.load_stackoverflow(path=tmp_path), "stackoverflow_train.h5"),
        (lambda: nextword.load_stackoverflow(cache_dir=tmp_path, download=False), "download=False"),
        (lambda: nextword.load_reddit(path=tmp_path), "reddit_vocab.pck"),
        (lambda: nextword.rt_nextword(path=tmp_path / "missing.csv"), "missing.csv"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message) as error:
            call()
        assert "\n" not in str(error.value)

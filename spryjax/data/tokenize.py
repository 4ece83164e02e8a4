"""Fixed-length tokenization of text columns to numpy arrays, and the `Dataset` record a classification task's
tokenized columns make. The tokenizer and the sequence length belong to the model; the loaders
(`spryjax.data.text`, `spryjax.data.rotten_tomatoes`) return plain columns.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from spryjax.data.dataset import Dataset
from spryjax.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Columns = dict[str, np.ndarray]


class Tokens(NamedTuple):
    """Token ids padded on the right to a fixed length; `length` lets a trainer trim a batch to its longest row."""
    input_ids: np.ndarray               # (n, max_length) int32, pad_token_id after `length`
    attention_mask: np.ndarray          # (n, max_length) int32, 1 on the first `length` positions
    token_type_ids: np.ndarray | None   # (n, max_length) int32 segment ids (BERT family), None if not produced
    length: np.ndarray                  # (n,) int32 tokens kept, ≤ max_length
    full_length: np.ndarray             # (n,) int32 tokens before truncation

    @property
    def truncated_fraction(self) -> float:
        """The fraction of examples that lost tokens to truncation."""
        return float(np.mean(self.full_length > self.length))

    @property
    def sequence_keys(self) -> tuple[str, ...]:
        """The arrays with a sequence axis (to trim alongside `length`)."""
        return ("input_ids", "attention_mask") + (("token_type_ids",) if self.token_type_ids is not None else ())

    def arrays(self) -> Columns:
        """The model inputs plus "length", as `Dataset` stores them."""
        return {key: getattr(self, key) for key in (*self.sequence_keys, "length")}


def tokenize(texts: Sequence[str] | np.ndarray, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
             text_pairs: Sequence[str] | np.ndarray | None = None) -> Tokens:
    """Tokenizes to fixed-length numpy arrays: special tokens added, truncated to `max_length`, right-padded.

    The tokenizer's own settings are overridden explicitly (MiniLM's tokenizer.json pads and truncates to 128).
    Sentence pairs (`text_pairs`, SNLI / MNLI) are truncated longest-first, the tokenizer's default. Each example
    is tokenized once in full (giving `full_length`); only the ones longer than `max_length` are tokenized again
    with truncation, so the special tokens end where the tokenizer puts them.
    Padding uses pad_token_id, or 0 for tokenizers without a pad token (Llama): the attention mask hides it.

    Args:
      texts: (n,) strings; text_pairs: (n,) second segments or None.
    Returns:
      `Tokens` with (n, max_length) int32 arrays and (n,) lengths.

    Example:
      >>> tokens = tokenize(["a fine film"], tokenizer, 8)
      >>> tokens.input_ids          # [[101, 1037, 2986, 2143, 102, 0, 0, 0]] for MiniLM
    """
    texts = _string_list(texts)
    pairs = None if text_pairs is None else _string_list(text_pairs)
    if not texts:
        raise InputError("tokenize: no texts")
    if pairs is not None and len(pairs) != len(texts):
        raise InputError(f"tokenize: {len(texts)} texts but {len(pairs)} text pairs")
    # verbose=False: sequences past the model's maximum are expected here (they are truncated next), not a warning.
    encoded = dict(tokenizer(texts, pairs, truncation=False, padding=False, verbose=False))
    full_length = np.fromiter(map(len, encoded["input_ids"]), dtype=np.int32, count=len(texts))
    too_long = np.flatnonzero(full_length > max_length)
    if too_long.size:
        cut = tokenizer([texts[i] for i in too_long], None if pairs is None else [pairs[i] for i in too_long],
                        truncation=True, max_length=max_length, padding=False)
        for key, rows in encoded.items():
            for i, row in zip(too_long, cut[key]):
                rows[i] = row
    length = np.fromiter(map(len, encoded["input_ids"]), dtype=np.int32, count=len(texts))
    mask = np.arange(max_length) < length[:, None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(rows: list[list[int]], fill: int) -> np.ndarray:
        out = np.full((len(rows), max_length), fill, dtype=np.int32)
        out[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(length.sum()))
        return out  # boolean-mask assignment fills row-major, so each row's tokens land left-aligned

    return Tokens(input_ids=padded(encoded["input_ids"], pad_id), attention_mask=mask.astype(np.int32),
                  token_type_ids=(padded(encoded["token_type_ids"], tokenizer.pad_token_type_id)
                                  if "token_type_ids" in encoded else None),
                  length=length, full_length=full_length)


def tokenized_dataset(name: str, train: Columns, test: Columns, tokenizer: PreTrainedTokenizerBase, *,
                      max_length: int, num_classes: int, text_fields: tuple[str, ...] = ("text",)) -> Dataset:
    """A classification task's columns → the `Dataset` record: tokens of `text_fields` (one field, or two for a
    pair), "length", "label", and "client" where the columns have natural clients.

    Example:
      >>> data = tokenized_dataset("rotten_tomatoes", load_rotten_tomatoes_split("train"),
      ...                          load_rotten_tomatoes_split("test"), tokenizer, max_length=64, num_classes=2)
    """
    if not 1 <= len(text_fields) <= 2:
        raise InputError(f"{name}: text_fields must name one text or a pair, got {text_fields}")

    def encode(columns: Columns) -> tuple[Columns, tuple[str, ...]]:
        tokens = tokenize(columns[text_fields[0]], tokenizer, max_length,
                          text_pairs=columns[text_fields[1]] if len(text_fields) == 2 else None)
        kept = {key: columns[key] for key in ("label", "client") if key in columns}
        return {**tokens.arrays(), **kept}, tokens.sequence_keys

    (train_arrays, sequence_keys), (test_arrays, _) = encode(train), encode(test)
    return Dataset(name, train_arrays, test_arrays, num_classes, sequence_keys)


def _string_list(values: Sequence[str] | np.ndarray) -> list[str]:
    # The fast tokenizers take only lists of str, not numpy arrays of objects.
    return values.tolist() if isinstance(values, np.ndarray) else list(values)

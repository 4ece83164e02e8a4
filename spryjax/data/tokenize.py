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


class Windows(NamedTuple):
    """(question, context) pairs cut into overlapping windows of at most `max_length` tokens (`tokenize_windows`):
    the question whole in every window, the context split with `stride` tokens shared by consecutive windows."""
    tokens: Tokens                # (w, max_length) token arrays of the windows
    example: np.ndarray           # (w,) int32: the pair each window comes from
    context_first: np.ndarray     # (w,) int32: the input position of the window's first context token
    context_last: np.ndarray      # (w,) int32: ... and of its last (the context tokens are contiguous)
    offsets: np.ndarray           # (t, 2) int32: character offsets into the context of every window's context
                                  # tokens, window after window (window k's: context_offsets(k))
    offsets_start: np.ndarray     # (w + 1,) int64: window k's rows of `offsets` are offsets_start[k:k+2]

    def context_offsets(self, k: int) -> np.ndarray:
        """(n_k, 2) character [start, end) of window k's context tokens, in input order."""
        return self.offsets[self.offsets_start[k]:self.offsets_start[k + 1]]

    def span_characters(self, k: int, start: int, end: int) -> tuple[int, int]:
        """The character range [a, b) in the context of window k's input positions start..end (context tokens)."""
        offsets = self.context_offsets(k)
        first = int(self.context_first[k])
        return int(offsets[start - first, 0]), int(offsets[end - first, 1])


def tokenize_windows(questions: Sequence[str] | np.ndarray, contexts: Sequence[str] | np.ndarray,
                     tokenizer: PreTrainedTokenizerBase, max_length: int, *, stride: int = 128,
                     max_question_tokens: int | None = None) -> Windows:
    """(question, context) pairs as windows of at most `max_length` tokens, as Hugging Face's run_qa prepares
    SQuAD: the question first and whole (truncated to `max_question_tokens`, default max_length // 2, so a
    context token always fits), the context cut into windows that share `stride` tokens with the previous one.
    Questions lose their leading whitespace (some SQuAD questions start with a lot of it). Needs a fast tokenizer
    (character offsets).

    Example:
      >>> windows = tokenize_windows(["Where is Paris?"], [long_context], tokenizer, 384, stride=128)
      >>> windows.example          # [0, 0, 0]: one pair, three windows
    """
    if not tokenizer.is_fast:
        raise InputError(f"tokenize_windows: {type(tokenizer).__name__} is not a fast tokenizer; windows need "
                         "character offsets")
    limit = max_question_tokens or max_length // 2
    room = max_length - limit - tokenizer.num_special_tokens_to_add(pair=True)   # context tokens per window, at least
    if not 0 <= stride < room:
        raise InputError(f"tokenize_windows: stride={stride} must be in [0, {room}): windows of {max_length} tokens "
                         f"with questions of up to {limit} tokens hold at least {room} context tokens")
    questions = [q.lstrip() for q in _string_list(questions)]
    contexts = _string_list(contexts)
    cut = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    questions = [q if len(spans) <= limit else q[:spans[limit - 1][1]] for q, spans in zip(questions, cut)]
    encoded = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False, verbose=False)
    rows = encoded["input_ids"]
    length = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    first, last, offsets = [], [], []
    for k in range(len(rows)):
        context = [i for i, segment in enumerate(encoded.sequence_ids(k)) if segment == 1]
        first.append(context[0])
        last.append(context[-1])
        offsets.append(np.asarray(encoded["offset_mapping"][k][context[0]:context[-1] + 1], np.int32))
    mask = np.arange(max_length) < length[:, None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(values: list[list[int]], fill: int) -> np.ndarray:
        out = np.full((len(values), max_length), fill, dtype=np.int32)
        out[mask] = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32, count=int(length.sum()))
        return out

    tokens = Tokens(input_ids=padded(rows, pad_id), attention_mask=mask.astype(np.int32),
                    token_type_ids=(padded(encoded["token_type_ids"], tokenizer.pad_token_type_id)
                                    if "token_type_ids" in encoded else None),
                    length=length, full_length=length)
    sizes = [len(o) for o in offsets]
    return Windows(tokens, np.asarray(encoded["overflow_to_sample_mapping"], np.int32),
                   np.asarray(first, np.int32), np.asarray(last, np.int32), np.concatenate(offsets),
                   np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def answer_positions(windows: Windows, answer_start: np.ndarray, answer_end: np.ndarray, *, no_answer: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The input positions (start, end) of each window's answer, as Hugging Face's run_qa labels SQuAD: the last
    context token starting at or before the answer's first character and the first one ending at or after its
    end; (`no_answer`, `no_answer`) where the pair has no answer (answer_start < 0) or the window does not hold
    all of it.

    Args:
      answer_start, answer_end: (pairs,) the answer's character range [start, end) in the context, −1 for none.
    Returns:
      (start_position, end_position), (w,) int32 each.
    """
    start_position = np.full(len(windows.example), no_answer, np.int32)
    end_position = np.full(len(windows.example), no_answer, np.int32)
    for k, pair in enumerate(windows.example):
        a, b = int(answer_start[pair]), int(answer_end[pair])
        offsets = windows.context_offsets(k)
        if a < 0 or not (offsets[0, 0] <= a and offsets[-1, 1] >= b):
            continue
        start_position[k] = windows.context_first[k] + np.searchsorted(offsets[:, 0], a, side="right") - 1
        end_position[k] = windows.context_first[k] + np.searchsorted(offsets[:, 1], b, side="left")
    return start_position, end_position


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

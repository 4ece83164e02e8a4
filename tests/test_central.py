"""The centralized trainer (`spryjax.central`) and the command line's answers to bad input."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spryjax import central
from spryjax.errors import InputError
from spryjax.task import classification_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_length_bucketed_batches_cover_distinct_examples_of_similar_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=1003)
    batches = central.length_bucketed_batches(lengths, 32, 16, np.random.default_rng(1))
    assert batches.shape == (1003 // 32, 32)
    assert len(np.unique(batches)) == batches.size  # each example at most once
    buckets = -(-lengths[batches] // 16)
    straddling = np.sum(buckets.min(1) != buckets.max(1))
    assert straddling <= len(np.unique(-(-lengths // 16))) - 1  # only at the boundaries between buckets
    # The batches are shuffled: their bucket order is not the sorted one.
    assert np.any(np.diff(buckets.max(1)) < 0)
    # Trimmed to their longest row, they carry far fewer tokens than random batches of the same examples.
    trimmed = lambda b: np.sum(-(-lengths[b].max(1) // 16) * 16) * 32
    assert trimmed(batches) < 0.75 * trimmed(rng.permutation(batches.ravel()).reshape(batches.shape))


def test_full_batch_training_equals_gradient_descent_loop():
    """One batch per epoch and plain SGD: `train` must take exactly the steps of a hand-written loop."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    task = classification_task(lambda p, f, b, k: b["x"] @ p["w"] + p["b"], 2)
    params = {"w": jnp.zeros((5, 2)), "b": jnp.zeros(2)}
    trained, history = central.train(task, params, {}, {"x": x, "label": y}, {"x": x, "label": y},
                                     optimizer=optax.sgd(0.5), epochs=4, batch_size=64, key=jax.random.key(0))
    expected = params
    for _ in range(4):
        grads = jax.grad(lambda p: task.loss(p, {}, {"x": x, "label": y, "mask": np.ones(64, np.float32)}))(expected)
        expected = jax.tree.map(lambda p, g: p - 0.5 * g, expected, grads)
    for got, want in zip(jax.tree.leaves(trained), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    accuracy = np.mean(np.argmax(x @ np.asarray(expected["w"]) + np.asarray(expected["b"]), 1) == y)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["test_accuracy"] == pytest.approx(accuracy)


def test_evaluations_inside_epochs_leave_training_unchanged():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(70, 5)).astype(np.float32)
    arrays = {"x": x, "label": (x[:, 0] > 0).astype(np.int32)}
    task = classification_task(lambda p, f, b, k: b["x"] @ p["w"], 2)
    kwargs = dict(optimizer=optax.adam(0.1), epochs=2, batch_size=16, key=jax.random.key(3))
    plain, plain_history = central.train(task, {"w": jnp.zeros((5, 2))}, {}, arrays, arrays, **kwargs)
    often, often_history = central.train(task, {"w": jnp.zeros((5, 2))}, {}, arrays, arrays, eval_every_steps=3,
                                         **kwargs)
    np.testing.assert_array_equal(plain["w"], often["w"])
    # 4 steps per epoch: evaluations after steps 3, 4 (epoch end), 6, 8 (epoch end); epoch ends as without.
    assert [r["step"] for r in often_history] == [3, 4, 6, 8]
    assert [r["epoch"] for r in often_history] == [0.75, 1, 1.5, 2]
    for mine, reference in zip(often_history[1::2], plain_history):
        assert {k: v for k, v in mine.items() if k != "wall_time"} == {
            k: v for k, v in reference.items() if k != "wall_time"}
    with pytest.raises(InputError, match="batch_size=128 exceeds the 70 training examples"):
        central.train(task, {"w": jnp.zeros((5, 2))}, {}, arrays, arrays, **{**kwargs, "batch_size": 128})


def test_length_sorted_trimmed_evaluation_equals_the_padded_one():
    """Visiting examples shortest first and trimming padding must not change any sum (checked against numpy)."""
    rng = np.random.default_rng(0)
    n, seq = 203, 64
    lengths = rng.integers(1, seq + 1, size=n)
    arrays = {"input_ids": rng.integers(0, 7, size=(n, seq)).astype(np.int32),
              "attention_mask": (np.arange(seq)[None] < lengths[:, None]).astype(np.int32),
              "label": rng.integers(0, 3, size=n).astype(np.int32)}
    table = rng.normal(size=(7, 3)).astype(np.float32)

    def logits_fn(p, f, b, k):  # mean of per-token logits over the real tokens
        m = b["attention_mask"][..., None]
        return jnp.sum(p["table"][b["input_ids"]] * m, 1) / jnp.sum(m, 1)

    task = classification_task(logits_fn, 3)
    padded = central.evaluate(task, {"table": table}, {}, arrays, batch_size=32)
    trimmed = central.evaluate(task, {"table": table}, {}, arrays, batch_size=32, lengths=lengths,
                               sequence_keys=("input_ids", "attention_mask"), sequence_bucket=16)
    logits = np.stack([table[arrays["input_ids"][i, :lengths[i]]].mean(0) for i in range(n)])
    assert padded["count"] == trimmed["count"] == n
    assert padded["accuracy"] == trimmed["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == arrays["label"]))
    assert trimmed["loss"] == pytest.approx(padded["loss"], rel=1e-5)


def spryjax_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spryjax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.mark.parametrize("override, message", [
    ("--config.model.path=minilmx", "'minilmx' is not a local model folder"),
    ("--config.data.task=sst2", "SST2: no network and no local copy"),
    ("--config.train.epoch=3", "--config.train.epoch: the config has no field 'epoch'"),
])
def test_bad_input_gives_one_line_and_exit_code_2(override, message, tmp_path):
    result = spryjax_cli("--config=configs/central_rt_minilm.py", override, f"--workdir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spryjax: error: ") and message in lines[0], result.stderr

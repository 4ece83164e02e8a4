"""Cutting each local minibatch to its own longest row (`MinibatchTrim`) changes no result: on the packaged
MiniLM with LoRA and dropout off, one client's local training with trimmed minibatches equals the padded one
(forward gradients with a Spry-style tensor mask, and backprop), and the engine's loop round passes each client
its rows' lengths."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spryjax import fwdgrad, lm_tasks, models, peft
from spryjax.data import rotten_tomatoes, tokenize
from spryjax.data.federated import FederatedData
from spryjax.fl import algorithm
from spryjax.models import hf
from spryjax.task import classification_task


@pytest.fixture(scope="module")
def client():
    """12 Rotten Tomatoes snippets of mixed lengths (one client, padded to 16 rows of 64 tokens) and MiniLM."""
    tokenizer = hf.load_tokenizer(hf.packaged_model())
    columns = rotten_tomatoes.load_rotten_tomatoes_split("all")
    order = np.argsort([len(t) for t in columns["text"]])
    pick = order[np.linspace(0, len(order) - 1, 12).astype(int)]        # short to long
    tokens = tokenize.tokenize(columns["text"][pick], tokenizer, 64)
    arrays = {**{k: v for k, v in tokens.arrays().items() if k != "length"}, "label": columns["label"][pick]}
    data = FederatedData.from_partition(arrays, [np.arange(12)], lengths=tokens.length,
                                        sequence_keys=tokens.sequence_keys)
    model = lm_tasks.with_base_dropout(hf.packaged_model(), 0.0)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(model, 2, peft.PeftConfig(dropout=0.0),
                                                             jax.random.key(0), head="mean")
    task = classification_task(logits_fn, 2)
    batch, counts = data.gather([0], batch_size=4, sequence_bucket=64)   # padded to 64 tokens: no cohort trim
    lengths = data.gather_lengths([0], batch_size=4)
    one = {k: v[0] for k, v in batch.items()}
    return task, trainable, frozen, one, counts[0], lengths[0], data.sequence_keys


@pytest.mark.parametrize("gradient", ["forward", "backprop"])
def test_trimmed_minibatches_equal_padded(client, gradient):
    task, trainable, frozen, data, count, lengths, keys = client
    leaves, structure = jax.tree.flatten(trainable)
    mask = jax.tree.unflatten(structure, [jnp.bool_(i % 3 == 0) for i in range(len(leaves))])
    # SGD: an update linear in the gradient (Adam's normalization would magnify float noise on the zero-gradient
    # LoRA A tensors, whose B starts at 0)
    options = dict(optimizer=optax.sgd(0.1), batch_size=4, epochs=1, update_mask=mask,
                   gradient_fn=functools.partial(fwdgrad.forward_grad, num_tangents=2) if gradient == "forward"
                   else algorithm.backprop)
    train = functools.partial(algorithm.dispatched_local_training, task, trainable, frozen, data, count,
                              jax.random.key(3), **options)
    padded, padded_metrics = train()
    trimmed, trimmed_metrics = train(trim=algorithm.MinibatchTrim(lengths, keys, multiple=8))
    delta = lambda tree: jnp.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(tree), leaves)])
    relative = jnp.linalg.norm(delta(trimmed) - delta(padded)) / jnp.linalg.norm(delta(padded))
    assert float(relative) < 1e-5
    np.testing.assert_allclose(trimmed_metrics["loss"], padded_metrics["loss"], rtol=1e-5)
    assert float(trimmed_metrics["steps"]) == float(padded_metrics["steps"]) == 3


def test_minibatches_are_cut_to_their_longest_row(client, monkeypatch):
    """The three minibatches of this client (short, middle, long snippets in a shuffled order) reach the jitted
    step with the sequence length of their longest row, rounded up to 8 (a tiny random model: only shapes count)."""
    _, _, _, data, count, lengths, keys = client
    frozen, trainable, logits_fn = lm_tasks.build_classifier(models.preset("tiny"), 2, peft.PeftConfig(dropout=0.0),
                                                             jax.random.key(0), head="mean")
    task = classification_task(logits_fn, 2)
    seen = []
    step = algorithm._dispatched_step
    monkeypatch.setattr(algorithm, "_dispatched_step",
                        lambda carry, step_data, plan, s, *args, **kw: (
                            seen.append((int(s), step_data[keys[0]].shape[1])),
                            step(carry, step_data, plan, s, *args, **kw))[1])
    algorithm.dispatched_local_training(task, trainable, frozen, data, count, jax.random.key(3),
                                        optimizer=optax.sgd(0.1), batch_size=4,
                                        trim=algorithm.MinibatchTrim(lengths, keys, multiple=8))
    index = np.asarray(algorithm.local_steps(jax.random.key(3), count, 16, 4)[0])
    expected = [(s, -(-int(lengths[index[s]].max()) // 8) * 8) for s in range(3)]
    assert seen == expected

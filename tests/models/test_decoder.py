"""The pure-JAX Llama and OPT decoders against transformers' PyTorch LlamaForCausalLM / OPTForCausalLM (tiny random
checkpoints made by tests/fixtures/make_fixtures.py, with right and left padding), and jvp through them."""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spryjax import fwdgrad, lm_tasks, models, peft
from spryjax.models import decoder, heads, hf

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOLERANCE = 1e-4
apply = jax.jit(models.apply, static_argnames=("config", "adapter"))
DECODERS = ["tiny_llama", "tiny_opt"]


def _load(name):
    return hf.load_pretrained(FIXTURES / name), dict(np.load(FIXTURES / name / "reference.npz"))


def _check(pre, ref, expected):
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    hidden = apply(pre.params, batch, config=pre.config)
    real = ref["attention_mask"].astype(bool)  # positions that are padding are not compared (torch leaves NaN there)
    np.testing.assert_allclose(np.asarray(hidden)[real], expected["hidden"][real], atol=TOLERANCE, rtol=0)
    logits = decoder.lm_logits(pre.params, hidden, config=pre.config)
    np.testing.assert_allclose(np.asarray(logits)[real], expected["logits"][real], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_torch_fixture(name):
    pre, ref = _load(name)
    _check(pre, ref, ref)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_torch_live(name, make_fixtures):
    pytest.importorskip("torch")
    pre, ref = _load(name)
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    _check(pre, ref, make_fixtures.reference(FIXTURES / name, inputs))


def test_config_from_checkpoints():
    llama, opt = hf.load_config(FIXTURES / "tiny_llama"), hf.load_config(FIXTURES / "tiny_opt")
    assert (llama.arch, llama.num_heads, llama.kv_heads, llama.head_size) == ("llama", 4, 2, 8)
    assert not llama.tie_word_embeddings and opt.tie_word_embeddings
    assert (opt.activation, opt.attention_bias, opt.pad_token_id) == ("relu", True, 1)


@pytest.mark.parametrize("name", DECODERS)
def test_label_word_scores_are_next_token_logits(name):
    """heads.lm_label_logits against torch's full next-token logits at each sequence's last real token."""
    pre, ref = _load(name)
    labels = jnp.array([5, 17, 42])
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    hidden = apply(pre.params, batch, config=pre.config)
    scores = heads.lm_label_logits(decoder.output_embedding(pre.params, pre.config), hidden,
                                   ref["attention_mask"], labels)
    last = ref["attention_mask"].shape[1] - 1 - np.argmax(ref["attention_mask"][:, ::-1], axis=1)  # rows 0,1,2: 9,6,9
    expected = ref["logits"][np.arange(3), last][:, np.asarray(labels)]
    np.testing.assert_allclose(scores, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name,head", [("tiny-llama", "last"),
                                       pytest.param("tiny-opt", "lm_labels", marks=pytest.mark.slow)])
def test_forward_grad_through_decoder_lora(name, head):
    """The directional derivative of forward_grad's estimate equals jax.grad · v (K = 1: ĝ = (∇L·v) v)."""
    config = dataclasses.replace(models.preset(name), num_layers=1)  # one layer: jvp is per layer, compiles cost
    kwargs = {"label_token_ids": [5, 17]} if head == "lm_labels" else {}
    frozen, trainable, logits_fn = lm_tasks.build_classifier(config, 2, peft.PeftConfig(dropout=0.0), jax.random.key(0),
                                                         head=head, **kwargs)
    # LoRA B starts at zero (so ∂L/∂A = 0); move away from it so every leaf has a gradient.
    trainable = jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), trainable)
    _, ref = _load(name.replace("-", "_"))
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"], "label": jnp.array([0, 1, 1])}

    def loss(t, f, b):
        logp = jax.nn.log_softmax(logits_fn(t, f, b))
        return -jnp.mean(logp[jnp.arange(3), b["label"]])

    key = jax.random.key(3)
    grad, (_, estimate) = jax.jit(lambda t, f, b: (jax.grad(loss)(t, f, b),
                                                   fwdgrad.forward_grad(loss, t, key, f, b)))(trainable, frozen, batch)
    v = fwdgrad.sample_tangent(jax.random.fold_in(key, 0), trainable)
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(estimate))
    np.testing.assert_allclose(dot(estimate, v) / dot(v, v), dot(grad, v), rtol=1e-4, atol=1e-6)

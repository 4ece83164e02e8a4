"""PEFT: trainable trees, their layer order and sizes (closed forms), merge without copies, adapter math against
merged-weight computations, and forward gradients through LoRA / IA3 / BitFit of the real MiniLM against jax.grad."""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spryjax import fwdgrad, lm_tasks, models, peft
from spryjax.errors import InputError
from spryjax.models import hf
from spryjax.models.layers import AdapterOptions, dense
from spryjax.pytrees import count_params

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEY = jax.random.key(0)
TINY = dataclasses.replace(models.preset("tiny"), num_layers=1)  # every layer adds seconds of CPU compile time


def _build(model, method="lora", **kwargs):
    return lm_tasks.build_classifier(model, 2, peft.PeftConfig(method=method, **kwargs), KEY, shapes_only=True)


def _paths(tree):
    return [path for path, _ in peft.ordered_leaves(tree)]


# ----------------------------------------------------------------------------------------------------------------
# Structure and counts


def test_ordered_leaves_follow_layer_order_not_jax_order():
    _, trainable, _ = _build(models.preset("minilm-l6"))
    expected = [f"layers/{i}/{m}/{ab}" for i in range(6) for m in ("query", "value") for ab in ("lora_a", "lora_b")]
    assert _paths(trainable) == expected + ["head/out/kernel", "head/out/bias"]
    # jax flattens dicts in sorted-key order (head first, bias before kernel): not the layer order Spry needs.
    jax_order = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert jax_order[0] == "['head']['out']['bias']"
    # A tree rebuilt by jax (as optax returns it) keeps the same order.
    assert _paths(jax.tree.map(lambda x: x, trainable)) == _paths(trainable)
    assert [leaf for _, leaf in peft.ordered_leaves(trainable)][0] is trainable["layers"][0]["query"]["lora_a"]


def test_ordered_leaves_of_a_pre_norm_decoder():
    _, trainable, _ = _build(models.preset("tiny-opt"), "bitfit")
    layer = ["attn_norm", "query", "key", "value", "attn_out", "ffn_norm", "ffn_in", "ffn_out"]
    expected = [f"layers/{i}/{m}/bias" for i in range(2) for m in layer]
    assert _paths(trainable) == expected + ["final_norm/bias", "head/out/kernel", "head/out/bias"]


def test_lora_targets_accept_hugging_face_names():
    _, trainable, _ = _build(models.preset("tiny-llama"), target_modules=("q_proj", "v_proj"), rank=2)
    assert set(trainable["layers"][0]) == {"query", "value"}
    assert trainable["layers"][0]["query"]["lora_a"].shape == (64, 2)
    assert trainable["layers"][0]["value"]["lora_b"].shape == (2, 32)  # 2 kv heads of 16


def test_frozen_tree_keeps_optional_parts_only_when_used():
    config = models.preset("tiny-llama")  # untied: an LM head of its own
    assert "lm_head" not in _build(config)[0]
    frozen, _, _ = lm_tasks.build_classifier(config, 2, peft.PeftConfig(), KEY, head="lm_labels", label_token_ids=[3, 4],
                                         shapes_only=True)
    assert "lm_head" in frozen and "head" not in frozen
    assert "pooler" in _build(models.preset("tiny"))[0]
    assert "pooler" not in lm_tasks.build_classifier(models.preset("tiny"), 2, peft.PeftConfig(), KEY, head="mean",
                                                 shapes_only=True)[0]


def test_param_counts_closed_form():
    config = models.preset("roberta-large")
    d, f, n, v, p = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size, 514
    head = (d * d + d) + (d * 2 + 2)  # RoBERTa head: dense D x D, out D x 2
    frozen, trainable, _ = _build(config, rank=4)
    assert count_params(trainable) == n * 2 * 4 * (d + d) + head
    base = v * d + p * d + d + 2 * d + n * (4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d))
    assert count_params(frozen) == base
    _, trainable, _ = _build(config, "ia3")                 # keys, values [D] and the FFN activation [F]
    assert count_params(trainable) == n * (d + d + f) + head
    frozen, trainable, _ = _build(config, "bitfit")         # every bias: embedding norm, q k v o, 2 norms, 2 FFN
    assert count_params(trainable) == d + n * (4 * d + 2 * d + f + d) + head
    assert count_params(frozen) + count_params(trainable) == base + head  # nothing held twice
    _, trainable, _ = _build(config, "classifier")
    assert count_params(trainable) == head
    frozen, trainable, _ = _build(config, train_head=False)
    assert "head" not in trainable and "head" in frozen
    assert "total" in peft.summary(frozen, trainable)


def test_bad_peft_configs_raise_input_errors():
    with pytest.raises(InputError, match="lorra"):
        peft.PeftConfig(method="lorra")
    with pytest.raises(InputError, match="'qery' is not in the model"):
        _build(models.preset("tiny"), target_modules=("qery",))
    with pytest.raises(InputError, match="trains nothing"):
        peft.PeftConfig(method="classifier", train_head=False)


def test_merge_shares_the_frozen_arrays():
    frozen, trainable, _ = lm_tasks.build_classifier(TINY, 2, peft.PeftConfig(method="bitfit"), KEY)
    merged = peft.merge(frozen, trainable)
    for path in (("layers", 0, "query", "kernel"), ("embeddings", "word"), ("pooler", "kernel")):
        a, b = merged, frozen
        for k in path:
            a, b = a[k], b[k]
        assert a is b
    assert merged["layers"][0]["query"]["bias"] is trainable["layers"][0]["query"]["bias"]
    assert "bias" not in frozen["layers"][0]["query"]  # split moved it, the frozen tree holds no stale copy
    frozen, trainable, _ = lm_tasks.build_classifier(TINY, 2, peft.PeftConfig(), KEY)
    node = peft.merge(frozen, trainable)["layers"][0]["value"]
    assert node["kernel"] is frozen["layers"][0]["value"]["kernel"]
    assert node["lora_b"] is trainable["layers"][0]["value"]["lora_b"]


def test_paths_mask_selects_exactly_the_named_leaves():
    _, trainable, _ = _build(models.preset("tiny"))
    chosen = ["layers/1/query/lora_a", "head/out/bias"]
    mask = peft.paths_mask(trainable, chosen)
    assert [path for path, on in zip(_paths(trainable), (m for _, m in peft.ordered_leaves(mask))) if on] == chosen
    with pytest.raises(ValueError, match="not a leaf path"):
        peft.paths_mask(trainable, ["layers/9/query/lora_a"])


# ----------------------------------------------------------------------------------------------------------------
# Adapter math


def test_dense_adapters_equal_the_merged_weight():
    k = jax.random.split(KEY, 6)
    x, w, b = jax.random.normal(k[0], (3, 5)), jax.random.normal(k[1], (5, 4)), jax.random.normal(k[2], (4,))
    a, bb = jax.random.normal(k[3], (5, 2)), jax.random.normal(k[4], (2, 4))
    s_in, s_out = jax.random.normal(k[5], (5,)), jax.random.normal(k[5], (4,))
    opts = AdapterOptions(lora_scale=0.5, lora_dropout=0.25)
    lora = {"kernel": w, "bias": b, "lora_a": a, "lora_b": bb}
    np.testing.assert_allclose(dense(lora, x, adapter=opts), x @ (w + 0.5 * a @ bb) + b, rtol=1e-5, atol=1e-5)
    keep = jax.random.bernoulli(k[0], 0.75, x.shape)
    np.testing.assert_allclose(dense(lora, x, adapter=opts, key=k[0]),
                               x @ w + b + 0.5 * ((keep * x / 0.75) @ a @ bb), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense({"kernel": w, "bias": b, "ia3_in": s_in}, x), x @ (s_in[:, None] * w) + b,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense({"kernel": w, "bias": b, "ia3_out": s_out}, x), (x @ w + b) * s_out,
                               rtol=1e-5, atol=1e-5)


def test_adapters_start_as_the_identity_and_bf16_bases_give_fp32_logits():
    """LoRA's B = 0 and IA3's scales = 1 at initialisation, so (by the dense test above) the adapted model starts as
    the base model; a bf16 base keeps fp32 adapters and gives fp32 logits close to the fp32 model's."""
    for method, init in (("lora", 0.0), ("ia3", 1.0)):
        _, trainable, _ = lm_tasks.build_classifier(TINY, 3, peft.PeftConfig(method), KEY)
        for path, leaf in peft.ordered_leaves(trainable):
            if path.endswith(("lora_b", "ia3_in", "ia3_out")):
                np.testing.assert_array_equal(leaf, init)
    batch = {"input_ids": jnp.arange(12).reshape(2, 6), "attention_mask": jnp.ones((2, 6), jnp.int32)}
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        frozen, trainable, logits_fn = lm_tasks.build_classifier(TINY, 3, peft.PeftConfig(), KEY, dtype)
        assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(dtype)}
        assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
        logits[dtype] = jax.jit(logits_fn)(trainable, frozen, batch)
        assert logits[dtype].dtype == jnp.float32
    np.testing.assert_allclose(logits[jnp.bfloat16], logits[jnp.float32], atol=0.05)


def test_multiple_choice_and_qa_heads():
    frozen, trainable, choice_fn = lm_tasks.build_multiple_choice(TINY, peft.PeftConfig(), KEY)
    ids = jax.random.randint(KEY, (2, 3, 6), 1, 1000)
    mask = jnp.ones_like(ids).at[:, :, 4:].set(0)
    scores = jax.jit(choice_fn)(trainable, frozen, {"input_ids": ids, "attention_mask": mask})
    _, _, single_fn = lm_tasks.build_classifier(TINY, 1, peft.PeftConfig(), KEY)
    one = jax.jit(single_fn)(trainable, frozen, {"input_ids": ids[1], "attention_mask": mask[1]})
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores[1], one[:, 0], atol=1e-5)
    frozen, trainable, qa_fn = lm_tasks.build_qa(TINY, peft.PeftConfig(), KEY)
    spans = jax.jit(qa_fn)(trainable, frozen, {"input_ids": ids[0], "attention_mask": mask[0]})
    assert spans.shape == (3, 6, 2)
    assert bool((spans[:, 4:] == jnp.finfo(jnp.float32).min).all()) and bool(jnp.isfinite(spans[:, :4]).all())


# ----------------------------------------------------------------------------------------------------------------
# Forward gradients through the real MiniLM


@pytest.fixture(scope="module")
def minilm_first_layer():
    """The real all-MiniLM-L6-v2 weights, embeddings and first layer: jvp works layer by layer, and each layer
    costs seconds of XLA compile time on a 2-core CPU."""
    pre = hf.load_pretrained(hf.packaged_model())
    params = {**pre.params, "layers": pre.params["layers"][:1]}
    return pre._replace(config=dataclasses.replace(pre.config, num_layers=1), params=params)


def _check_forward_grad(logits_fn, trainable, frozen, *, dropout_key=None, with_scalars=False):
    """forward_grad (K = 1: ĝ = (∇L·v) v) and, optionally, jvp_scalars (d_k = ∇L·v_k) against jax.grad · v on two
    sentence pairs of the MiniLM fixture, away from the initialisation (where LoRA's B = 0 makes ∂L/∂A vanish)."""
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(KEY, x.shape), trainable)
    ref = np.load(FIXTURES / "minilm_reference.npz")
    batch = {k: ref[f"pair_{k}"][:2, :10] for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["label"] = jnp.array([0, 1])

    def loss(t, f, b):
        logp = jax.nn.log_softmax(logits_fn(t, f, b, dropout_key))
        return -jnp.mean(logp[jnp.arange(2), b["label"]])

    key = jax.random.key(1)

    @jax.jit
    def run(t, f, b):
        scalars = fwdgrad.jvp_scalars(loss, t, key, f, b, num_tangents=2)[1] if with_scalars else None
        return jax.grad(loss)(t, f, b), fwdgrad.forward_grad(loss, t, key, f, b)[1], scalars

    grad, estimate, scalars = run(trainable, frozen, batch)
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    tangents = [fwdgrad.sample_tangent(jax.random.fold_in(key, k), trainable) for k in range(2)]
    exact = jnp.stack([dot(grad, v) for v in tangents])
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(estimate))
    assert float(jnp.abs(exact).min()) > 1e-3  # a meaningful comparison, not 0 == 0
    v = tangents[0]
    np.testing.assert_allclose(dot(estimate, v) / dot(v, v), exact[0], rtol=1e-4, atol=1e-6)
    if with_scalars:
        np.testing.assert_allclose(scalars, exact, rtol=1e-4, atol=1e-6)


def _no_model_dropout(pre):
    """Model dropout off: every dropout site costs about a second of XLA compile time on a 2-core CPU."""
    return pre._replace(config=dataclasses.replace(pre.config, hidden_dropout=0.0, attention_dropout=0.0))


def test_forward_grad_through_all_adapters_of_minilm(minilm_first_layer):
    """LoRA (with its dropout on: the masks must match in primal and tangent passes), IA3 and BitFit leaves in one
    trainable tree (dense applies whatever sits beside a kernel), so one compile checks jvp through all of them."""
    pre = _no_model_dropout(minilm_first_layer)
    trees = {m: lm_tasks.build_classifier(pre, 2, peft.PeftConfig(m), KEY) for m in ("lora", "ia3", "bitfit")}
    frozen, _, logits_fn = trees["bitfit"]  # its frozen tree lacks the biases, which the BitFit leaves provide
    trainable = peft.merge(peft.merge(trees["lora"][1], trees["ia3"][1]), trees["bitfit"][1])
    kinds = {path.rsplit("/", 1)[1] for path, _ in peft.ordered_leaves(trainable)}
    assert {"lora_a", "lora_b", "ia3_in", "ia3_out", "bias", "kernel"} <= kinds
    _check_forward_grad(logits_fn, trainable, frozen, dropout_key=jax.random.key(7), with_scalars=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_forward_grad_through_each_peft_method_of_minilm(minilm_first_layer, method):
    frozen, trainable, logits_fn = lm_tasks.build_classifier(_no_model_dropout(minilm_first_layer), 2,
                                                         peft.PeftConfig(method), KEY)
    _check_forward_grad(logits_fn, trainable, frozen, dropout_key=jax.random.key(7))

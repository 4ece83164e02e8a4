"""Quantized frozen bases (`spryjax.models.quant`): round-to-nearest bounds, MiniLM parity against fp32, forward
gradients, vmap and sharding over clients, one dequantized weight at a time in a compiled step, tensor-by-tensor
loading (a host-memory probe on the packaged MiniLM), embeddings and LM head, and the one-line errors."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spryjax import build, fwdgrad, lm_tasks, models, peft
from spryjax.errors import InputError
from spryjax.memory import MIB, compiled_memory
from spryjax.models import decoder, hf, quant
from spryjax.pytrees import tree_bytes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
apply = jax.jit(models.apply, static_argnames=("config",))
# MiniLM-L6 hidden states (RMS 0.45 on the fixture pairs) with a quantized base against the fp32 base: the largest
# and mean absolute differences over attended positions may not exceed these (measured: int8 0.17 / 0.011,
# int4 0.89 / 0.124, nf4 0.80 / 0.085; 4-bit RTN on a 22M-parameter model is coarse, see docs/models.md).
PARITY = {"int8": (0.3, 0.02), "int4": (1.3, 0.18), "nf4": (1.2, 0.13)}


def dequantized(params):
    """The float tree a quantized one stands for."""
    return jax.tree.map(lambda x: quant.dequantize(x) if quant.is_quantized(x) else x, params,
                        is_leaf=quant.is_quantized)


def unpacked_by_hand(q) -> tuple[np.ndarray, np.ndarray]:
    """(the levels [in, out], each weight's scale [in, out]) of a QuantizedWeight, decoded in numpy from the stored
    bytes as the format is specified (two 4-bit codes per byte, row 2i in the low nibble, row 2i + 1 in the high
    one; int4 codes offset by 8, NF4 codes indexing the code book)."""
    values, scale = np.asarray(q.values), np.asarray(q.scale, np.float32)
    if q.scheme == "int8":
        levels = values.astype(np.float32)
    else:
        codes = np.empty((2 * values.shape[0], values.shape[1]), np.int64)
        codes[0::2], codes[1::2] = values & 0xF, values >> 4
        levels = (codes - 8).astype(np.float32) if q.scheme == "int4" else quant.NF4_CODE[codes]
    return levels, np.repeat(scale, levels.shape[0] // scale.shape[0], axis=0)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_round_to_nearest_bounds_and_storage(scheme):
    w = np.random.default_rng(0).standard_t(4, size=(256, 48)).astype(np.float32) * 0.05   # heavy tails
    w[:, 7] = 0.0                                                            # an all-zero column stays zero
    q = quant.quantize(w, scheme)
    traced = quant.quantize(jnp.asarray(w), scheme)     # the jax path (init, eval_shape) gives the same codes
    np.testing.assert_array_equal(q.values, traced.values)
    np.testing.assert_array_equal(q.scale, traced.scale)
    levels, scale = unpacked_by_hand(q)
    group = 256 if scheme == "int8" else quant.GROUP_SIZE[scheme]
    absmax = np.repeat(np.abs(w).reshape(256 // group, group, 48).max(axis=1), group, axis=0)   # [in, out]
    np.testing.assert_allclose(scale, absmax / {"int8": 127, "int4": 7, "nf4": 1}[scheme], rtol=1e-6)
    # Round to nearest: no other level of the grid is closer to W / s than the stored one.
    grid = (np.arange(-127, 128) if scheme == "int8" else np.arange(-7, 8) if scheme == "int4"
            else quant.NF4_CODE).astype(np.float32)
    x = w / np.where(scale == 0, 1, scale)
    nearest = np.abs(x[..., None] - grid).min(axis=-1)
    np.testing.assert_allclose(np.abs(x - levels), nearest, atol=1e-5)
    # Closed-form RTN bound: |W − Ŵ| ≤ half a step (int: s; NF4: s times the widest gap of the code book).
    step = scale * (np.diff(quant.NF4_CODE).max() if scheme == "nf4" else 1)
    hand = levels * scale
    assert np.all(np.abs(hand - w) <= 0.5 * step * (1 + 1e-6)), "not rounded to the nearest level"
    assert np.all(hand[:, 7] == 0)
    # The library's dequantization equals the hand decoding.
    np.testing.assert_allclose(quant.dequantize(jax.tree.map(jnp.asarray, q)), hand, rtol=1e-6, atol=1e-9)
    assert q.shape == (256, 48) and q.dtype == np.float32
    assert q.values.dtype == (np.int8 if scheme == "int8" else np.uint8)
    bits = 8 * q.nbytes / w.size
    assert bits == pytest.approx({"int8": 8 + 32 / 256, "int4": 4 + 32 / 128, "nf4": 4 + 32 / 64}[scheme])


@pytest.fixture(scope="module")
def minilm():
    return hf.load_pretrained(hf.packaged_model())


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_minilm_hidden_states_against_fp32(minilm, scheme):
    ref = np.load(FIXTURES / "minilm_reference.npz")
    batch = {k: ref[f"pair_{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")}
    attended = batch["attention_mask"].astype(bool)
    full = np.asarray(apply(minilm.params, batch, config=minilm.config))
    loaded = hf.load_pretrained(hf.packaged_model(), quantize=scheme)
    hidden = np.asarray(apply(loaded.params, batch, config=loaded.config))
    error = np.abs(hidden - full)[attended]
    largest, mean = PARITY[scheme]
    assert error.max() <= largest and error.mean() <= mean, (error.max(), error.mean())
    # Quantizing while reading equals quantizing the loaded fp32 tree (numpy and jax paths agree on real weights).
    after = quant.quantize_params(minilm.params, scheme)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def _loss_fn(logits_fn, n):
    def loss(t, f, b):
        logp = jax.nn.log_softmax(logits_fn(t, f, b))
        return -jnp.mean(logp[jnp.arange(n), b["label"]])
    return loss


@pytest.mark.parametrize("name,scheme,dtype,rtol", [
    ("tiny-llama", "nf4", jnp.float32, 1e-4), ("tiny", "int8", jnp.float32, 1e-4),
    ("tiny", "int4", jnp.float32, 1e-4), ("tiny-llama", "int8", jnp.bfloat16, 3e-2)])
def test_forward_gradient_through_quantized_base(name, scheme, dtype, rtol):
    """The directional derivative of forward_grad's estimate equals jax.grad · v (K = 1: ĝ = (∇L·v) v), both
    through the same quantized base, and jax.grad through the quantized base equals jax.grad through the dense
    model made of the dequantized weights: fp32 tolerance with fp32 activations, bf16's with bf16 ones."""
    config = dataclasses.replace(models.preset(name), num_layers=1)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(config, 2, peft.PeftConfig(dropout=0.0),
                                                             jax.random.key(0), dtype, quantize=scheme)
    assert quant.is_quantized(frozen["layers"][0]["query"]["kernel"])
    trainable = jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), trainable)   # B = 0 would zero A's gradient
    ids = jax.random.randint(jax.random.key(1), (3, 12), 3, config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "label": jnp.array([0, 1, 1])}
    loss = _loss_fn(logits_fn, 3)
    key = jax.random.key(3)
    grad, (_, estimate), dense = jax.jit(lambda t, f, b: (
        jax.grad(loss)(t, f, b), fwdgrad.forward_grad(loss, t, key, f, b),
        jax.grad(loss)(t, dequantized(f), b)))(trainable, frozen, batch)
    v = fwdgrad.sample_tangent(jax.random.fold_in(key, 0), trainable)
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    np.testing.assert_allclose(dot(estimate, v) / dot(v, v), dot(grad, v), rtol=rtol, atol=1e-6)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    if dtype == jnp.float32:
        np.testing.assert_allclose(flat(grad), flat(dense), rtol=rtol, atol=1e-6)
    else:   # bf16 rounds (x · q) ⊙ s and x · (q ⊙ s) differently: compare the gradients as vectors
        assert np.linalg.norm(flat(grad) - flat(dense)) <= rtol * np.linalg.norm(flat(dense))


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (cond branches, checkpoints, pjit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_vmap_and_sharding_over_clients_keep_one_unbatched_base():
    config = dataclasses.replace(models.preset("tiny"), num_layers=1)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(config, 2, peft.PeftConfig(dropout=0.0),
                                                             jax.random.key(0), quantize="int8")
    clients = 8
    stacked = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), (clients, *x.shape)),
                           trainable)
    ids = jax.random.randint(jax.random.key(1), (clients, 2, 10), 3, config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    per_client = jax.vmap(logits_fn, in_axes=(0, None, 0))
    looped = [logits_fn(jax.tree.map(lambda x: x[c], stacked), frozen, {k: v[c] for k, v in batch.items()})
              for c in range(clients)]
    vmapped = jax.jit(per_client)(stacked, frozen, batch)
    np.testing.assert_allclose(vmapped, jnp.stack(looped), rtol=1e-5, atol=1e-6)
    # Each int8 kernel is converted once, unbatched ([in, out]), not once per client.
    converts = [e for e in _eqns(jax.make_jaxpr(per_client)(stacked, frozen, batch).jaxpr)
                if e.primitive.name == "convert_element_type" and e.invars[0].aval.dtype == jnp.int8]
    assert converts and all(e.outvars[0].aval.ndim == 2 for e in converts)
    mesh = Mesh(np.array(jax.devices()[:clients]), ("clients",))
    shard = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
    sharded = jax.jit(per_client)(shard(stacked, PartitionSpec("clients")), shard(frozen, PartitionSpec()),
                                  shard(batch, PartitionSpec("clients")))
    np.testing.assert_allclose(sharded, vmapped, rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # nine compilations (about 30 s on a loaded 2-core CPU)
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's scheduling is what is checked")
def test_compiled_step_holds_one_dequantized_weight_at_a_time():
    """Two MiniLM-shaped layers, batch 1 × 8 (activations negligible): a quantized base adds about one
    dequantized fp32 kernel (the FFN's 384 × 1536, 2.25 MiB) of temporaries to the forward pass, to backprop and to
    forward gradients, not the 13.5 MiB of both layers' kernels (what XLA:CPU's scheduler and CSE would hold)."""
    config = dataclasses.replace(models.preset("minilm-l6"), num_layers=2)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "label": jax.ShapeDtypeStruct((1,), jnp.int32)}
    temps = {}
    for scheme in (None, "int8", "nf4"):
        frozen, trainable, logits_fn = lm_tasks.build_classifier(config, 2, peft.PeftConfig(dropout=0.0),
                                                                 jax.random.key(0), shapes_only=True, quantize=scheme)
        loss = _loss_fn(logits_fn, 1)
        steps = {"forward": loss, "backprop": jax.grad(loss),
                 "forward_grad": lambda t, f, b: fwdgrad.forward_grad(loss, t, jax.random.key(0), f, b)}
        temps[scheme] = {name: compiled_memory(step, trainable, frozen, batch).temp for name, step in steps.items()}
    largest = 384 * 1536 * 4
    for scheme in ("int8", "nf4"):
        for name, temp in temps[scheme].items():
            assert temp - temps[None][name] <= 1.6 * largest, (scheme, name, temp / MIB, temps[None][name] / MIB)


# Peak RSS from /proc (VmHWM): getrusage's ru_maxrss would keep the forking pytest process' high-water mark.
PROBE = """
import json, re, sys, tracemalloc
import jax.numpy as jnp
from spryjax.models import hf
from spryjax.pytrees import tree_bytes
peak_rss = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
folder = hf.packaged_model()
hf.load_config(folder)                     # transformers and jax imported and warmed up before the baseline
jnp.zeros(1).block_until_ready()
before = peak_rss()
tracemalloc.start()
pre = hf.load_pretrained(folder, quantize=None if sys.argv[1] == "none" else sys.argv[1], quantize_embeddings=True)
host_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"host_peak": host_peak, "rss": peak_rss() - before, "params": tree_bytes(pre.params)}))
"""


def _probe(scheme: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, scheme], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_loading_quantizes_tensor_by_tensor():
    """Host memory while loading MiniLM with int8 (embedding included): numpy/Python allocations (tracemalloc)
    peak at the largest full-precision tensor (the 30522 × 384 word embedding, 44.7 MiB) plus its int8 codes and
    a few column blocks of temporaries; the process' peak RSS grows by far less than an fp32 load's (which holds
    the 86.6 MiB fp32 model; both also map the 86.7 MiB safetensors file)."""
    largest = 30522 * 384 * 4
    int8, fp32 = _probe("int8"), _probe("none")
    assert int8["params"] < 0.3 * fp32["params"]
    assert int8["host_peak"] <= largest + largest / 4 + 4 * quant.HOST_BLOCK * 4, int8
    assert int8["rss"] <= fp32["rss"] - (fp32["params"] - int8["params"]) / 2, (int8, fp32)


def test_embeddings_and_lm_head_quantized():
    """The untied tiny Llama with its word embedding and LM head in NF4: hidden states, label-word scores and full
    LM logits equal those of the float model made of the dequantized tensors."""
    pre = hf.load_pretrained(FIXTURES / "tiny_llama", quantize="nf4", quantize_embeddings=True)
    word, head = pre.params["embeddings"]["word"], pre.params["lm_head"]["kernel"]
    assert quant.is_quantized(word) and word.transposed and word.shape == (pre.config.vocab_size, 32)
    assert quant.is_quantized(head) and not head.transposed
    ref = np.load(FIXTURES / "tiny_llama" / "reference.npz")
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    plain = dequantized(pre.params)
    hidden = apply(pre.params, batch, config=pre.config)
    np.testing.assert_allclose(hidden, apply(plain, batch, config=pre.config), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decoder.lm_logits(pre.params, hidden, config=pre.config),
                               decoder.lm_logits(plain, hidden, config=pre.config), rtol=1e-5, atol=1e-5)
    scores = []
    for model in (pre, pre._replace(params=plain)):
        frozen, trainable, logits_fn = lm_tasks.build_classifier(model, 2, peft.PeftConfig(dropout=0.0),
                                                                 jax.random.key(0), head="lm_labels",
                                                                 label_token_ids=[5, 17])
        scores.append(logits_fn(trainable, frozen, batch))
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-5)


def test_shapes_only_and_loaded_trees():
    frozen, _, _ = lm_tasks.build_classifier(models.preset("llama2-7b"), 2, peft.PeftConfig(), jax.random.key(0),
                                             jnp.bfloat16, shapes_only=True, quantize="nf4")
    down = frozen["layers"][0]["down"]["kernel"]
    assert down.values.shape == (11008 // 2, 4096) and down.values.dtype == jnp.uint8
    assert down.scale.shape == (11008 // 64, 4096) and down.scale.dtype == jnp.bfloat16
    assert frozen["embeddings"]["word"].dtype == jnp.bfloat16          # not quantized unless asked
    gib = tree_bytes(frozen) / 2**30
    assert 3.4 < gib < 3.5   # 6.48B quantized weights at 4.25 bits (3.21 GiB) + the bf16 embedding (0.24 GiB)


def test_errors_are_one_line():
    with pytest.raises(InputError, match="not a quantization scheme"):
        hf.load_pretrained(FIXTURES / "tiny_llama", quantize="int3")
    with pytest.raises(InputError, match="cannot be quantized with nf4"):
        config = models.EncoderConfig(arch="bert", vocab_size=50, hidden_size=96, num_layers=1, num_heads=4,
                                      intermediate_size=192, max_positions=16)
        lm_tasks.build_classifier(config, 2, peft.PeftConfig(), jax.random.key(0), quantize="nf4")
    with pytest.raises(InputError, match="no transformer-layer dense kernels"):
        quant.quantize_params({"embeddings": {"word": jnp.ones((4, 4))}}, "int8")
    section = ml_collections.ConfigDict({"name": "text_classifier", "path": "minilm", "quantize": "int3"})
    with pytest.raises(InputError, match=r"config.model.quantize='int3': must be one of 'int8', 'int4', 'nf4'"):
        build.check_model(section)
    for error in (InputError, ):
        with pytest.raises(error) as raised:
            quant.check_scheme("fp8")
        assert "\n" not in str(raised.value)

"""Forward gradients at a glance: softmax regression on scikit-learn's 8×8 digits trained by backprop and by
`forward_grad` with K tangents, from the same start, with the same optimizer and steps.

Prints, per estimator: final held-out accuracy, cosine between the estimate and the true gradient at the start,
and the bytes a federated client would upload per step (a K-scalar seed-trick upload vs the full gradient).
Writes one WORKDIR/metrics.jsonl record per estimator. Run: python -m spryjax.main --config=configs/fwdgrad_demo.py
"""
from __future__ import annotations

import os
import time

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from spryjax import build, fwdgrad
from spryjax.data import vision
from spryjax.errors import InputError
from spryjax.metrics import MetricsWriter, read_metrics


def _loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y))


def _cosine(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


TOP_FIELDS = ("experiment", "seed", "steps", "batch_size", "learning_rate", "num_tangents", "chunk_size")


def check_fwdgrad_demo(config) -> None:
    """Every field checked: the schedule, the optimizer's rate, K ≥ 1 for every forward-gradient row (backprop is
    its own row), a batch no larger than the 1,437 training digits."""
    build.check_fields(config, "config", TOP_FIELDS, required=TOP_FIELDS[1:], rules={"num_tangents": build.SIZES})
    train_size = len(vision.digits(seed=config.seed).train["label"])
    if config.batch_size > train_size:
        raise InputError(f"config.batch_size={config.batch_size}: more than the {train_size} training digits")


def run_fwdgrad_demo(config, workdir: str) -> list[dict]:
    """Trains one model per estimator (backprop, then forward_grad with each K), one metrics.jsonl record each; a
    rerun computes only the estimators whose record is missing (each row is a pure function of the config)."""
    digits = vision.digits(seed=config.seed)
    (xtr, ytr), (xte, yte) = ((split["x"], split["label"]) for split in (digits.train, digits.test))
    params0 = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    true_grad = jax.grad(_loss)(params0, xtr, ytr)
    optimizer = optax.adam(config.learning_rate)
    writer = MetricsWriter(workdir)
    done = {r["estimator"]: r for r in read_metrics(workdir) if "estimator" in r}
    rows = []
    for k in [0, *config.num_tangents]:  # k = 0: backprop
        name = "backprop" if k == 0 else f"forward_grad K={k}"
        if name in done:
            rows.append(done[name])
            continue
        estimate = (lambda p, key, xb, yb: jax.value_and_grad(_loss)(p, xb, yb)) if k == 0 else \
            (lambda p, key, xb, yb, k=k: fwdgrad.forward_grad(_loss, p, key, xb, yb, num_tangents=k,
                                                              chunk_size=min(k, config.chunk_size)))

        @jax.jit
        def step(p, opt_state, key, xb, yb):
            loss, g = estimate(p, key, xb, yb)
            updates, opt_state = optimizer.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        jitted = jax.jit(estimate)
        cos = np.mean([_cosine(jitted(params0, jax.random.key(i), xtr, ytr)[1], true_grad) for i in range(20)])
        params, opt_state = params0, optimizer.init(params0)
        start = time.perf_counter()
        for i in range(config.steps):
            idx = np.random.default_rng((config.seed, i)).choice(len(ytr), config.batch_size, replace=False)
            params, opt_state, loss = step(params, opt_state, jax.random.key(i), xtr[idx], ytr[idx])
        jax.block_until_ready(params)
        grad_bytes = sum(v.size * 4 for v in jax.tree.leaves(params0))
        row = {"estimator": name, "test_accuracy": _accuracy(params, xte, yte), "cosine_to_true_grad": float(cos),
               "upload_bytes_per_step": grad_bytes if k == 0 else 4 * k, "seconds": time.perf_counter() - start}
        writer.write(row)
        rows.append(row)
    print(f"\nsoftmax regression on 8x8 digits, {config.steps} Adam steps (lr {config.learning_rate}), "
          f"batch {config.batch_size}; 650 parameters")
    print(f"{'estimator':<22}{'test acc':>10}{'cos(ĝ, ∇L)':>13}{'upload B/step':>15}{'seconds':>9}")
    for r in rows:
        print(f"{r['estimator']:<22}{r['test_accuracy']:>10.3f}{r['cosine_to_true_grad']:>13.3f}"
              f"{r['upload_bytes_per_step']:>15d}{r['seconds']:>9.2f}")
    print("\nForward gradients are unbiased but noisy (cosine ~ 1/sqrt(#params/K)); with the seed trick a client "
          "uploads K scalars instead of a gradient.")
    print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    return rows

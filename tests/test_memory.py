"""FLOP counts against hand computations on a small model: the forward pass, backprop, forward gradients with K
tangents in one chunk, and the pitfall they are counted around (XLA counts a loop body once)."""
import functools

import jax
import jax.numpy as jnp
import pytest

from spryjax import fwdgrad
from spryjax.memory import flops_of

B, D, H, OUT = 32, 64, 128, 256    # batch, input, hidden and output widths


def loss(scale, frozen, x):
    """A LoRA-like shape: big frozen matmuls, a small trainable tensor (a per-unit scale) between them."""
    return jnp.sum(jnp.tanh(jnp.tanh((x @ frozen["w1"]) * scale) @ frozen["w2"]))


SCALE = jnp.ones(H)
FROZEN = {"w1": jnp.ones((D, H)) * 0.01, "w2": jnp.ones((H, OUT)) * 0.01}
X = jnp.ones((B, D))
FIRST, SECOND = 2 * B * D * H, 2 * B * H * OUT    # the two matmuls' multiply-adds, 2 FLOPs each


def count(fn, *args) -> float:
    return flops_of(jax.jit(fn).lower(*args).compile())


def test_forward_pass_is_its_matmuls():
    assert count(loss, SCALE, FROZEN, X) == pytest.approx(FIRST + SECOND, rel=0.05)


def test_backprop_adds_the_second_matmul_once():
    """dL/ds needs δ W2ᵀ through the second matmul; the first one's input gradient is not needed."""
    assert count(jax.grad(loss), SCALE, FROZEN, X) == pytest.approx(FIRST + 2 * SECOND, rel=0.05)


@pytest.mark.parametrize("k", [1, 4])
def test_forward_gradient_adds_the_second_matmul_per_tangent(k):
    """The jvp computes the primal once and pushes each of the K tangents (all in one chunk) through the second
    matmul: FIRST + (1 + K) SECOND."""
    estimate = functools.partial(fwdgrad.forward_grad, loss, num_tangents=k)
    assert count(lambda s, f, x: estimate(s, jax.random.key(0), f, x), SCALE, FROZEN, X) == pytest.approx(
        FIRST + (1 + k) * SECOND, rel=0.05)


def test_a_loop_body_is_counted_once():
    """Why experiments/spry_memory.py counts with one-iteration loops: a 10-step scan reports one step."""
    def ten_steps(scale, frozen, x):
        return jax.lax.scan(lambda c, _: (c + loss(scale, frozen, x), None), 0.0, None, length=10)[0]
    assert count(ten_steps, SCALE, FROZEN, X) == pytest.approx(count(loss, SCALE, FROZEN, X), rel=0.05)

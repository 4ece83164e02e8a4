"""Server optimizers as optax transforms applied to the aggregated pseudo-gradient u = θ − mean(θ_client)
(Reddi et al. 2021, "Adaptive Federated Optimization"). FedAvg, FedAvgM, FedAdam, FedAdagrad and FedYogi differ
only in the transform:

    name         update                                   transform             (`SERVER_OPTIMIZERS`)
    fedavg       θ ← θ − η u                              optax.sgd(η)          (η = 1: plain model averaging)
    fedavgm      m ← β m + u;  θ ← θ − η m                optax.sgd(η, β)
    fedadam      optax.adam(η, β1, β2, eps=τ)             (optax's bias-corrected Adam)
    fedadagrad   optax.adagrad(η, eps=τ)
    fedyogi      optax.yogi(η, β1, β2, eps=τ)             (optax's Yogi)
    flower_yogi  Flower 1.5's FedYogi, which the Spry code used, with Δ = −u:
                 m ← β1 m + (1−β1) Δ;  v ← v − (1−β2) Δ² sign(v − Δ²);  θ ← θ + η m / (√v + τ)
                 m, v start at zero, no bias correction; defaults η=1e-2, β1=0.9, β2=0.99, τ=1e-3.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax



class FlowerYogiState(NamedTuple):
    m: optax.Updates  # first moment of the pseudo-gradient
    v: optax.Updates  # Yogi's second moment


def flower_yogi(learning_rate: float = 1e-2, *, b1: float = 0.9, b2: float = 0.99,
                tau: float = 1e-3) -> optax.GradientTransformation:
    """Flower's FedYogi (see the module docstring), written on the pseudo-gradient u = −Δ.

    Example:
      >>> opt = flower_yogi()
      >>> updates, state = opt.update(u, opt.init(params)); params = optax.apply_updates(params, updates)
    """
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return FlowerYogiState(m=zeros, v=zeros)

    def update(u, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, u)
        v = jax.tree.map(lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, u)
        updates = jax.tree.map(lambda m, v: -learning_rate * m / (jnp.sqrt(v) + tau), m, v)
        return updates, FlowerYogiState(m, v)

    return optax.GradientTransformation(init, update)


def fedavg(learning_rate: float = 1.0) -> optax.GradientTransformation:
    """θ ← θ − η u; η = 1 is plain model averaging."""
    return optax.sgd(learning_rate)


def fedavgm(learning_rate: float = 1.0, *, momentum: float = 0.9) -> optax.GradientTransformation:
    """m ← β m + u; θ ← θ − η m."""
    return optax.sgd(learning_rate, momentum=momentum)


def fedadam(learning_rate: float = 1e-2, *, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3) -> optax.GradientTransformation:
    """optax's bias-corrected Adam with ε = τ."""
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=tau)


def fedadagrad(learning_rate: float = 1e-1, *, tau: float = 1e-3) -> optax.GradientTransformation:
    """optax's Adagrad with ε = τ."""
    return optax.adagrad(learning_rate, eps=tau)


def fedyogi(learning_rate: float = 1e-2, *, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3) -> optax.GradientTransformation:
    """optax's Yogi with ε = τ."""
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=tau)


# name -> factory; each factory's signature holds its options and their defaults.
SERVER_OPTIMIZERS = {"fedavg": fedavg, "fedavgm": fedavgm, "fedadam": fedadam, "fedadagrad": fedadagrad,
                     "fedyogi": fedyogi, "flower_yogi": flower_yogi}

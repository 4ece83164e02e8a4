import jax.numpy as jnp
import numpy as np
import optax

from spryjax.fl import server_opt
from spryjax.fl.server_opt import flower_yogi


def test_flower_yogi_matches_hand_computed_steps():
    """Flower's FedYogi, written out in numpy with Δ = mean(θ_client) − θ = −u (Flower's own formulation)."""
    eta, b1, b2, tau = 1e-2, 0.9, 0.99, 1e-3
    theta = np.array([0.5, -1.0, 2.0])
    deltas = [np.array([0.1, -0.2, 0.0]), np.array([-0.05, 0.3, 0.01])]
    m, v, x = np.zeros(3), np.zeros(3), theta.copy()
    for delta in deltas:
        m = b1 * m + (1 - b1) * delta
        v = v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2)
        x = x + eta * m / (np.sqrt(v) + tau)
    opt = flower_yogi()
    params, state = jnp.asarray(theta), flower_yogi().init(jnp.asarray(theta))
    for delta in deltas:
        updates, state = opt.update(jnp.asarray(-delta), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, x, rtol=1e-6)


def test_fedavg_with_unit_learning_rate_is_model_averaging():
    opt = server_opt.fedavg()
    theta, u = jnp.array([1.0, 2.0]), jnp.array([0.25, -0.5])
    updates, _ = opt.update(u, opt.init(theta), theta)
    np.testing.assert_allclose(optax.apply_updates(theta, updates), theta - u)

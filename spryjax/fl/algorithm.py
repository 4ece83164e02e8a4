"""The federated-algorithm protocol: a small frozen record of pure functions (in the spirit of optax's
`GradientTransformation` and fedjax's `FederatedAlgorithm`), and the local-training loop that backprop and
forward-gradient clients share.

One round, as the engine (`spryjax.fl.simulate`) runs it for a cohort of clients i = 1..C:

    b    = broadcast(state)                                     what every client receives
    o_i  = client_update(frozen, b, data_i, n_i, slot_i, key_i)  one client, pure, vmappable, static shapes
    u    = Σ_i w_i ⊙ o_i.update / Σ_i w_i                       per leaf; leaves nobody trained get u = 0
    state = server_update(state, u)                             an optax transform on the pseudo-gradient u

`o_i.update` is a pseudo-gradient: θ_global − θ_client after local training (so that plain SGD with learning
rate 1 on u is FedAvg), or a gradient estimate for FedSGD-shaped algorithms. `o_i.weight` is a scalar (the
client's example count) or a pytree of per-leaf scalars (Spry: examples × "this client trained this tensor").
Because the aggregate is a ratio of sums, the engine can accumulate it over sequential chunks of clients and
across devices.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spryjax.data.federated import batch_indices, take_batch, trimmed_length
from spryjax.pytrees import tree_bytes
from spryjax.task import Task

PyTree = Any


class ServerState(NamedTuple):
    params: PyTree          # the global trainable parameters θ
    opt_state: PyTree       # the server optimizer's state
    extra: PyTree = ()      # algorithm-specific arrays (FwdLLM: the previous round's update)


class ClientOutput(NamedTuple):
    update: PyTree                  # pseudo-gradient, θ's structure
    weight: PyTree | jax.Array      # scalar, or per-leaf scalars with θ's structure
    metrics: dict[str, jax.Array]   # per-client scalars (means over the client's steps); averaged by examples


class Communication(NamedTuple):
    """Bytes moved in one round for the whole cohort (`FederatedAlgorithm.bytes_per_round`)."""
    down: int
    up: int


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as pure functions (see the module docstring for the round).

    init(params, key) -> ServerState
    broadcast(state) -> pytree sent to clients
    client_update(frozen, broadcast, data, count, slot, key) -> ClientOutput
        data: {name: [P, ...]} one client's padded examples; count: its number of real ones;
        slot: its position 0..C-1 in the cohort (Spry assigns work by slot).
    server_update(state, update) -> ServerState
    evaluate_client(frozen, broadcast, train, train_count, test, test_count, client, key) -> {group: {name: sum}}
        sums over the client's held-out examples (see spryjax.task), by group: "generalized" uses the global
        model; algorithms with personalization add groups (e.g. "personalized", after local finetuning).
        The engine logs `<group>_<metric>`, e.g. generalized_accuracy.
    bytes_per_round(params_like, cohort_size) -> Communication: bytes down and up for the cohort
    eager_client_update: optional, the same client update for concrete (host) arrays, whose local training is
        `dispatched_local_training`: one jitted step per real minibatch instead of one program per client. The
        engine's "loop" strategy calls it where given (faster on CPU), else `jax.jit(client_update)`. Only for
        algorithms whose local loss, gradient function and optimizer are the same objects for every client (no
        per-client closures), or every client would compile its own step.
    evaluate_client_final: optional, a costlier evaluate_client for the run's last evaluation only (Spry's
        finetuned accuracy), evaluate_client at every other.
    """
    name: str
    init: Callable[[PyTree, jax.Array], ServerState]
    broadcast: Callable[[ServerState], PyTree]
    client_update: Callable[..., ClientOutput]
    server_update: Callable[[ServerState, PyTree], ServerState]
    evaluate_client: Callable[..., dict[str, jax.Array]]
    bytes_per_round: Callable[[PyTree, int], Communication]
    eager_client_update: Callable[..., ClientOutput] | None = None
    evaluate_client_final: Callable[..., dict[str, jax.Array]] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pieces algorithms are built from


def init_with_optimizer(server_optimizer: optax.GradientTransformation) -> Callable[[PyTree, jax.Array], ServerState]:
    return lambda params, key: ServerState(params, server_optimizer.init(params))


def apply_server_optimizer(server_optimizer: optax.GradientTransformation) -> Callable[..., ServerState]:
    """server_update: θ ← θ + optax_update(u), u the aggregated pseudo-gradient."""
    def server_update(state: ServerState, update: PyTree) -> ServerState:
        updates, opt_state = server_optimizer.update(update, state.opt_state, state.params)
        return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return server_update


def full_model_bytes(params_like: PyTree, cohort_size: int) -> Communication:
    """Every client downloads and uploads the whole trainable tree."""
    size = tree_bytes(params_like)
    return Communication(down=size * cohort_size, up=size * cohort_size)


def evaluate_global(task: Task, *, batch_size: int) -> Callable[..., dict[str, jax.Array]]:
    """evaluate_client for the global model: {"generalized": task.evaluate summed over the client's held-out
    examples}."""
    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        del train, train_count, client, key
        return {"generalized": evaluate_examples(task, params, frozen, test, test_count, batch_size=batch_size)}
    return evaluate_client


def evaluate_examples(task: Task, params: PyTree, frozen: PyTree, data: dict, count: jax.Array, *,
                      batch_size: int) -> dict[str, jax.Array]:
    """Σ task.evaluate over the first `count` rows of padded arrays `data` [P, ...], in batches of `batch_size`."""
    return sum_over_batches(lambda batch: task.evaluate(params, frozen, batch), data, count, batch_size=batch_size)


def sum_over_batches(fn: Callable[[dict], PyTree], data: dict, count: jax.Array, *, batch_size: int) -> PyTree:
    """Σ_b fn(batch_b) over the batches of the first `count` rows of padded arrays `data` [P, ...], in order, padding
    rows masked (batch["mask"]). `fn` returns sums over a batch's real examples (a pytree of arrays); personalized
    evaluations use it to score several models on the same batches."""
    capacity = next(iter(data.values())).shape[0]
    batch_size = min(batch_size, capacity)
    steps = -(-capacity // batch_size)
    rows = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    batch_at = lambda index: take_batch(data, jnp.minimum(index, capacity - 1), index < count)

    def body(total, index):
        return jax.tree.map(jnp.add, total, fn(batch_at(index))), None

    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, batch_at(rows[0])))
    return jax.lax.scan(body, zero, rows)[0]


# (loss_fn, params, key, *args, mask=None) -> (loss, grad): the signature `spryjax.fwdgrad`'s estimators share.
# `mask` (booleans, a prefix of params, may be traced) names the leaves being trained; an estimator may use it
# (forward gradients draw tangents only there), backprop ignores it (local training zeroes the others' updates).
GradientFn = Callable[..., tuple[jax.Array, PyTree]]


def backprop(loss_fn, params, key, *args, mask=None):
    """The gradient of `loss_fn(params, *args)` by reverse mode, as a `GradientFn`; `key` and `mask` are unused."""
    del key, mask
    return jax.value_and_grad(loss_fn)(params, *args)


def local_steps(key: jax.Array, count: jax.Array, capacity: int, batch_size: int, epochs: int = 1
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The minibatches and step keys of `epochs` local epochs: (index [S, B], mask [S, B], keys [S]); S = 0 for
    no epochs (training then changes nothing)."""
    batches = [batch_indices(jax.random.fold_in(key, e), count, capacity, batch_size) for e in range(epochs)]
    if not batches:
        return (jnp.zeros((0, batch_size), jnp.int32), jnp.zeros((0, batch_size), bool),
                jax.random.split(jax.random.fold_in(key, epochs), 0))
    index = jnp.concatenate([b[0] for b in batches])
    mask = jnp.concatenate([b[1] for b in batches])
    return index, mask, jax.random.split(jax.random.fold_in(key, epochs), index.shape[0])


_jitted_local_steps = jax.jit(local_steps, static_argnums=(2, 3, 4))


def first_batch(data: dict, count: jax.Array, key: jax.Array, batch_size: int
                ) -> tuple[dict, jax.Array, jax.Array]:
    """(batch, estimator_key, dropout_key) of `local_training`'s first step: FedSGD-shaped algorithms take one step
    on exactly the batch and keys a one-step local epoch would."""
    capacity = next(iter(data.values())).shape[0]
    index, mask, keys = local_steps(key, count, capacity, batch_size)
    estimator_key, dropout_key = jax.random.split(keys[0])
    return take_batch(data, index[0], mask[0]), estimator_key, dropout_key


def local_training(task: Task, params: PyTree, frozen: PyTree, data: dict, count: jax.Array, key: jax.Array, *,
                   optimizer: optax.GradientTransformation, batch_size: int, epochs: int = 1,
                   max_steps: int | None = None, gradient_fn: GradientFn = backprop,
                   loss_fn: Callable[..., jax.Array] | None = None, update_mask: PyTree | None = None,
                   unroll: int | bool = 1, skip_padding: bool = True) -> tuple[PyTree, dict[str, jax.Array]]:
    """`epochs` passes of minibatch training over a client's `count` real examples (padded to P rows).

    Each step: (ℓ, g) = gradient_fn(loss, θ, k_step, frozen, batch, k_dropout, mask=update_mask);
    θ ← θ + optimizer(g) on the leaves in `update_mask`. Batches
    made only of padding leave θ and the optimizer state unchanged, so clients of different sizes share one
    static shape. `max_steps` truncates to the first steps (FedSGD: 1). `loss_fn(θ, frozen, batch, key)`
    defaults to `task.loss` (FedProx adds its proximal term). `update_mask` (booleans with θ's structure, may be
    traced) freezes the leaves outside it, weight decay included (Spry's split).

    The steps are a `lax.scan` (to run inside jit or vmap; `dispatched_local_training` is the same training for
    concrete arrays, one jitted step per real minibatch). `unroll` is passed to the scan (XLA:CPU picked a 3×
    slower layout for conv weight gradients in a rolled loop). `skip_padding=False` keeps padding batches from
    changing anything by a select instead of a `lax.cond`: every step is computed, but no step sits in a nested XLA
    computation, where XLA:CPU ran a small CNN's training step 16× slower (103 vs 6.4 ms, jax 0.10); with
    `unroll=True` the whole loop is then straight-line code.

    Returns θ after training and {"loss": mean loss over real steps, "steps": their number}.
    """
    loss_fn = loss_fn or task.loss
    capacity = next(iter(data.values())).shape[0]
    index, mask, step_keys = local_steps(key, count, capacity, batch_size, epochs)
    if max_steps is not None:
        index, mask, step_keys = index[:max_steps], mask[:max_steps], step_keys[:max_steps]
    train_step = functools.partial(_train_step, frozen=frozen, update_mask=update_mask, loss_fn=loss_fn,
                                   gradient_fn=gradient_fn, optimizer=optimizer)

    def step(carry, inputs):
        idx, m, k = inputs
        real = jnp.any(m)
        # A padding batch skips the step. Unbatched (one client per call) the cond really skips the work; under
        # vmap it becomes a select, computing both branches.
        batch = take_batch(data, idx, m)
        if skip_padding:
            carry, loss = jax.lax.cond(real, train_step, lambda c, b, k: (c, jnp.float32(0)), carry, batch, k)
        else:
            trained, loss = train_step(carry, batch, k)
            carry = jax.tree.map(lambda new, old: jnp.where(real, new, old), trained, carry)
            loss = jnp.where(real, loss, 0.0)
        return carry, (loss, real)

    (params, _), (losses, real) = jax.lax.scan(step, (params, optimizer.init(params)), (index, mask, step_keys),
                                               unroll=unroll)
    steps = jnp.sum(real)
    return params, {"loss": jnp.sum(losses) / jnp.maximum(steps, 1), "steps": steps.astype(jnp.float32)}


def _train_step(carry, batch, k, *, frozen, update_mask, loss_fn, gradient_fn, optimizer):
    """One optimizer step of `local_training` on `batch`: carry = (θ, optimizer state) -> (carry, loss)."""
    params, opt_state = carry
    estimator_key, dropout_key = jax.random.split(k)  # as in first_batch
    loss, grads = gradient_fn(loss_fn, params, estimator_key, frozen, batch, dropout_key, mask=update_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    if update_mask is not None:
        updates = jax.tree.map(lambda u, keep: jnp.where(keep, u, jnp.zeros_like(u)), updates, update_mask)
    return (optax.apply_updates(params, updates), opt_state), loss.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("loss_fn", "gradient_fn", "optimizer"))
def _dispatched_step(carry, data, plan, s, frozen, update_mask, *, loss_fn, gradient_fn, optimizer):
    """`_train_step` on minibatch s of plan = `local_steps(...)`, as its own XLA program (one per shape)."""
    index, mask, keys = plan
    return _train_step(carry, take_batch(data, index[s], mask[s]), keys[s], frozen=frozen, update_mask=update_mask,
                       loss_fn=loss_fn, gradient_fn=gradient_fn, optimizer=optimizer)


class MinibatchTrim(NamedTuple):
    """How `dispatched_local_training` cuts each minibatch's sequences: to its longest row, rounded up to a
    multiple of `multiple` (so a handful of lengths, each compiled once)."""
    lengths: np.ndarray         # [P] the client's rows' token counts (0 for padding rows)
    keys: tuple[str, ...]       # the arrays whose axis 1 is the sequence axis
    multiple: int = 8


def dispatched_local_training(task: Task, params: PyTree, frozen: PyTree, data: dict, count: jax.Array,
                              key: jax.Array, *, optimizer: optax.GradientTransformation, batch_size: int,
                              epochs: int = 1, max_steps: int | None = None, gradient_fn: GradientFn = backprop,
                              loss_fn: Callable[..., jax.Array] | None = None, update_mask: PyTree | None = None,
                              unroll: int | bool = 1, skip_padding: bool = True, trim: MinibatchTrim | None = None
                              ) -> tuple[PyTree, dict[str, jax.Array]]:
    """`local_training` for concrete arrays (same keys, batches and arithmetic): a host loop over the real
    minibatches, each one call of a jitted step, padding batches skipped on the host. Which batches are real follows
    from `count` alone (`batch_indices` puts the real rows first in every epoch), so the host never waits for the
    device and dispatch overlaps compute. On a 2-core CPU one jitted step of a small CNN took 8.6 ms against 12.3
    ms per step of five steps fused into one program. The step compiles once per shape as long as `loss_fn`,
    `gradient_fn` and `optimizer` are the same objects from client to client (`update_mask` is an array argument).
    `unroll` and `skip_padding` are accepted for `local_training`'s signature and have nothing to control here.

    With `trim`, each minibatch's sequences are cut to its longest row rounded up to `trim.multiple` tokens (one
    compiled step per distinct length): the same minibatches and keys, padding positions the attention mask already
    hides left out, so the update equals the untrimmed one to float tolerance when dropout is off. With dropout on,
    a dropout mask's shape follows the sequence length, so trimming changes which random masks are drawn (not their
    distribution). Random minibatches of 8 Rotten Tomatoes snippets are cut from 64 to about 47 tokens."""
    del unroll, skip_padding
    loss_fn = loss_fn or task.loss
    capacity = next(iter(data.values())).shape[0]
    plan = _jitted_local_steps(key, count, capacity, batch_size, epochs)
    per_epoch = -(-capacity // batch_size)
    real = np.tile(np.arange(per_epoch) < -(-int(count) // batch_size), epochs)[:max_steps]
    data = jax.device_put(data)
    rows, real_rows = (np.asarray(plan[0]), np.asarray(plan[1])) if trim is not None else (None, None)
    cut: dict[int, dict] = {}   # sequence length -> the client's arrays cut to it
    carry, losses = (params, optimizer.init(params)), []
    for s in np.flatnonzero(real).astype(np.int32):
        step_data = data
        if trim is not None:
            full = data[trim.keys[0]].shape[1]
            length = trimmed_length(trim.lengths[rows[s]] * real_rows[s], full, trim.multiple)
            if length not in cut:
                cut[length] = {k: v[:, :length] if k in trim.keys else v for k, v in data.items()}
            step_data = cut[length]
        carry, loss = _dispatched_step(carry, step_data, plan, s, frozen, update_mask, loss_fn=loss_fn,
                                       gradient_fn=gradient_fn, optimizer=optimizer)
        losses.append(loss)
    steps = len(losses)
    mean_loss = sum(losses) / steps if steps else jnp.float32(0)
    return carry[0], {"loss": jnp.asarray(mean_loss, jnp.float32), "steps": jnp.float32(steps)}


def proximal_loss(loss_fn: Callable[..., jax.Array], anchor: PyTree, mu: float) -> Callable[..., jax.Array]:
    """θ ↦ loss_fn(θ, ...) + (μ/2) ‖θ − anchor‖²: FedProx's local objective and Ditto's personal one."""
    def loss(theta, *args):
        distance = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(anchor)))
        return loss_fn(theta, *args) + 0.5 * mu * distance
    return loss


def pseudo_gradient(global_params: PyTree, local_params: PyTree) -> PyTree:
    """u = θ_global − θ_local: plain SGD with learning rate 1 on the mean of u is FedAvg."""
    return jax.tree.map(jnp.subtract, global_params, local_params)

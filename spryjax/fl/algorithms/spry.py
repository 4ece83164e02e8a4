"""Spry: "Thinking Forward: Memory-Efficient Federated Finetuning of Language Models" (Panchal et al., NeurIPS
2024, arXiv 2405.15551).

The split. The T trainable tensors, in layer order (`tensor_order`), are cut into J chunks of `tensors_per_chunk`
consecutive tensors; chunk j goes to cohort slot j mod C when J ≥ C (a client trains several chunks), and slot s
trains chunk s mod J when J < C (several clients share a chunk; the released code crashes there). The mapping is
the same every round; which client fills a slot changes. With `share_head`, the task head's tensors
(`head_tensors`) are trained by every slot instead of being dealt (the released code's --classifier_share). The assignment is a boolean mask M[s, t], so every client has the same shapes and one vmapped,
sharded round serves them all.

Client in slot s, per-epoch communication (the released code): for each batch, K tangents v_k ~ N(0, I) on its own
tensors only (zero elsewhere), ĝ = (1/K) Σ_k (∇L·v_k) v_k by forward-mode AD (`fwdgrad.forward_grad`), then an
AdamW step restricted to its tensors; after `local_epochs` it uploads Δ_s = θ − θ_s on its tensors.
Per-iteration communication (the paper's ablation; its exact protocol is unpublished, this is our reading): one
batch per round, the client uploads only the K jvp scalars d_k = ∇L·v_k; the server regenerates v_k from the
client's seed and slot mask (`fwdgrad.grad_from_scalars`) to get the same ĝ: a FedSGD-shaped round.

Server: each tensor t is averaged over the clients that trained it, weighted by examples,
    u_t = Σ_s n_s M[s, t] Δ_{s,t} / Σ_s n_s M[s, t],
then the server optimizer (FedYogi by default; `flower_yogi` is the variant the released code used) applies u.
This per-assignee average is what the released code intends: its clients freeze their unassigned tensors and
return only the assigned ones, and its server hands the assignment to an aggregation that is not in the release
(the commented-out version writes each client's arrays into its own tensors). `dilute_aggregation=True` is a
variant that averages every tensor over all C clients (u_t = Σ_s n_s M[s,t] Δ_{s,t} / Σ_s n_s), shrinking each
update by the share of clients that trained it.

Evaluation: "generalized" is the global model on each client's held-out split. With `finetune_epochs` > 0,
"finetuned" is the released code's reported accuracy (its "Test Generalized Accuracy"), measured after
`finetune_epochs` of forward-gradient finetuning on the client's own chunk: the evaluated client `client` takes the
chunk of slot `client mod clients_per_round` (the assignment M above), draws its tangents and applies the client
optimizer's updates there only, as in training, on its training split, then is scored on its held-out split
(`finetune_scope="all"` finetunes every trainable tensor instead). The released code finetunes 5 epochs with AdamW on
10 sampled clients; the engine evaluates the clients it is given. Finetuning every evaluated client costs about as
much as 5 rounds of training per 10 clients, so it runs at the last evaluation only (`evaluate_client_final`)
unless `finetune_every_evaluation`.

Options a communication shape does not use are errors, not ignored (`check_communication`): per-iteration rounds
take no `client_optimizer` (unless `finetune_epochs` needs one) and no `local_epochs` other than 1.

`chunk_gradient_shares` is a diagnostic of where the gradient lives: each chunk's share of ‖∇L‖².

`gradient="backprop"` swaps the estimator for reverse mode: the paper's FedAvgSplit ablation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spryjax import fwdgrad
from spryjax.errors import InputError
from spryjax.fl.algorithm import (ClientOutput, Communication, FederatedAlgorithm, apply_server_optimizer,
                                  backprop, dispatched_local_training, evaluate_examples, first_batch,
                                  init_with_optimizer, local_training, pseudo_gradient)
from spryjax.pytrees import tree_bytes
from spryjax.task import Task

PyTree = Any


def assign_tensors(num_tensors: int, num_slots: int, *, tensors_per_chunk: int = 2,
                   tensor_order: Sequence[int] | None = None, shared_tensors: Sequence[int] = ()) -> np.ndarray:
    """Spry's split as a boolean matrix M [num_slots, num_tensors]: M[s, t] iff slot s trains tensor t.

    Tensors are indexed in `jax.tree.leaves` order; `tensor_order` lists them in layer order (default: that order).

    Example (6 tensors, chunks of 2, 2 slots): chunks {0,1} {2,3} {4,5} → slot 0 trains {0,1,4,5}, slot 1 {2,3}.
    """
    order = [t for t in (range(num_tensors) if tensor_order is None else tensor_order) if t not in set(shared_tensors)]
    if sorted(order + list(shared_tensors)) != list(range(num_tensors)):
        raise ValueError(f"tensor_order and shared_tensors must cover the {num_tensors} tensors exactly once")
    chunks = [order[i:i + tensors_per_chunk] for i in range(0, len(order), tensors_per_chunk)]
    matrix = np.zeros((num_slots, num_tensors), bool)
    matrix[:, list(shared_tensors)] = True
    for slot in range(num_slots):
        for j, chunk in enumerate(chunks):
            if (len(chunks) >= num_slots and j % num_slots == slot) or \
                    (len(chunks) < num_slots and slot % len(chunks) == j):
                matrix[slot, chunk] = True
    return matrix


def check_communication(communication: str, *, client_optimizer: optax.GradientTransformation | None,
                        local_epochs: int, finetune_epochs: int = 0) -> None:
    """The option rule of the two communication shapes that Spry and its zero-order baselines (fedmezo, baffle,
    fwdllm) share. "per_epoch": `local_epochs` of the client optimizer, weights up: `client_optimizer` is required.
    "per_iteration": one minibatch per round, a gradient or its scalars up: neither `client_optimizer` nor
    `local_epochs` is used, so setting them is an InputError rather than silently ignored. `finetune_epochs` > 0
    (Spry's evaluation) uses the client optimizer in either shape."""
    if communication not in ("per_epoch", "per_iteration"):
        raise InputError(f"communication must be 'per_epoch' or 'per_iteration', got {communication!r}")
    if communication == "per_iteration" and local_epochs != 1:
        raise InputError(f"local_epochs={local_epochs}: not used by per_iteration communication "
                         "(one minibatch per round)")
    if client_optimizer is None:
        if communication == "per_epoch":
            raise InputError("client_optimizer is required for per_epoch communication")
        if finetune_epochs:
            raise InputError("client_optimizer is required for finetune_epochs > 0")
    elif communication == "per_iteration" and not finetune_epochs:
        raise InputError("client_optimizer: not used by per_iteration communication")


def scalars_up_bytes(bytes_per_client: int) -> Callable[[PyTree, int], Communication]:
    """`bytes_per_round` of the seed trick: every client downloads the whole trainable tree and uploads
    `bytes_per_client` bytes (its K scalars, and what else the server needs to regenerate the tangents)."""
    return lambda params_like, cohort_size: Communication(down=tree_bytes(params_like) * cohort_size,
                                                          up=bytes_per_client * cohort_size)


def spry(task: Task, *, clients_per_round: int, server_optimizer: optax.GradientTransformation, batch_size: int,
         client_optimizer: optax.GradientTransformation | None = None, local_epochs: int = 1,
         num_tangents: int = 1, tangent_chunk_size: int | None = None,
         distribution: fwdgrad.Distribution = "gaussian", tensors_per_chunk: int = 2,
         tensor_order: Sequence[int] | None = None, head_tensors: Sequence[int] = (), share_head: bool = False,
         communication: Literal["per_epoch", "per_iteration"] = "per_epoch", dilute_aggregation: bool = False,
         finetune_epochs: int = 0, finetune_scope: Literal["slot_chunk", "all"] = "slot_chunk",
         finetune_every_evaluation: bool = False,
         gradient: Literal["forward", "backprop"] = "forward", eval_batch_size: int = 64,
         name: str = "spry") -> FederatedAlgorithm:
    """Spry (see the module docstring). Hyperparameters map to the paper: K = num_tangents, AdamW client
    optimizer (lr 1e-4 in the paper), 1 local epoch, batch 8, FedYogi server (η 1e-2, β1 .9, β2 .99, τ 1e-3).

    `client_optimizer` is required for per-epoch communication and for `finetune_epochs` > 0, and an error
    otherwise; `local_epochs` is per-epoch only (`check_communication`). `finetune_scope` says which tensors the
    evaluation's finetuning trains: "slot_chunk" (the released code's) or "all".

    `tensor_order` (the trainable leaves in layer order, as indices into `jax.tree.leaves`) and `head_tensors`
    (the task head's leaves) describe the trainable tree; `spryjax.build.tensor_layout` computes both.

    Example:
      >>> algorithm = spry(task, clients_per_round=10, client_optimizer=optax.adamw(1e-4),
      ...                  server_optimizer=flower_yogi(), batch_size=8)
    """
    check_communication(communication, client_optimizer=client_optimizer, local_epochs=local_epochs,
                        finetune_epochs=finetune_epochs)
    if finetune_scope not in ("slot_chunk", "all"):
        raise InputError(f"finetune_scope must be 'slot_chunk' or 'all', got {finetune_scope!r}")
    if communication == "per_iteration" and gradient != "forward":
        raise ValueError("per-iteration communication uploads jvp scalars: it needs gradient='forward'")
    estimator = functools.partial(fwdgrad.forward_grad, num_tangents=num_tangents, chunk_size=tangent_chunk_size,
                                  distribution=distribution)

    def assignment(params) -> np.ndarray:
        return assign_tensors(len(jax.tree.leaves(params)), clients_per_round, tensors_per_chunk=tensors_per_chunk,
                              tensor_order=tensor_order, shared_tensors=head_tensors if share_head else ())

    def slot_mask(params, slot):
        """The boolean pytree of the tensors slot `slot` trains (traced: the slot is data under vmap)."""
        row = jnp.asarray(assignment(params))[slot]
        return jax.tree.unflatten(jax.tree.structure(params), [row[t] for t in range(row.shape[0])])

    gradient_fn = estimator if gradient == "forward" else backprop

    def client_update_with(train):
        def client_update(frozen, params, data, count, slot, key, **train_options):
            mask = slot_mask(params, slot)
            if communication == "per_epoch":   # the estimator draws tangents on the masked tensors only
                local, metrics = train(task, params, frozen, data, count, key, optimizer=client_optimizer,
                                       batch_size=batch_size, epochs=local_epochs, gradient_fn=gradient_fn,
                                       update_mask=mask, **train_options)
                update, examples = pseudo_gradient(params, local), count.astype(jnp.float32)
            else:
                update, examples, metrics = per_iteration_update(frozen, params, data, count, key, mask)
            weight = examples if dilute_aggregation else jax.tree.map(lambda m: examples * m, mask)
            return ClientOutput(update, weight, metrics)
        return client_update

    def per_iteration_update(frozen, params, data, count, key, mask):
        batch, tangent_key, dropout_key = first_batch(data, count, key, batch_size)
        options = dict(chunk_size=tangent_chunk_size, distribution=distribution, mask=mask)
        loss, scalars = fwdgrad.jvp_scalars(task.loss, params, tangent_key, frozen, batch, dropout_key,
                                            num_tangents=num_tangents, **options)
        # Uploaded: the K scalars. The server knows the client's seed and slot, and regenerates ĝ:
        update = fwdgrad.grad_from_scalars(params, tangent_key, scalars, **options)
        return update, jnp.sum(batch["mask"]), {"loss": loss, "steps": jnp.float32(1)}

    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key, *, finetune=False):
        groups = {"generalized": evaluate_examples(task, params, frozen, test, test_count, batch_size=eval_batch_size)}
        if finetune:
            # the evaluated client's chunk: that of slot `client mod C`, as a client in that slot trains it
            mask = slot_mask(params, client % clients_per_round) if finetune_scope == "slot_chunk" else None
            local, _ = local_training(task, params, frozen, train, train_count, key, optimizer=client_optimizer,
                                      batch_size=batch_size, epochs=finetune_epochs, gradient_fn=estimator,
                                      update_mask=mask)
            groups["finetuned"] = evaluate_examples(task, local, frozen, test, test_count, batch_size=eval_batch_size)
        return groups

    def bytes_per_round(params_like, cohort_size) -> Communication:
        sizes = np.array([x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params_like)])
        down = int(sizes.sum()) * cohort_size  # every client runs the whole model, so it needs every adapter
        if communication == "per_iteration":
            return Communication(down=down, up=4 * num_tangents * cohort_size)
        up_per_slot = assignment(params_like)[:cohort_size] @ sizes
        return Communication(down=down, up=int(up_per_slot.sum()))

    return FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update_with(local_training), server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=functools.partial(evaluate_client, finetune=finetune_epochs > 0 and finetune_every_evaluation),
        evaluate_client_final=functools.partial(evaluate_client, finetune=finetune_epochs > 0),
        bytes_per_round=bytes_per_round,
        eager_client_update=client_update_with(dispatched_local_training) if communication == "per_epoch" else None)


def chunk_gradient_shares(task: Task, params: PyTree, frozen: PyTree, batches: Sequence[dict],
                          assignment: np.ndarray) -> np.ndarray:
    """Where the gradient lives: each chunk's share of ‖∇L‖², for the exact (backprop) gradient of the mean loss
    over the real examples of `batches`,

        g = ∇_θ Σ_b Σ_i m_bi ℓ_bi / Σ_b Σ_i m_bi,        share_j = Σ_{t: M[j, t]} ‖g_t‖² / ‖g‖²,

    with the chunks the rows of `assignment` M [J, T] over the T tensors in `jax.tree.leaves` order
    (`assign_tensors`: with J = the number of chunks, one row per chunk; with J = the cohort size, one per slot).
    Each tensor must be in exactly one row, so the shares sum to 1. Deterministic (no dropout); the gradient is
    accumulated batch by batch in float32, the norms taken in float64.

    Example (3 tensors, chunks {0, 1} and {2}; experiments/spry_gradient_share.py runs it on the offline task):
      >>> shares = chunk_gradient_shares(task, params, frozen, [batch], np.array([[1, 1, 0], [0, 0, 1]], bool))
      >>> shares.shape, shares.sum()        # ((2,), 1.0)
    """
    assignment = np.asarray(assignment, bool)
    num_tensors = len(jax.tree.leaves(params))
    if assignment.ndim != 2 or assignment.shape[1] != num_tensors or not (assignment.sum(axis=0) == 1).all():
        raise ValueError(f"assignment must be a [chunks, {num_tensors}] boolean matrix with each tensor in exactly "
                         f"one chunk, got shape {assignment.shape}")
    total, examples = None, 0.0
    for batch in batches:
        grad = _summed_loss_grad(task.loss, params, frozen, batch)
        total = grad if total is None else jax.tree.map(jnp.add, total, grad)
        examples += float(np.sum(batch["mask"]))
    squares = np.array([np.sum(np.square(np.asarray(g, np.float64) / examples)) for g in jax.tree.leaves(total)])
    return assignment @ squares / squares.sum()


@functools.partial(jax.jit, static_argnums=0)
def _summed_loss_grad(loss_fn, params, frozen, batch):
    """∇_θ Σ_i m_i ℓ_i on one batch (the batch's mean loss times its real examples)."""
    return jax.grad(lambda p: loss_fn(p, frozen, batch, None) * jnp.sum(batch["mask"]))(params)

"""Flow's routed layers and models: per input instance, each routing point mixes a global and a local copy of a layer.

Reference: "Flow: Per-Instance Personalized Federated Learning Through Dynamic Routing", arXiv 2211.15281; released
code github.com/Astuary/Flow (models/*_dynamic_v4.py, the versions its trainer imports).

At routing point k, with input h_k and the raw input x, a policy network gives p_k(x) = (p_k^g, p_k^l) ∈ Δ²:

    h_{k+1} = p_k^g · f_k^g(h_k) + p_k^l · f_k^l(h_k)          soft mixing (training)
    h_{k+1} = f_k^{d_k}(h_k),  d_k = argmax p_k(x)              hard decisions (evaluation)

`mode` chooses the path of every call: "global" (p ≡ (1, 0): the global model, the router is not evaluated),
"local" (p ≡ (0, 1)) or "routed" (the router's p, soft, or hard with `hard=True`). The column order is
(global, local) everywhere; the released models disagree on it, which this module does not copy.

Parameter groups are NNX Variable types, so each of Flow's three training phases differentiates one group only:

    GlobalParam   θ_g  the global copy of every routed layer and every shared layer (an embedding, a stem norm)
    LocalParam    θ_l  the local copy of every routed layer
    RouterParam   φ    the policy network

    graphdef, theta_g, theta_l, phi = nnx.split(model, GlobalParam, LocalParam, RouterParam)

`routed_model` does that split once and exposes the pure function
`apply((θ_g, θ_l, φ), batch, *, mode, hard, key) -> (logits, probs)` over pure-dict states. A phase closes over
the other two groups and takes `jax.grad` with respect to its own, so the others receive no update by construction:

    local phase:   jax.grad(lambda l: loss(apply((g, l, r), batch, mode="local")))(l)
    router phase:  jax.grad(lambda r: loss(apply((g, l, r), batch, mode="routed")) + λ·R(probs))(r)
    global phase:  jax.grad(lambda g: loss(apply((g, l, r), batch, mode="global")))(g)

The pure paths leave the other path's copies and the router out of the computation altogether (exact-zero
gradients); shared layers are global, so the local path reads them too (but its phase does not train them).

To route your own model: wrap each routed layer in `Routed(factory, rngs=...)` (the factory builds the layer from
`nnx.Rngs`), tag shared layers with `as_group(layer, GlobalParam)`, give a `Router` one exit per routing point, and
pass `route(...)`'s weights to each `Routed` call; see `spryjax.nn.routed_models.RoutedCNN` for a complete
example in thirty lines. The paper's three architectures are in `spryjax.nn.routed_models`, the objectives beside
`spryjax.task`.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Sequence, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from spryjax.models.layers import dropout, split_key
from spryjax.task import Objective, Task

PyTree = Any
Mode = Literal["global", "local", "routed"]
MODES: tuple[str, ...] = ("global", "local", "routed")


class GlobalParam(nnx.Param):
    """θ_g: the global copy of each routed layer, and every shared layer; trained on the pure global path."""


class LocalParam(nnx.Param):
    """θ_l: the local copy of each routed layer; trained on the pure local path."""


class RouterParam(nnx.Param):
    """φ: the policy network; trained on the routed path."""


GROUPS: tuple[type[nnx.Param], ...] = (GlobalParam, LocalParam, RouterParam)

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def as_group(module: ModuleT, group: type[nnx.Param]) -> ModuleT:
    """Re-types, in place, every parameter of `module` that is not yet in a group as `group`; returns `module`.

    Flax layers create plain `nnx.Param`s; this is how a layer built by any factory joins a group. Parameters already
    in a group keep theirs, so a model can tag its parts and then the whole. A parameter shared by two submodules
    stays shared.
    """
    retyped: dict[int, nnx.Param] = {}
    for _, sub in list(nnx.iter_modules(module)):
        for name, value in list(vars(sub).items()):
            if isinstance(value, nnx.Param) and not isinstance(value, GROUPS):
                if id(value) not in retyped:
                    retyped[id(value)] = group.from_metadata(value.get_value(), value.get_metadata())
                setattr(sub, name, retyped[id(value)])
    return module


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def path_weights(mode: Mode, shape: tuple[int, ...]) -> jax.Array:
    """[*shape, 2] weights of a pure path: (1, 0) everywhere for "global", (0, 1) for "local"."""
    check_mode(mode)
    if mode == "routed":
        raise ValueError("path_weights is for the pure paths; the routed path takes the router's weights")
    return jnp.broadcast_to(jax.nn.one_hot(int(mode == "local"), 2), (*shape, 2))


def hard_decisions(p: jax.Array) -> jax.Array:
    """One-hot argmax of p [..., 2]: d = argmax p; a tie goes to the global path. (The released code rounds p,
    which maps a 0.5/0.5 tie to (0, 0) and drops the layer's output.)"""
    return jax.nn.one_hot(jnp.argmax(p, -1), 2, dtype=p.dtype)


def route(policy: Callable[[], jax.Array], *, mode: Mode, hard: bool, shape: tuple[int, ...]) -> jax.Array:
    """The weights [*shape, 2] the routing points use: the policy's p (soft) or its argmax (hard) on the routed
    path, the constant one-hot of a pure path otherwise (where `policy` is never called, so it costs nothing)."""
    check_mode(mode)
    if mode != "routed":
        return path_weights(mode, shape)
    p = policy()
    return hard_decisions(p) if hard else p


def mix(p: jax.Array, global_out: PyTree, local_out: PyTree) -> PyTree:
    """p^g · global_out + p^l · local_out, leaf by leaf; p [*lead, 2] broadcasts over each leaf's trailing axes.

    Example: p [B, 2] with conv outputs [B, H, W, C]; p [B, T, 2] with per-token outputs [B, T, V]."""
    def one(g: jax.Array, l: jax.Array) -> jax.Array:
        shape = p.shape[:-1] + (1,) * (g.ndim - p.ndim + 1)
        w = p.astype(g.dtype)
        return w[..., 0].reshape(shape) * g + w[..., 1].reshape(shape) * l
    return jax.tree.map(one, global_out, local_out)


class Routed(nnx.Module):
    """A layer held twice, global and local: y = p^g · f^g(*args) + p^l · f^l(*args).

    `factory(rngs)` builds the layer (any Flax module or callable module tree); the two copies are initialized
    independently and their parameters are typed `GlobalParam` and `LocalParam`. Outputs may be pytrees (an LSTM
    cell's (carry, h)): they are mixed leaf by leaf.

    Example:
      >>> layer = Routed(lambda r: nnx.Linear(16, 8, rngs=r), rngs=nnx.Rngs(0))
      >>> y = layer(x, p=p, mode="routed")          # x [B, 16], p [B, 2] -> y [B, 8]
    """

    def __init__(self, factory: Callable[[nnx.Rngs], nnx.Module], *, rngs: nnx.Rngs):
        self.global_ = as_group(factory(rngs), GlobalParam)
        self.local = as_group(factory(rngs), LocalParam)

    def candidates(self, *args, **kwargs) -> tuple[Any, Any]:
        """(f^g(*args), f^l(*args)): both outputs, for a router that looks at them before mixing."""
        return self.global_(*args, **kwargs), self.local(*args, **kwargs)

    def __call__(self, *args, p: jax.Array | None = None, mode: Mode, **kwargs) -> Any:
        """f^g(*args) for "global", f^l(*args) for "local", `mix(p, ...)` for "routed" (p soft or one-hot)."""
        check_mode(mode)
        if mode == "global":
            return self.global_(*args, **kwargs)
        if mode == "local":
            return self.local(*args, **kwargs)
        if p is None:
            raise ValueError("the routed path needs the mixing weights p")
        return mix(p, *self.candidates(*args, **kwargs))


def default_exits(num_layers: int, num_points: int) -> tuple[int, ...]:
    """Exit k reads hidden layer min(max(L − P + 1 + k, 0), L − 1): the last P layers get one exit each, and the
    last layer two when P = L + 1, which is the paper's layout (EMNIST: 3 layers, 4 exits; CIFAR: 5 and 6)."""
    return tuple(min(max(num_layers - num_points + 1 + k, 0), num_layers - 1) for k in range(num_points))


class Router(nnx.Module):
    """The policy network: an MLP with one 2-way softmax exit per routing point.

        a_0 = x,  a_j = relu(W_j a_{j−1} + b_j)  (j = 1..L, widths `hidden`)
        p_k(x) = softmax(V_k · dropout(a_{e_k}) + c_k)   (k = 1..P, e_k = `exits[k]`, default `default_exits`)

    x [..., in_features] -> p [..., P, 2], columns (global, local). Dropout runs only when a key is given. The
    released EMNIST policy (784→350→150→50, exits after each layer plus a final head) applies dropout to the first
    three exits only and its CIFAR policy none at all; here one rate serves every exit.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], *, num_points: int,
                 exits: Sequence[int] | None = None, dropout_rate: float = 0.0, rngs: nnx.Rngs):
        if not hidden:
            raise ValueError("a Router needs at least one hidden layer")
        exits = default_exits(len(hidden), num_points) if exits is None else tuple(exits)
        if len(exits) != num_points or not all(0 <= e < len(hidden) for e in exits):
            raise ValueError(f"exits {exits} must name {num_points} of the {len(hidden)} hidden layers")
        widths = (in_features, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.heads = nnx.List([nnx.Linear(hidden[e], 2, rngs=rngs) for e in exits])
        self.exits = exits
        self.dropout_rate = dropout_rate
        as_group(self, RouterParam)

    @property
    def num_points(self) -> int:
        return len(self.exits)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        activations = []
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
            activations.append(x)
        keys = split_key(key, self.num_points)
        logits = [head(dropout(activations[e], self.dropout_rate, k))
                  for head, e, k in zip(self.heads, self.exits, keys)]
        return jax.nn.softmax(jnp.stack(logits, -2).astype(jnp.float32), -1)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions for trainers.
# ----------------------------------------------------------------------------------------------------------------


States = tuple[PyTree, PyTree, PyTree]


class RoutedModel(NamedTuple):
    """A routed architecture as pure functions over its three parameter groups (see the module docstring).

    apply(states, batch, *, mode, hard=False, key=None) -> (logits, probs)
        states = (θ_g, θ_l, φ): nested dicts of arrays, in the order of `GROUPS`; logits [B, C] or [B, T, V];
        probs [B, (T,) P, 2]: the weights each of the P routing points used. `key` drives dropout (None: none).
    states: the initial (θ_g, θ_l, φ).
    objective(logits, batch) -> (loss, correct, weight) per example [B] or per token [B, T].
    make_task(logits_fn) -> Task: the matching `Task` for any logits function (used for the global path).
    """
    apply: Callable[..., tuple[jax.Array, jax.Array]]
    states: States
    objective: Objective
    make_task: Callable[[Callable[..., jax.Array]], Task]
    num_points: int


def routed_model(module: nnx.Module, *, objective: Objective,
                 make_task: Callable[[Callable[..., jax.Array]], Task], num_points: int,
                 input_key: str = "x") -> RoutedModel:
    """Splits `module` into (graphdef, θ_g, θ_l, φ) once and closes `apply` over the graphdef.

    Every parameter of `module` must be in one of the three groups (nnx.split raises otherwise); the module is
    called as `module(batch[input_key], mode=..., hard=..., key=...)`.
    """
    graphdef, *states = nnx.split(module, *GROUPS)

    def apply(states: States, batch: dict, *, mode: Mode, hard: bool = False, key: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
        return nnx.merge(graphdef, *states)(batch[input_key], mode=mode, hard=hard, key=key)

    return RoutedModel(apply, tuple(nnx.to_pure_dict(s) for s in states), objective, make_task, num_points)


def local_from_global(theta_g: PyTree, theta_l: PyTree) -> PyTree:
    """θ_l with every routed layer's local copy replaced by its global copy: for each `Routed` layer, whose pure
    states are θ_g[...]["global_"] and θ_l[...]["local"] at the same path, θ_l[...]["local"] := θ_g[...]["global_"].

    Flow's `local_init` options use it (the released code initializes the copies independently). Raises ValueError
    if a local copy has no global copy of the same structure.

    Example:
      >>> theta_g, theta_l, phi = model.states
      >>> theta_l = local_from_global(theta_g, theta_l)     # f_local(x) == f_global(x) for every x
    """
    def copy(g: Any, l: Any, path: str) -> Any:
        if not isinstance(l, dict):
            raise ValueError(f"local parameter {path or '/'} is not inside a Routed layer's local copy")
        out = {}
        for name, sub in l.items():
            here = f"{path}/{name}"
            if not isinstance(g, dict) or (name not in g and not (name == "local" and "global_" in g)):
                raise ValueError(f"local copy {here} has no global counterpart")
            if name == "local":
                source = g["global_"]
                if jax.tree.structure(source) != jax.tree.structure(sub) or any(
                        (a.shape, a.dtype) != (b.shape, b.dtype)
                        for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(sub))):
                    raise ValueError(f"local copy {here} and its global copy differ in structure, shapes or dtypes")
                out[name] = source
            else:
                out[name] = copy(g[name], sub, here)
        return out

    return copy(theta_g, theta_l, "")


def global_logits(model: RoutedModel) -> Callable[..., jax.Array]:
    """The pure global path as `logits(θ_g, frozen, batch, key=None)`, the signature of a `Task`'s logits function.

    The global path reads no local or router parameter; zeros of their shapes stand in for them inside the traced
    function, where XLA drops them, so they cost neither memory nor communication.
    """
    unused = jax.eval_shape(lambda: model.states[1:])

    def logits(trainable, frozen, batch, key=None):
        stand_ins = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), unused)
        return model.apply((trainable, *stand_ins), batch, mode="global", key=key)[0]

    return logits


def global_task(model: RoutedModel) -> tuple[Task, PyTree, PyTree]:
    """The pure global path as a `Task`, for non-Flow trainers (FedAvg, ...): trainable = θ_g, frozen = {}."""
    return model.make_task(global_logits(model)), model.states[0], {}

"""Flow's three routed architectures (the paper's EMNIST CNN, a GroupNorm ResNet for CIFAR, the Stackoverflow LSTM)
as Flax NNX modules built from `spryjax.nn.routing`'s primitives, and builders that size them for a `Dataset` and
return their pure-function view (`routing.RoutedModel`).

Reference: "Flow: Per-Instance Personalized Federated Learning Through Dynamic Routing", arXiv 2211.15281; released
code github.com/Astuary/Flow (models/*_dynamic_v4.py).
"""
from __future__ import annotations

import functools
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spryjax.data.dataset import Dataset
from spryjax.errors import InputError
from spryjax.models.layers import dropout, split_key
from spryjax.nn.routing import (GlobalParam, Mode, Routed, Router, RoutedModel, as_group, check_mode, mix,
                                path_weights, route, routed_model)
from spryjax.signatures import forwards_options_to
from spryjax.task import classification_objective, classification_task, next_word_objective, objective_task


# ----------------------------------------------------------------------------------------------------------------
# The paper's models. Each __call__(inputs, *, mode, hard=False, key=None) returns (logits, probs) where probs
# [B, (T,) P, 2] are the weights each routing point used (soft p, one-hot decisions, or a pure path's constant).
# ----------------------------------------------------------------------------------------------------------------


class RoutedCNN(nnx.Module):
    """The EMNIST CNN with 4 routing points (conv1, conv2, dense1, dense2) and a policy on the raw image.

        conv 3×3 C→c1, relu, conv 3×3 c1→c2, relu, maxpool 2, dropout, flatten, dense →d, relu, dropout, dense →classes

    Paper sizes (defaults): c = (32, 64), d = 128, dropout (.25, .5), 28×28×1 → 9216 → 128 → 62, about 1.2M
    parameters per copy; policy 784→350→150→50 with 4 exits, dropout .3. Any H, W ≥ 6 works (8×8 digits: 256 → d).
    Inputs [B, H, W] or [B, H, W, C].
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, channels: Sequence[int] = (32, 64),
                 dense: int = 128, dropout_rates: Sequence[float] = (0.25, 0.5),
                 router_hidden: Sequence[int] = (350, 150, 50), router_dropout: float = 0.3, rngs: nnx.Rngs):
        h, w, c = (*image_shape, 1) if len(image_shape) == 2 else tuple(image_shape)
        c1, c2 = channels
        self.image_shape = (h, w, c)
        self.dropout_rates = tuple(dropout_rates)
        conv = lambda a, b: lambda r: nnx.Conv(a, b, (3, 3), padding="VALID", rngs=r)
        self.conv1 = Routed(conv(c, c1), rngs=rngs)
        self.conv2 = Routed(conv(c1, c2), rngs=rngs)
        self.dense1 = Routed(lambda r: nnx.Linear((h - 4) // 2 * ((w - 4) // 2) * c2, dense, rngs=r), rngs=rngs)
        self.dense2 = Routed(lambda r: nnx.Linear(dense, num_classes, rngs=r), rngs=rngs)
        self.router = Router(h * w * c, router_hidden, num_points=4, dropout_rate=router_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, mode: Mode, hard: bool = False, key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        b = x.shape[0]
        x = x.reshape(b, *self.image_shape)
        router_key, key1, key2 = split_key(key, 3)
        p = route(lambda: self.router(x.reshape(b, -1), key=router_key), mode=mode, hard=hard, shape=(b, 4))
        h = jax.nn.relu(self.conv1(x, p=p[:, 0], mode=mode))
        h = jax.nn.relu(self.conv2(h, p=p[:, 1], mode=mode))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        h = dropout(h, self.dropout_rates[0], key1).reshape(b, -1)
        h = jax.nn.relu(self.dense1(h, p=p[:, 2], mode=mode))
        h = dropout(h, self.dropout_rates[1], key2)
        return self.dense2(h, p=p[:, 3], mode=mode), p


class BasicBlock(nnx.Module):
    """ResNet basic block with GroupNorm: relu(GN(conv3×3(relu(GN(conv3×3(x))))) + shortcut(x)); the second norm's
    scale starts at zero (as in the released code) so each block starts as its shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, norm_groups: int, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding=1, use_bias=False, rngs=rngs)
        norm = functools.partial(nnx.GroupNorm, num_groups=norm_groups, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, strides=stride)
        self.norm1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels)
        self.norm2 = norm(out_channels, scale_init=nnx.initializers.zeros_init())
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nnx.Sequential(
            nnx.Conv(in_channels, out_channels, (1, 1), strides=stride, use_bias=False, rngs=rngs),
            norm(out_channels)) if needs_projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return jax.nn.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class RoutedResNet(nnx.Module):
    """ResNet with GroupNorm and 2 + len(widths) routing points: the stem conv, each stage, the classifier.

    Paper (CIFAR): ResNet-18, widths (64, 128, 256, 512) with 2 blocks each, GroupNorm with 2 groups, 6 routing
    points, policy 3072→1000→750→350→150→50 with 6 exits. `stem="imagenet"` is the released code's 7×7/2 conv
    and 3×3/2 max-pool; `stem="cifar"` a 3×3/1 conv without pooling, for small images. The stem's norm is shared
    (global group). Features are average-pooled over space (the released code's AvgPool2d(1) only flattens, which is
    the same when the last map is 1×1, as it is for 32×32 inputs with the ImageNet stem).
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2), norm_groups: int = 2,
                 stem: Literal["imagenet", "cifar"] = "imagenet",
                 router_hidden: Sequence[int] = (1000, 750, 350, 150, 50), router_dropout: float = 0.0,
                 rngs: nnx.Rngs):
        h, w, c = (*image_shape, 1) if len(image_shape) == 2 else tuple(image_shape)
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.image_shape = (h, w, c)
        self.pool_stem = stem == "imagenet"
        kernel, stride = ((7, 7), 2) if stem == "imagenet" else ((3, 3), 1)
        self.stem = Routed(lambda r: nnx.Conv(c, widths[0], kernel, strides=stride, padding=kernel[0] // 2,
                                              use_bias=False, rngs=r), rngs=rngs)
        self.stem_norm = as_group(nnx.GroupNorm(widths[0], num_groups=norm_groups, rngs=rngs), GlobalParam)

        def stage(i: int) -> Callable[[nnx.Rngs], nnx.Module]:
            first_in = widths[max(i - 1, 0)]
            return lambda r: nnx.Sequential(*[
                BasicBlock(first_in if j == 0 else widths[i], widths[i], 2 if (i > 0 and j == 0) else 1,
                           norm_groups=norm_groups, rngs=r) for j in range(blocks[i])])

        self.stages = nnx.List([Routed(stage(i), rngs=rngs) for i in range(len(widths))])
        self.fc = Routed(lambda r: nnx.Linear(widths[-1], num_classes, rngs=r), rngs=rngs)
        self.router = Router(h * w * c, router_hidden, num_points=len(widths) + 2, dropout_rate=router_dropout,
                             rngs=rngs)

    def __call__(self, x: jax.Array, *, mode: Mode, hard: bool = False, key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        b = x.shape[0]
        x = x.reshape(b, *self.image_shape)
        points = self.router.num_points
        p = route(lambda: self.router(x.reshape(b, -1), key=key), mode=mode, hard=hard, shape=(b, points))
        h = jax.nn.relu(self.stem_norm(self.stem(x, p=p[:, 0], mode=mode)))
        if self.pool_stem:
            h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for k, stage in enumerate(self.stages):
            h = stage(h, p=p[:, k + 1], mode=mode)
        return self.fc(h.mean((1, 2)), p=p[:, points - 1], mode=mode), p


class RoutedLSTM(nnx.Module):
    """The Stackoverflow next-word LSTM with per-time-step routing of the recurrent cell and per-token routing of
    the two output layers (3 routing points, probs [B, T, 3, 2]).

        e_t = E[w_t];  (s_t^g, h_t^g) = LSTM^g(s_{t−1}, e_t),  (s_t^l, h_t^l) = LSTM^l(s_{t−1}, e_t)
        q_t = step_router([e_t, h_t^g, h_t^l]);  s_t = q_t^g s_t^g + q_t^l s_t^l   (cell and hidden state)
        z^g, z^l = D1^g(h_t), D1^l(h_t);  (r_t, u_t) = output_router([z^g, z^l])
        z = r^g z^g + r^l z^l;  logits_t = u^g D2^g(z) + u^l D2^l(z)

    Paper sizes (defaults): embedding 96, hidden 670, dense 670→96→vocab (10,000 words + 4 specials), sequences of
    20; step policy (96+2·670)→500→250→100→50, output policy 192→75→30→10 with exits after 30 and 10, dropout .3.
    The embedding is shared (global group). Deviations from the released code, both so that a routed LSTM is a
    `Routed` layer like any other: both cells read the mixed state s_{t−1} (the released local cell kept a private
    state chain), and the router's exits are not passed through a relu before the softmax.
    """

    def __init__(self, vocab_size: int, *, embed: int = 96, hidden: int = 670, projection: int | None = None,
                 step_router_hidden: Sequence[int] = (500, 250, 100, 50),
                 output_router_hidden: Sequence[int] = (75, 30, 10), router_dropout: float = 0.3, rngs: nnx.Rngs):
        projection = embed if projection is None else projection
        self.hidden = hidden
        self.embed = as_group(nnx.Embed(vocab_size, embed, rngs=rngs), GlobalParam)
        self.cell = Routed(lambda r: nnx.OptimizedLSTMCell(embed, hidden, rngs=r), rngs=rngs)
        self.dense1 = Routed(lambda r: nnx.Linear(hidden, projection, rngs=r), rngs=rngs)
        self.dense2 = Routed(lambda r: nnx.Linear(projection, vocab_size, rngs=r), rngs=rngs)
        self.step_router = Router(embed + 2 * hidden, step_router_hidden, num_points=1, dropout_rate=router_dropout,
                                  rngs=rngs)
        last = len(output_router_hidden) - 1
        self.output_router = Router(2 * projection, output_router_hidden, num_points=2,
                                    exits=(max(last - 1, 0), last), dropout_rate=router_dropout, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, mode: Mode, hard: bool = False, key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        check_mode(mode)
        b, t = tokens.shape
        e = self.embed(tokens)
        step_key, output_key = split_key(key, 2)
        step_keys = None if step_key is None else jax.random.split(step_key, t)
        zeros = jnp.zeros((b, self.hidden), e.dtype)

        if mode != "routed":
            _, hs = jax.lax.scan(lambda state, e_t: self.cell(state, e_t, mode=mode), (zeros, zeros),
                                 e.swapaxes(0, 1))
            logits = self.dense2(self.dense1(hs.swapaxes(0, 1), mode=mode), mode=mode)
            return logits, path_weights(mode, (b, t, 3))

        def step(state, inputs):
            e_t, key_t = inputs
            (state_g, h_g), (state_l, h_l) = self.cell.candidates(state, e_t)
            q = route(lambda: self.step_router(jnp.concatenate([e_t, h_g, h_l], -1), key=key_t)[:, 0],
                      mode=mode, hard=hard, shape=(b,))
            state = mix(q, state_g, state_l)
            return state, (state[1], q)

        _, (hs, q) = jax.lax.scan(step, (zeros, zeros), (e.swapaxes(0, 1), step_keys))
        hs, q = hs.swapaxes(0, 1), q.swapaxes(0, 1)               # [B, T, H], [B, T, 2]
        z_g, z_l = self.dense1.candidates(hs)
        r = route(lambda: self.output_router(jnp.concatenate([z_g, z_l], -1), key=output_key),
                  mode=mode, hard=hard, shape=(b, t, 2))
        logits = self.dense2(mix(r[:, :, 0], z_g, z_l), p=r[:, :, 1], mode=mode)
        return logits, jnp.concatenate([q[:, :, None], r], axis=2)


# ----------------------------------------------------------------------------------------------------------------
# Builders: Dataset + key + size options -> RoutedModel. `spryjax.build` maps config fields onto the options.
# ----------------------------------------------------------------------------------------------------------------


def _image_shape(dataset: Dataset) -> tuple[int, ...]:
    shape = tuple(dataset.train["x"].shape[1:])
    if len(shape) not in (2, 3):
        raise InputError(f"image models need x of shape [N, H, W] or [N, H, W, C]; dataset {dataset.name!r} has "
                         f"[N, {', '.join(map(str, shape))}]")
    return shape


@forwards_options_to(RoutedCNN, sets=("rngs",))
def emnist_cnn(dataset: Dataset, key: jax.Array, **options) -> RoutedModel:
    """`RoutedCNN` for `dataset`'s images and classes; `options` are RoutedCNN's size keywords."""
    module = RoutedCNN(_image_shape(dataset), dataset.num_classes, rngs=nnx.Rngs(key), **options)
    return routed_model(module, objective=classification_objective, num_points=4,
                        make_task=functools.partial(classification_task, num_classes=dataset.num_classes))


@forwards_options_to(RoutedResNet, sets=("rngs",))
def resnet_gn(dataset: Dataset, key: jax.Array, **options) -> RoutedModel:
    """`RoutedResNet` for `dataset`'s images and classes; `options` are RoutedResNet's size keywords."""
    module = RoutedResNet(_image_shape(dataset), dataset.num_classes, rngs=nnx.Rngs(key), **options)
    return routed_model(module, objective=classification_objective, num_points=module.router.num_points,
                        make_task=functools.partial(classification_task, num_classes=dataset.num_classes))


@forwards_options_to(RoutedLSTM, sets=("rngs",))
def so_lstm(dataset: Dataset, key: jax.Array, *, pad_id: int = 0, **options) -> RoutedModel:
    """`RoutedLSTM` over `dataset.num_classes` token ids (x [N, T] inputs, label [N, T] next tokens, `pad_id`
    padding); `options` are RoutedLSTM's size keywords."""
    module = RoutedLSTM(dataset.num_classes, rngs=nnx.Rngs(key), **options)
    objective = functools.partial(next_word_objective, pad_id=pad_id)
    return routed_model(module, objective=objective, num_points=3,
                        make_task=functools.partial(objective_task, objective=objective))

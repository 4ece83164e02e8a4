"""Sizes and names of pytree leaves, for parameter trees of arrays or `jax.ShapeDtypeStruct`s and Flax NNX modules.

    count_params({"w": zeros((3, 4)), "b": zeros(4)})   -> 16          (scalars)
    tree_bytes({"w": zeros((3, 4), float32)})            -> 48          (bytes)
    leaf_paths({"layers": [{"q": a}], "head": {"w": b}}) -> ["head/w", "layers/0/q"]   (jax.tree.leaves order)
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any


def _params(tree: PyTree | nnx.Module) -> PyTree:
    return nnx.to_pure_dict(nnx.state(tree, nnx.Param)) if isinstance(tree, nnx.Module) else tree


def count_params(tree: PyTree | nnx.Module) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs, or in an NNX module's parameters."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(_params(tree)))


def count_params_by_part(tree: PyTree | nnx.Module) -> dict[str, int]:
    """{top-level part: scalars, …, "total": scalars} of a dict-like parameter tree or an NNX module."""
    counts = {str(name): count_params(part) for name, part in _params(tree).items()}
    return {**counts, "total": sum(counts.values())}


def tree_bytes(tree: PyTree) -> int:
    """Bytes of all leaves (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def leaf_paths(tree: PyTree) -> list[str]:
    """The leaves' key paths as "a/0/b" strings, in `jax.tree.leaves` order."""
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@jax.jit
def all_finite(tree: PyTree) -> jax.Array:
    """Whether every element of every floating-point leaf is finite (one boolean; True for no such leaf)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

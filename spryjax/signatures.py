"""Signatures of builders that forward their options to another function: one place for each option's default."""
from __future__ import annotations

import inspect
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def parameters_of(builder: Callable) -> dict[str, inspect.Parameter]:
    """The parameters a function (or a class's constructor, `self` left out) accepts, by name. A class's own
    signature can hide them (Flax NNX modules are built through a metaclass taking *args, **kwargs)."""
    if isinstance(builder, type):
        return dict(list(inspect.signature(builder.__init__).parameters.items())[1:])
    return dict(inspect.signature(builder).parameters)


def forwards_options_to(base: Callable, *, sets: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorates a builder `f(..., *, own options, **options)` that calls `base(..., **options)`, passing the
    parameters named in `sets` itself: f's signature becomes its own parameters followed by `base`'s other
    keyword-only options (`base` may be a function or a class). `inspect.signature` then lists every option f
    accepts with its one default (in `base`'s signature), which is what the config layer checks a config's fields
    against (`spryjax.build.options`).

    Example:
      >>> @forwards_options_to(fedavg, sets=("gradient_fn", "name"))
      ... def fedfgd(task, *, num_tangents=1, **fedavg_options): ...
      >>> list(inspect.signature(fedfgd).parameters)   # task, num_tangents, client_optimizer, ..., unroll
    """
    def decorate(factory):
        own = inspect.signature(factory)
        kept = [p for p in own.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        forwarded = [p for name, p in parameters_of(base).items()
                     if p.kind == inspect.Parameter.KEYWORD_ONLY and name not in sets and name not in own.parameters]
        factory.__signature__ = own.replace(parameters=kept + forwarded)
        return factory
    return decorate

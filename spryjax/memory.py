"""Memory and compute of a jitted step: XLA's compiled buffer assignment and cost analysis, and the device
allocator's peak where it exists.

`compiled_memory(fn, *args)` compiles `fn` for the given arguments (arrays or `jax.ShapeDtypeStruct`s, so a
7B-parameter step can be measured on a laptop without allocating it) and reads `memory_analysis()`:

    total = argument + output + temp − alias

(On CPU the analysis' own peak field leaves temp out, hence the explicit sum.) temp is what the step allocates
for itself: activations, gradients, optimizer scratch. It is deterministic and works on every backend, so it is
what tests assert on. `device_peak_bytes()` reads `peak_bytes_in_use` from the allocator on GPU/TPU (None on CPU).

`flops_of(compiled)` is XLA's floating-point operation count. XLA counts a loop body once (a `lax.scan` of 10 steps
reports one step's FLOPs), so count a step whose loops have one iteration (e.g. tangents in a single vmapped chunk)
and multiply by the iterations yourself.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

MIB = 2**20


class MemoryReport(NamedTuple):
    """Bytes of one compiled step."""
    argument: int
    output: int
    temp: int
    alias: int

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    def as_dict(self) -> dict[str, int]:
        return {**self._asdict(), "total": self.total}

    def mib(self) -> dict[str, float]:
        return {k: v / MIB for k, v in self.as_dict().items()}


def compiled_memory(fn: Callable[..., Any], *args, **kwargs) -> MemoryReport:
    """Compiles `jax.jit(fn)` for `args` / `kwargs` (arrays or ShapeDtypeStructs) and reports its buffers.

    Example:
      >>> report = compiled_memory(train_step, jax.ShapeDtypeStruct((8, 64), jnp.int32))
      >>> report.temp / 2**20   # MiB of activations and scratch
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return memory_of(jitted.lower(*args, **kwargs).compile())


def memory_of(compiled: Any) -> MemoryReport:
    """The MemoryReport of an already compiled function (`jit(f).lower(...).compile()`)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError(f"backend {jax.default_backend()!r} gives no memory analysis")
    return MemoryReport(argument=int(analysis.argument_size_in_bytes), output=int(analysis.output_size_in_bytes),
                        temp=int(analysis.temp_size_in_bytes), alias=int(analysis.alias_size_in_bytes))


def flops_of(compiled: Any) -> float:
    """XLA's FLOP count of an already compiled function (0.0 where the backend gives none); loops count once."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def device_free_bytes(device: jax.Device | None = None) -> int | None:
    """bytes_limit − bytes_in_use of the device allocator (GPU/TPU), or None where it keeps no statistics (CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
    """`peak_bytes_in_use` of the device allocator (GPU/TPU), or None where the backend keeps no statistics (CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def shape_like(tree: Any) -> Any:
    """The pytree of `jax.ShapeDtypeStruct`s describing `tree` (arrays stay unallocated when passed on)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

"""Custom VJPs inside `shard_map` / `pmap`: cotangents must vary over the same mesh axes as their primals."""

import jax
from jax import lax


def _varying_axes(a) -> frozenset:
    """The mesh axes `a` varies along inside `shard_map` (empty outside)."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; earlier releases call it `vma`
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def sum_to_primal_axes(cotangent, primal):
    """psum `cotangent` over the mesh axes it varies along but `primal` does not.

    A replicated primal (a weight) meeting a per-device one (a batch shard) is
    implicitly broadcast to every device; the transpose of that broadcast is a
    sum over the devices. JAX inserts it for its own rules; a hand-written
    backward must do it itself. Outside `shard_map` this is the identity.
    """
    extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return lax.psum(cotangent, extra) if extra else cotangent

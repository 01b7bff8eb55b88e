"""What a formulation is: one way to compute the forward, dE/dX or dE/dW of a conv, and the one calling convention
every formulation follows.

Geometry first, then the arrays, then the static shape the result takes where the arrays do not give it:

- forward: `(geometry, x, w, b) -> Y` (:class:`ForwardFormula`);
- dE/dX: `(geometry, g, w, in_spatial) -> dE/dX` (:class:`InputGradientFormula`): the input itself is not needed,
  only its spatial shape, so :func:`convlib.ops.conv_transpose` and a transpose rule, which have no input, call it too;
- dE/dW: `(geometry, x, g, kernel_shape) -> dE/dW` (:class:`WeightGradientFormula`);
- both gradients: `(geometry, x, w, g) -> (dE/dX, dE/dW)` (:class:`GradientsFormula`): a plan, or a lowering's inner
  plan.

A formulation's own parameters (a block side, a chunk size) are keyword-only, bound by the plan with
`functools.partial`. Each runs under its `jax.named_scope` (:attr:`Formulation.scope`), so a profile or a lowered
program reads like the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

import jax

from convlib.ops.geometry import Geometry


class ForwardFormula(Protocol):
    """`Y = X (*) W + b`: x (N, *S, C_in) or channels first; returns (N, *S_out, C_out) or channels first."""

    def __call__(self, geometry: Geometry, x: jax.Array, w: jax.Array, b: jax.Array | None, /) -> jax.Array: ...


class InputGradientFormula(Protocol):
    """dE/dX from the output cotangent `g` and the kernel `w`, for an input of spatial shape `in_spatial`."""

    def __call__(self, geometry: Geometry, g: jax.Array, w: jax.Array, in_spatial: Sequence[int], /) -> jax.Array: ...


class WeightGradientFormula(Protocol):
    """dE/dW from the input `x` and the output cotangent `g`, for a kernel of shape `kernel_shape`."""

    def __call__(self, geometry: Geometry, x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], /) -> jax.Array: ...


class GradientsFormula(Protocol):
    """(dE/dX, dE/dW) of one conv from its input `x`, kernel `w` and output cotangent `g`."""

    def __call__(
        self, geometry: Geometry, x: jax.Array, w: jax.Array, g: jax.Array, /
    ) -> tuple[jax.Array, jax.Array]: ...


F = TypeVar("F", ForwardFormula, InputGradientFormula, WeightGradientFormula)


@dataclasses.dataclass(frozen=True)
class Formulation(Generic[F]):
    """A named formula: `fn` run under `jax.named_scope(scope)`.

    name: its name in a plan; detail: a parameter, shown in the plan; scope: the named scope it runs under
    (`convlib.conv.forward...`, `convlib.conv.dX.<name>`, `convlib.conv.dW.<name>`).

    >>> from convlib.ops import textbook
    >>> dx = input_gradient_formulation("textbook", textbook.input_gradient)
    >>> str(dx), dx.scope
    ('textbook', 'convlib.conv.dX.textbook')
    """

    name: str
    fn: F
    scope: str
    detail: str = ""

    def __call__(self, geometry: Geometry, *operands) -> jax.Array:
        with jax.named_scope(self.scope):
            return self.fn(geometry, *operands)

    def __str__(self) -> str:
        return f"{self.name}{self.detail}"


def forward_formulation(name: str, fn: ForwardFormula, detail: str = "") -> Formulation[ForwardFormula]:
    """A forward formulation, under `convlib.conv.forward.<name>` (the textbook's: `convlib.conv.forward`)."""
    scope = "convlib.conv.forward" if name == "textbook" else f"convlib.conv.forward.{name}"
    return Formulation(name, fn, scope, detail)


def input_gradient_formulation(
    name: str, fn: InputGradientFormula, detail: str = ""
) -> Formulation[InputGradientFormula]:
    """A dE/dX formulation, under `convlib.conv.dX.<name>`."""
    return Formulation(name, fn, f"convlib.conv.dX.{name}", detail)


def weight_gradient_formulation(
    name: str, fn: WeightGradientFormula, detail: str = ""
) -> Formulation[WeightGradientFormula]:
    """A dE/dW formulation, under `convlib.conv.dW.<name>`."""
    return Formulation(name, fn, f"convlib.conv.dW.{name}", detail)

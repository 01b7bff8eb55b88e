"""Which formulation `backward="custom"` runs for one conv, per platform: a policy table.

The policy is data: tables of :class:`Rule` (`when(case) -> then(case)`, each with a one-line reason), read top to
bottom, the first match wins. :data:`FORWARD_RULES` pick the forward that runs under differentiation;
:data:`GRADIENT_RULES` pick the backward, for ungrouped 1-D and 2-D convs through :data:`INPUT_GRADIENT_RULES`
and :data:`WEIGHT_GRADIENT_RULES`. A :class:`Plan` is either :class:`Formulas` (one dE/dX and one dE/dW
formulation) or :class:`Lowered` (a :class:`~convlib.ops.fast_backward.Lowering` whose smaller convs follow an
inner plan). The CPU's rules were measured on XLA:CPU (JAX 0.10; the numbers are in docs/performance.md,
"Measurements behind the CPU plan"); other platforms run the textbook formulation, which their conv libraries
take natively.

:func:`planned_forward` and :func:`planned_gradients` run the CPU plan on a CPU and the other platforms' plan
elsewhere, chosen by `lax.platform_dependent` where the program is lowered (so `jax.default_device`, export, or a
jit pinned to another device get the right one). The primal of a conv (outside differentiation) is never planned:
it is one `lax.conv_general_dilated` (:mod:`convlib.ops.conv`).

To add a formulation: write it in :mod:`convlib.ops.fast_backward` (calling convention:
:mod:`convlib.ops.formulation`), name it here, and add its rule to a table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import jax
from jax import lax

from convlib.ops import fast_backward, fast_forward, textbook
from convlib.ops.compiler import compiler_options as _compiler_options
from convlib.ops.formulation import (
    Formulation,
    ForwardFormula,
    forward_formulation,
    input_gradient_formulation,
    weight_gradient_formulation,
)
from convlib.ops.geometry import Geometry

# --------------------------------------------------------------------------- the measured constants

CHANNEL_MULTIPLE = 8  # XLA:CPU's Eigen convs run fastest with output channels a multiple of its 8-float vectors
CHUNK = 8  # fewest images per weight-gradient chunk
CHUNK_PIXELS = 1024  # output pixels a weight-gradient chunk aims at (small maps take more images)
MAX_PLANNED_GROUPS = 4  # more groups: textbook per group, a bounded op count
FEW_INPUT_CHANNELS = 3  # a first layer's inputs
FEW_INPUT_CHUNK_MAX_OUT = 16  # a first layer chunks dW only up to this many outputs (and in NHWC)
FOLD_MAX_IN = 24  # dX by folded columns up to this many input channels
FOLD_ONE_CHANNEL_MAX_OUT = 12  # ... and, with one input channel, up to this many outputs
BLOCK = 2  # side of the space-to-depth block
ONE_CHANNEL_BLOCK = 4  # ... with one input channel
BLOCKS_MAX_IN = 6  # space-to-depth forward up to this many input channels
BLOCKS_MAX_OUT = 16  # ... and this many outputs
BLOCKS_DW_MAX_OUT = 6  # dW by space-to-depth: one input channel to at most this many outputs
BLOCKS_DW_CHUNK = 32  # ... in batch chunks of this many images

# --------------------------------------------------------------------------- the formulations by name

FORWARD_TEXTBOOK = forward_formulation("textbook", textbook.forward)


def forward_blocks(block: int) -> Formulation[ForwardFormula]:
    """The forward by space-to-depth in blocks of `block` x `block` pixels."""
    fn = functools.partial(fast_forward.forward_by_space_to_depth, block=block)
    return forward_formulation("space_to_depth", fn, f" {block}x{block}")


DX_TEXTBOOK = input_gradient_formulation("textbook", textbook.input_gradient)
DX_PHASES = input_gradient_formulation("phases", fast_backward.input_gradient_by_phases)
DX_TAPS = input_gradient_formulation("taps", fast_backward.depthwise_input_gradient)
DX_PADDED = input_gradient_formulation(
    "padded",
    functools.partial(fast_backward.input_gradient_with_padded_channels, multiple=CHANNEL_MULTIPLE),
    f" to {CHANNEL_MULTIPLE}s",
)
DX_FOLDED = input_gradient_formulation("folded_columns", fast_backward.input_gradient_by_folded_columns)
DW_TEXTBOOK = weight_gradient_formulation("textbook", textbook.weight_gradient)
DW_TAPS = weight_gradient_formulation("taps", fast_backward.depthwise_weight_gradient)
DW_BLOCKS = weight_gradient_formulation(
    "space_to_depth",
    functools.partial(fast_backward.weight_gradient_by_space_to_depth, block=BLOCK, chunk=BLOCKS_DW_CHUNK),
    f" {BLOCK}x{BLOCK} in chunks of {BLOCKS_DW_CHUNK}",
)


def dw_chunks(chunk: int) -> Formulation:
    """dE/dW in batch chunks of `chunk` images."""
    fn = functools.partial(fast_backward.weight_gradient_by_chunks, chunk=chunk)
    return weight_gradient_formulation("chunks", fn, f" of {chunk}")


# --------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class Formulas:
    """dE/dX and dE/dW, each by one formulation: a :class:`~convlib.ops.formulation.GradientsFormula`."""

    input_gradient: Formulation = DX_TEXTBOOK
    weight_gradient: Formulation = DW_TEXTBOOK

    def __call__(self, geometry: Geometry, x, w, g):
        dx = self.input_gradient(geometry, g, w, geometry.spatial_shape(x.shape))
        return dx, self.weight_gradient(geometry, x, g, w.shape)

    def scopes(self) -> tuple[str, ...]:
        """The named scopes this plan runs under, outermost first."""
        return self.input_gradient.scope, self.weight_gradient.scope

    def __str__(self) -> str:
        return f"dX {self.input_gradient}, dW {self.weight_gradient}"


@dataclasses.dataclass(frozen=True)
class Lowered:
    """A lowering whose smaller convs each follow the plan `inner`: a
    :class:`~convlib.ops.formulation.GradientsFormula`."""

    lowering: fast_backward.Lowering
    inner: Plan

    @property
    def scope(self) -> str:
        return f"convlib.conv.{self.lowering.name.replace(' ', '_')}"

    def __call__(self, geometry: Geometry, x, w, g):
        with jax.named_scope(self.scope):
            return self.lowering(geometry, x, w, g, self.inner)

    def scopes(self) -> tuple[str, ...]:
        """The named scopes this plan runs under, outermost first.

        >>> from convlib.ops.geometry import make_geometry
        >>> plan(make_geometry(2, 3, groups=2), (16, 8, 8, 4), (3, 3, 2, 8), "cpu").scopes()
        ('convlib.conv.per_group', 'convlib.conv.dX.folded_columns', 'convlib.conv.dW.chunks')
        """
        return self.scope, *self.inner.scopes()

    def __str__(self) -> str:
        return f"{self.lowering.name}: {self.inner}"


Plan = Formulas | Lowered
TEXTBOOK = Formulas()

# --------------------------------------------------------------------------- the policy table


@dataclasses.dataclass(frozen=True)
class Case:
    """The static facts a rule reads about one conv: its geometry, the shapes of x and w, the platform."""

    geometry: Geometry
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    platform: str

    @property
    def c_in(self) -> int:
        return self.x_shape[self.geometry.axes.channel]

    @property
    def c_out(self) -> int:
        return self.w_shape[self.geometry.axes.kernel_out]

    @property
    def on_cpu(self) -> bool:
        return self.platform == "cpu"

    @property
    def depthwise(self) -> bool:
        """groups = C_in = C_out > 1 (no channel multiplier)."""
        return 1 < self.geometry.groups == self.c_in == self.c_out

    @property
    def strided(self) -> bool:
        return any(s > 1 for s in self.geometry.stride)

    @property
    def blockable(self) -> bool:
        """Whether the space-to-depth formulations apply and were measured: a 2-D NHWC conv with stride 1, no
        dilation, no groups and a kernel of at least 3x3."""
        g = self.geometry
        unit = set(g.stride) == set(g.dilation) == {1}
        return g.ndim == 2 and g.layout == "NHWC" and g.groups == 1 and unit and min(g.kernel) >= 3

    @property
    def folding_pays(self) -> bool:
        """dX by folded columns beats the textbook (stride 1): 2-D, ungrouped, fewer inputs than outputs, at most
        `FOLD_MAX_IN` inputs, and one input channel only with at most `FOLD_ONE_CHANNEL_MAX_OUT` outputs."""
        few_inputs = self.c_in <= FOLD_MAX_IN and (self.c_in > 1 or self.c_out <= FOLD_ONE_CHANNEL_MAX_OUT)
        return self.geometry.ndim == 2 and self.geometry.groups == 1 and self.c_in < self.c_out and few_inputs

    @property
    def dw_chunk(self) -> int:
        """Images per dW chunk where chunks pay, else 0: at least two chunks of `CHUNK` images, or on maps of fewer
        than `CHUNK_PIXELS / CHUNK` output pixels the power of two nearest below `CHUNK_PIXELS` pixels; a first layer
        (<= `FEW_INPUT_CHANNELS` inputs) only in NHWC with at most `FEW_INPUT_CHUNK_MAX_OUT` outputs."""
        first_layer = self.c_in <= FEW_INPUT_CHANNELS
        if first_layer and (self.geometry.layout != "NHWC" or self.c_out > FEW_INPUT_CHUNK_MAX_OUT):
            return 0
        g = self.geometry
        out_pixels = math.prod(g.output_spatial(g.spatial_shape(self.x_shape)))
        per_pixels = _power_of_two_below(CHUNK_PIXELS // max(out_pixels, 1))
        chunk = min(max(CHUNK, per_pixels), _power_of_two_below(self.x_shape[g.axes.batch] // 2))
        return chunk if chunk >= CHUNK else 0


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Rule(Generic[T]):
    """`when(case)` -> `then(case)`, for the one-line reason `why`."""

    when: Callable[[Case], bool]
    then: Callable[[Case], T]
    why: str


def first_rule(rules: Sequence[Rule[T]], case: Case) -> Rule[T]:
    """The first rule whose `when` holds (every table ends with a rule that always holds)."""
    return next(rule for rule in rules if rule.when(case))


def first_match(rules: Sequence[Rule[T]], case: Case) -> T:
    """The outcome of the first rule whose `when` holds."""
    return first_rule(rules, case).then(case)


FORWARD_RULES: tuple[Rule[Formulation], ...] = (
    Rule(lambda c: not c.on_cpu, lambda c: FORWARD_TEXTBOOK, "other platforms' conv libraries take any conv natively"),
    Rule(
        lambda c: c.blockable and c.c_in == 1 and c.c_out <= BLOCKS_MAX_OUT,
        lambda c: forward_blocks(ONE_CHANNEL_BLOCK),
        "one input channel: 4x4 blocks turn a thin patch into 16 channels",
    ),
    Rule(
        lambda c: c.blockable and c.c_in <= BLOCKS_MAX_IN and c.c_out <= BLOCKS_MAX_OUT,
        lambda c: forward_blocks(BLOCK),
        "few channels: 2x2 blocks, a wider conv for the same sums",
    ),
    Rule(lambda c: True, lambda c: FORWARD_TEXTBOOK, "wide enough for XLA:CPU's conv libraries"),
)
"""The forward that runs under differentiation (the `custom_vjp`'s `fwd`)."""

INPUT_GRADIENT_RULES: tuple[Rule[Formulation], ...] = (
    Rule(lambda c: c.strided, lambda c: DX_PHASES, "strided: one stride-1 conv per phase, no zero insertion"),
    Rule(lambda c: c.folding_pays, lambda c: DX_FOLDED, "few inputs to more outputs: one wide conv, not a narrow one"),
    Rule(
        lambda c: c.c_in >= 4 and c.c_in % CHANNEL_MULTIPLE != 0,
        lambda c: DX_PADDED,
        "dX's outputs padded to whole 8-float vectors of Eigen",
    ),
    Rule(lambda c: True, lambda c: DX_TEXTBOOK, "the textbook conv is already the fast shape"),
)
"""dE/dX of an ungrouped 1-D or 2-D conv on a CPU."""

WEIGHT_GRADIENT_RULES: tuple[Rule[Formulation], ...] = (
    Rule(
        lambda c: c.blockable and c.c_in == 1 and c.c_out <= BLOCKS_DW_MAX_OUT,
        lambda c: DW_BLOCKS,
        "one input channel to few outputs: the blocked conv's weight gradient",
    ),
    Rule(
        lambda c: c.dw_chunk > 0,
        lambda c: dw_chunks(c.dw_chunk),
        "batch chunks: each chunk's operands stay in cache, the chunks run concurrently",
    ),
    Rule(lambda c: True, lambda c: DW_TEXTBOOK, "fewer than two chunks, or a first layer measured faster whole"),
)
"""dE/dW of an ungrouped 1-D or 2-D conv on a CPU."""

GRADIENT_RULES: tuple[Rule[Plan], ...] = (
    Rule(lambda c: not c.on_cpu, lambda c: TEXTBOOK, "other platforms' conv libraries take any conv natively"),
    Rule(
        lambda c: c.depthwise,
        lambda c: Formulas(DX_TAPS, DW_TAPS),
        "depthwise: XLA:CPU's depthwise convs run at ~1 GFLOP/s; tap by tap is elementwise",
    ),
    Rule(
        lambda c: c.geometry.ndim == 3,
        lambda c: _lowered(fast_backward.DEPTH_TAPS, c),
        "3-D: one 2-D conv per depth tap, depth folded into the batch",
    ),
    Rule(
        lambda c: c.geometry.groups > MAX_PLANNED_GROUPS,
        lambda c: Lowered(fast_backward.PER_GROUP, TEXTBOOK),
        "many groups: one textbook conv per group, a bounded op count",
    ),
    Rule(
        lambda c: c.geometry.groups > 1,
        lambda c: _lowered(fast_backward.PER_GROUP, c),
        "grouped convs never reach XLA:CPU's fast conv library: one planned conv per group",
    ),
    Rule(
        lambda c: True,
        lambda c: Formulas(first_match(INPUT_GRADIENT_RULES, c), first_match(WEIGHT_GRADIENT_RULES, c)),
        "ungrouped: dX and dW each by its own table",
    ),
)
"""The backward of `backward="custom"`."""


def plan(geometry: Geometry, x_shape, w_shape, platform: str) -> Plan:
    """The gradients `backward="custom"` computes for these static shapes on `platform` (a JAX platform name:
    "cpu", "cuda", "rocm", "tpu", or "default" for any but the CPU): the first match in :data:`GRADIENT_RULES`.

    >>> from convlib.ops.geometry import make_geometry
    >>> str(plan(make_geometry(2, 3, stride=2, padding=1), (32, 32, 32, 16), (3, 3, 16, 32), "cpu"))
    'dX phases, dW chunks of 8'
    """
    return first_match(GRADIENT_RULES, _case(geometry, x_shape, w_shape, platform))


def forward_plan(geometry: Geometry, x_shape, w_shape, platform: str) -> Formulation:
    """The forward `backward="custom"` runs under differentiation for these static shapes on `platform` (see
    :func:`plan`): the first match in :data:`FORWARD_RULES`.

    >>> from convlib.ops.geometry import make_geometry
    >>> str(forward_plan(make_geometry(2, 5), (256, 32, 32, 1), (5, 5, 1, 6), "cpu"))
    'space_to_depth 4x4'
    """
    return first_match(FORWARD_RULES, _case(geometry, x_shape, w_shape, platform))


def planned_forward(geometry: Geometry, x, w, b):
    """Y of `backward="custom"` under differentiation: the CPU's forward plan on a CPU, the others' elsewhere."""
    return _per_platform(lambda platform: forward_plan(geometry, x.shape, w.shape, platform), geometry, x, w, b)


def planned_gradients(geometry: Geometry, x, w, g):
    """(dE/dX, dE/dW) of `backward="custom"`: the CPU plan on a CPU, the other platforms' plan elsewhere."""
    return _per_platform(lambda platform: plan(geometry, x.shape, w.shape, platform), geometry, x, w, g)


def _per_platform(planned: Callable[[str], Callable], geometry: Geometry, *operands):
    """`planned(platform)(geometry, *operands)` for the platform the program is lowered for ("cpu", else
    "default"), by `lax.platform_dependent`; one call when both platforms plan the same."""
    on_cpu, elsewhere = planned("cpu"), planned("default")
    if on_cpu == elsewhere:
        return on_cpu(geometry, *operands)
    return lax.platform_dependent(
        *operands, cpu=functools.partial(on_cpu, geometry), default=functools.partial(elsewhere, geometry)
    )


def _case(geometry: Geometry, x_shape, w_shape, platform) -> Case:
    if not isinstance(platform, str):
        raise TypeError(f"platform must be a JAX platform name such as 'cpu', got {platform!r}")
    return Case(geometry, tuple(x_shape), tuple(w_shape), platform)


def _lowered(lowering: fast_backward.Lowering, case: Case) -> Lowered:
    """`lowering` with the inner plan of its first smaller conv, whose shapes come from the lowering's own split
    (traced abstractly: no shape arithmetic is repeated here)."""
    geometry, axes = case.geometry, case.geometry.axes
    g_shape = axes.array_shape(
        case.x_shape[axes.batch], case.c_out, geometry.output_spatial(geometry.spatial_shape(case.x_shape))
    )
    shapes = (jax.ShapeDtypeStruct(s, "float32") for s in (case.x_shape, case.w_shape, g_shape))
    x_i, w_i, _ = jax.eval_shape(functools.partial(lowering.split, geometry), *shapes)[0]
    return Lowered(lowering, plan(lowering.sub_geometry(geometry), x_i.shape, w_i.shape, case.platform))


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (0 for n < 1)."""
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def __getattr__(name: str):
    """The old import path of :func:`convlib.ops.compiler_options`, with a DeprecationWarning."""
    if name == "compiler_options":
        warnings.warn(
            "convlib.ops.plan.compiler_options moved to convlib.ops.compiler_options",
            DeprecationWarning,
            stacklevel=2,
        )
        return _compiler_options
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Which formulation `backward="custom"` runs for one conv: the measured policy, per platform.

A :class:`Plan` is either :class:`Formulas` (one dE/dX and one dE/dW formulation) or :class:`Lowered` (a
:class:`~convlib.ops.fast_backward.Lowering` whose smaller convs follow an inner plan). :func:`plan` builds it
from static shapes and an explicit platform; :func:`planned_gradients` runs the CPU plan on a CPU and the
textbook elsewhere, chosen by `lax.platform_dependent` where the program is lowered (so `jax.default_device`,
export, or a jit pinned to another device get the right one). To add a formulation: write it in
:mod:`convlib.ops.fast_backward`, name it here as a :class:`Formulation`, and add the measured rule to :func:`plan`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
from jax import lax

from convlib.ops import fast_backward, fast_forward, textbook
from convlib.ops.geometry import Geometry


@dataclasses.dataclass(frozen=True)
class Formulation:
    """One way to compute the forward (`fn(x, w, b, geometry)`), dE/dX (`fn(g, w, geometry, in_spatial)`) or dE/dW
    (`fn(x, g, geometry, kernel_shape)`).

    name: its name in a plan and in profiles (`convlib.conv.dX.<name>`); detail: a parameter, shown in the plan.
    """

    name: str
    fn: Callable
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name}{self.detail}"


FORWARD_TEXTBOOK = Formulation("textbook", textbook.forward)


def forward_blocks(block: int) -> Formulation:
    """The forward by space-to-depth in blocks of `block` x `block` pixels."""
    return Formulation(
        "space_to_depth",
        functools.partial(fast_forward.forward_by_space_to_depth, block=block),
        f" {block}x{block}",
    )


DX_TEXTBOOK = Formulation("textbook", textbook.input_gradient)
DX_PHASES = Formulation("phases", fast_backward.input_gradient_by_phases)
DX_TAPS = Formulation("taps", fast_backward.depthwise_input_gradient)
CHANNEL_MULTIPLE = 8  # XLA:CPU's Eigen convs run fastest with output channels a multiple of its 8-float vectors
DX_PADDED = Formulation(
    "padded",
    functools.partial(fast_backward.input_gradient_with_padded_channels, multiple=CHANNEL_MULTIPLE),
    f" to {CHANNEL_MULTIPLE}s",
)
DX_FOLDED = Formulation("folded_columns", fast_backward.input_gradient_by_folded_columns)
DW_TEXTBOOK = Formulation("textbook", textbook.weight_gradient)
DW_TAPS = Formulation("taps", fast_backward.depthwise_weight_gradient)


def dw_chunks(chunk: int) -> Formulation:
    """dE/dW in batch chunks of `chunk` images."""
    return Formulation(
        "chunks", functools.partial(fast_backward.weight_gradient_by_chunks, chunk=chunk), f" of {chunk}"
    )


@dataclasses.dataclass(frozen=True)
class Formulas:
    """dE/dX and dE/dW, each by one formulation."""

    input_gradient: Formulation = DX_TEXTBOOK
    weight_gradient: Formulation = DW_TEXTBOOK

    def __call__(self, geometry: Geometry, x, w, g):
        with jax.named_scope(f"convlib.conv.dX.{self.input_gradient.name}"):
            dx = self.input_gradient.fn(g, w, geometry, geometry.spatial_shape(x.shape))
        with jax.named_scope(f"convlib.conv.dW.{self.weight_gradient.name}"):
            dw = self.weight_gradient.fn(x, g, geometry, w.shape)
        return dx, dw

    def __str__(self) -> str:
        return f"dX {self.input_gradient}, dW {self.weight_gradient}"


@dataclasses.dataclass(frozen=True)
class Lowered:
    """A lowering whose smaller convs each follow the plan `inner`."""

    lowering: fast_backward.Lowering
    inner: Plan

    def __call__(self, geometry: Geometry, x, w, g):
        with jax.named_scope(f"convlib.conv.{self.lowering.name.replace(' ', '_')}"):
            return self.lowering(geometry, x, w, g, self.inner)

    def __str__(self) -> str:
        return f"{self.lowering.name}: {self.inner}"


Plan = Formulas | Lowered
TEXTBOOK = Formulas()

# dW in chunks, measured in whole custom training steps against dW in one conv (interleaved, fastest steps):
# ResNet-20 batch 128 1.33x, LeNet-5 batch 256 1.04x faster, though a chunked layer timed alone is autodiff's +-5 %.
CHUNK = 8  # fewest images per weight-gradient chunk
CHUNK_PIXELS = 1024  # output pixels a weight-gradient chunk aims at (small maps take more images)
MAX_PLANNED_GROUPS = 4  # more groups: textbook per group, a bounded op count
# First layers (1-3 input channels): dW in chunks won only in NHWC with at most 16 outputs; in NCHW, or with more
# outputs, one conv measured faster (fwd+bwd / autodiff's, batch 128, 32x32, interleaved: 3 -> 16 k3 NCHW 1.28
# chunked vs 0.99 whole, 3 -> 48 k3 NHWC 1.05 vs 0.98, 3 -> 64 k5 NHWC 1.20 vs 0.94, 1 -> 16 k5 NCHW 1.15 vs 0.99;
# kept: 3 -> 16 k3 NHWC 0.83 vs 0.91, 1 -> 16 k5 NHWC 0.73 vs 0.92).
FEW_INPUT_CHANNELS = 3
FEW_INPUT_CHUNK_MAX_OUT = 16
# dX with the kernel's columns folded into its channels (2-D, ungrouped, stride 1, convs on Eigen), dX alone,
# folded / the plan's before, interleaved medians, batch 128 (LeNet 256), NHWC (NCHW): the main job's C2
# 16 -> 32 5x5 0.46 (0.57), LeNet C3 6 -> 16 0.28 (0.29), LeNet C1 1 -> 6 0.42 (0.43), ResNet stem 3 -> 16 0.39
# (0.44), VGG conv1 3 -> 64 0.40 (0.88), AlexNet conv1 3 -> 48 0.24 (0.31), AlexNet conv2's groups 24 -> 64
# 0.74 (0.84), 16 -> 32 3x3 0.86; not faster: C_in >= C_out (16 -> 16 0.95-1.04, 32 -> 32 1.15-1.20, 32 -> 16
# 1.18), C_in >= 32 (32 -> 64 0.94-1.03), one input channel to 16-24 outputs (1 -> 16 5x5 1.06-1.44, 1 -> 24
# 0.87-1.04), 1-D (32 -> 32 k5 1.30 (1.65)).
FOLD_MAX_IN = 24
FOLD_ONE_CHANNEL_MAX_OUT = 12


def plan(geometry: Geometry, x_shape, w_shape, platform: str) -> Plan:
    """The formulations `backward="custom"` uses for these static shapes on `platform` (a JAX platform name:
    "cpu", "cuda", "rocm", "tpu", or "default" for any but the CPU).

    Rules measured on XLA:CPU (experiments/benchmarks, JAX 0.10), which runs a 2-D conv with more than 16 channels
    on either side in its fast conv library (YNNPACK) and every other conv in a slower generic one:
    - depthwise (groups = C_in = C_out): dX and dW tap by tap, elementwise (XLA:CPU's depthwise convs run at
      ~1 GFLOP/s; with a channel multiplier, one conv per group measured faster);
    - 3-D: one 2-D conv per depth tap, depth folded into the batch;
    - other groups: one conv per group, since grouped convs never reach that library (each planned as below for
      up to `MAX_PLANNED_GROUPS` groups, else textbook);
    - dX: by phases when strided (no zero insertion); else, in 2-D with fewer input than output channels and at
      most `FOLD_MAX_IN` inputs (one input only with at most `FOLD_ONE_CHANNEL_MAX_OUT` outputs), with the
      kernel's columns folded into its channels (one wide conv instead of a narrow one: LeNet C3 3.5x, the main
      job's C2 2.2x faster); else, with 4 or more input channels but not a multiple of
      `CHANNEL_MULTIPLE`, textbook with zero filters up to that multiple (Eigen, 8-float vectors: 16 -> 6 5x5
      (LeNet C3) 1.5-2.2x, -> 4 3x3 3x, -> 12 1.4x, -> 20 1.25x faster; -> 3 alike); else textbook;
    - dW: for one input channel to at most `BLOCKS_DW_MAX_OUT` outputs where the forward can run by space-to-depth,
      as the weight gradient of that blocked conv (LeNet C1); else in batch chunks when there are at least two
      (1-D or 2-D): each chunk's operands stay in cache and the chunks run concurrently; else textbook. A chunk
      holds `CHUNK` images, or on maps of fewer than `CHUNK_PIXELS / CHUNK` output pixels the power of two nearest
      below `CHUNK_PIXELS` pixels (VGG's 4x4 512-channel dW: 8 images 63 GFLOP/s, 64 images 164, textbook 124);
      with at most `FEW_INPUT_CHANNELS` input channels only in NHWC with at most `FEW_INPUT_CHUNK_MAX_OUT` outputs
      (first layers).
    Other platforms run the textbook formulation, which their conv libraries take natively.

    >>> from convlib.ops.geometry import make_geometry
    >>> str(plan(make_geometry(2, 3, stride=2, padding=1), (32, 32, 32, 16), (3, 3, 16, 32), "cpu"))
    'dX phases, dW chunks of 8'
    """
    _check_platform(platform)
    if platform != "cpu":
        return TEXTBOOK
    axes, groups = geometry.axes, geometry.groups
    c_in, c_out = x_shape[axes.channel], w_shape[axes.kernel_out]
    if 1 < groups == c_in == c_out:
        return Formulas(DX_TAPS, DW_TAPS)
    if geometry.ndim == 3:
        return _lowered(fast_backward.DEPTH_TAPS, geometry, x_shape, w_shape)
    if groups > 1:
        if groups > MAX_PLANNED_GROUPS:
            return Lowered(fast_backward.PER_GROUP, TEXTBOOK)
        return _lowered(fast_backward.PER_GROUP, geometry, x_shape, w_shape)
    if any(s > 1 for s in geometry.stride):
        dx = DX_PHASES
    elif _folding_pays(geometry, c_in, c_out):
        dx = DX_FOLDED
    elif c_in >= 4 and c_in % CHANNEL_MULTIPLE:
        dx = DX_PADDED
    else:
        dx = DX_TEXTBOOK
    if _blockable(geometry) and c_in == 1 and c_out <= BLOCKS_DW_MAX_OUT:
        return Formulas(dx, DW_BLOCKS)
    out_pixels = math.prod(geometry.output_spatial(geometry.spatial_shape(x_shape)))
    chunk = _weight_gradient_chunk(x_shape[axes.batch], out_pixels) if _chunks_pay(geometry, c_in, c_out) else 0
    return Formulas(dx, dw_chunks(chunk) if chunk else DW_TEXTBOOK)


# Space-to-depth forwards measured faster (2-core AMD EPYC, convs on Eigen): 1 -> 6 channels 5x5 (LeNet C1) 3.7x,
# 1 -> 16 5x5 (the main job's C1, batch 128) 2.2x,
# 3 -> 16 3x3 (ResNet stem) 1.6x, 6 -> 16 5x5 (LeNet C3) 1.3x; slower: 8 -> 16, 16 -> 16, 3 -> 64 (3x3 and 5x5).
BLOCKS_MAX_IN = 6
BLOCKS_MAX_OUT = 16
# One input channel: 4x4 blocks (a 2x2 kernel over 16 channels) measured faster than 2x2 (2-core Intel Xeon,
# interleaved, forward alone: LeNet C1 1 -> 6 5x5 batch 256 1.73 -> 0.89 ms, the main job's C1 1 -> 16 5x5 batch 128
# 1.39 -> 1.16 ms); with more channels 4x4 was slower (6 -> 16 5x5 0.88 -> 1.68 ms, 3 -> 16 3x3 1.30 -> 2.88 ms).
BLOCK = fast_forward.BLOCK
ONE_CHANNEL_BLOCK = 4
# dW of one input channel to at most 6 outputs as the blocked conv's weight gradient, 2x2 blocks, in chunks of 32
# images (2-core Intel Xeon, interleaved): LeNet C1 (1 -> 6 5x5, batch 256) dW alone 1.49 -> 0.97 ms, its training
# step 8.52 -> 7.77 ms (one conv 8.20 ms); slower: 1 -> 16 5x5 (1.22 -> 1.57 ms), 3 -> 16 3x3 (1.60 -> 2.47 ms).
BLOCKS_DW_MAX_OUT = 6
BLOCKS_DW_CHUNK = 32
DW_BLOCKS = Formulation(
    "space_to_depth",
    functools.partial(fast_backward.weight_gradient_by_space_to_depth, block=BLOCK, chunk=BLOCKS_DW_CHUNK),
    f" {BLOCK}x{BLOCK} in chunks of {BLOCKS_DW_CHUNK}",
)


def forward_plan(geometry: Geometry, x_shape, w_shape, platform: str) -> Formulation:
    """The forward `backward="custom"` uses for these static shapes on `platform` (see :func:`plan`).

    On XLA:CPU: space-to-depth (:mod:`convlib.ops.fast_forward`) for a 2-D NHWC conv with stride 1, no dilation,
    no groups, a kernel of at least 3x3, at most `BLOCKS_MAX_IN` input and `BLOCKS_MAX_OUT` output channels; else,
    and on other platforms, the textbook forward.

    >>> from convlib.ops.geometry import make_geometry
    >>> str(forward_plan(make_geometry(2, 5), (256, 32, 32, 1), (5, 5, 1, 6), "cpu"))
    'space_to_depth 4x4'
    """
    _check_platform(platform)
    few_channels = x_shape[-1] <= BLOCKS_MAX_IN and w_shape[-1] <= BLOCKS_MAX_OUT
    if platform != "cpu" or not (_blockable(geometry) and few_channels):
        return FORWARD_TEXTBOOK
    return forward_blocks(ONE_CHANNEL_BLOCK if x_shape[-1] == 1 else BLOCK)


def planned_forward(x, w, b, geometry: Geometry):
    """The forward of `backward="custom"`: the CPU forward plan on a CPU, the textbook elsewhere."""
    on_cpu, elsewhere = (forward_plan(geometry, x.shape, w.shape, p) for p in ("cpu", "default"))
    if on_cpu == elsewhere:
        return on_cpu.fn(x, w, b, geometry)
    return lax.platform_dependent(
        x, w, cpu=lambda x, w: on_cpu.fn(x, w, b, geometry), default=lambda x, w: elsewhere.fn(x, w, b, geometry)
    )


def _blockable(geometry: Geometry) -> bool:
    """Whether the space-to-depth formulations apply and were measured: a 2-D NHWC conv with stride 1, no dilation,
    no groups and a kernel of at least 3x3."""
    return (
        geometry.ndim == 2
        and geometry.layout == "NHWC"
        and geometry.groups == 1
        and set(geometry.stride) == set(geometry.dilation) == {1}
        and min(geometry.kernel) >= 3
    )


def _check_platform(platform) -> None:
    if not isinstance(platform, str):
        raise TypeError(f"platform must be a JAX platform name such as 'cpu', got {platform!r}")


def _lowered(lowering: fast_backward.Lowering, geometry: Geometry, x_shape, w_shape) -> Lowered:
    """`lowering` with the inner plan of its first smaller conv, whose shapes come from the lowering's own split
    (traced abstractly: no shape arithmetic is repeated here)."""
    g_shape = geometry.axes.array_shape(
        x_shape[geometry.axes.batch],
        w_shape[geometry.axes.kernel_out],
        geometry.output_spatial(geometry.spatial_shape(x_shape)),
    )
    shapes = (jax.ShapeDtypeStruct(s, "float32") for s in (x_shape, w_shape, g_shape))
    x_i, w_i, _ = jax.eval_shape(functools.partial(lowering.split, geometry), *shapes)[0]
    return Lowered(lowering, plan(lowering.sub_geometry(geometry), x_i.shape, w_i.shape, "cpu"))


def _folding_pays(geometry: Geometry, c_in: int, c_out: int) -> bool:
    """Whether dX by folded columns beats the textbook (stride 1): 2-D, ungrouped, fewer inputs than outputs, at
    most `FOLD_MAX_IN` inputs, and one input channel only with at most `FOLD_ONE_CHANNEL_MAX_OUT` outputs."""
    few_inputs = c_in <= FOLD_MAX_IN and (c_in > 1 or c_out <= FOLD_ONE_CHANNEL_MAX_OUT)
    return geometry.ndim == 2 and geometry.groups == 1 and c_in < c_out and few_inputs


def _chunks_pay(geometry: Geometry, c_in: int, c_out: int) -> bool:
    """Whether dW in batch chunks can beat one conv: not for a first layer (<= `FEW_INPUT_CHANNELS` inputs) in
    NCHW or with more than `FEW_INPUT_CHUNK_MAX_OUT` outputs."""
    first_layer = c_in <= FEW_INPUT_CHANNELS
    return not first_layer or (geometry.layout == "NHWC" and c_out <= FEW_INPUT_CHUNK_MAX_OUT)


def _weight_gradient_chunk(batch: int, out_pixels: int) -> int:
    """Images per dW chunk, or 0 when fewer than two chunks of `CHUNK` images fit in the batch."""
    per_pixels = _power_of_two_below(CHUNK_PIXELS // max(out_pixels, 1))
    chunk = min(max(CHUNK, per_pixels), _power_of_two_below(batch // 2))
    return chunk if chunk >= CHUNK else 0


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (0 for n < 1)."""
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


# XLA:CPU (JAX 0.10) hands 2-D convs with more than 16 channels to YNNPACK, which ran each on one of two cores;
# with convs left to Eigen (multi-threaded) and dots and reductions still on YNNPACK, whole jitted training steps
# ran 17 % (ResNet-20), 34 % (VGG-11) and 59 % (AlexNet) faster, LeNet-5 alike (2-core AMD EPYC, custom backward,
# experiments/benchmarks): the option names the YNNPACK fusions to keep.
_CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def compiler_options(platform: str) -> dict[str, str]:
    """The XLA compile options measured best for jitted programs of convlib convs on `platform` (a JAX platform
    name), for ``jax.jit(f, compiler_options=...)``: one program opts in, nothing process-wide changes. Empty on
    every platform but the CPU, where it keeps convs off YNNPACK (the rules of :func:`plan` are measured so).

    >>> compiler_options("cuda")
    {}
    >>> sorted(compiler_options("cpu"))
    ['xla_cpu_experimental_ynn_fusion_type']
    """
    _check_platform(platform)
    return dict(_CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


def planned_gradients(geometry: Geometry, x, w, g):
    """(dE/dX, dE/dW) of `backward="custom"`: the CPU plan on a CPU, the textbook on other platforms."""
    on_cpu = plan(geometry, x.shape, w.shape, "cpu")
    elsewhere = plan(geometry, x.shape, w.shape, "default")
    if on_cpu == elsewhere:
        return on_cpu(geometry, x, w, g)
    return lax.platform_dependent(
        x, w, g, cpu=functools.partial(on_cpu, geometry), default=functools.partial(elsewhere, geometry)
    )

"""The GPU and TPU path of backward="custom", checked on a CPU-only machine.

`lax.platform_dependent` picks each conv's formulations where a program is lowered, so lowering for "cuda" or
"tpu" here (`jax.jit(f).trace(...).lower(lowering_platforms=...)`, abstract shapes, nothing compiled) gives the
very program a GPU or TPU would run. Its named scopes (`convlib.conv.dX.<name>`, ...) must be exactly the
formulations the plan names for that platform, for the benchmark's layer grid and for whole training steps of the
registry's small models; and the formulations the non-CPU plan names must compute autodiff's gradients, run here.
"""

from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import models, ops, train
from convlib.ops.geometry import conv_geometry
from convlib.ops.plan import forward_plan, plan
from experiments.benchmarks import layers, training

conv_module = importlib.import_module("convlib.ops.conv")  # the module, not the function `ops.conv`

PLATFORMS = ("cpu", "cuda", "tpu")
SCOPE = re.compile(r"convlib\.[\w.]+")
POOL_SCOPES = {"convlib.max_pool.dX", "convlib.avg_pool.dX"}
# XLA:CPU's workaround for a conv narrower than its kernel (textbook.conv_general_dilated) is CPU-only and unnamed:
# its optimisation barrier marks it.
CPU_ONLY_OP = "optimization_barrier"
# The grid's plans cover every formulation but dX with zero filters up to whole vectors: one case adds it.
CONV_CASES = (*layers.CONV_CASES, layers.ConvCase("dX padded channels", 32, (8, 8), 12, 8, 3, padding=1))
# float64 sums of a few thousand products agree to ~1e-14 relative; 1e-10 leaves room for the longest.
RELATIVE_TOLERANCE = 1e-10


def conv_scopes(text: str) -> set[str]:
    return {s for s in SCOPE.findall(text) if s.startswith("convlib.conv.")}


def planned_scopes(convs, platform: str, first_layer_input=None) -> set[str]:
    """The scopes of the forward and backward plans of `convs` ((geometry, x_shape, w_shape) each) on `platform`;
    a conv whose input has the shape `first_layer_input` (a model's images) has no dX to compute."""
    scopes = set()
    for geometry, x_shape, w_shape in convs:
        input_gradient = x_shape != first_layer_input
        backward = plan(geometry, x_shape, w_shape, platform).scopes()
        scopes |= {s for s in backward if input_gradient or not s.startswith("convlib.conv.dX.")}
        scopes.add(forward_plan(geometry, x_shape, w_shape, platform).scope)
    return scopes


def check_program(text: str, convs, platform: str, first_layer_input=None) -> None:
    assert conv_scopes(text) == planned_scopes(convs, platform, first_layer_input)
    assert set(SCOPE.findall(text)) - conv_scopes(text) <= POOL_SCOPES
    if platform != "cpu":
        assert CPU_ONLY_OP not in text


def value_and_vjp(f, g, *args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(g)


def grid_conv(case: layers.ConvCase, layout: str):
    """(fwd+bwd fn, its abstract arguments, (geometry, x_shape, w_shape)) of one grid case at its full size."""
    x, w, b = jax.eval_shape(lambda: case.arrays(layout, jax.random.key(0)))
    options = case.options(layout)
    g = jax.eval_shape(lambda x, w, b: ops.conv(x, w, b, **options), x, w, b)
    fn = lambda x, w, b, g: value_and_vjp(lambda *a: ops.conv(*a, **options), g, x, w, b)
    return fn, (x, w, b, g), (conv_geometry(x, w, **options), x.shape, w.shape)


GRID = [pytest.param(case, layout, id=f"{case.name} {layout}") for case in CONV_CASES for layout in ("NHWC", "NCHW")]


@pytest.mark.parametrize(("case", "layout"), GRID)
def test_layer_lowers_with_the_platforms_plan(case, layout):
    fn, args, conv = grid_conv(case, layout)
    traced = jax.jit(fn).trace(*args)
    for platform in PLATFORMS:
        check_program(traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True), [conv], platform)


def test_the_grid_runs_cpu_only_formulations_that_the_gpu_program_must_not_carry():
    """Else the leak checks above could not fail: the CPU plans of the grid use formulations the GPU's lacks."""
    convs = [grid_conv(case, layout)[2] for case, layout in (p.values for p in GRID)]
    cpu_only = planned_scopes(convs, "cpu") - planned_scopes(convs, "cuda")
    assert {"convlib.conv.dX.phases", "convlib.conv.dX.padded", "convlib.conv.dW.chunks"} <= cpu_only
    assert {"convlib.conv.per_group", "convlib.conv.depth_taps", "convlib.conv.forward.space_to_depth"} <= cpu_only


def test_platform_dependent_keeps_only_the_lowered_platforms_branch():
    """Lowered for one platform, only its branch is in the program; for several, each one's."""
    case = next(c for c in CONV_CASES if c.stride > 1 and c.ndim == 2)
    fn, args, conv = grid_conv(case, "NHWC")
    traced = jax.jit(fn).trace(*args)
    both = conv_scopes(traced.lower(lowering_platforms=("cuda", "cpu")).as_text(debug_info=True))
    assert "convlib.conv.dX.phases" in planned_scopes([conv], "cpu") - planned_scopes([conv], "cuda")
    assert both == planned_scopes([conv], "cpu") | planned_scopes([conv], "cuda")


def autodiff_conv(geometry):
    return lambda x, w: jax.lax.conv_general_dilated(
        x,
        w,
        geometry.stride,
        geometry.padding,
        rhs_dilation=geometry.dilation,
        dimension_numbers=geometry.dimension_numbers,
        feature_group_count=geometry.groups,
    )


def check_default_plan_gradients(convs) -> None:
    """The non-CPU plan's forward and gradients of each conv of `convs` ((geometry, x_shape, w_shape), run on 2
    images in float64) equal autodiff's on this CPU; one compiled program for all (compiling dominates)."""
    rng = np.random.default_rng(0)
    checks = []
    with jax.enable_x64(True):
        for geometry, x_shape, w_shape in dict.fromkeys(convs):
            x_shape = tuple(2 if i == geometry.axes.batch else n for i, n in enumerate(x_shape))
            x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
            g = rng.standard_normal(jax.eval_shape(autodiff_conv(geometry), x, w).shape)
            checks.append((geometry, (x, w, g)))

        def run(arrays):
            results = []
            for (geometry, _), (x, w, g) in zip(checks, arrays):
                forward = forward_plan(geometry, x.shape, w.shape, "default")
                gradients = plan(geometry, x.shape, w.shape, "default")
                y, vjp = jax.vjp(autodiff_conv(geometry), x, w)
                results.append(((forward(geometry, x, w, None), *gradients(geometry, x, w, g)), (y, *vjp(g))))
            return results

        for got, want in jax.jit(run)([arrays for _, arrays in checks]):
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=0, atol=RELATIVE_TOLERANCE * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_default_plan_computes_autodiffs_gradients(layout):
    check_default_plan_gradients([grid_conv(case, layout)[2] for case in CONV_CASES])


@pytest.fixture
def planned_convs(monkeypatch):
    """The (geometry, x_shape, w_shape) of every custom conv whose backward is traced while the fixture lives."""
    convs, gradients = [], conv_module.GRADIENTS["custom"]

    def recording(geometry, x, w, g):
        convs.append((geometry, x.shape, w.shape))
        return gradients(geometry, x, w, g)

    monkeypatch.setitem(conv_module.GRADIENTS, "custom", recording)
    return convs


# name -> (batch, input channels, input side, compute dtype): the training benchmark's models and sizes
MODELS = {
    **{name: (*spec, None) for name, spec in training.MODELS.items()},
    training.RESNET50[0]: (128, 3, training.RESNET50[1], jnp.bfloat16),
}


@pytest.mark.parametrize("name", MODELS)
def test_training_step_lowers_with_the_platforms_plan(name, planned_convs):
    """The jitted custom training step (forward, hand-derived backward, SGD update), abstract, lowered for each
    platform; the non-CPU plan of each of its convs computes autodiff's gradients."""
    batch, channels, size, dtype = MODELS[name]
    tx = train.make_optimizer("sgd", 0.01, momentum=0.9)
    graphdef, state = nnx.eval_shape(
        lambda: train.create_train_state(
            models.create(name, in_channels=channels, rngs=nnx.Rngs(0), dtype=dtype), tx, jax.random.key(0)
        )
    )
    images = jax.ShapeDtypeStruct((batch, size, size, channels), dtype or jnp.float32)
    data = {"image": images, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    traced = jax.jit(train.make_train_step(graphdef, tx, train.CROSS_ENTROPY)).trace(state, data)
    assert planned_convs, "no custom conv was traced"
    for platform in PLATFORMS:
        text = traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)
        check_program(text, planned_convs, platform, first_layer_input=images.shape)
    if dtype is None:  # ResNet-50's convs are the ImageNet shapes: lowering only
        check_default_plan_gradients(planned_convs)

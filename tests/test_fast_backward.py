"""The faster exact formulations (`backward="custom"`: convlib.ops.fast_backward and fast_forward) against the
textbook one, JAX's autodiff and the NumPy loop reference, in float64 over the whole configuration space; and a
smoke run of the benchmark suite."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_configs import chunked_conv_configs, conv_configs, random_arrays
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

from convlib import ops
from convlib.ops import fast_backward, fast_forward, plan, textbook
from convlib.ops.geometry import conv_geometry
from convlib.ops.textbook import input_gradient, weight_gradient
from convlib.ops.windows import pad_input

# float64 sums of a few hundred products agree to ~1e-15 relative; 1e-10 leaves room for the longest sums.
RTOL = ATOL = 1e-10


def gradients(backward, x, w, b, kwargs, g):
    """(dX, dW, db) of <g, conv(x, w, b)> with the given backward mode (compiled: one program, not op by op)."""

    @jax.jit
    def vjp(x, w, b, g):
        return jax.vjp(lambda x, w, b: ops.conv(x, w, b, **kwargs, backward=backward), x, w, b)[1](g)

    return vjp(x, w, b, g)


def prepared(x_shape, w_shape, kwargs, seed):
    """x (padding mode applied), w, a cotangent g and the Geometry, as the custom_vjp's backward sees them."""
    x, w, _ = random_arrays(seed, x_shape, w_shape, False, kwargs["layout"])
    geometry = conv_geometry(x, w, **kwargs)
    x, geometry = pad_input(jnp.asarray(x), geometry)
    y = ops.conv(x, w, **{**kwargs, "padding": geometry.padding, "padding_mode": "zeros"})
    g = np.random.default_rng(seed + 1).standard_normal(y.shape)
    return x, jnp.asarray(w), jnp.asarray(g), geometry


def as_depthwise(config, multiplier):
    """A drawn conv config made depthwise (groups = C_in) with `multiplier` filters per input channel."""
    x_shape, w_shape, _, kwargs = config
    if kwargs["layout"] == "NHWC":
        c_in = x_shape[-1]
        return x_shape, (*w_shape[:-2], 1, c_in * multiplier), {**kwargs, "groups": c_in}
    c_in = x_shape[1]
    return x_shape, (c_in * multiplier, 1, *w_shape[2:]), {**kwargs, "groups": c_in}


@st.composite
def blockable_configs(draw):
    """(x_shape, w_shape, has_bias, padding) of a 2-D stride-1 NHWC conv, float64-sized tiny."""
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(2))
    padding = tuple((draw(st.integers(-1, 3)), draw(st.integers(-1, 3))) for _ in range(2))
    spatial = tuple(draw(st.integers(max(k - lo - hi, 1), k + 5)) for k, (lo, hi) in zip(kernel, padding))
    c_in, c_out, batch = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([0, 1, 2]))
    return (batch, *spatial, c_in), (*kernel, c_in, c_out), draw(st.booleans()), padding


@pytest.mark.usefixtures("x64_class")
class TestExact:
    @settings(max_examples=30)
    @given(st.one_of(conv_configs(), chunked_conv_configs()), st.integers(0, 2**16))
    def test_custom_matches_textbook_and_autodiff(self, config, seed):
        x_shape, w_shape, has_bias, kwargs = config
        x, w, b = random_arrays(seed, x_shape, w_shape, has_bias, kwargs["layout"])
        y = ops.conv(x, w, b, **kwargs)
        g = np.random.default_rng(seed + 1).standard_normal(y.shape)
        for mode in ("textbook", "autodiff"):
            np.testing.assert_allclose(ops.conv(x, w, b, **kwargs, backward=mode), y, rtol=RTOL, atol=ATOL)
        custom, textbook, autodiff = (gradients(m, x, w, b, kwargs, g) for m in ("custom", "textbook", "autodiff"))
        for c, t, a in zip(custom, textbook, autodiff):
            if c is None:
                assert t is None and a is None
                continue
            np.testing.assert_allclose(c, t, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(c, a, rtol=RTOL, atol=ATOL)

    def test_the_sweep_reaches_the_chunked_weight_gradient(self):
        """`chunked_conv_configs` draws convs whose CPU plan runs dE/dW in batch chunks (the one training uses)."""

        def chunked(config):
            x_shape, w_shape, _, kwargs = config
            geometry = conv_geometry(np.zeros(x_shape), np.zeros(w_shape), **kwargs)
            return "chunks of" in str(plan.plan(geometry, x_shape, w_shape, "cpu"))

        find(chunked_conv_configs(), chunked, settings=settings(max_examples=20, database=None))

    @settings(max_examples=15)
    @given(conv_configs(), st.integers(0, 2**16))
    def test_custom_is_the_adjoint_of_the_loop_reference(self, config, seed):
        """<dX, u> = <g, conv_loops(u, w)> and <dW, v> = <g, conv_loops(x, v)>: conv is linear in x and in w."""
        x_shape, w_shape, _, kwargs = config
        x, w, _ = random_arrays(seed, x_shape, w_shape, False, kwargs["layout"])
        u, v, _ = random_arrays(seed + 2, x_shape, w_shape, False, kwargs["layout"])
        g = np.random.default_rng(seed + 1).standard_normal(ops.conv_loops(x, w, **kwargs).shape)
        dx, dw, _ = gradients("custom", x, w, None, kwargs, g)
        np.testing.assert_allclose(np.vdot(dx, u), np.vdot(g, ops.conv_loops(u, w, **kwargs)), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.vdot(dw, v), np.vdot(g, ops.conv_loops(x, v, **kwargs)), rtol=RTOL, atol=ATOL)

    @settings(max_examples=20)
    @given(conv_configs(), st.integers(0, 2**16))
    def test_input_gradient_by_phases(self, config, seed):
        """dX by phases equals the textbook one, strided or not (the dispatch sends empty cotangents nowhere: it
        returns zeros)."""
        x_shape, w_shape, _, kwargs = config
        x, w, g, geometry = prepared(x_shape, w_shape, kwargs, seed)
        assume(g.size > 0)
        in_spatial = geometry.spatial_shape(x.shape)
        expected = input_gradient(geometry, g, w, in_spatial)
        dx = jax.jit(fast_backward.input_gradient_by_phases, static_argnums=(0, 3))(geometry, g, w, in_spatial)
        np.testing.assert_allclose(dx, expected, rtol=RTOL, atol=ATOL)

    @settings(max_examples=20)
    @given(conv_configs(), st.integers(2, 8), st.integers(0, 2**16))
    def test_input_gradient_with_padded_channels(self, config, multiple, seed):
        """dX through zero filters up to a multiple of channels equals the textbook one, in both layouts, 1-3-D,
        strided or not."""
        x_shape, w_shape, _, kwargs = config
        assume(kwargs["groups"] == 1)
        x, w, g, geometry = prepared(x_shape, w_shape, kwargs, seed)
        in_spatial = geometry.spatial_shape(x.shape)
        dx = jax.jit(
            fast_backward.input_gradient_with_padded_channels, static_argnums=(0, 3), static_argnames="multiple"
        )(geometry, g, w, in_spatial, multiple=multiple)
        np.testing.assert_allclose(dx, input_gradient(geometry, g, w, in_spatial), rtol=RTOL, atol=ATOL)

    @settings(max_examples=30)
    @given(conv_configs(), st.integers(0, 2**16))
    def test_input_gradient_by_folded_columns(self, config, seed):
        """dX with the kernel's columns folded into its channels equals the textbook one, in both layouts, 1-3-D,
        strided, dilated and padded (negative padding too)."""
        x_shape, w_shape, _, kwargs = config
        assume(kwargs["groups"] == 1)
        x, w, g, geometry = prepared(x_shape, w_shape, kwargs, seed)
        assume(g.size > 0)
        in_spatial = geometry.spatial_shape(x.shape)
        dx = jax.jit(fast_backward.input_gradient_by_folded_columns, static_argnums=(0, 3))(geometry, g, w, in_spatial)
        np.testing.assert_allclose(dx, input_gradient(geometry, g, w, in_spatial), rtol=RTOL, atol=ATOL)

    @settings(max_examples=20)
    @given(conv_configs(), st.integers(1, 2), st.integers(0, 2**16))
    def test_depthwise_gradients_by_taps(self, config, multiplier, seed):
        """dX and dW of a depthwise conv tap by tap equal the textbook ones, with any channel multiplier."""
        x_shape, w_shape, kwargs = as_depthwise(config, multiplier)
        x, w, g, geometry = prepared(x_shape, w_shape, kwargs, seed)
        assume(g.size > 0)
        in_spatial = geometry.spatial_shape(x.shape)
        dx = jax.jit(fast_backward.depthwise_input_gradient, static_argnums=(0, 3))(geometry, g, w, in_spatial)
        dw = jax.jit(fast_backward.depthwise_weight_gradient, static_argnums=(0, 3))(geometry, x, g, w.shape)
        np.testing.assert_allclose(dx, input_gradient(geometry, g, w, in_spatial), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(dw, weight_gradient(geometry, x, g, w.shape), rtol=RTOL, atol=ATOL)

    @settings(max_examples=15)
    @given(conv_configs(), st.integers(0, 2**16), st.integers(1, 3))
    def test_weight_gradient_by_chunks(self, config, seed, chunk):
        x_shape, w_shape, _, kwargs = config
        x, w, g, geometry = prepared(x_shape, w_shape, kwargs, seed)
        assume(g.size > 0)
        np.testing.assert_allclose(
            fast_backward.weight_gradient_by_chunks(geometry, x, g, w.shape, chunk=chunk),
            weight_gradient(geometry, x, g, w.shape),
            rtol=RTOL,
            atol=ATOL,
        )

    @settings(max_examples=30)
    @given(blockable_configs(), st.integers(0, 2**16), st.sampled_from([2, 3, 4]), st.integers(1, 3))
    def test_weight_gradient_by_space_to_depth(self, config, seed, block, chunk):
        """dW as the weight gradient of the space-to-depth conv, folded back onto the taps, equals the textbook dW
        on every 2-D stride-1 NHWC conv (kernels 1 to 5, negative padding), in blocks of 2-4 and any chunk."""
        x_shape, w_shape, _, padding = config
        x, w, _ = random_arrays(seed, x_shape, w_shape, False, "NHWC")
        geometry = conv_geometry(x, w, padding=padding)
        g = np.random.default_rng(seed + 1).standard_normal(ops.conv(x, w, padding=padding).shape)
        assume(g.size > 0)
        dw = jax.jit(
            fast_backward.weight_gradient_by_space_to_depth, static_argnums=(0, 3), static_argnames=("block", "chunk")
        )(geometry, x, g, w.shape, block=block, chunk=chunk)
        np.testing.assert_allclose(dw, weight_gradient(geometry, x, g, w.shape), rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize(
        "layout, shape, expected",
        [
            (
                "NHWC",
                dict(batch=20, spatial=(6, 6), c_in=2, c_out=12, kernel=3, stride=2, padding=1),
                "dX phases, dW chunks of 8",
            ),
            # first layers (<= 3 input channels) chunk dW only in NHWC with <= 16 outputs
            ("NHWC", dict(batch=16, spatial=(6, 6), c_in=3, c_out=17, kernel=3), "dX folded_columns, dW textbook"),
            ("NCHW", dict(batch=17, spatial=(9, 9), c_in=1, c_out=3, kernel=3), "dX folded_columns, dW textbook"),
            ("NCHW", dict(batch=17, spatial=(9, 9), c_in=4, c_out=3, kernel=3), "dX padded to 8s, dW chunks of 8"),
            ("NHWC", dict(batch=4, spatial=(10, 10), c_in=6, c_out=16, kernel=5), "dX folded_columns, dW textbook"),
            # dX by folded columns: fewer inputs than outputs, at most 24 inputs, one input only up to 12 outputs
            (
                "NCHW",
                dict(batch=2, spatial=(9, 8), c_in=4, c_out=8, kernel=3, dilation=2, padding=[2, 1]),
                "dX folded_columns, dW textbook",
            ),
            ("NHWC", dict(batch=2, spatial=(9, 9), c_in=1, c_out=16, kernel=5), "dX textbook, dW textbook"),
            # one input channel to at most 6 outputs (LeNet C1): dW as the blocked conv's, in chunks
            (
                "NHWC",
                dict(batch=35, spatial=(12, 11), c_in=1, c_out=6, kernel=5, padding=1),
                "dX folded_columns, dW space_to_depth 2x2 in chunks of 32",
            ),
            ("NCHW", dict(batch=3, spatial=(12, 12), c_in=1, c_out=6, kernel=5), "dX folded_columns, dW textbook"),
            ("NHWC", dict(batch=2, spatial=(6, 6), c_in=25, c_out=32, kernel=3), "dX padded to 8s, dW textbook"),
            ("NHWC", dict(batch=2, spatial=(6, 6), c_in=16, c_out=16, kernel=3), "dX textbook, dW textbook"),
            ("NCHW", dict(batch=3, spatial=(7,), c_in=5, c_out=2, kernel=3, padding=1), "dX padded to 8s, dW textbook"),
            (
                "NHWC",
                dict(batch=40, spatial=(2, 2), c_in=3, c_out=2, kernel=3, padding=1),
                "dX textbook, dW chunks of 16",
            ),
            (
                "NHWC",
                dict(batch=3, spatial=(7, 7), c_in=4, c_out=4, kernel=2, stride=3, dilation=2, groups=2),
                "per group: dX phases, dW textbook",
            ),
            (
                "NCHW",
                dict(batch=2, spatial=(6, 5), c_in=3, c_out=3, kernel=3, stride=2, padding=1, groups=3),
                "dX taps, dW taps",
            ),
            (
                "NHWC",
                dict(batch=2, spatial=(6, 5), c_in=3, c_out=6, kernel=3, padding=1, groups=3),
                "per group: dX folded_columns, dW space_to_depth 2x2 in chunks of 32",
            ),
            (
                "NCHW",
                dict(batch=2, spatial=(9,), c_in=3, c_out=5, kernel=3, padding=(2, -1)),
                "dX textbook, dW textbook",
            ),
            ("NHWC", dict(batch=16, spatial=(9,), c_in=3, c_out=5, kernel=3, stride=2), "dX phases, dW chunks of 8"),
            (
                "NCHW",
                dict(batch=2, spatial=(5, 4, 6), c_in=4, c_out=6, kernel=3, stride=2, dilation=2, padding=2, groups=2),
                "depth taps: per group: dX phases, dW textbook",
            ),
        ],
    )
    def test_dispatched_strategies(self, layout, shape, expected):
        """Shapes that reach each branch of the CPU dispatch: custom still equals textbook."""
        shape = dict(shape)
        batch, spatial, c_in, c_out, k = (shape.pop(n) for n in ("batch", "spatial", "c_in", "c_out", "kernel"))
        groups, kernel = shape.get("groups", 1), (k,) * len(spatial)
        x_shape = (batch, *spatial, c_in) if layout == "NHWC" else (batch, c_in, *spatial)
        w_shape = (*kernel, c_in // groups, c_out) if layout == "NHWC" else (c_out, c_in // groups, *kernel)
        kwargs = dict(shape, layout=layout)
        if isinstance(kwargs.get("padding"), tuple):
            kwargs["padding"] = (kwargs["padding"],)
        x, w, b = random_arrays(0, x_shape, w_shape, True, layout)
        g = np.random.default_rng(1).standard_normal(ops.conv(x, w, b, **kwargs).shape)
        for c, t in zip(gradients("custom", x, w, b, kwargs, g), gradients("textbook", x, w, b, kwargs, g)):
            np.testing.assert_allclose(c, t, rtol=RTOL, atol=ATOL)
        planned = plan.plan(conv_geometry(x, w, **kwargs), x_shape, w_shape, "cpu")
        assert str(planned) == expected

    @settings(max_examples=40)
    @given(blockable_configs(), st.integers(0, 2**16), st.sampled_from([2, 3, 4]))
    def test_forward_by_space_to_depth(self, config, seed, block):
        """The space-to-depth forward, in blocks of 2, 3 or 4 pixels a side, equals the textbook forward and the
        float64 loop oracle, on every 2-D stride-1 NHWC conv (kernels 1 to 5, odd and even sizes, negative padding,
        empty batches)."""
        x_shape, w_shape, has_bias, padding = config
        x, w, b = random_arrays(seed, x_shape, w_shape, has_bias, "NHWC")
        geometry = conv_geometry(x, w, b, padding=padding)
        x, w = jnp.asarray(x), jnp.asarray(w)
        b = None if b is None else jnp.asarray(b)
        y = jax.jit(fast_forward.forward_by_space_to_depth, static_argnums=0, static_argnames="block")(
            geometry, x, w, b, block=block
        )
        np.testing.assert_allclose(y, textbook.forward(geometry, x, w, b), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(y, ops.conv_loops(x, w, b, padding=padding), rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize(
        "x_shape, w_shape, kwargs, expected",
        [
            ((4, 32, 32, 1), (5, 5, 1, 6), {}, "space_to_depth 4x4"),  # LeNet C1
            ((4, 28, 28, 1), (5, 5, 1, 16), {"padding": 2}, "space_to_depth 4x4"),  # the main job's C1
            ((4, 32, 32, 3), (3, 3, 3, 16), {"padding": 1}, "space_to_depth 2x2"),  # ResNet stem
            ((4, 14, 14, 6), (5, 5, 6, 16), {}, "space_to_depth 2x2"),  # LeNet C3
            ((4, 32, 32, 3), (3, 3, 3, 64), {"padding": 1}, "textbook"),  # VGG's first conv: measured slower
            ((4, 32, 32, 8), (3, 3, 8, 16), {"padding": 1}, "textbook"),
            ((4, 32, 32, 3), (3, 3, 3, 16), {"stride": 2}, "textbook"),
            ((4, 32, 32, 3), (3, 3, 3, 16), {"dilation": 2}, "textbook"),
            ((4, 32, 32, 2), (1, 1, 2, 16), {}, "textbook"),
            ((4, 3, 32, 32), (16, 3, 3, 3), {"layout": "NCHW"}, "textbook"),
            ((4, 32, 3), (3, 3, 16), {}, "textbook"),
        ],
    )
    def test_forward_plan(self, x_shape, w_shape, kwargs, expected):
        """The measured forward rule, and `backward="custom"` through it equal to the textbook forward."""
        x, w, b = random_arrays(0, x_shape, w_shape, True, kwargs.get("layout", "NHWC"))
        geometry = conv_geometry(x, w, b, **kwargs)
        assert str(plan.forward_plan(geometry, x_shape, w_shape, "cpu")) == expected
        assert str(plan.forward_plan(geometry, x_shape, w_shape, "cuda")) == "textbook"
        custom = ops.conv(x, w, b, **kwargs, backward="custom")
        np.testing.assert_allclose(custom, ops.conv(x, w, b, **kwargs, backward="textbook"), rtol=RTOL, atol=ATOL)

    def test_other_backends_run_the_textbook_formulation(self):
        geometry = conv_geometry(np.zeros((64, 8, 8, 1)), np.zeros((3, 3, 1, 32)), stride=2)
        assert str(plan.plan(geometry, (64, 8, 8, 1), (3, 3, 1, 32), "gpu")) == ("dX textbook, dW textbook")


def test_benchmark_quick_run_writes_results(tmp_path):
    from experiments.benchmarks import bench

    bench.main(
        [
            "all",
            "--quick",
            "--layouts",
            "NHWC",
            "--modes",
            "autodiff,custom",
            "--no-torch",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
        ]
    )
    with open(tmp_path / "smoke.json") as f:
        results = json.load(f)
    assert results["machine"]["jax"] and results["machine"]["gemm"]["gflops"] > 0
    for row in results["layers"]["conv"]:
        assert row["autodiff fwd+bwd ms"] > 0 and row["custom fwd+bwd ms"] > 0 and row["custom plan"]
    assert results["training"]["models"][0]["custom images/s"] > 0
    assert "Convolutions" in (tmp_path / "smoke.md").read_text()


@pytest.mark.parametrize("stride, same", [(1, True), (2, False)])
def test_benchmark_tells_when_custom_compiles_to_autodiffs_program(stride, same):
    """Where the plan reorders nothing (more inputs than outputs, a multiple of 8, no chunks), custom's program is
    autodiff's; strided dX by phases is another program."""
    from experiments.benchmarks import layers
    from experiments.timing import compiled_program

    case = layers.ConvCase("textbook layer", 4, (8, 8), 8, 4, 3, stride=stride, padding=1)
    calls = layers.conv_calls(case, "NCHW", ("autodiff", "custom"), jax.random.key(0))
    programs = [compiled_program(fn, *args) for fn, args in (calls["custom fwd+bwd"], calls["autodiff fwd+bwd"])]
    assert (programs[0] == programs[1]) is same


def test_benchmark_summary_separates_custom_programs_from_autodiffs_per_estimate():
    """Each estimate's worst row, worst own-program row and noise range (the rows that run autodiff's program)."""
    from experiments.benchmarks import layers

    case = layers.ConvCase("a", 1, (4, 4), 1, 1, 3)
    cases = [dataclasses.replace(case, name=n) for n in "abc"]

    def row(name, same, median, best):
        ratios = {"": median, " best": best, " cpu": 1.0}
        return {"layer": name, "layout": "NHWC", "custom program = autodiff's": same, "custom dW of GEMM": 0.5}, {
            f"custom/autodiff fwd+bwd{k}": v for k, v in ratios.items()
        }

    rows = [
        {**a, **b, "gemm GFLOP/s": 50.0}
        for a, b in (row("a", True, 1.2, 0.98), row("b", True, 0.9, 1.03), row("c", False, 1.1, 0.5))
    ]
    s = layers.summary(rows, cases)
    assert s[layers.SAME_PROGRAM_ROWS] == 2
    assert s["median"]["worst"]["layer"] == "a" and s["median"][layers.OWN_PROGRAMS_WORST]["ratio"] == 1.1
    assert s["median"][layers.NOISE_RANGE] == [0.9, 1.2]
    assert s["best"]["worst"]["layer"] == "b" and s["best"][layers.NOISE_RANGE] == [0.98, 1.03]
    np.testing.assert_allclose(s["best"]["geomean"], (0.98 * 1.03 * 0.5) ** (1 / 3))


def test_interleaved_times_gives_the_fastest_call_and_the_median(monkeypatch):
    """On a fake clock, so the test times nothing: each call of f lasts the next of 3, 1, 2 ms."""
    from experiments import timing

    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    durations = iter([3e-3, 1e-3, 2e-3])

    def f():
        clock["now"] += next(durations)
        return jnp.zeros(())

    t = timing.interleaved_times({"f": (f, ())}, repeats=3, warmup=0)["f"]
    np.testing.assert_allclose([t["best_ms"], t["ms"]], [1.0, 2.0])


def test_interleaved_times_leaves_the_lead_in_calls_untimed(monkeypatch):
    """On a fake clock: each timed call of f (1, 2, 3 ms) follows one untimed call that lasts 50 ms."""
    from experiments import timing

    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    durations = iter([50e-3, 1e-3, 50e-3, 2e-3, 50e-3, 3e-3])

    def f():
        clock["now"] += next(durations)
        return jnp.zeros(())

    t = timing.interleaved_times({"f": (f, ())}, repeats=3, warmup=0, lead_in=1)["f"]
    np.testing.assert_allclose([t["best_ms"], t["ms"]], [1.0, 2.0])
    with pytest.raises(ValueError, match="lead_in"):
        timing.interleaved_times({"f": (f, ())}, repeats=1, lead_in=-1)

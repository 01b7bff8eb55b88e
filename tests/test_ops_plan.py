"""The CPU plan as it runs: every rule of its tables reached by a shape, each planned formulation found in the lowered
program of the custom VJP (its named scope, and convs unlike the textbook's), and the primal of every conv one plain
`conv_general_dilated` in its jaxpr (what tools that match layers in jaxprs read)."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import models, nn, ops
from convlib.ops import plan
from convlib.ops.geometry import conv_geometry

# (name, layout, x_shape, w_shape, kwargs, platform, the plan, the forward plan): every rule of every table
CASES = [
    ("other platforms", "NHWC", (20, 6, 6, 1), (3, 3, 1, 6), {}, "cuda", "dX textbook, dW textbook", "textbook"),
    (
        "depthwise",
        "NCHW",
        (2, 3, 6, 5),
        (3, 1, 3, 3),
        dict(stride=2, padding=1, groups=3),
        "cpu",
        "dX taps, dW taps",
        "textbook",
    ),
    (
        "3-D",
        "NCHW",
        (2, 4, 5, 4, 6),
        (6, 2, 3, 3, 3),
        dict(stride=2, dilation=2, padding=2, groups=2),
        "cpu",
        "depth taps: per group: dX phases, dW textbook",
        "textbook",
    ),
    (
        "many groups",
        "NHWC",
        (2, 6, 6, 5),
        (3, 3, 1, 10),
        dict(groups=5),
        "cpu",
        "per group: dX textbook, dW textbook",
        "textbook",
    ),
    (
        "groups",
        "NHWC",
        (3, 7, 7, 4),
        (2, 2, 2, 4),
        dict(stride=3, dilation=2, groups=2),
        "cpu",
        "per group: dX phases, dW textbook",
        "textbook",
    ),
    (
        "strided",
        "NHWC",
        (20, 6, 6, 2),
        (3, 3, 2, 12),
        dict(stride=2, padding=1),
        "cpu",
        "dX phases, dW chunks of 8",
        "textbook",
    ),
    (
        "few channels",
        "NHWC",
        (4, 10, 10, 6),
        (5, 5, 6, 16),
        {},
        "cpu",
        "dX folded_columns, dW textbook",
        "space_to_depth 2x2",
    ),
    ("padded channels", "NCHW", (17, 4, 9, 9), (3, 4, 3, 3), {}, "cpu", "dX padded to 8s, dW chunks of 8", "textbook"),
    ("wide", "NHWC", (2, 6, 6, 16), (3, 3, 16, 16), {}, "cpu", "dX textbook, dW textbook", "textbook"),
    (
        "one input channel",
        "NHWC",
        (35, 12, 11, 1),
        (5, 5, 1, 6),
        dict(padding=1),
        "cpu",
        "dX folded_columns, dW space_to_depth 2x2 in chunks of 32",
        "space_to_depth 4x4",
    ),
]
IDS = [case[0] for case in CASES]


def arrays(x_shape, w_shape, layout):
    rng = np.random.default_rng(0)
    c_out = w_shape[-1] if layout == "NHWC" else w_shape[0]
    return (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, w_shape, (c_out,)))


def lowered_loss_and_gradients(backward, x, w, b, kwargs, platform):
    """The lowered program, with its named-scope locations, of the loss and its gradients on `platform`."""
    loss = lambda x, w, b: jnp.sum(jnp.sin(ops.conv(x, w, b, **kwargs, backward=backward)))
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(x, w, b)
    return traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)


def convs_by_scope(program: str) -> list[tuple[str, str]]:
    """(name stack, output type) of every convolution in a lowered program."""
    locations = dict(re.findall(r'^(#loc\d+) = loc\("([^"]*)"', program, re.MULTILINE))
    convs = re.findall(r"stablehlo\.convolution.*-> (tensor<[^>]*>) loc\((#loc\d+)\)", program)
    return [(locations.get(loc, ""), out) for out, loc in convs]


def conv_outputs(convs, scope: str) -> list[str]:
    """The output types of the convs that run under a scope named `scope...`, sorted."""
    return sorted(out for stack, out in convs if scope in stack)


@pytest.mark.parametrize("name, layout, x_shape, w_shape, kwargs, platform, expected, forward", CASES, ids=IDS)
def test_the_planned_formulations_run_in_the_custom_vjp(
    name, layout, x_shape, w_shape, kwargs, platform, expected, forward
):
    """The plan's named scopes appear in the lowered gradient program; a formulation other than the textbook's runs
    other convs than the textbook's under its scope (a textbook function under a planned name would not)."""
    kwargs = dict(kwargs, layout=layout)
    x, w, b = arrays(x_shape, w_shape, layout)
    geometry = conv_geometry(x, w, b, **kwargs)
    planned = plan.plan(geometry, x_shape, w_shape, platform)
    forward_planned = plan.forward_plan(geometry, x_shape, w_shape, platform)
    assert (str(planned), str(forward_planned)) == (expected, forward)
    custom = lowered_loss_and_gradients("custom", x, w, b, kwargs, platform)
    textbook = convs_by_scope(lowered_loss_and_gradients("textbook", x, w, b, kwargs, platform))
    for scope in (*planned.scopes(), forward_planned.scope):
        assert re.search(rf"[/(]{re.escape(scope)}[/)]", custom), f"{scope} does not run"
    convs = convs_by_scope(custom)
    if isinstance(planned, plan.Lowered):
        assert conv_outputs(convs, "convlib.conv.d") != conv_outputs(textbook, "convlib.conv.d")
    else:
        for formulation in (planned.input_gradient, planned.weight_gradient):
            kind = formulation.scope.rsplit(".", 1)[0]
            same = conv_outputs(convs, kind) == conv_outputs(textbook, kind)
            assert same == (formulation.name == "textbook"), formulation.scope
    same_forward = conv_outputs(convs, "convlib.conv.forward") == conv_outputs(textbook, "convlib.conv.forward")
    assert same_forward == (forward_planned.name == "textbook")


def test_every_rule_is_reached_by_a_case():
    """The cases above reach every rule of every table: a new rule needs a case."""
    reached = collections.defaultdict(set)
    for _, layout, x_shape, w_shape, kwargs, platform, _, _ in CASES:
        x, w, b = arrays(x_shape, w_shape, layout)
        case = plan.Case(conv_geometry(x, w, b, **kwargs, layout=layout), x_shape, w_shape, platform)
        tables = {"forward": plan.FORWARD_RULES, "gradients": plan.GRADIENT_RULES}
        if plan.first_rule(plan.GRADIENT_RULES, case) is plan.GRADIENT_RULES[-1]:
            tables |= {"dX": plan.INPUT_GRADIENT_RULES, "dW": plan.WEIGHT_GRADIENT_RULES}
        for table, rules in tables.items():
            reached[table].add(rules.index(plan.first_rule(rules, case)))
    for table, rules in [
        ("forward", plan.FORWARD_RULES),
        ("gradients", plan.GRADIENT_RULES),
        ("dX", plan.INPUT_GRADIENT_RULES),
        ("dW", plan.WEIGHT_GRADIENT_RULES),
    ]:
        assert reached[table] == set(range(len(rules))), table


def primitives(jaxpr) -> collections.Counter:
    """How often each primitive occurs in a jaxpr, its sub-jaxprs included (custom_vjp_call, pjit, cond, ...)."""
    counts = collections.Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    counts += primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    counts += primitives(sub)
    return counts


def assert_plain(counts: collections.Counter, convs: int) -> None:
    assert counts["conv_general_dilated"] == convs, counts
    branches = [p for p in counts if p.startswith("scatter") or p in ("platform_index", "cond", "while")]
    assert not branches, counts


NARROW = ("narrow input", "NHWC", (2, 2, 3, 4), (3, 5, 4, 3), dict(stride=(1, 2), padding=((1, 1), (3, -1))))
REFLECT = ("reflect padding", "NCHW", (2, 3, 5, 5), (4, 3, 3, 3), dict(padding=2, padding_mode="reflect"))


@pytest.mark.parametrize("backward", ops.BACKWARDS)
@pytest.mark.parametrize(
    "name, layout, x_shape, w_shape, kwargs",
    [c[:5] for c in CASES] + [NARROW, REFLECT],
    ids=[*IDS, "narrow", "reflect"],
)
def test_the_primal_is_one_plain_conv(name, layout, x_shape, w_shape, kwargs, backward):
    """Outside differentiation a conv is one `conv_general_dilated` (+ bias) in every mode and for every plan: no
    platform branch, no scatter; the faster forwards run only under differentiation."""
    x, w, b = arrays(x_shape, w_shape, layout)
    jaxpr = jax.make_jaxpr(lambda x, w, b: ops.conv(x, w, b, **kwargs, layout=layout, backward=backward))(x, w, b)
    assert_plain(primitives(jaxpr.jaxpr), convs=1)


@pytest.mark.parametrize("backward", ops.BACKWARDS)
def test_a_models_loss_shows_one_conv_per_conv_layer(backward):
    """kfac-jax-style layer matching: the jaxpr of LeNet-5's loss has one `conv_general_dilated` per conv layer, and
    its pools no branch or scatter either."""
    model = models.create("lenet5", rngs=nnx.Rngs(0), in_channels=1, backward=backward)
    layers = sum(isinstance(node, nn.Conv) for _, node in nnx.iter_graph(model))
    x = jnp.zeros((2, 32, 32, 1))
    jaxpr = jax.make_jaxpr(lambda x: jnp.mean(model(x) ** 2))(x)
    assert layers >= 2
    assert_plain(primitives(jaxpr.jaxpr), convs=layers)


def test_max_and_avg_pool_primals_are_one_reduce_window():
    x = jnp.zeros((2, 6, 6, 3))
    for pool, primitive in ((ops.max_pool, "reduce_window_max"), (ops.avg_pool, "reduce_window_sum")):
        counts = primitives(jax.make_jaxpr(lambda x, pool=pool: pool(x, 2, 1, padding=1))(x).jaxpr)
        assert counts[primitive] == 1 and sum(counts[p] for p in counts if p.startswith("scatter")) == 0, counts

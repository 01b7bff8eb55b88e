"""Hypothesis strategies over the whole configuration space of `convlib.ops.conv`."""

import numpy as np
from hypothesis import strategies as st

TINY_BATCHES = st.sampled_from([0, 1, 2, 2])


@st.composite
def conv_configs(draw, max_ndim=3, batches=TINY_BATCHES, max_extra=3):
    """Draws (x_shape, w_shape, has_bias, kwargs) for a valid `conv` call, float64-sized tiny: `batches` images,
    each spatial dim at most `max_extra` (1 in 3-D) above what the kernel needs."""
    ndim = draw(st.integers(1, max_ndim))
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))  # depthwise with channel multiplier when c_in == groups
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"]))
    kind = draw(st.sampled_from(["int", "pairs", "SAME", "valid"]))
    lowest = 0 if padding_mode != "zeros" else -1
    if kind == "int":
        pads = ((draw(st.integers(0, 3)),) * 2,) * ndim
        padding = pads[0][0]
    elif kind == "pairs":
        pads = tuple((draw(st.integers(lowest, 3)), draw(st.integers(lowest, 3))) for _ in range(ndim))
        padding = pads
    else:
        pads, padding = ((0, 0),) * ndim, kind
    spatial = []
    for k, d, (lo, hi) in zip(kernel, dilation, pads):
        need = max(d * (k - 1) + 1 - lo - hi, 1)
        if padding_mode == "reflect":
            need = max(need, lo + 1, hi + 1)
        elif padding_mode == "circular":
            need = max(need, lo, hi)
        spatial.append(draw(st.integers(need, need + (max_extra if ndim < 3 else min(max_extra, 1)))))
    batch = draw(batches)
    if layout == "NHWC":
        x_shape, w_shape = (batch, *spatial, c_in), (*kernel, c_in // groups, c_out)
    else:
        x_shape, w_shape = (batch, c_in, *spatial), (c_out, c_in // groups, *kernel)
    kwargs = dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, layout=layout
    )
    if draw(st.booleans()):  # ints instead of tuples where they are equal
        kwargs["stride"] = stride[0] if len(set(stride)) == 1 else stride
    return x_shape, w_shape, draw(st.booleans()), kwargs


def chunked_conv_configs():
    """Conv configs with batches of 16-20 images on tiny maps: more than two chunks of the CPU plan's chunked dE/dW
    (8 images), which the tiny batches of :func:`conv_configs` never reach."""
    return conv_configs(max_ndim=2, batches=st.integers(16, 20), max_extra=1)


def random_arrays(seed, x_shape, w_shape, has_bias, layout, dtype=np.float64):
    """Standard-normal x, w and (optionally) b for the given shapes."""
    rng = np.random.default_rng(seed)
    c_out = w_shape[-1] if layout == "NHWC" else w_shape[0]
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    return x, w, rng.standard_normal(c_out).astype(dtype) if has_bias else None

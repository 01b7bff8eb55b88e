"""Bad input raises ValueError/TypeError naming the parameter and the value, at call time."""

import numpy as np
import pytest

from convlib import ops

X = np.zeros((2, 8, 8, 4), np.float32)
W = np.zeros((3, 3, 4, 6), np.float32)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.zeros((8, 8, 4)), W), {}, ValueError, r"w must have the same rank"),
        ((np.zeros((2, 8, 8, 4, 1, 1)), W), {}, ValueError, r"x must have rank 3, 4 or 5"),
        ((X, np.zeros((3, 3, 5, 6))), {}, ValueError, r"x has 4 input channels .* expects 5"),
        ((X, W), {"groups": 3}, ValueError, r"groups=3 .* divide"),
        ((X, np.zeros((3, 3, 2, 6))), {"groups": 3}, ValueError, r"groups=3"),
        ((X, W), {"groups": 0}, ValueError, r"groups=0"),
        ((X, W), {"groups": 2.0}, TypeError, r"groups must be an int, got 2.0"),
        ((X, W), {"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
        ((X, W), {"stride": (1, 2, 3)}, ValueError, r"stride must be an int or a sequence of 2 ints"),
        ((X, W), {"dilation": -1}, ValueError, r"dilation must be >= 1, got -1"),
        ((X, W), {"stride": 1.5}, ValueError, r"stride .* got 1.5"),
        ((X, W), {"padding": "full"}, ValueError, r"padding .* got 'full'"),
        ((X, W), {"padding": (1, 2, 3)}, ValueError, r"padding must be .* got \(1, 2, 3\)"),
        ((X, W), {"padding": -3}, ValueError, r"kernel size \(3, 3\) .* larger than the padded input"),
        ((np.zeros((1, 2, 2, 4)), W), {}, ValueError, r"larger than the padded input \(2 \+ padding \(0, 0\)\)"),
        ((X, W), {"dilation": 5}, ValueError, r"dilated extent 11"),
        ((X, W), {"layout": "NWHC"}, ValueError, r"layout must be .* got 'NWHC'"),
        ((X, W), {"padding_mode": "mirror"}, ValueError, r"padding_mode must be one of .* got 'mirror'"),
        ((X, W), {"backward": "manual"}, ValueError, r"backward must be one of .* got 'manual'"),
        (
            (X, W),
            {"padding": 8, "padding_mode": "reflect"},
            ValueError,
            r"padding \(8, 8\) .* too large for padding_mode='reflect' with input size 8 \(at most 7\)",
        ),
        ((X, W), {"padding": 9, "padding_mode": "circular"}, ValueError, r"too large for padding_mode='circular'"),
        ((X, W), {"padding": ((-1, 1), (1, 1)), "padding_mode": "reflect"}, ValueError, r"negative padding"),
        ((X.astype(np.int32), W), {}, TypeError, r"x must have a floating dtype, got int32"),
        ((X, W.astype(np.int8)), {}, TypeError, r"w must have a floating dtype, got int8"),
        ((X, W, np.zeros(5)), {}, ValueError, r"b must have shape \(6,\), got \(5,\)"),
        ((X, W, np.zeros(6, np.int32)), {}, TypeError, r"b must have a floating dtype"),
    ],
)
def test_conv_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.conv(*args, **kwargs)


def test_nchw_channel_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"x has 8 input channels but w of shape \(6, 4, 3, 3\)"):
        ops.conv(np.zeros((2, 8, 8, 8)), np.zeros((6, 4, 3, 3)), layout="NCHW")


@pytest.mark.parametrize("pool", [ops.max_pool, ops.avg_pool])
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((X, 0), {}, ValueError, r"kernel size must be >= 1, got 0"),
        ((X, 2, 0), {}, ValueError, r"stride must be >= 1, got 0"),
        ((X, 9), {}, ValueError, r"larger than the padded input"),
        ((X, 3, 1, 2), {}, ValueError, r"padding must be between 0 and half the window"),
        ((X, 3, 1, -1), {}, ValueError, r"padding must be between 0 and half the window"),
        ((X, (2, 2, 2)), {}, ValueError, r"kernel size must be an int or a sequence of 2 ints"),
        ((X[0, 0], 2), {}, ValueError, r"x must have rank 3, 4 or 5"),
        ((X.astype(np.int32), 2), {}, TypeError, r"x must have a floating dtype"),
        ((X, 2), {"layout": "CHW"}, ValueError, r"layout must be .* got 'CHW'"),
        ((X, 2), {"backward": "fast"}, ValueError, r"backward must be one of .* got 'fast'"),
    ],
)
def test_pools_reject_bad_input(pool, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        pool(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output_padding": 2, "stride": 2}, r"output_padding must be >= 0 and < stride or dilation"),
        ({"output_padding": -1}, r"output_padding must be >= 0"),
        ({"padding": "SAME"}, r"padding must be explicit for conv_transpose"),
        ({"padding": 9}, r"padding 9 is too large"),
    ],
)
def test_conv_transpose_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.conv_transpose(np.zeros((1, 4, 4, 6)), W, **kwargs)


def test_reference_rejects_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of .* got 'fft'"):
        ops.conv_by("fft", X, W)

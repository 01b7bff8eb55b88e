"""The lecture's three ways to compute a convolution: explicit loops, serialisation (im2col + one matrix product)
and lax.conv_general_dilated; their agreement and their time against problem size.

For a sweep of 3x3 'same' convolutions (N, H, H, C) -> (N, H, H, C), growing in FLOPs:
- forward time of `conv_loops` (NumPy float64, only up to --loops-max-gflop), `conv_im2col` and `conv_lax`
  (jit, float32), median of repeated calls;
- forward + backward time of im2col (JAX autodiff through the patch matrix and the matrix product) and of lax
  with the hand-derived backward ("custom") and with autodiff;
- agreement: max relative error (max|a - b| / max|b|) of each forward against the loops (float64 oracle), in
  float32 and float64, and of the im2col and hand-derived gradients against lax's autodiff (float32). The loops
  have no backward of their own: their gradient is checked only by central finite differences of <G, loops(X, W)>
  along random directions, at the smallest size, and not timed.

Writes into --out: implementations.csv, results.json, time_vs_flops.png.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convlib import ops
from experiments import outputs
from experiments.agreement import errors
from experiments.timing import median_time

# (batch, height = width, channels in = out)
SIZES = {
    "smoke": [(1, 6, 2), (2, 8, 4)],
    "default": [(1, 8, 4), (1, 16, 8), (2, 16, 16), (4, 16, 32), (4, 32, 32), (8, 32, 64), (32, 32, 64)],
    "full": [
        (1, 8, 4),
        (1, 16, 8),
        (2, 16, 16),
        (4, 16, 32),
        (4, 32, 32),
        (8, 32, 64),
        (32, 32, 64),
        (64, 32, 128),
        (128, 32, 128),
        (128, 64, 128),
        (128, 56, 256),
    ],
}
OPTIONS = dict(padding=1)
KERNEL = 3


def parse_args(argv=None):
    p = outputs.make_parser(__doc__, "implementations")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement after the compiling one (default: 2 smoke, 5 default, 20 full)",
    )
    p.add_argument("--loops-max-gflop", type=float, default=0.2, help="time the loops only up to this many GFLOPs")
    p.add_argument("--fd-step", type=float, default=1e-6, help="finite-difference step for the loops' gradient")
    args = p.parse_args(argv)
    outputs.positive(p, args, "repeats", "loops_max_gflop", "fd_step")
    args.repeats = args.repeats or outputs.pick(args.size, 2, 5, 20)
    return args


def arrays(key, n, h, c, dtype=jnp.float32):
    kx, kw, kg = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, h, h, c), dtype)
    w = jax.random.normal(kw, (KERNEL, KERNEL, c, c), dtype) / math.sqrt(KERNEL * KERNEL * c)
    g = jax.random.normal(kg, (n, h, h, c), dtype)  # 'same' padding: the output has the input's shape
    return x, w, g


def gradient_functions():
    """name -> jit((x, w, g) -> (y, dX, dW))."""

    def with_vjp(conv):
        def f(x, w, g):
            y, pull = jax.vjp(lambda x, w: conv(x, w, **OPTIONS), x, w)
            return (y, *pull(g))

        return jax.jit(f)

    return {
        "im2col (autodiff)": with_vjp(ops.conv_im2col),
        "lax (custom backward)": with_vjp(lambda x, w, **o: ops.conv(x, w, backward="custom", **o)),
        "lax (autodiff)": with_vjp(lambda x, w, **o: ops.conv(x, w, backward="autodiff", **o)),
    }


def time_numpy(fn, repeats: int) -> float:
    """Median seconds of `fn()`, a NumPy computation (nothing to compile or wait for)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def finite_difference_check(key, fd_step: float) -> dict:
    """The loops' gradient by central differences of L = <G, loops(X, W)> along random directions (float64),
    against the hand-derived dX and dW (float64, inside the x64 context): relative errors."""
    n, h, c = SIZES["smoke"][0]
    rng = np.random.default_rng(0)
    result = {}
    # conv_loops pads its input with jnp: inside the x64 context it stays float64 end to end
    with jax.enable_x64(True):
        x, w, g = arrays(key, n, h, c, jnp.float64)
        _, dx, dw = gradient_functions()["lax (custom backward)"](x, w, g)
        x, w, g, dx, dw = map(np.asarray, (x, w, g, dx, dw))
        for name, grad in (("dX", dx), ("dW", dw)):
            relative = []
            for _ in range(3):
                v = rng.standard_normal(grad.shape)

                def loss(t):
                    dx_, dw_ = (t * v, 0) if name == "dX" else (0, t * v)
                    return float(np.sum(g * ops.conv_loops(x + dx_, w + dw_, **OPTIONS)))

                numeric = (loss(fd_step) - loss(-fd_step)) / (2 * fd_step)
                analytic = float(np.sum(grad * v))
                relative.append(abs(numeric - analytic) / abs(analytic))
            result[f"loops_fd_{name}_rel_error"] = max(relative)
    return result


def measure(key, n, h, c, args, grads) -> dict:
    flops = 2 * n * h * h * c * c * KERNEL * KERNEL
    row = {"batch": n, "size": h, "channels": c, "gflop": flops / 1e9}
    x, w, g = arrays(key, n, h, c)
    reference = ops.conv_loops(x, w, **OPTIONS)  # float64 NumPy
    forwards = {
        "im2col": jax.jit(lambda x, w: ops.conv_im2col(x, w, **OPTIONS)),
        "lax": jax.jit(lambda x, w: ops.conv_lax(x, w, **OPTIONS)),
    }
    for name, fn in forwards.items():
        row[f"{name}_rel32"] = errors(fn(x, w), reference)[1]
        row[f"{name}_forward_ms"] = 1e3 * median_time(fn, x, w, repeats=args.repeats)
    with jax.enable_x64(True):
        x64, w64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w))
        for name, fn in forwards.items():
            row[f"{name}_rel64"] = errors(fn(x64, w64), reference)[1]
    row["loops_forward_ms"] = (
        1e3 * time_numpy(lambda: ops.conv_loops(x, w, **OPTIONS), min(args.repeats, 3))
        if flops / 1e9 <= args.loops_max_gflop
        else None
    )
    results = {name: fn(x, w, g) for name, fn in grads.items()}
    for name, fn in grads.items():
        row[f"{name}_fwd+bwd_ms"] = 1e3 * median_time(fn, x, w, g, repeats=args.repeats)
    lax = results["lax (autodiff)"]
    for name in ("im2col (autodiff)", "lax (custom backward)"):
        row[f"{name}_dX_rel32"] = errors(results[name][1], lax[1])[1]
        row[f"{name}_dW_rel32"] = errors(results[name][2], lax[2])[1]
    return row


def time_of(row, column):
    return row[column] if row[column] is not None else np.nan


def plot(run, rows, machine):
    plt = outputs.pyplot()
    fig, (ax, rate) = plt.subplots(1, 2, figsize=(13, 4.8))
    flops = np.array([r["gflop"] for r in rows]) * 1e9
    series = [
        ("loops (NumPy) forward", "loops_forward_ms", "-", 1),
        ("im2col forward", "im2col_forward_ms", "-", 1),
        ("lax forward", "lax_forward_ms", "-", 1),
        ("im2col fwd+bwd (autodiff)", "im2col (autodiff)_fwd+bwd_ms", "--", 3),
        ("lax fwd+bwd (custom backward)", "lax (custom backward)_fwd+bwd_ms", "--", 3),
        ("lax fwd+bwd (autodiff)", "lax (autodiff)_fwd+bwd_ms", ":", 3),
    ]
    for label, column, style, passes in series:
        ms = np.array([time_of(r, column) for r in rows], float)
        ax.plot(flops, ms / 1e3, style, marker="o", ms=4, label=label)
        rate.plot(flops, passes * flops / (ms / 1e3) / 1e9, style, marker="o", ms=4, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("forward FLOPs (2 x multiply-adds)")
    ax.set_ylabel("time (s), median")
    ax.set_title("time vs problem size, 3x3 'same' conv, float32")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    rate.set_xscale("log")
    rate.set_yscale("log")
    rate.set_xlabel("forward FLOPs (2 x multiply-adds)")
    rate.set_ylabel("GFLOP/s (backward counted as 2 forwards)")
    rate.set_title("throughput")
    rate.grid(alpha=0.3, which="both")
    fig.suptitle(machine, fontsize=9)
    run.save_figure(fig, "time_vs_flops.png")


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    key = jax.random.key(args.seed)
    grads = gradient_functions()
    rows = [
        measure(jax.random.fold_in(key, i), *size, args, grads)
        for i, size in enumerate(tqdm(SIZES[args.size], desc="sizes", disable=args.no_progress))
    ]
    run.write_csv("implementations.csv", rows)
    plot(run, rows, machine)
    summary = {
        "max_forward_rel_error_float32": max(max(r["im2col_rel32"], r["lax_rel32"]) for r in rows),
        "max_forward_rel_error_float64": max(max(r["im2col_rel64"], r["lax_rel64"]) for r in rows),
        "max_gradient_rel_error_float32": max(
            max(r[k] for k in r if k.endswith(("_dX_rel32", "_dW_rel32"))) for r in rows
        ),
        **finite_difference_check(jax.random.fold_in(key, 99), args.fd_step),
    }
    return run.finish({"summary": summary, "sizes": rows})


if __name__ == "__main__":
    main()

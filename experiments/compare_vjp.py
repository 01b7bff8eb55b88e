"""The hand-derived backward pass (custom_vjp) of convlib.ops.conv against JAX's autodiff.

1. Layer grid: the convolutions of LeNet-5, ResNet-20, VGG and AlexNet, plus stride / dilation / groups /
   depthwise / 1-D / 3-D / NCHW / reflect-padding cases. For each backward mode ("custom", "textbook") against
   "autodiff": max abs and max relative error (max|a - b| / max|b|) of Y, dX, dW, db in float32 and in float64;
   the float32 error of each mode against the float64 result; and the time of the forward, dX alone, dW alone and
   the whole forward + backward (median of repeated compiled calls). Both precisions run in one process: the
   float64 part runs inside `jax.enable_x64(True)` on arrays cast to float64; everything else stays float32.
2. Whole models: the parameter gradients of a loss on one batch, custom vs autodiff, same parameters
   (float32 and float64), and the time of one forward + backward.
3. Training: lenet5_modern trained on Fashion-MNIST from the same seed with backward="custom" and with
   "autodiff"; the per-step losses of the two runs and their largest difference.

Writes into --out: layers.csv, layers.md, models.csv, training.csv, results.json, time_ratios.png,
training.png.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convlib import models, ops, train
from experiments import fashion_training, outputs
from experiments.agreement import errors
from experiments.timing import median_times


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution: input (N, *spatial, C_in) per image `spatial`, kernel `kernel`, C_out, and its options."""

    name: str
    spatial: tuple[int, ...]
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    layout: str = "NHWC"
    padding_mode: str = "zeros"

    def options(self) -> dict:
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            layout=self.layout,
            padding_mode=self.padding_mode,
        )

    def arrays(self, key, batch: int, dtype=jnp.float32):
        """x, w, b for a batch of `batch`, in this layer's layout."""
        kx, kw, kb = jax.random.split(key, 3)
        axes = ops.layout_axes(self.layout, len(self.spatial))
        x_shape = axes.array_shape(batch, self.c_in, self.spatial)
        w_shape = axes.kernel_shape(self.kernel, self.c_in // self.groups, self.c_out)
        fan_in = math.prod(self.kernel) * self.c_in // self.groups
        return (
            jax.random.normal(kx, x_shape, dtype),
            jax.random.normal(kw, w_shape, dtype) / math.sqrt(fan_in),
            jax.random.normal(kb, (self.c_out,), dtype),
        )

    def flops(self, batch: int) -> int:
        """2 x multiply-adds of the forward."""
        out = ops.make_geometry(
            len(self.kernel),
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            in_spatial=self.spatial,
        ).output_spatial(self.spatial)
        return 2 * batch * math.prod(out) * self.c_out * math.prod(self.kernel) * self.c_in // self.groups


def square(n, ndim=2):
    """(n, n) or (n,) * ndim."""
    return (n,) * ndim


LAYERS = [
    Layer("LeNet-5 C1", square(32), 1, 6, square(5)),
    Layer("LeNet-5 C3", square(14), 6, 16, square(5)),
    Layer("LeNet-5 C5", square(5), 16, 120, square(5)),
    Layer("ResNet-20 stem", square(32), 3, 16, square(3), padding=1),
    Layer("ResNet-20 stage 1", square(32), 16, 16, square(3), padding=1),
    Layer("ResNet-20 down 2", square(32), 16, 32, square(3), stride=2, padding=1),
    Layer("ResNet-20 stage 3", square(8), 64, 64, square(3), padding=1),
    Layer("VGG conv1", square(32), 3, 64, square(3), padding=1),
    Layer("VGG conv3", square(8), 128, 256, square(3), padding=1),
    Layer("VGG conv8", square(2), 512, 512, square(3), padding=1),
    Layer("AlexNet conv1 11/4", square(224), 3, 96, square(11), stride=4, padding=2),
    Layer("AlexNet-small conv2 g2", square(15), 48, 128, square(5), padding=2, groups=2),
    Layer("stride 3, ragged", square(33), 8, 16, square(3), stride=3),
    Layer("dilation 2", square(32), 16, 16, square(3), padding=2, dilation=2),
    Layer("dilation 4, stride 2", square(32), 8, 8, square(3), stride=2, padding=4, dilation=4),
    Layer("groups 4", square(16), 32, 32, square(3), padding=1, groups=4),
    Layer("depthwise", square(16), 32, 32, square(3), padding=1, groups=32),
    Layer("depthwise stride 2", square(16), 32, 32, square(3), stride=2, padding=1, groups=32),
    Layer("1x1 bottleneck", square(8), 64, 256, square(1)),
    Layer("1-D k5 s2", (128,), 16, 32, (5,), stride=2, padding=2),
    Layer("3-D 3x3x3", square(8, 3), 8, 16, square(3, 3), padding=1),
    Layer("NCHW stage 1", square(32), 16, 16, square(3), padding=1, layout="NCHW"),
    Layer("reflect padding", square(32), 16, 16, square(3), padding=1, padding_mode="reflect"),
]
SMOKE_LAYERS = ("ResNet-20 down 2",)
MODELS = {
    "smoke": ("lenet5_modern",),
    "default": ("lenet5_modern", "resnet20", "alexnet_small"),
    "full": ("lenet5_modern", "resnet20", "resnet56", "alexnet_small", "vgg11_small", "vgg16_small"),
}
FUNCTIONS = ("forward", "dX", "dW", "fwd+bwd")
HAND_DERIVED = tuple(m for m in ops.BACKWARDS if m != "autodiff")


def parse_args(argv=None):
    p = outputs.make_parser(__doc__, "compare_vjp")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of the layer grid and the model gradients (default: 2 smoke, 8 default, 64 full)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement, after one compiling call (default: 2 smoke, 7 default, 20 full)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated backward modes compared with autodiff "
        "(default: custom with --smoke, else " + ",".join(HAND_DERIVED) + ")",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated model names for the whole-model gradients "
        "(default by size: " + "; ".join(f"{s}: {','.join(m)}" for s, m in MODELS.items()) + ")",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="training steps of each run (default: 2 smoke, 300 default, 2000 full; 0 skips the training part)",
    )
    p.add_argument("--train-size", type=int, default=None, help="training images used (default: all)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    fashion_training.add_data_flags(p)
    args = p.parse_args(argv)
    outputs.positive(p, args, "batch", "repeats", "batch_size", "train_size")
    if args.train_steps is not None and args.train_steps < 0:
        p.error(f"--train-steps must be >= 0, got {args.train_steps}")
    modes = (args.modes or outputs.pick(args.size, "custom", *[",".join(HAND_DERIVED)] * 2)).split(",")
    if not set(modes) <= set(HAND_DERIVED):
        p.error(f"--modes must name backward modes from {HAND_DERIVED}, got {args.modes!r}")
    args.modes = modes
    names = MODELS[args.size] if args.models is None else tuple(args.models.split(","))
    unknown = [n for n in names if n not in models.available()]
    if unknown:
        p.error(f"--models: unknown model(s) {unknown}; available: {', '.join(models.available())}")
    args.models = names
    args.batch = args.batch or outputs.pick(args.size, 2, 8, 64)
    args.repeats = args.repeats or outputs.pick(args.size, 2, 7, 20)
    if args.train_steps is None:
        args.train_steps = outputs.pick(args.size, 2, 300, 2000)
    return args


# --------------------------------------------------------------------------- layer grid


def layer_functions(layer: Layer, mode: str) -> dict:
    """The four compiled functions of one layer and backward mode: (x, w, b, g) -> ..."""
    conv = functools.partial(ops.conv, **layer.options(), backward=mode)

    def vjp_of(*wrt):
        def f(x, w, b, g):
            primals = {"x": x, "w": w, "b": b}
            y, pull = jax.vjp(lambda *p: conv(**{**primals, **dict(zip(wrt, p))}), *(primals[n] for n in wrt))
            return (y, *pull(g))

        return jax.jit(f)

    return {
        "forward": jax.jit(lambda x, w, b, g: conv(x, w, b)),
        "dX": jax.jit(lambda x, w, b, g: vjp_of("x")(x, w, b, g)[1]),
        "dW": jax.jit(lambda x, w, b, g: vjp_of("w")(x, w, b, g)[1]),
        "fwd+bwd": vjp_of("x", "w", "b"),
    }


def compare_layer(layer: Layer, modes, batch: int, repeats: int, key) -> dict:
    """Agreement (float32, float64) and timings (float32) of every mode against autodiff on one layer."""
    row = {
        "layer": layer.name,
        "x": f"{batch}x{'x'.join(map(str, layer.spatial))}x{layer.c_in}",
        "kernel": "x".join(map(str, layer.kernel)),
        "c_out": layer.c_out,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "layout": layer.layout,
        "padding_mode": layer.padding_mode,
        "gflop": layer.flops(batch) / 1e9,
    }
    x, w, b = layer.arrays(key, batch)
    all_modes = ("autodiff", *modes)
    fns = {m: layer_functions(layer, m) for m in all_modes}
    g = jax.random.normal(jax.random.fold_in(key, 1), fns["autodiff"]["forward"](x, w, b, None).shape)
    # float32 results, and float64 results of the same arrays inside the x64 context
    results32 = {m: fns[m]["fwd+bwd"](x, w, b, g) for m in all_modes}
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w, b, g)]
        results64 = jax.tree.map(np.asarray, {m: fns[m]["fwd+bwd"](*args64) for m in all_modes})
    for m in modes:
        for name, i in (("Y", 0), ("dX", 1), ("dW", 2), ("db", 3)):
            row[f"{m}_{name}_abs32"], row[f"{m}_{name}_rel32"] = errors(results32[m][i], results32["autodiff"][i])
            row[f"{m}_{name}_abs64"], row[f"{m}_{name}_rel64"] = errors(results64[m][i], results64["autodiff"][i])
    for m in all_modes:  # float32 gradient error against the float64 truth
        row[f"{m}_rel32_vs_64"] = errors(results32[m][1:], results64["autodiff"][1:])[1]
    for f in FUNCTIONS:  # the modes of one function are timed in turns
        times = median_times({m: (fns[m][f], (x, w, b, g)) for m in all_modes}, repeats=repeats)
        for m in all_modes:
            row[f"{m}_{f}_ms"] = 1e3 * times[m]
    for m in modes:
        for f in FUNCTIONS:
            row[f"{m}_{f}_ratio"] = row[f"{m}_{f}_ms"] / row[f"autodiff_{f}_ms"]
    return row


# --------------------------------------------------------------------------- whole models


def model_gradients(name: str, modes, batch: int, repeats: int, seed: int) -> dict:
    """Gradients of the mean cross-entropy on one random batch w.r.t. all parameters, each mode vs autodiff."""
    from flax import nnx

    size = 32
    options = {"input_size": size} if name.startswith(("lenet", "alexnet", "vgg")) else {}
    model = models.create(name, in_channels=1, rngs=nnx.Rngs(seed), **options)
    key = jax.random.key(seed)
    x = jax.random.normal(key, (batch, size, size, 1))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 10)
    graphdefs = {}
    for m in ("autodiff", *modes):
        model.set_attributes(backward=m, raise_if_not_found=False)
        graphdefs[m], params, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(mode):
        def loss(params, rest, x):
            logits = nnx.merge(graphdefs[mode], params, rest, copy=True)(x)
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])

        return jax.jit(jax.value_and_grad(loss))

    def cast64(tree):
        return jax.tree.map(
            lambda a: jnp.asarray(np.asarray(a), jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
        )

    row = {"model": name, "batch": batch, "parameters": models.param_count(params)}
    fns = {m: grad_fn(m) for m in graphdefs}
    grads32 = {m: fns[m](params, rest, x)[1] for m in fns}
    with jax.enable_x64(True):
        p64, r64, x64 = cast64(params), cast64(rest), cast64(x)
        grads64 = {m: jax.tree.map(np.asarray, grad_fn(m)(p64, r64, x64)[1]) for m in fns}
    for m in modes:
        row[f"{m}_abs32"], row[f"{m}_rel32"] = errors(grads32[m], grads32["autodiff"])
        row[f"{m}_abs64"], row[f"{m}_rel64"] = errors(grads64[m], grads64["autodiff"])
    times = median_times({m: (fns[m], (params, rest, x)) for m in fns}, repeats=repeats)
    for m in fns:
        row[f"{m}_fwd+bwd_ms"] = 1e3 * times[m]
    for m in modes:
        row[f"{m}_ratio"] = row[f"{m}_fwd+bwd_ms"] / row["autodiff_fwd+bwd_ms"]
    return row


# --------------------------------------------------------------------------- training


def train_both(args, modes) -> tuple[dict, list[dict]]:
    """lenet5_modern trained with each of `modes` and with autodiff from the same seed; returns (summary, per-step
    rows)."""
    from flax import nnx

    dataset = fashion_training.load(
        args,
        train_size=args.train_size or outputs.pick(args.size, 512, None, None),
        test_size=outputs.pick(args.size, 256, None, None),
        seed=args.seed,
    )
    runs = {}
    for mode in ("autodiff", *modes):
        model = models.create(
            "lenet5_modern",
            in_channels=1,
            input_size=28,
            backward=mode,
            rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
        )
        runs[mode] = fashion_training.fit(
            model,
            dataset,
            steps=args.train_steps,
            batch_size=min(args.batch_size, dataset.train.labels.shape[0]),
            key=jax.random.key(args.seed),
            evaluations=outputs.pick(args.size, 1, 5, 10),
            recipe=train.Recipe(learning_rate=3e-3, warmup_steps=max(1, args.train_steps // 20)),
            progress=not args.no_progress,
        )
    rows = [
        {"step": r["step"], **{f"{m}_loss": runs[m].steps[i]["loss"] for m in runs}}
        for i, r in enumerate(runs["autodiff"].steps)
    ]
    summary = {
        "dataset": dataset.name,
        "train_images": int(dataset.train.labels.shape[0]),
        "steps": args.train_steps,
        "batch_size": args.batch_size,
    }
    for m in runs:
        summary[f"{m}_final_test_error"] = runs[m].curve[-1]["test_error"]
        summary[f"{m}_train_images_per_s"] = runs[m].result.images_per_s
        summary[f"{m}_curve"] = runs[m].curve
    for m in modes:
        diff = [abs(r[f"{m}_loss"] - r["autodiff_loss"]) for r in rows]
        summary[f"{m}_max_loss_diff"] = max(diff)
        summary[f"{m}_max_loss_diff_first_10_steps"] = max(diff[:10])
        summary[f"{m}_test_error_diff"] = abs(summary[f"{m}_final_test_error"] - summary["autodiff_final_test_error"])
    return summary, rows


# --------------------------------------------------------------------------- figures


def plot_ratios(run: outputs.Run, rows: list[dict], modes, machine: str) -> None:
    plt = outputs.pyplot()
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 4.6 * len(modes)), squeeze=False, layout="constrained")
    width = 0.8 / len(FUNCTIONS)
    positions = np.arange(len(rows))
    for ax, m in zip(axes[:, 0], modes):
        for i, f in enumerate(FUNCTIONS):
            ax.bar(positions + (i - 1.5) * width, [r[f"{m}_{f}_ratio"] for r in rows], width, label=f)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(positions, [r["layer"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"time {m} / time autodiff")
        ax.set_title(f"backward='{m}' vs autodiff, float32, median of repeats ({machine})", fontsize=10)
        ax.legend(ncol=4, fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    run.save_figure(fig, "time_ratios.png", dpi=80)


def plot_training(run: outputs.Run, summary: dict, rows: list[dict], modes) -> None:
    plt = outputs.pyplot()
    fig, (ax, diff_ax) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r["step"] for r in rows]
    styles = {"autodiff": dict(lw=2.5, alpha=0.5), "custom": dict(lw=1, ls="--"), "textbook": dict(lw=1, ls=":")}
    for m in ("autodiff", *modes):
        ax.plot(steps, [r[f"{m}_loss"] for r in rows], label=f"backward='{m}'", **styles.get(m, {}))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (batch)")
    ax.set_title(f"lenet5_modern on {summary['dataset']}, same seed")
    ax.legend()
    for m in modes:
        diff = [abs(r[f"{m}_loss"] - r["autodiff_loss"]) for r in rows]
        diff_ax.plot(steps, np.maximum(diff, 1e-12), label=f"|loss {m} - loss autodiff|")
        if not any(diff):
            diff_ax.text(
                0.5,
                0.6,
                f"{m}: identical losses at all {len(rows)} steps\n(difference exactly 0)",
                transform=diff_ax.transAxes,
                ha="center",
            )
    diff_ax.set_yscale("log")
    diff_ax.set_xlabel("step")
    diff_ax.set_ylabel("absolute difference (floor 1e-12)")
    diff_ax.set_title("difference of the per-step losses")
    diff_ax.legend()
    run.save_figure(fig, "training.png")


# --------------------------------------------------------------------------- main


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    key = jax.random.key(args.seed)
    layers = [layer for layer in LAYERS if args.size != "smoke" or layer.name in SMOKE_LAYERS]
    rows = []
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=args.no_progress)):
        rows.append(compare_layer(layer, args.modes, args.batch, args.repeats, jax.random.fold_in(key, i)))
    run.write_csv("layers.csv", rows)
    columns = ["layer", "x", "kernel", "c_out", "stride", "dilation", "groups", "gflop"]
    for m in args.modes:
        columns += [
            f"{m}_dX_rel32",
            f"{m}_dW_rel32",
            f"{m}_db_rel32",
            f"{m}_dX_rel64",
            f"{m}_dW_rel64",
            f"{m}_forward_ratio",
            f"{m}_dX_ratio",
            f"{m}_dW_ratio",
            f"{m}_fwd+bwd_ratio",
        ]
    run.write_markdown("layers.md", rows, columns, title=f"custom_vjp vs autodiff per layer ({machine})")
    plot_ratios(run, rows, args.modes, machine)

    model_rows = [
        model_gradients(name, args.modes, args.batch, args.repeats, args.seed)
        for name in tqdm(args.models, desc="models", disable=args.no_progress)
    ]
    run.write_csv("models.csv", model_rows)

    training = None
    if args.train_steps:
        training, step_rows = train_both(args, ["custom"])
        run.write_csv("training.csv", step_rows)
        plot_training(run, training, step_rows, ["custom"])

    summary = {}
    for m in args.modes:
        summary[m] = {
            "max_rel_error_float32": max(max(r[f"{m}_{g}_rel32"] for g in ("dX", "dW", "db")) for r in rows),
            "max_rel_error_float64": max(max(r[f"{m}_{g}_rel64"] for g in ("dX", "dW", "db")) for r in rows),
            "max_forward_abs_error": max(max(r[f"{m}_Y_abs32"], r[f"{m}_Y_abs64"]) for r in rows),
            "max_model_rel_error_float32": max((r[f"{m}_rel32"] for r in model_rows), default=None),
            "max_model_rel_error_float64": max((r[f"{m}_rel64"] for r in model_rows), default=None),
            "median_time_ratio": {f: float(np.median([r[f"{m}_{f}_ratio"] for r in rows])) for f in FUNCTIONS},
            "geomean_time_ratio": {
                f: float(np.exp(np.mean(np.log([r[f"{m}_{f}_ratio"] for r in rows])))) for f in FUNCTIONS
            },
        }
    return run.finish({"summary": summary, "layers": rows, "models": model_rows, "training": training})


if __name__ == "__main__":
    main()

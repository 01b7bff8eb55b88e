"""Receptive fields: the analytic calculator (convlib.ops.receptive_fields) against the empirical field, and the
effective receptive field of an untrained and a trained network.

1. Analytic vs empirical. Stacks of stride-1 3x3 / 5x5 / 7x7 convs, strided 3x3 convs, 3x3 convs each followed
   by a 2x2 pool, and dilated 3x3 convs (Yu & Koltun's context module: dilations 1, 1, 2, 4, 8, ...; and constant
   dilation 2, which leaves holes), depth 1..D. The empirical field of the centre output unit is the nonzero
   region of its gradient with respect to the input, through a linear stack with all-ones kernels and average
   pools (same geometry as max pools, but every input in a window gets gradient, so the region is the whole
   field). Checked: its extent and centre equal the calculator's size and start + index x jump; "dense" says
   whether every pixel inside the extent is reached (dilation without a dilation-1 layer leaves holes).
   With C channels per layer, parameters grow linearly with depth for every stack, so the dilated stack's field
   grows exponentially with linearly many parameters (a single conv of the same field would need RF^2 C^2).
2. The analytic fields of named networks (LeNet-5, AlexNet, VGG-16, and the stages of ResNet-20 / lenet5_modern
   read from the convlib models themselves).
3. Effective receptive field (Luo et al. 2016): the mean over test images of |d(centre unit of the last stage,
   summed over channels) / d input|, for the network at initialisation and after brief training on Fashion-MNIST
   zero-padded to 32x32.

Writes into --out: fields.csv, networks.csv, results.json, rf_vs_depth.png, erf.png.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convlib import models, ops, train
from experiments import fashion_training, feature_maps, outputs


def context_dilations(depth: int) -> list[int]:
    """Yu & Koltun's context module: dilations 1, 1, 2, 4, 8, ... (fields 3, 5, 9, 17, 33, ...)."""
    return [1, 1, *(2**i for i in range(1, depth - 1))][:depth]


def conv(kernel, stride=1, dilation=1):
    """A 'same'-padded conv layer spec: ("conv", kernel, stride, dilation, padding)."""
    return ("conv", kernel, stride, dilation, dilation * (kernel - 1) // 2)


POOL = ("pool", 2, 2, 1, 0)

# name -> depth -> layer specs (depth counts the convs)
STACKS = {
    "3x3 conv": lambda d: [conv(3)] * d,
    "5x5 conv": lambda d: [conv(5)] * d,
    "7x7 conv": lambda d: [conv(7)] * d,
    "3x3 conv, stride 2": lambda d: [conv(3, stride=2)] * d,
    "3x3 conv + 2x2 pool": lambda d: [conv(3), POOL] * d,
    "dilated 3x3: 1,1,2,4,8,...": lambda d: [conv(3, dilation=r) for r in context_dilations(d)],
    "dilated 3x3: 2,2,2,...": lambda d: [conv(3, dilation=2)] * d,
}

# Named networks, as (name, [(layer name, spec)]); specs as above with explicit padding.
NETWORKS = {
    "LeNet-5 (32x32 input)": [
        ("C1", ("conv", 5, 1, 1, 0)),
        ("S2", POOL),
        ("C3", ("conv", 5, 1, 1, 0)),
        ("S4", POOL),
        ("C5", ("conv", 5, 1, 1, 0)),
    ],
    "AlexNet (224x224)": [
        ("conv1", ("conv", 11, 4, 1, 2)),
        ("pool1", ("pool", 3, 2, 1, 0)),
        ("conv2", ("conv", 5, 1, 1, 2)),
        ("pool2", ("pool", 3, 2, 1, 0)),
        ("conv3", conv(3)),
        ("conv4", conv(3)),
        ("conv5", conv(3)),
        ("pool5", ("pool", 3, 2, 1, 0)),
    ],
    "VGG-16 (224x224)": [
        (f"conv{b + 1}_{i + 1}" if kind == "c" else f"pool{b + 1}", conv(3) if kind == "c" else POOL)
        for b, n in enumerate((2, 2, 3, 3, 3))
        for i, kind in enumerate("c" * n + "p")
    ],
}


def parse_args(argv=None):
    p = outputs.make_parser(__doc__, "receptive_field")
    p.add_argument("--depth", type=int, default=None, help="deepest stack (default: 2 smoke, 6 default, 8 full)")
    p.add_argument("--channels", type=int, default=64, help="channels per layer for the parameter counts")
    p.add_argument(
        "--erf-model",
        default=None,
        choices=("lenet5_modern", "resnet20", "plain20"),
        help="network of the effective receptive field (default: lenet5_modern with --smoke, else resnet20)",
    )
    p.add_argument(
        "--erf-steps",
        type=int,
        default=None,
        help="training steps before the trained ERF (default: 2 smoke, 150 default, 3000 full)",
    )
    p.add_argument(
        "--erf-images",
        type=int,
        default=None,
        help="test images the ERF is averaged over (default: 4 smoke, 128 default, 1000 full)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD with momentum, cosine)")
    fashion_training.add_data_flags(p)
    args = p.parse_args(argv)
    outputs.positive(p, args, "depth", "channels", "erf_steps", "erf_images", "batch_size", "lr")
    args.depth = args.depth or outputs.pick(args.size, 2, 6, 8)
    args.erf_model = args.erf_model or outputs.pick(args.size, "lenet5_modern", "resnet20", "resnet20")
    args.erf_steps = args.erf_steps or outputs.pick(args.size, 2, 150, 3000)
    args.erf_images = args.erf_images or outputs.pick(args.size, 4, 128, 1000)
    return args


def geometry(spec) -> ops.Geometry:
    _, kernel, stride, dilation, padding = spec
    return ops.make_geometry(2, kernel, stride=stride, padding=padding, dilation=dilation)


def apply(spec, x):
    """The linear layer of `spec` on x (1, H, W, 1): an all-ones kernel, or a 2x2 average pool."""
    kind, kernel, stride, dilation, padding = spec
    if kind == "pool":
        return ops.avg_pool(x, kernel, stride, padding)
    return ops.conv(x, jnp.ones((kernel, kernel, 1, 1), x.dtype), stride=stride, padding=padding, dilation=dilation)


def empirical_fields(specs, size: int) -> list[np.ndarray]:
    """For each depth (each conv of `specs`, with the pool after it): the gradient (size, size) of the centre unit
    of that layer's output with respect to an input of size x size; and the index in `specs` of each such layer."""
    ends = [
        i + 1 if i + 1 < len(specs) and specs[i + 1][0] == "pool" else i
        for i, spec in enumerate(specs)
        if spec[0] == "conv"
    ]

    @jax.jit
    def grads(x):
        out = []
        for end in ends:

            def unit(x, end=end):
                for spec in specs[: end + 1]:
                    x = apply(spec, x)
                h, w = x.shape[1:3]
                return x[0, h // 2, w // 2, 0]

            out.append(jax.grad(unit)(x))
        return out

    return [np.asarray(g[0, :, :, 0]) for g in grads(jnp.zeros((1, size, size, 1)))], ends


def output_size(specs, size: int) -> int:
    for spec in specs:
        size = geometry(spec).output_spatial((size, size))[0]
    return size


def analytic_vs_empirical(args) -> list[dict]:
    rows = []
    for name, make in tqdm(STACKS.items(), desc="stacks", disable=args.no_progress):
        specs = make(args.depth)
        fields = ops.receptive_fields([geometry(s) for s in specs])
        size = 2 * max(f.size[0] for f in fields) + 9
        grads, ends = empirical_fields(specs, size)
        for depth, (end, grad) in enumerate(zip(ends, grads), start=1):
            field = fields[end]
            unit = output_size(specs[: end + 1], size) // 2
            rows_, cols_ = np.nonzero(grad)
            extent = (int(rows_.max() - rows_.min() + 1), int(cols_.max() - cols_.min() + 1))
            centre = ((rows_.max() + rows_.min()) / 2, (cols_.max() + cols_.min()) / 2)
            analytic_centre = field.start[0] + unit * field.jump[0]
            rows.append(
                {
                    "stack": name,
                    "depth": depth,
                    "analytic_size": field.size[0],
                    "empirical_size": extent[0],
                    "empirical_size_w": extent[1],
                    "jump": field.jump[0],
                    "analytic_centre": analytic_centre,
                    "empirical_centre": float(centre[0]),
                    "empirical_centre_w": float(centre[1]),
                    "dense": bool(len(rows_) == extent[0] * extent[1]),
                    "reached_fraction": len(rows_) / (extent[0] * extent[1]),
                    "match": bool(
                        field.size[0] == extent[0] == extent[1] and analytic_centre == centre[0] == centre[1]
                    ),
                    "parameters": sum(
                        s[1] ** 2 * args.channels**2 + args.channels for s in specs[: end + 1] if s[0] == "conv"
                    ),
                    "single_conv_parameters": field.size[0] ** 2 * args.channels**2 + args.channels,
                }
            )
    return rows


def named_networks(args) -> list[dict]:
    rows = []
    for name, layers in NETWORKS.items():
        fields = ops.receptive_fields([geometry(spec) for _, spec in layers])
        rows += [
            {"network": name, "layer": layer, "size": f.size[0], "jump": f.jump[0], "start": f.start[0]}
            for (layer, _), f in zip(layers, fields)
        ]
    for name in ("lenet5_modern", "resnet20"):
        model = models.abstract_model(name, in_channels=1, **erf_options(name))  # shapes only, nothing computed
        for stage, f in zip(feature_maps.stages(model), feature_maps.stage_fields(model)):
            rows.append(
                {
                    "network": f"convlib {name} (32x32)",
                    "layer": stage.name,
                    "size": f.size[0],
                    "jump": f.jump[0],
                    "start": f.start[0],
                }
            )
    return rows


def erf_options(name: str) -> dict:
    return {"input_size": 32} if name.startswith("lenet") else {}


def effective_field(model, images) -> np.ndarray:
    """Mean over images of |d(sum over channels of the centre unit of the last stage) / d input|, (H, W)."""
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad_one(state, x):
        def unit(x):
            y = feature_maps.features(nnx.merge(graphdef, state), x[None])[-1][1]
            return jnp.sum(y[0, y.shape[1] // 2, y.shape[2] // 2, :])

        return jnp.abs(jax.grad(unit)(x))[..., 0]

    total = 0.0
    for x in images:
        total = total + grad_one(state, x)
    model.train()
    return np.asarray(total / images.shape[0])


def mass_radius(erf: np.ndarray, centre: tuple[float, float], fraction: float) -> float:
    """The smallest radius (pixels, Chebyshev distance from `centre`) whose square holds `fraction` of the ERF."""
    h, w = erf.shape
    r = np.maximum(np.abs(np.arange(h)[:, None] - centre[0]), np.abs(np.arange(w)[None, :] - centre[1]))
    order = np.argsort(r, axis=None)
    cumulative = np.cumsum(erf.ravel()[order]) / erf.sum()
    return float(r.ravel()[order][np.searchsorted(cumulative, fraction)])


def erf_experiment(args) -> dict:
    from flax import nnx

    dataset = fashion_training.load(
        args, train_size=outputs.pick(args.size, 256, None, None), test_size=args.erf_images, pad_to=32, seed=args.seed
    )
    model = models.create(args.erf_model, in_channels=1, rngs=nnx.Rngs(args.seed), **erf_options(args.erf_model))
    images = fashion_training.preprocess(dataset.test.images)
    field = feature_maps.stage_fields(model)[-1]
    y_size = feature_maps.features(model, images[:1])[-1][1].shape[1]
    centre = field.start[0] + (y_size // 2) * field.jump[0]
    before = effective_field(model, images)
    training = fashion_training.fit(
        model,
        dataset,
        steps=args.erf_steps,
        batch_size=min(args.batch_size, dataset.train.labels.shape[0]),
        key=jax.random.key(args.seed),
        evaluations=1,
        recipe=train.Recipe(
            optimizer="sgd",
            learning_rate=args.lr,
            warmup_steps=max(1, args.erf_steps // 20),
            crop_padding=2,
        ),
        progress=not args.no_progress,
    )
    after = effective_field(model, images)
    summary = {
        "model": args.erf_model,
        "dataset": dataset.name,
        "steps": args.erf_steps,
        "batch_size": args.batch_size,
        "test_error_after": training.curve[-1]["test_error"],
        "images_averaged": int(images.shape[0]),
        "theoretical_size": field.size[0],
        "centre": centre,
        "unit_index": y_size // 2,
    }
    for label, erf in (("untrained", before), ("trained", after)):
        summary[label] = {f"radius_{int(100 * q)}": mass_radius(erf, (centre, centre), q) for q in (0.5, 0.9)}
    return summary, before, after


# --------------------------------------------------------------------------- figures


def plot_depth(run, rows, channels, machine):
    plt = outputs.pyplot()
    fig, (ax, par) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in STACKS:
        mine = [r for r in rows if r["stack"] == name]
        (line,) = ax.plot([r["depth"] for r in mine], [r["analytic_size"] for r in mine], label=name)
        ax.plot(
            [r["depth"] for r in mine],
            [r["empirical_size"] for r in mine],
            "o",
            color=line.get_color(),
            mfc="none",
            ms=8,
        )
    ax.plot([], [], "ko", mfc="none", label="empirical (gradient support)")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("depth (conv layers)")
    ax.set_ylabel("receptive field size (pixels, one side)")
    ax.set_title("analytic (lines) vs empirical (circles) receptive field")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    for name, style, label in (("3x3 conv", "-", "3x3 conv (any dilation: the same)"), ("7x7 conv", "--", None)):
        mine = [r for r in rows if r["stack"] == name]
        par.plot([r["depth"] for r in mine], [r["parameters"] for r in mine], style, marker=".", label=label or name)
    mine = [r for r in rows if r["stack"] == "dilated 3x3: 1,1,2,4,8,..."]
    par.plot(
        [r["depth"] for r in mine],
        [r["single_conv_parameters"] for r in mine],
        ":",
        marker=".",
        label="one conv with the dilated stack's field",
    )
    par.set_yscale("log")
    par.set_xlabel("depth (conv layers)")
    par.set_ylabel(f"parameters (C = {channels} channels per layer)")
    par.set_title("parameters: linear in depth for every stack (Yu & Koltun)")
    par.legend(fontsize=7)
    par.grid(alpha=0.3, which="both")
    fig.suptitle(f"Receptive fields ({machine})", fontsize=9)
    run.save_figure(fig, "rf_vs_depth.png")


def plot_erf(run, summary, before, after):
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    half = (summary["theoretical_size"] - 1) / 2
    c = summary["centre"]
    for ax, erf, label in ((axes[0], before, "untrained"), (axes[1], after, f"trained {summary['steps']} steps")):
        image = ax.imshow(erf / erf.max(), cmap="viridis")
        ax.add_patch(
            plt.Rectangle(
                (c - half - 0.5, c - half - 0.5), 2 * half + 1, 2 * half + 1, fill=False, ec="red", lw=1, ls="--"
            )
        )
        ax.set_xlim(-0.5, erf.shape[1] - 0.5)
        ax.set_ylim(erf.shape[0] - 0.5, -0.5)
        radius = summary[label.split()[0]]["radius_90"]
        ax.set_title(
            f"ERF of {summary['model']}, {label}: mean |gradient| / max\n"
            f"(90% of it within {radius:.1f} px of the centre; red: theoretical RF)",
            fontsize=9,
        )
        ax.set_xlabel("input column")
        ax.set_ylabel("input row")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for erf, label in ((before, "untrained"), (after, "trained")):
        centre_row = erf[round(c)] if 0 <= round(c) < erf.shape[0] else erf[erf.shape[0] // 2]
        axes[2].plot(centre_row / centre_row.max(), label=label)
    axes[2].axvspan(c - half, c + half, color="red", alpha=0.08, label="theoretical RF (clipped)")
    axes[2].set_xlim(0, before.shape[1] - 1)
    axes[2].set_xlabel("input column (centre row)")
    axes[2].set_ylabel("mean |gradient| / max")
    axes[2].set_title("profile through the centre")
    axes[2].legend(fontsize=8)
    run.save_figure(fig, "erf.png")


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    rows = analytic_vs_empirical(args)
    run.write_csv("fields.csv", rows)
    networks = named_networks(args)
    run.write_csv("networks.csv", networks)
    plot_depth(run, rows, args.channels, machine)
    erf, before, after = erf_experiment(args)
    plot_erf(run, erf, before, after)
    return run.finish({"all_match": all(r["match"] for r in rows), "fields": rows, "networks": networks, "erf": erf})


if __name__ == "__main__":
    main()

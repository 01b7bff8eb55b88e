"""Hierarchical representations (Zeiler & Fergus 2014) of a trained network: its first-layer filters as images,
the feature maps of each stage for a few test images, and, per channel of a stage, the input patches that
activate it most (the patch is the unit's receptive field, located by receptive-field arithmetic:
centre = start + index x jump, side = size).

The network (lenet5_modern by default, or resnet20) is trained briefly in the script on Fashion-MNIST
zero-padded to 32x32, or loaded with --from-run from the output folder of experiments/train.py (its
results.json and newest checkpoint).

Per channel, the top activations are also projected back to the input by Zeiler & Fergus's deconvnet
(experiments/deconvnet.py: convlib's reverse layers) and shown beside their patches as in their Fig. 2.

Writes into --out: results.json, filters.png, feature_maps.png, top_patches.png, deconvnet.png (lenet5_modern).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from convlib import models, train
from experiments import deconvnet, fashion_training, feature_maps, outputs

MODEL_OPTIONS = {"lenet5_modern": {"channels": (16, 32), "input_size": 32}, "resnet20": {}}


def parse_args(argv=None):
    p = outputs.make_parser(__doc__, "visualize")
    p.add_argument(
        "--model",
        choices=tuple(MODEL_OPTIONS),
        default="lenet5_modern",
        help="network trained in the script (lenet5_modern with channels 16, 32)",
    )
    p.add_argument(
        "--from-run",
        default=None,
        help="output folder of experiments/train.py: load its model "
        "(results.json) and newest checkpoint instead of training here",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 2 smoke, 600 default, 5000 full)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine)")
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="test images searched for the top patches (default: 32 smoke, 2000 default, 10000 full)",
    )
    p.add_argument("--channels", type=int, default=8, help="channels shown per stage")
    p.add_argument("--top", type=int, default=8, help="patches shown per channel")
    fashion_training.add_data_flags(p)
    args = p.parse_args(argv)
    outputs.positive(p, args, "steps", "batch_size", "lr", "images", "channels", "top")
    if args.from_run is not None and not os.path.exists(os.path.join(args.from_run, "results.json")):
        p.error(f"--from-run {args.from_run!r} holds no results.json of experiments/train.py")
    args.steps = args.steps or outputs.pick(args.size, 2, 600, 5000)
    args.images = args.images or outputs.pick(args.size, 32, 2000, 10000)
    return args


def load_run(folder: str):
    """(model, input size, description) of an experiments/train.py run: its model, with the newest checkpoint."""
    with open(os.path.join(folder, "results.json")) as f:
        config = json.load(f)["config"]
    model = models.create(config["model"], in_channels=1, rngs=nnx.Rngs(0), **config.get("model_options", {}))
    # Optax states depend on the optimiser's structure, not on the schedule's values: any callable schedule fits.
    tx = train.make_optimizer(
        config["optimizer"], lambda step: 0.0, momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    _, like = train.create_train_state(model, tx, jax.random.key(0))
    checkpoints = train.Checkpoints(os.path.join(folder, "checkpoints"))
    try:
        state, meta = checkpoints.restore(like)
    finally:
        checkpoints.close()
    nnx.update(model, state.params, state.rest)
    return model, config.get("input_size", 32), f"{config['model']} from {folder} (step {meta['step']})"


def first_conv_kernel(model) -> np.ndarray:
    """The first conv's kernel, (K, K, C_in, C_out)."""
    return np.asarray(feature_maps.stages(model)[0].path[0].kernel[...])


def activations(model, images, batch: int = 500) -> list[np.ndarray]:
    """Each stage's output (N, H, W, C) for preprocessed images, in evaluation mode."""
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: [m for _, m in feature_maps.features(nnx.merge(graphdef, state), x)])
    parts = [forward(state, images[i : i + batch]) for i in range(0, images.shape[0], batch)]
    model.train()
    return [np.concatenate([np.asarray(p[s]) for p in parts]) for s in range(len(parts[0]))]


def top_patches(maps: np.ndarray, images: np.ndarray, field, channels: int, top: int):
    """Per channel c < channels: the `top` largest activations of maps[..., c] over images and positions, each with
    its input patch (field.size x field.size, zero outside the image) and location."""
    n, h, w, _ = maps.shape
    size = field.size[0]
    found = []
    for c in range(min(channels, maps.shape[-1])):
        flat = maps[..., c].reshape(-1)
        best = np.argsort(flat)[::-1][:top]
        entries = []
        for index in best:
            image, i, j = np.unravel_index(index, (n, h, w))
            # top-left input pixel of the field: centre - (size - 1) / 2 (centres may be half-integers)
            top_row = int(np.floor(field.start[0] + i * field.jump[0] - (size - 1) / 2))
            left = int(np.floor(field.start[1] + j * field.jump[1] - (size - 1) / 2))
            entries.append(
                {
                    "image": int(image),
                    "unit": [int(i), int(j)],
                    "activation": float(flat[index]),
                    "patch_top_left": [top_row, left],
                    "patch": crop(images[image, ..., 0], (top_row, left), size),
                }
            )
        found.append(entries)
    return found


def crop(image: np.ndarray, top_left, size: int) -> np.ndarray:
    """The size x size window of a (H, W) image at top_left (row, column), zero outside the image."""
    padded = np.pad(image, size)
    return padded[top_left[0] + size : top_left[0] + 2 * size, top_left[1] + size : top_left[1] + 2 * size]


def projections(path, images, stage: dict, rule: str = "deconvnet") -> list[list[np.ndarray]]:
    """Per channel of `stage` (a `top_patches` stage with its name, field size and patches), the deconvnet
    projection (experiments/deconvnet.py) of each top activation, cropped to its patch; images: preprocessed
    (N, H, W, 1)."""
    found = []
    for c, entries in enumerate(stage["patches"]):
        chosen = np.array([e["image"] for e in entries])
        units = np.array([[*e["unit"], c] for e in entries])
        projected = np.asarray(deconvnet.project(path, images[chosen], units, rule))
        found.append([crop(p[..., 0], e["patch_top_left"], stage["size"]) for p, e in zip(projected, entries)])
    return found


def plot_filters(run, kernel, title):
    plt = outputs.pyplot()
    count = kernel.shape[-1]
    cols = min(count, 8)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.5 * rows + 0.6), squeeze=False)
    for c, ax in enumerate(axes.flat):
        ax.axis("off")
        if c < count:
            f = kernel[:, :, 0, c]
            limit = np.abs(f).max() or 1.0
            ax.imshow(f, cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"filter {c}", fontsize=7)
    fig.suptitle(title + "\n(red positive, blue negative, each scaled to its own max)", fontsize=9)
    run.save_figure(fig, "filters.png")


def plot_feature_maps(run, images, maps, names, channels, title):
    plt = outputs.pyplot()
    shown = min(channels, min(m.shape[-1] for m in maps))
    rows = images.shape[0]
    fig, axes = plt.subplots(
        rows, 1 + len(maps) * shown, figsize=(1.0 * (1 + len(maps) * shown), 1.15 * rows + 0.8), squeeze=False
    )
    for r in range(rows):
        axes[r, 0].imshow(images[r, ..., 0], cmap="gray")
        axes[r, 0].set_title("input" if r == 0 else "", fontsize=7)
        for s, (m, name) in enumerate(zip(maps, names)):
            for c in range(shown):
                ax = axes[r, 1 + s * shown + c]
                ax.imshow(m[r, ..., c], cmap="magma")
                if r == 0:
                    ax.set_title(f"{name}\nch {c}" if c == 0 else f"ch {c}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    run.save_figure(fig, "feature_maps.png", dpi=80)


def plot_top_patches(run, stages, title):
    plt = outputs.pyplot()
    channels = max(len(s["patches"]) for s in stages)
    top = max(len(p) for s in stages for p in s["patches"])
    fig, axes = plt.subplots(
        channels, len(stages) * (top + 1), figsize=(0.75 * len(stages) * (top + 1), 0.8 * channels + 0.9), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for s, stage in enumerate(stages):
        for c, entries in enumerate(stage["patches"]):
            for t, entry in enumerate(entries):
                ax = axes[c, s * (top + 1) + t]
                ax.imshow(entry["patch"], cmap="gray")
                if c == 0 and t == 0:
                    ax.set_title(f"{stage['name']}: {stage['size']}x{stage['size']} field", fontsize=7, loc="left")
            axes[c, s * (top + 1)].text(
                -0.2, 0.5, f"ch {c}", transform=axes[c, s * (top + 1)].transAxes, ha="right", va="center", fontsize=6
            )
    fig.suptitle(title, fontsize=9)
    run.save_figure(fig, "top_patches.png", dpi=80)


def plot_projections(run, stages, title):
    """Zeiler & Fergus's Fig. 2: per stage and channel, the projections of the top activations, then their
    patches."""
    plt = outputs.pyplot()
    channels = max(len(s["patches"]) for s in stages)
    top = max(len(p) for s in stages for p in s["patches"])
    columns = 2 * top + 1  # projections, a gap, patches
    fig, axes = plt.subplots(
        channels, len(stages) * columns, figsize=(0.6 * len(stages) * columns, 0.7 * channels + 0.9), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for s, stage in enumerate(stages):
        for c, (shown, entries) in enumerate(zip(stage["projections"], stage["patches"])):
            for t, (projection, entry) in enumerate(zip(shown, entries)):
                limit = np.abs(projection).max() or 1.0
                axes[c, s * columns + t].imshow(projection, cmap="gray", vmin=-limit, vmax=limit)
                axes[c, s * columns + top + 1 + t].imshow(entry["patch"], cmap="gray")
            if s == 0:
                axes[c, 0].text(
                    -0.2, 0.5, f"ch {c}", transform=axes[c, 0].transAxes, ha="right", va="center", fontsize=6
                )
        axes[0, s * columns].set_title(f"{stage['name']}: projections", fontsize=7, loc="left")
        axes[0, s * columns + top + 1].set_title("top patches", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    run.save_figure(fig, "deconvnet.png", dpi=80)


def project_top_activations(run, model, images, stages: list[dict], shown: list[int]) -> dict:
    """Adds each stage's deconvnet projections of its top activations (their "projections") and plots them beside
    the top patches; returns how far they are from backprop's projections (a one-line reason where the model has
    no deconvnet here)."""
    try:
        paths = deconvnet.lenet_stage_paths(model)
    except ValueError as error:
        return {"skipped": str(error)}
    differences = {}
    for s, stage in zip(shown[-2:], stages):
        stage["projections"] = projections(paths[s], images, stage)
        differences[stage["name"]] = relative_difference(
            stage["projections"], projections(paths[s], images, stage, "backprop")
        )
    plot_projections(
        run,
        stages,
        "deconvnet projections of the top activations per channel (each alone, through unpooling with the forward "
        "switches, rectification and the transposed conv), beside their input patches",
    )
    return {"rule": "deconvnet", "mean relative difference from the gradient times the activation": differences}


def relative_difference(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    """The mean over projections of |a - b| / |b| (Frobenius norms)."""
    pairs = [(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return float(np.mean([np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12) for x, y in pairs]))


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    run = outputs.Run(args, argv)
    if args.from_run is not None:
        model, input_size, source = load_run(args.from_run)
        dataset = fashion_training.load(args, train_size=1, test_size=args.images, pad_to=input_size, seed=args.seed)
        training = None
    else:
        dataset = fashion_training.load(
            args, train_size=outputs.pick(args.size, 256, None, None), test_size=args.images, pad_to=32, seed=args.seed
        )
        model = models.create(args.model, in_channels=1, rngs=nnx.Rngs(args.seed), **MODEL_OPTIONS[args.model])
        fit = fashion_training.fit(
            model,
            dataset,
            steps=args.steps,
            batch_size=min(args.batch_size, dataset.train.labels.shape[0]),
            key=jax.random.key(args.seed),
            evaluations=1,
            recipe=train.Recipe(learning_rate=args.lr, warmup_steps=max(1, args.steps // 20), crop_padding=2),
            progress=not args.no_progress,
        )
        training = fit.curve[-1]
        source = f"{args.model} trained {args.steps} steps on {dataset.name}"
    images = np.asarray(dataset.test.images, np.float32) / 255.0
    maps = activations(model, fashion_training.preprocess(dataset.test.images))
    names = [stage.name for stage in feature_maps.stages(model)]
    fields = feature_maps.stage_fields(model)
    plot_filters(run, first_conv_kernel(model), f"first-layer filters of {source}")
    plot_feature_maps(
        run,
        images[:4],
        [m[:4] for m in maps],
        names,
        args.channels,
        f"feature maps of each stage, first {args.channels} channels, 4 test images ({source})",
    )
    shown = [s for s, f in enumerate(fields) if f.size[0] < images.shape[1]] or [0]
    stages = [
        {
            "name": names[s],
            "size": fields[s].size[0],
            "jump": fields[s].jump[0],
            "start": fields[s].start[0],
            "patches": top_patches(maps[s], images, fields[s], args.channels, args.top),
        }
        for s in shown[-2:]
    ]
    plot_top_patches(
        run, stages, f"top-{args.top} input patches per channel over {images.shape[0]} test images ({source})"
    )
    projected = project_top_activations(run, model, fashion_training.preprocess(dataset.test.images), stages, shown)
    for stage in stages:
        stage.pop("projections", None)
        for entries in stage["patches"]:
            for entry in entries:
                del entry["patch"]
    return run.finish(
        {
            "source": source,
            "training": training,
            "dataset": dataset.name,
            "fields": [
                {"stage": n, "size": f.size[0], "jump": f.jump[0], "start": f.start[0]} for n, f in zip(names, fields)
            ],
            "top_patches": stages,
            "deconvnet": projected,
        }
    )


if __name__ == "__main__":
    main()

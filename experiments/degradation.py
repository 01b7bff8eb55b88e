"""The degradation problem (He et al. 2016, Fig. 1 and Fig. 6): is learning better networks as easy as stacking
more layers? Plain-20 vs plain-56 and ResNet-20 vs ResNet-56 (convlib.models' CIFAR nets, option-A shortcuts),
trained with the same recipe on Fashion-MNIST zero-padded to 32x32 (CIFAR-10 cannot be loaded here: TFDS's
cifar10 builder needs TensorFlow and a download). Training error (running mean over the steps between two
evaluations, training mode, augmented batches) and test error along training.

Recipe (He et al. Section 4.2, shortened by default): SGD with momentum 0.9, weight decay 1e-4, learning rate
divided by 10 at 1/2 and 3/4 of the run, random crops of the 4-pixel zero-padded image. The default run on the
CPU uses narrower nets (widths 8-16-32 instead of 16-32-64: a quarter of the FLOPs, the same depths), a few hundred
steps and a test subset; --full is the paper's schedule (64k steps of 128, widths 16-32-64, whole test set).

Writes into --out: curves.csv, results.json, degradation.png.
"""

from __future__ import annotations

import time

import jax
from flax import nnx

from convlib import models, train
from experiments import fashion_training, outputs


def parse_args(argv=None):
    p = outputs.make_parser(__doc__, "degradation")
    p.add_argument(
        "--depths",
        default=None,
        help="comma-separated depths 6n+2 of both the plain and the residual nets (default: 8 smoke, else 20,56)",
    )
    p.add_argument(
        "--widths",
        default=None,
        help="channels of the three stages (default: 4,8,16 smoke, 8,16,32 default, 16,32,64 full = the paper's)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per net (default: 2 smoke, 200 default, 64000 full)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 16 smoke, 64 default, 128 full)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: 0.1 x batch / 128)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (kernels only)")
    p.add_argument(
        "--evaluations",
        type=int,
        default=None,
        help="test evaluations along training (default: 1 smoke, 5 default, 64 full)",
    )
    p.add_argument(
        "--test-size",
        type=int,
        default=None,
        help="test images evaluated (default: 64 smoke, 1000 default, all 10000 full)",
    )
    p.add_argument("--train-size", type=int, default=None, help="training images used (default: all)")
    p.add_argument("--crop", type=int, default=4, help="random-crop padding in pixels (0: no augmentation)")
    fashion_training.add_data_flags(p)
    args = p.parse_args(argv)
    outputs.positive(p, args, "steps", "batch_size", "lr", "evaluations", "test_size", "train_size")
    if args.crop < 0 or args.weight_decay < 0:
        p.error(f"--crop and --weight-decay must be >= 0, got {args.crop} and {args.weight_decay}")
    try:
        args.depths = [int(d) for d in (args.depths or outputs.pick(args.size, "8", "20,56", "20,56")).split(",")]
        args.widths = tuple(
            int(w) for w in (args.widths or outputs.pick(args.size, "4,8,16", "8,16,32", "16,32,64")).split(",")
        )
    except ValueError:
        p.error(f"--depths and --widths must be comma-separated ints, got {args.depths!r} and {args.widths!r}")
    if any(d < 8 or (d - 2) % 6 for d in args.depths):
        p.error(f"--depths must be of the form 6n + 2 (20, 32, 44, 56, 110), got {args.depths}")
    if len(args.widths) != 3 or min(args.widths) < 1:
        p.error(f"--widths must be 3 positive ints, got {args.widths}")
    args.steps = args.steps or outputs.pick(args.size, 2, 200, 64000)
    args.batch_size = args.batch_size or outputs.pick(args.size, 16, 64, 128)
    args.lr = args.lr or 0.1 * args.batch_size / 128
    args.evaluations = args.evaluations or outputs.pick(args.size, 1, 5, 64)
    args.test_size = args.test_size or outputs.pick(args.size, 64, 1000, None)
    return args


def plot(run, rows, args, dataset_name, machine):
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, family in zip(axes, ("plain", "resnet")):
        for r, color in zip([r for r in rows if r["family"] == family], ("tab:orange", "tab:red", "tab:purple")):
            steps = [p["step"] for p in r["curve"]]
            ax.plot(
                steps,
                [100 * p["train_error"] for p in r["curve"]],
                "--",
                color=color,
                lw=1,
                label=f"{r['model']} train",
            )
            ax.plot(
                steps, [100 * p["test_error"] for p in r["curve"]], "o-", color=color, lw=2, label=f"{r['model']} test"
            )
        ax.set_xlabel("step")
        ax.set_title(
            ("plain" if family == "plain" else "residual") + f" nets, widths {'-'.join(map(str, args.widths))}"
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle(
        f"{dataset_name} padded to 32x32, {args.steps} steps of {args.batch_size}; dashed: running training "
        f"error, solid: test error ({machine})",
        fontsize=9,
    )
    run.save_figure(fig, "degradation.png")


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    dataset = fashion_training.load(
        args,
        train_size=args.train_size or outputs.pick(args.size, 256, None, None),
        test_size=args.test_size,
        pad_to=32,
        seed=args.seed,
    )
    rows = []
    for family in ("plain", "resnet"):
        for depth in args.depths:
            name = f"{family}{depth}"
            started = time.perf_counter()
            model = models.CifarResNet(
                depth=depth, residual=family == "resnet", widths=args.widths, in_channels=1, rngs=nnx.Rngs(args.seed)
            )
            training = fashion_training.fit(
                model,
                dataset,
                steps=args.steps,
                batch_size=args.batch_size,
                key=jax.random.key(args.seed),
                evaluations=args.evaluations,
                recipe=train.Recipe(
                    optimizer="sgd",
                    learning_rate=args.lr,
                    schedule="piecewise",
                    momentum=0.9,
                    weight_decay=args.weight_decay,
                    crop_padding=args.crop,
                ),
                progress=not args.no_progress,
            )
            final = training.curve[-1]
            rows.append(
                {
                    "model": name,
                    "family": family,
                    "depth": depth,
                    "parameters": models.param_count(model),
                    "final_train_error": final["train_error"],
                    "final_test_error": final["test_error"],
                    "best_test_error": min(p["test_error"] for p in training.curve),
                    "train_images_per_s": training.result.images_per_s,
                    "wall_s": time.perf_counter() - started,
                    "curve": training.curve,
                }
            )
            # after every net, so that a run stopped early keeps what it finished
            run.write_csv("curves.csv", [{"model": r["model"], **p} for r in rows for p in r["curve"]])
            plot(run, rows, args, dataset.name, machine)
    by_name = {r["model"]: r for r in rows}
    shallow, deep = min(args.depths), max(args.depths)
    summary = {
        f"{family}: {deep} minus {shallow}, final {split} error": by_name[f"{family}{deep}"][f"final_{split}_error"]
        - by_name[f"{family}{shallow}"][f"final_{split}_error"]
        for family in ("plain", "resnet")
        for split in ("train", "test")
    }
    return run.finish(
        {
            "dataset": dataset.name,
            "train_images": int(dataset.train.labels.shape[0]),
            "test_images": int(dataset.test.labels.shape[0]),
            "summary": summary,
            "models": rows,
        }
    )


if __name__ == "__main__":
    main()

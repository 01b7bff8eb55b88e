"""The degradation problem (He et al. 2016, Fig. 1 and Fig. 6): is learning better networks as easy as stacking
more layers? Plain-20 vs plain-56 and ResNet-20 vs ResNet-56 (convlib.models' CIFAR nets, option-A shortcuts),
trained with the same recipe, on Fashion-MNIST zero-padded to 32x32 or on CIFAR-10 (the official
cifar-10-python.tar.gz, read offline by convlib.data), over several seeds. Training error (running mean over the
steps between two evaluations, training mode, augmented batches) and test error along training.

Recipes (--recipe): "he2016" is He et al.'s Section 4.2: SGD with momentum 0.9, weight decay 1e-4, batch 128, lr 0.1
divided by 10 at 32k and 48k iterations, 64k iterations, 4-pixel zero pad + random 32x32 crop + horizontal flip.
"short" (the default, sized for a 2-core CPU) is the same optimiser and augmentation over a short run, with the
warm-up He et al. used for ResNet-110 (lr / 10 for the first steps) for every net. --steps rescales a recipe's
boundaries and warm-up to the same fractions of the run. Horizontal flips are off on Fashion-MNIST: its images are
all in one canonical pose (the shoes all point left), so a mirrored image is one the test set never shows.

Sizes: the CPU default uses narrower nets (widths 8-16-32 instead of 16-32-64: a quarter of the FLOPs, the same
depths), a training subset and a test subset; --full is the paper's widths on the whole data (meant for a GPU).

Writes into --out: curves.csv, results.json (every curve of every seed, the summary, machine and commit),
degradation.png (mean over the seeds with the min-max band; dashed: training error, solid: test error).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from convlib import models, train
from experiments import fashion_training, outputs

DATASETS = ("fashion_mnist", "cifar10")


@dataclasses.dataclass(frozen=True)
class NamedRecipe:
    """A training recipe of this script with its run length: `boundaries` and `warmup_steps` of `recipe` are for
    `steps` steps of `batch_size`."""

    recipe: train.Recipe
    steps: int
    batch_size: int

    def for_run(self, steps: int, *, flip: bool) -> train.Recipe:
        """The recipe for a run of `steps`: boundaries and warm-up at the same fractions of the run."""
        scale = steps / self.steps
        return dataclasses.replace(
            self.recipe,
            boundaries=tuple(max(1, round(b * scale)) for b in self.recipe.boundaries),
            warmup_steps=round(self.recipe.warmup_steps * scale),
            flip=self.recipe.flip and flip,
        )


_SGD = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4, schedule="piecewise", crop_padding=4, flip=True)
RECIPES = {
    "he2016": NamedRecipe(train.Recipe(learning_rate=0.1, boundaries=(32_000, 48_000), **_SGD), 64_000, 128),
    # Sized for the CPU default (widths 8-16-32, 2500 training images): 1200 steps of 32 at lr 0.025 (He et al.'s
    # 0.1 at 128, scaled to the batch). Batch 32 rather than 64: twice the updates for the same images at about
    # the same CPU time per image (ResNet-20: 1200 steps of 32 in 151 s here), and updates are what the deeper
    # nets lack in a short run. 2500 images rather than 5000: 15 epochs instead of 7.7, so the nets reach
    # the regime where depth fits the data better (seed 0, ResNet-56 vs ResNet-20 training error: 15.2 vs 16.8 %
    # with 2500, 16.5 vs 16.8 % with 5000, 18.5 vs 17.1 % with 600 steps of 64). The default 2 seeds took 41 min here.
    "short": NamedRecipe(train.Recipe(learning_rate=0.025, boundaries=(600, 900), warmup_steps=60, **_SGD), 1200, 32),
}


def make_parser() -> outputs.Parser:
    p = outputs.make_parser(__doc__, "degradation")
    add = p.add_argument
    add("--dataset", choices=DATASETS, default="fashion_mnist", help="the data (CIFAR-10: see --source-dir)")
    add("--recipe", choices=tuple(RECIPES), default=None, help="training recipe (default: he2016 --full, else short)")
    add("--seeds", default=None, help="comma-separated seeds, one run of every net each (default: 0,1)")
    add(
        "--depths",
        default=None,
        help="comma-separated depths 6n+2 of both the plain and the residual nets (default: 8 smoke, else 20,56)",
    )
    add(
        "--widths",
        default=None,
        help="channels of the three stages (default: 4,8,16 smoke, 8,16,32 default, 16,32,64 full = the paper's)",
    )
    add("--steps", type=int, default=None, help="training steps per net (default: 2 smoke, else the recipe's)")
    add("--batch-size", type=int, default=None, help="batch size (default: 16 smoke, else the recipe's)")
    add("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    add(
        "--evaluations",
        type=int,
        default=None,
        help="test evaluations along training (default: 1 smoke, 10 default, 64 full)",
    )
    add(
        "--test-size",
        type=int,
        default=None,
        help="test images evaluated (default: 64 smoke, 1000 default, all full)",
    )
    add("--train-size", type=int, default=None, help="training images (default: 256 smoke, 2500 default, all full)")
    fashion_training.add_data_flags(p)
    return p


def parse_args(argv=None, parser: outputs.Parser | None = None):
    """The flags, checked (one-line error and exit 2 otherwise), with the size's and the recipe's defaults."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    outputs.positive(p, args, "steps", "batch_size", "lr", "evaluations", "test_size", "train_size")
    try:
        args.seeds = [int(s) for s in (args.seeds or f"{args.seed},{args.seed + 1}").split(",")]
        args.depths = [int(d) for d in (args.depths or outputs.pick(args.size, "8", "20,56", "20,56")).split(",")]
        args.widths = tuple(
            int(w) for w in (args.widths or outputs.pick(args.size, "4,8,16", "8,16,32", "16,32,64")).split(",")
        )
    except ValueError:
        p.error(
            f"--seeds, --depths and --widths must be comma-separated ints, got {args.seeds!r}, {args.depths!r} "
            f"and {args.widths!r}"
        )
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative ints, got {args.seeds}")
    if any(d < 8 or (d - 2) % 6 for d in args.depths):
        p.error(f"--depths must be of the form 6n + 2 (20, 32, 44, 56, 110), got {args.depths}")
    if len(args.widths) != 3 or min(args.widths) < 1:
        p.error(f"--widths must be 3 positive ints, got {args.widths}")
    args.recipe = args.recipe or ("he2016" if args.size == "full" else "short")
    named = RECIPES[args.recipe]
    args.steps = args.steps or outputs.pick(args.size, 2, named.steps, named.steps)
    args.batch_size = args.batch_size or outputs.pick(args.size, 16, named.batch_size, named.batch_size)
    args.evaluations = args.evaluations or outputs.pick(args.size, 1, 10, 64)
    args.test_size = args.test_size or outputs.pick(args.size, 64, 1000, None)
    args.train_size = args.train_size or outputs.pick(args.size, 256, 2500, None)
    return args


def aggregate(rows: list[dict], model: str) -> dict:
    """Mean, min and max over the seeds of one net's curves (rows of the same model share the evaluation steps)."""
    runs = [r for r in rows if r["model"] == model]
    out = {"step": [p["step"] for p in runs[0]["curve"]]}
    for split in ("train", "test"):
        values = np.array([[p[f"{split}_error"] for p in r["curve"]] for r in runs])  # (seeds, evaluations)
        out |= {f"{split}_{k}": list(getattr(values, k)(axis=0)) for k in ("mean", "min", "max")}
    return out


def plot(run, rows, args, dataset_name, machine):
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = ("tab:orange", "tab:red", "tab:purple", "tab:brown")
    for ax, family in zip(axes, ("plain", "resnet")):
        for depth, color in zip(args.depths, colors):
            name = f"{family}{depth}"
            if not any(r["model"] == name for r in rows):
                continue
            a = aggregate(rows, name)
            label = f"{'plain' if family == 'plain' else 'ResNet'}-{depth}"
            for split, style, width in (("train", "--", 1.2), ("test", "-", 2.0)):
                mean, low, high = (100 * np.array(a[f"{split}_{k}"]) for k in ("mean", "min", "max"))
                ax.plot(a["step"], mean, style, color=color, lw=width, marker=".", label=f"{label} {split}")
                ax.fill_between(a["step"], low, high, color=color, alpha=0.15, lw=0)
        ax.set_xlabel("iterations")
        ax.set_title(f"{'plain' if family == 'plain' else 'residual'} nets, widths {'-'.join(map(str, args.widths))}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0].set_ylabel("error (%)")
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(
        f"{dataset_name}, recipe {args.recipe}: {args.steps} iterations of {args.batch_size}; dashed: training error "
        f"(running mean), solid: test error; mean over seeds {seeds}, band min-max ({machine})",
        fontsize=9,
    )
    run.save_figure(fig, "degradation.png")


def summarize(rows: list[dict], depths: list[int]) -> dict:
    """Deep minus shallow final errors (mean over seeds) per family, and whether He et al.'s two claims hold."""
    shallow, deep = min(depths), max(depths)

    def gap(family: str, split: str) -> float:
        mean = {d: np.mean([r[f"final_{split}_error"] for r in rows if r["model"] == f"{family}{d}"]) for d in depths}
        return float(mean[deep] - mean[shallow])

    gaps = {
        f"{family}: {deep} minus {shallow}, final {split} error": gap(family, split)
        for family in ("plain", "resnet")
        for split in ("train", "test")
    }
    claims = {
        f"plain-{deep} training error above plain-{shallow}'s": gap("plain", "train") > 0,
        f"plain-{deep} test error above plain-{shallow}'s": gap("plain", "test") > 0,
        f"ResNet-{deep} training error at or below ResNet-{shallow}'s": gap("resnet", "train") <= 0,
    }
    return {"mean over seeds": gaps, "claims": claims}


@outputs.script
def main(argv=None) -> dict:
    parser = make_parser()
    args = parse_args(argv, parser)
    with parser.setting_up():  # a missing or corrupt dataset: one line, exit 2, nothing written
        dataset = fashion_training.load(
            args, train_size=args.train_size, test_size=args.test_size, pad_to=32, seed=args.seed, name=args.dataset
        )
        if args.batch_size > (n := dataset.train.labels.shape[0]):
            raise ValueError(f"--batch-size {args.batch_size} exceeds the {n} training images")
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    recipe = RECIPES[args.recipe].for_run(args.steps, flip=args.dataset != "fashion_mnist")
    if args.lr is not None:
        recipe = dataclasses.replace(recipe, learning_rate=args.lr)
    rows = []
    for seed in args.seeds:
        for family in ("plain", "resnet"):
            for depth in args.depths:
                name = f"{family}{depth}"
                started = time.perf_counter()
                model = models.CifarResNet(
                    depth=depth,
                    residual=family == "resnet",
                    widths=args.widths,
                    in_channels=dataset.train.images.shape[-1],
                    rngs=nnx.Rngs(seed),
                )
                training = fashion_training.fit(
                    model,
                    dataset,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    key=jax.random.key(seed),
                    evaluations=args.evaluations,
                    recipe=recipe,
                    progress=not args.no_progress,
                )
                final = training.curve[-1]
                rows.append(
                    {
                        "model": name,
                        "family": family,
                        "depth": depth,
                        "seed": seed,
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
                run.write_csv(
                    "curves.csv", [{"model": r["model"], "seed": r["seed"], **p} for r in rows for p in r["curve"]]
                )
                plot(run, rows, args, dataset.name, machine)
    return run.finish(
        {
            "dataset": dataset.name,
            "train_images": int(dataset.train.labels.shape[0]),
            "test_images": int(dataset.test.labels.shape[0]),
            "seeds": args.seeds,
            "recipe": dataclasses.asdict(recipe),
            "summary": summarize(rows, args.depths),
            "models": rows,
        }
    )


if __name__ == "__main__":
    main()

"""A solution by construction (He et al. 2016, Section 1): a deeper plain net built from a trained shallower one
(its layers copied, the extra blocks set to the identity) has exactly the shallower net's errors, so the higher
training error of the same deep net trained from scratch (the degradation problem) is a failure of optimisation,
not of capacity.

The run, on the data and with the recipe of experiments/degradation.py (Fashion-MNIST zero-padded to 32x32, a
training subset, recipe "short": SGD with momentum, piecewise learning rate, crop augmentation):
  1. trains the shallow plain net (plain-20) from scratch;
  2. builds the deep plain net (plain-56) from it with `deepen` and measures both nets' training and test errors in
     evaluation mode (they agree to float rounding);
  3. takes the deep net trained from scratch from the committed degradation run (--reference) when that run used
     this run's data, widths, recipe and seed, and otherwise trains it here;
  4. trains the constructed deep net further with the same optimiser (--further): "final-lr", the default, goes on
     at the learning rate the shallow net's schedule ended with (constant); "recipe" runs the whole schedule again
     (warm-up, peak learning rate, decays), which first pushes the net away from the constructed solution.

Writes into --out: results.json (errors, curves, the three claims, machine and commit), curves.csv and
construction.png (the three training curves side by side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convlib import models, train
from experiments import degradation, fashion_training, outputs

DEPTHS = (20, 32, 44, 56, 110)  # the plain nets of convlib.models' registry
REFERENCE = os.path.join(os.path.dirname(__file__), "results", "degradation_fig6_short", "results.json")
# what a reference degradation run must share with this run (besides the recipe's values) for its deep net's curve
# to be the from-scratch one
SHARED_CONFIG = ("size", "dataset", "widths", "steps", "batch_size", "train_size", "test_size", "synthetic")


FURTHER = ("final-lr", "recipe")


def further_recipe(recipe: train.Recipe, how: str) -> train.Recipe:
    """The recipe of the constructed net's further training: `recipe` itself ("recipe"), or its optimiser at the
    learning rate its piecewise schedule ends with, constant ("final-lr")."""
    if how == "recipe":
        return recipe
    final = recipe.learning_rate * recipe.decay_factor ** len(recipe.boundaries)
    return dataclasses.replace(recipe, learning_rate=final, schedule="constant", warmup_steps=0)


def identity_block(block, mean: jax.Array, var: jax.Array) -> None:
    """Sets a plain basic block (conv - BN - ReLU - conv - BN - ReLU, stride 1, C -> C channels) to the identity,
    in place, for non-negative inputs whose per-channel statistics are `mean` and `var` (C,).

    Each conv gets the identity kernel: 1 at the centre tap from channel c to channel c, 0 elsewhere, so conv(x) = x
    (the zero padding only ever meets the zero taps). BatchNorm in evaluation mode computes, per channel,

        BN(z) = (z - running_mean) / sqrt(running_var + eps) * scale + bias,

    and with scale = sqrt(running_var + eps) and bias = running_mean this is (z - m) / s * s + m = z, whatever the
    running statistics are. In convlib's plain block the ReLUs sit after each BN, and the block's input x is the
    output of a ReLU (the stem's or the previous block's), so x >= 0 and ReLU(x) = x: the block maps x to
    ReLU(BN(conv(ReLU(BN(conv(x)))))) = x exactly, up to float rounding in (z - m) / s * s + m.

    In training mode BatchNorm uses the batch's mean and variance instead: (z - mean_B) / sqrt(var_B + eps) * s + m,
    the identity only where the batch's statistics equal the running ones. `mean` and `var` are therefore those of
    the block's input over the training data, so that further training starts close to the identity too (and the
    running averages start where they will stay).

    >>> from convlib import models, train
    >>> net = models.create("plain20", widths=(2, 2, 2), in_channels=1, rngs=nnx.Rngs(0))
    >>> block = net.stages[0].layers[1]
    >>> identity_block(block, jnp.array([0.5, 1.0]), jnp.array([0.25, 2.0]))
    >>> block.eval(); x = jnp.abs(jax.random.normal(jax.random.key(0), (1, 4, 4, 2)))
    >>> bool(jnp.allclose(block(x), x, atol=1e-6))
    True
    """
    for conv, norm in ((block.conv1, block.norm1), (block.conv2, block.norm2)):
        kernel = conv.kernel[...]
        height, width, c_in, c_out = kernel.shape
        if c_in != c_out or conv.stride != (1, 1) or conv.bias is not None or block.residual:
            raise ValueError(
                f"an identity block needs a plain block with C -> C channels, stride 1 and no bias, got kernel "
                f"{kernel.shape}, stride {conv.stride}, residual={block.residual}"
            )
        conv.kernel[...] = jnp.zeros_like(kernel).at[height // 2, width // 2].set(jnp.eye(c_in, dtype=kernel.dtype))
        # fresh buffers for every layer: training donates them, and one buffer may be donated only once
        norm.mean[...], norm.var[...] = jnp.array(mean, copy=True), jnp.array(var, copy=True)
        norm.scale[...], norm.bias[...] = jnp.sqrt(var + norm.epsilon), jnp.array(mean, copy=True)


def deepen(shallow, deep, x: jax.Array) -> None:
    """Makes `deep` (a plain CIFAR net with as many stages and the same widths as `shallow`, and at least as many
    blocks per stage) compute exactly what `shallow` computes in evaluation mode, in place: the stem, the classifier
    and the first blocks of every stage are copied from `shallow`, the blocks after them are identity blocks
    (`identity_block`) with the statistics of their input over the images `x` (N, H, W, C), preprocessed.

    >>> from convlib import models, train
    >>> make = lambda name: models.create(name, widths=(2, 2, 2), in_channels=1, rngs=nnx.Rngs(0))
    >>> shallow, deep, x = make("plain20"), make("plain32"), jnp.ones((2, 8, 8, 1))
    >>> deepen(shallow, deep, x)
    >>> shallow.eval(); deep.eval()
    >>> bool(jnp.allclose(shallow(x), deep(x), atol=1e-5))
    True
    """
    shallow_sizes = [len(stage.layers) for stage in shallow.stages]
    deep_sizes = [len(stage.layers) for stage in deep.stages]
    if len(shallow_sizes) != len(deep_sizes) or any(s > d for s, d in zip(shallow_sizes, deep_sizes)):
        raise ValueError(f"deep's blocks per stage {deep_sizes} must cover shallow's {shallow_sizes}")
    shallow.eval()
    for part in ("stem", "fc"):
        nnx.update(getattr(deep, part), copied(getattr(shallow, part)))
    for shallow_stage, deep_stage, (mean, var) in zip(shallow.stages, deep.stages, stage_statistics(shallow, x)):
        for source, target in zip(shallow_stage.layers, deep_stage.layers):
            nnx.update(target, copied(source))
        for block in deep_stage.layers[len(shallow_stage.layers) :]:
            identity_block(block, mean, var)
    shallow.train()


@nnx.jit
def stage_statistics(model, x: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Per stage of a CIFAR net, the mean and variance (C,) of each channel of its output over images x
    (N, H, W, C_in), in the model's current mode."""
    h, found = model.stem(x), []
    for stage in model.stages:
        h = stage(h)
        found.append((jnp.mean(h, axis=(0, 1, 2)), jnp.var(h, axis=(0, 1, 2))))
    return found


@nnx.jit
def _forward(model, x):
    return model(x)


def copied(module) -> nnx.State:
    """The state of `module` in fresh buffers (training one model must not donate the other's)."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.state(module))


def logits(model, images: jax.Array, dataset: str, batch: int = 500) -> np.ndarray:
    """The model's logits (N, classes) in evaluation mode for uint8 images (N, H, W, C); the model is left in
    training mode."""
    model.eval()
    parts = [
        _forward(model, fashion_training.preprocess(images[i : i + batch], dataset))
        for i in range(0, len(images), batch)
    ]
    out = np.concatenate([np.asarray(p) for p in parts])
    model.train()
    return out


def error(scores: np.ndarray, labels) -> float:
    """The fraction of rows of `scores` (N, classes) whose largest entry is not at `labels` (N,)."""
    return float(np.mean(np.argmax(scores, axis=-1) != np.asarray(labels)))


def make_parser() -> outputs.Parser:
    p = outputs.make_parser(__doc__, "construction")
    add = p.add_argument
    add("--quick", dest="size", action="store_const", const="smoke", help="the same as --smoke")
    add("--shallow", type=int, choices=DEPTHS, default=20, help="depth of the shallow plain net")
    add("--deep", type=int, choices=DEPTHS, default=56, help="depth of the deep plain net")
    add("--widths", default=None, help="channels of the three stages (default: 2,4,4 smoke, else 8,16,32)")
    add("--steps", type=int, default=None, help="training steps of each run (default: 4 smoke, else 1200)")
    add("--batch-size", type=int, default=None, help="batch size (default: 16 smoke, else 32)")
    add("--lr", type=float, default=None, help="peak learning rate (default: the recipe's, 0.025)")
    add("--evaluations", type=int, default=None, help="test evaluations along each run (default: 1 smoke, else 10)")
    add("--train-size", type=int, default=None, help="training images (default: 64 smoke, else 2500)")
    add("--test-size", type=int, default=None, help="test images (default: 64 smoke, else 1000)")
    add("--further", choices=FURTHER, default="final-lr", help="the constructed net's further training (see above)")
    add(
        "--reference",
        default=REFERENCE,
        help="results.json of an experiments/degradation.py run whose deep plain net (same seed) is reused as the "
        "one trained from scratch when it shares this run's data, widths and recipe (otherwise it is trained here; "
        "'none': always)",
    )
    fashion_training.add_data_flags(p)
    return p


def parse_args(argv=None, parser: outputs.Parser | None = None):
    """The flags, checked (one-line error and exit 2 otherwise), with the size's defaults."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    outputs.positive(p, args, "steps", "batch_size", "lr", "evaluations", "train_size", "test_size")
    if args.deep <= args.shallow:
        p.error(f"--deep must exceed --shallow, got --shallow {args.shallow} and --deep {args.deep}")
    try:
        widths = args.widths or outputs.pick(args.size, "2,4,4", "8,16,32", "16,32,64")
        args.widths = [int(w) for w in widths.split(",")]
    except ValueError:
        p.error(f"--widths must be 3 comma-separated ints, got {args.widths!r}")
    if len(args.widths) != 3 or min(args.widths) < 1:
        p.error(f"--widths must be 3 positive ints, got {args.widths}")
    if args.reference != "none" and not os.path.isfile(args.reference):
        p.error(f"--reference {args.reference!r} is not a file (a degradation run's results.json, or 'none')")
    named = degradation.RECIPES["short"]
    args.dataset, args.recipe = "fashion_mnist", "short"
    args.steps = args.steps or outputs.pick(args.size, 4, named.steps, named.steps)
    args.batch_size = args.batch_size or outputs.pick(args.size, 16, named.batch_size, named.batch_size)
    args.evaluations = args.evaluations or outputs.pick(args.size, 1, 10, 10)
    args.train_size = args.train_size or outputs.pick(args.size, 64, 2500, None)
    args.test_size = args.test_size or outputs.pick(args.size, 64, 1000, None)
    return args


def reference_run(args, recipe: train.Recipe, name: str) -> dict | None:
    """The row of model `name` and seed `args.seed` in the --reference degradation run, if that run shares this
    run's data, widths and run length (`SHARED_CONFIG`) and `recipe`'s values, else None."""
    if args.reference == "none":
        return None
    with open(args.reference) as f:
        reference = json.load(f)
    config = reference["config"]
    if any(config.get(key) != getattr(args, key) for key in SHARED_CONFIG):
        return None
    if reference.get("recipe") != json.loads(json.dumps(dataclasses.asdict(recipe))):
        return None
    return next((r for r in reference["models"] if r["model"] == name and r["seed"] == args.seed), None)


def train_run(model, dataset, args, recipe) -> dict:
    """Trains `model` in place with `recipe`; its curve, final errors (running training error, test error) and
    wall time."""
    started = time.perf_counter()
    training = fashion_training.fit(
        model,
        dataset,
        steps=args.steps,
        batch_size=args.batch_size,
        key=jax.random.key(args.seed),
        evaluations=args.evaluations,
        recipe=recipe,
        progress=not args.no_progress,
    )
    final = training.curve[-1]
    return {
        "final_train_error": final["train_error"],
        "final_test_error": final["test_error"],
        "wall_s": time.perf_counter() - started,
        "curve": training.curve,
    }


def eval_errors(model, dataset) -> tuple[dict, np.ndarray]:
    """Evaluation-mode errors on the (unaugmented) training and test images, and the test logits."""
    n = dataset.train.labels.shape[0]
    both = logits(model, jnp.concatenate([dataset.train.images, dataset.test.images]), dataset.name)
    train_logits, test_logits = both[:n], both[n:]
    errors = {
        "train_error": error(train_logits, dataset.train.labels),
        "test_error": error(test_logits, dataset.test.labels),
    }
    return errors, test_logits


def plot(run, runs: dict, shallow_train_error: float, start_error: float, title: str) -> None:
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.2), sharey=True)
    for ax, (label, result) in zip(axes, runs.items()):
        steps = [p["step"] for p in result["curve"]]
        for split, style, width in (("train", "--", 1.2), ("test", "-", 2.0)):
            errors = [100 * p[f"{split}_error"] for p in result["curve"]]
            ax.plot(steps, errors, style, lw=width, marker=".", label=f"{split} error")
        ax.axhline(100 * shallow_train_error, color="grey", ls=":", label="shallow net's final training error")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
    axes[-1].plot([0], [100 * start_error], "k*", ms=10, label="as constructed (evaluation mode, training images)")
    axes[0].set_ylabel("error (%)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    run.save_figure(fig, "construction.png")


@outputs.script
def main(argv=None) -> dict:
    parser = make_parser()
    args = parse_args(argv, parser)
    with parser.setting_up():  # a missing or corrupt dataset: one line, exit 2, nothing written
        dataset = fashion_training.load(
            args, train_size=args.train_size, test_size=args.test_size, pad_to=32, seed=args.seed
        )
        if args.batch_size > (n := dataset.train.labels.shape[0]):
            raise ValueError(f"--batch-size {args.batch_size} exceeds the {n} training images")
    run = outputs.Run(args, argv)
    machine = outputs.describe(outputs.machine())
    recipe = degradation.RECIPES["short"].for_run(args.steps, flip=False)
    if args.lr is not None:
        recipe = dataclasses.replace(recipe, learning_rate=args.lr)
    shallow_name, deep_name = f"plain{args.shallow}", f"plain{args.deep}"

    def create(name):
        return models.create(name, widths=tuple(args.widths), in_channels=1, rngs=nnx.Rngs(args.seed))

    shallow = create(shallow_name)
    shallow_run = train_run(shallow, dataset, args, recipe)
    constructed = create(deep_name)
    deepen(shallow, constructed, fashion_training.preprocess(dataset.train.images, dataset.name))
    shallow_errors, shallow_logits = eval_errors(shallow, dataset)
    constructed_errors, constructed_logits = eval_errors(constructed, dataset)
    construction = {
        shallow_name: shallow_errors,
        f"{deep_name} as constructed": constructed_errors,
        "max_abs_test_logit_difference": float(np.max(np.abs(shallow_logits - constructed_logits))),
        "max_abs_test_logit": float(np.max(np.abs(shallow_logits))),
    }
    scratch = reference_run(args, recipe, deep_name)
    if scratch is None:
        scratch = {"source": "trained here", **train_run(create(deep_name), dataset, args, recipe)}
    else:
        scratch = {"source": f"reused: {os.path.relpath(args.reference)}, seed {args.seed} (not retrained)", **scratch}
    further = train_run(constructed, dataset, args, further_recipe(recipe, args.further))
    further_errors, _ = eval_errors(constructed, dataset)
    further["evaluation_mode"] = further_errors
    shallow_run["evaluation_mode"] = shallow_errors
    runs = {
        f"{shallow_name} from scratch": shallow_run,
        f"{deep_name} from scratch ({scratch['source'].split(':')[0]})": scratch,
        f"{deep_name} constructed from {shallow_name}, trained further ({args.further})": further,
    }
    run.write_csv("curves.csv", [{"run": label, **p} for label, result in runs.items() for p in result["curve"]])
    plot(
        run,
        runs,
        shallow_run["final_train_error"],
        constructed_errors["train_error"],
        f"{dataset.name}, recipe short: {args.steps} iterations of {args.batch_size} for each run, widths "
        f"{'-'.join(map(str, args.widths))}; dashed: training error (running mean, training mode), solid: test "
        f"error ({machine})",
    )
    claims = {
        f"{deep_name} as constructed: evaluation-mode training and test errors equal {shallow_name}'s": (
            constructed_errors == shallow_errors
        ),
        f"{deep_name} from scratch: final training error above {shallow_name}'s": (
            scratch["final_train_error"] > shallow_run["final_train_error"]
        ),
        f"{deep_name} constructed and trained further: final training error at or below {shallow_name}'s": (
            further["final_train_error"] <= shallow_run["final_train_error"]
        ),
    }
    return run.finish(
        {
            "dataset": dataset.name,
            "train_images": int(dataset.train.labels.shape[0]),
            "test_images": int(dataset.test.labels.shape[0]),
            "recipe": dataclasses.asdict(recipe),
            "further_recipe": dataclasses.asdict(further_recipe(recipe, args.further)),
            "construction": construction,
            "claims": claims,
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()

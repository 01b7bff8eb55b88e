"""Train a convlib model on an image-classification dataset and write its results.

The defaults are the main job: lenet5_modern on Fashion-MNIST with the hand-derived (custom) backward pass, on
the CPU, to >= 91 % test accuracy in a few minutes:

    python experiments/train.py

Writes into --out: metrics.jsonl (every step and epoch), curves.png, results.json (test accuracy, wall time,
images/s, configuration, machine) and checkpoints/ (Orbax; --resume continues from the newest). Prints the final
test accuracy. One run writes into an --out (and a --checkpoint-dir) at a time. Ctrl-C or SIGTERM stops after the
step under way with a checkpoint (exit 130 or 143); exit 2: refused (a flag, a busy folder, a checkpoint of other
flags); exit 1: stopped (non-finite values, a full disk).

Several processes (hosts) train one model with --parallel sharding: run the same command on every host, adding
--coordinator HOST:PORT (process 0's address) --num-processes N --process-id I, or --coordinator auto under SLURM,
Open MPI or on a TPU pod slice. Process 0 alone writes --out's files; --checkpoint-dir must be storage every
process sees. See docs/guides/distributed.md, "Training on several machines".
"""

import argparse
import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import data, models, ops, train
from experiments import distributed_flags, fashion_training, outputs, recipe_flags, runs

# Per-model defaults of --model-option. The main job widens lenet5_modern's feature maps from LeNet-5's (6, 16) to
# (16, 32): with (6, 16) this recipe ends at 0.900-0.910 test accuracy on Fashion-MNIST, with (16, 32) at 0.92.
MODEL_DEFAULTS = {"lenet5_modern": {"channels": [16, 32]}}
# Set by the script itself, so not --model-option keys.
SCRIPT_OPTIONS = ("num_classes", "in_channels", "backward", "dtype", "param_dtype", "rngs")
MAX_SEED = 2**32 - 1
# The flags (dest names) a resume must repeat, besides the data source and the run's length (see run_config).
RUN_FLAGS = (
    "model model_options input_size batch_size loss rbf_j dtype seed optimizer lr momentum weight_decay schedule "
    "warmup_epochs lr_boundaries lr_decay crop_padding flip"
).split()
# The flag of each key of run_config that is not --key.
CONFIG_FLAGS = {"steps": "--steps/--epochs", "model_options": "--model-option"}
MODEL_OPTION_HELP = (
    'keyword for convlib.models.create, value parsed as JSON (e.g. channels=[6,16], head="rbf"); repeatable; '
    f"overrides the per-model defaults {MODEL_DEFAULTS}"
)
SOURCE_DIR_HELP = (
    "fashion_mnist, mnist: folder of the four IDX files (default: the Debian package's, else a download); cifar10: "
    "cifar-10-python.tar.gz or its folder (default: DATA_DIR/downloads/manual)"
)


def make_parser() -> outputs.Parser:
    """The flags of train.py (every one documented, with its default); the choices are the library's lists."""
    p = outputs.Parser(__doc__, prog="train.py")
    add = p.add_argument
    add("--model", default="lenet5_modern", help="model name, one of convlib.models.available()")
    add("--model-option", action="append", default=[], metavar="KEY=JSON", help=MODEL_OPTION_HELP)
    add("--backward", choices=ops.BACKWARDS, default="custom", help="gradients of conv and pool (see convlib.nn)")
    add("--dataset", choices=data.DATASETS, default="fashion_mnist", help="fashion_mnist, mnist: 28x28; cifar10: 32x32")
    add("--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    add("--source-dir", default=None, help=SOURCE_DIR_HELP)
    add("--install-dataset", action="store_true", help="IDX datasets: apt-get install the Debian package if missing")
    add("--synthetic", type=int, default=None, metavar="N", help="N synthetic training images (N / 5 test) instead")
    add("--input-size", type=int, default=32, help="image side fed to the model (smaller images are zero-padded)")
    add("--crop-padding", type=int, default=2, help="augmentation: random crop after zero-padding (0: none)")
    add("--flip", action="store_true", help="augmentation: random left-right flips")
    add("--batch-size", type=int, default=128, help="global batch size (divisible by the devices with --parallel)")
    # 250: the main job's 10,000 test images took 0.42 s a pass in batches of 250, 0.66 s in batches of 1,000
    # (2-core AMD EPYC; 200 and 125 alike to 250); it changes no count, only the float rounding of the mean loss.
    add("--eval-batch-size", type=int, default=250, help="test-set batch size")
    add("--epochs", type=int, default=12, help="training epochs")
    add("--steps", type=int, default=None, help="stop after this many steps instead (the schedule spans them)")
    recipe_flags.add_flags(p)
    add("--loss", choices=train.LOSSES, default="cross_entropy", help='rbf: LeCun\'s eq. 9, for head="rbf"')
    add("--rbf-j", type=float, default=1.0, help="the constant j of the RBF loss")
    add("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (parameters stay float32)")
    add("--parallel", choices=train.PARALLEL_MODES, default="none", help="data parallelism over all devices")
    add("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation and dropout")
    add("--out", default=None, help="output folder (default: runs/<model>_<dataset>)")
    runs.add_checkpoint_flags(p)
    add("--no-progress", action="store_true", help="no progress bar")
    distributed_flags.add_flags(p)
    return p


def parse_args(argv=None, parser: outputs.Parser | None = None) -> argparse.Namespace:
    """The flags, each checked on its own and against the others (one-line error and exit 2 otherwise); the
    recipe's values are checked by `convlib.train.Recipe` (see `recipe_flags.recipe`)."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    counts = ("batch_size", "eval_batch_size", "epochs", "steps", "input_size", "synthetic")
    outputs.positive(p, args, *counts, *distributed_flags.COUNTS, "checkpoint_every", "rbf_j")
    recipe_flags.check(p, args)
    try:
        data.check_crop_padding(args.crop_padding, args.input_size, args.input_size)
    except ValueError as error:
        p.error(f"--crop-padding: {error} (for --input-size {args.input_size})")
    if args.synthetic is not None and args.synthetic < 5:
        p.error(f"--synthetic must be at least 5 (N training and N / 5 test images), got {args.synthetic}")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    args.model_options = checked_model_options(p, args)
    distributed_flags.check(p, args)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}_{'synthetic' if args.synthetic else args.dataset}")
    runs.check_folders(p, args)
    return args


def checked_model_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The model's keyword arguments: the per-model defaults, then --model-option; none that a flag sets."""
    options = {}
    for pair in args.model_option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            p.error(f"--model-option must be KEY=JSON, got {pair!r}")
        if key in SCRIPT_OPTIONS:
            p.error(f"--model-option {key}=... is set by the script (from the data and the flags), not an option")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)  # else a bare word, e.g. head=rbf
        options[key] = value
    options = {**MODEL_DEFAULTS.get(args.model, {}), **options}
    rbf_head = options.get("head") == "rbf"
    if (args.loss == "rbf") != rbf_head:
        p.error(
            f"--loss {args.loss} does not fit the model's head ({'rbf' if rbf_head else 'logits'}): use --loss rbf "
            'exactly with --model lenet5 --model-option head="rbf"'
        )
    return options


def set_up(p: argparse.ArgumentParser, args: argparse.Namespace):
    """``(loop, dataset, recipe, model)`` of the flags, each checked against the others; writes nothing."""
    loop = train.LoopConfig(
        batch_size=args.batch_size, epochs=args.epochs, steps=args.steps, eval_batch_size=args.eval_batch_size
    )
    dataset = fashion_training.load_splits(
        args.dataset,
        synthetic=args.synthetic,
        data_dir=args.data_dir,
        source_dir=args.source_dir,
        apt_install=data.apt_get_install if args.install_dataset else None,
        pad_to=args.input_size,
        seed=args.seed,
    )
    examples = len(dataset.train.labels)
    if args.batch_size > examples:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {examples} training images")
    if args.parallel != "none" and args.batch_size % jax.device_count():
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by the {jax.device_count()} devices "
            f"({jax.process_count()} processes) of --parallel {args.parallel}"
        )
    model = models.create(
        args.model,
        num_classes=10,
        in_channels=dataset.train.images.shape[-1],
        backward=args.backward,
        dtype=None if args.dtype == "float32" else jnp.dtype(args.dtype),
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
        **args.model_options,
    )
    side = getattr(model, "input_size", args.input_size)
    if side != args.input_size:
        raise ValueError(
            f"--model {args.model} takes {side}x{side} images but --input-size is {args.input_size} (change "
            "--input-size, or --model-option input_size=... where the model has that option)"
        )
    recipe = recipe_flags.recipe(
        p, args, steps_per_epoch=loop.steps_per_epoch(examples), total_steps=loop.total_steps(examples)
    )
    return loop, dataset, recipe, model


def run_config(args: argparse.Namespace, recipe: train.Recipe, total: int) -> dict:
    """What a checkpoint of this run must have been made with to be resumed, by flag (dest names): everything
    that changes the maths, the run's length where the schedule depends on it (a run with a constant schedule, or
    piecewise at --lr-boundaries, may be extended); not how it is computed (--backward, --parallel, the folders)."""
    source = {"synthetic": args.synthetic} if args.synthetic else {"dataset": args.dataset}
    steps = total if recipe.depends_on_length else None
    return {**{name: getattr(args, name) for name in RUN_FLAGS}, **source, "steps": steps}


@outputs.script
def main(argv=None) -> dict:
    """Trains and returns the results (on processes other than 0: ``{}``; process 0 writes them).

    Everything is checked before anything is written: the flags, then the data against the batch size and the
    model against the data; a user error ends with one line (exit 2).
    """
    p = make_parser()
    args = parse_args(argv, p)
    distributed_flags.join(args)
    with p.setting_up(), runs.stops_outside_steps(p.prog):
        loop, dataset, recipe, model = set_up(p, args)
    primary = jax.process_index() == 0
    with runs.writing(p, args, primary=primary):
        run = outputs.Run(args, argv) if primary else None
        with runs.stops_outside_steps(p.prog):  # inside the steps, fit stops after the step under way
            result = fit(p, args, model, recipe, loop, dataset)
        return report(p, run, args, result) if primary else {}


def fit(p, args: argparse.Namespace, model, recipe: train.Recipe, loop, dataset) -> train.FitResult:
    """`convlib.train.fit` as the flags say; a refused resume or a busy folder is one line naming the flag."""
    config = run_config(args, recipe, loop.total_steps(len(dataset.train.labels)))
    with runs.refusals(p, args, CONFIG_FLAGS):
        return train.fit(
            model,
            recipe,
            (dataset.train.images, dataset.train.labels),
            (dataset.test.images, dataset.test.labels),
            key=jax.random.key(args.seed),
            loop=loop,
            loss=train.make_loss(args.loss, rbf_j=args.rbf_j),
            preprocess=functools.partial(fashion_training.preprocess, dataset=dataset.name, dtype=args.dtype),
            parallel=args.parallel,
            **runs.fit_config(args, config, progress=jax.process_index() == 0 and not args.no_progress),
        )


def report(p, run: outputs.Run, args: argparse.Namespace, result: train.FitResult) -> dict:
    """Publishes the finished run (see `runs.publish`) and prints its test accuracy."""
    source = None if args.synthetic else data.provenance(args.dataset, args.data_dir)
    results = runs.publish(p.prog, run, result, model_options=args.model_options, data_source=source)
    rate = f"{result.images_per_s:.0f} train images/s" if results["train_images_per_s"] else "no steps left to train"
    wall = f"wall {results['wall_s']:.0f} s"
    print(f"test accuracy: {results['test_accuracy']:.4f}  ({wall}, {rate}; results in {args.out})")
    return results


if __name__ == "__main__":
    main()

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
import signal
import sys
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import data, models, ops, train
from convlib.train import distributed
from convlib.train.atomic_files import as_disk_full
from convlib.train.locks import exclusive
from experiments import fashion_training, outputs

# Per-model defaults of --model-option. The main job widens lenet5_modern's feature maps from LeNet-5's (6, 16) to
# (16, 32): with (6, 16) this recipe ends at 0.900-0.910 test accuracy on Fashion-MNIST, with (16, 32) at 0.92.
MODEL_DEFAULTS = {"lenet5_modern": {"channels": [16, 32]}}
# Set by the script itself, so not --model-option keys.
SCRIPT_OPTIONS = ("num_classes", "in_channels", "backward", "dtype", "param_dtype", "rngs")
MAX_SEED = 2**32 - 1
# The flag of each Recipe field, to name it when the Recipe refuses a value.
RECIPE_FLAGS = {
    "optimizer": "--optimizer",
    "learning_rate": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "schedule": "--schedule",
    "boundaries": "--lr-boundaries",
    "decay_factor": "--lr-decay",
    "crop_padding": "--crop-padding",
    "warmup_steps": "--warmup-epochs",
}
# While a run trains, its log is metrics.jsonl.incomplete; it becomes metrics.jsonl with the results, so no reader
# (or --resume) takes a failed or interrupted run's log for a finished one's.
METRICS, INCOMPLETE = "metrics.jsonl", ".incomplete"
# The flags (dest names) a resume must repeat, besides the data source and the run's length (see run_config).
RUN_FLAGS = (
    "model model_options input_size batch_size loss rbf_j dtype seed optimizer lr momentum weight_decay schedule "
    "warmup_epochs lr_boundaries lr_decay crop_padding flip"
).split()


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
    add("--optimizer", choices=train.OPTIMIZERS, default="adamw", help="see convlib.train.Recipe")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--momentum", type=float, default=0.9, help="momentum of sgd/nesterov")
    add("--schedule", choices=train.SCHEDULES, default="cosine", help="learning-rate schedule (see Recipe)")
    add("--warmup-epochs", type=float, default=1.0, help="linear warm-up of the cosine schedule, in epochs")
    add("--lr-boundaries", default=None, help="piecewise: comma-separated steps (default: 1/2 and 3/4 of the run)")
    add("--lr-decay", type=float, default=0.1, help="piecewise: factor applied at each boundary")
    add("--weight-decay", type=float, default=5e-4, help="weight decay of kernels (not biases, BatchNorm)")
    add("--loss", choices=train.LOSSES, default="cross_entropy", help='rbf: LeCun\'s eq. 9, for head="rbf"')
    add("--rbf-j", type=float, default=1.0, help="the constant j of the RBF loss")
    add("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (parameters stay float32)")
    add("--parallel", choices=train.PARALLEL_MODES, default="none", help="data parallelism over all devices")
    add("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation and dropout")
    add("--out", default=None, help="output folder (default: runs/<model>_<dataset>)")
    add("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (also at the end, at a stop)")
    add("--checkpoint-dir", default=None, help="Orbax checkpoints (default: --out/checkpoints; shared by processes)")
    add("--resume", nargs="?", const="auto", default=None, choices=train.RESUME[1:], help=RESUME_HELP)
    add("--on-corrupt-checkpoint", default="fall-back", choices=("fall-back", "stop"), help=ON_CORRUPT_HELP)
    add("--no-progress", action="store_true", help="no progress bar")
    add("--coordinator", default=None, metavar="HOST:PORT|auto", help=COORDINATOR_HELP)
    add("--num-processes", type=int, default=None, help="number of processes, with --coordinator HOST:PORT")
    add("--process-id", type=int, default=None, help="this process's index in [0, --num-processes)")
    add("--distributed-timeout", type=int, default=300, help="seconds to wait at start-up for every process")
    add("--heartbeat-timeout", type=int, default=100, help="seconds of silence after which a process counts as dead")
    return p


MODEL_OPTION_HELP = (
    'keyword for convlib.models.create, value parsed as JSON (e.g. channels=[6,16], head="rbf"); repeatable; '
    f"overrides the per-model defaults {MODEL_DEFAULTS}"
)
SOURCE_DIR_HELP = (
    "fashion_mnist, mnist: folder of the four IDX files (default: the Debian package's, else a download); cifar10: "
    "cifar-10-python.tar.gz or its folder (default: DATA_DIR/downloads/manual)"
)
RESUME_HELP = (
    "continue from the newest intact checkpoint; bare --resume (auto) starts afresh with a warning when there is "
    "none, --resume=require stops. A checkpoint of other flags (model, data, recipe, batch size, seed; --steps and "
    "--epochs where the schedule spans the run) is refused"
)
ON_CORRUPT_HELP = (
    "on --resume, when the newest checkpoint fails its checksums or holds non-finite parameters: set it aside "
    "(<step>.corrupt) and continue from the newest intact one, or stop"
)
COORDINATOR_HELP = (
    "train across processes: process 0's address; 'auto': from the cluster's environment (SLURM, Open MPI, TPU); "
    "needs --parallel sharding or shard_map"
)


def parse_args(argv=None, parser: outputs.Parser | None = None) -> argparse.Namespace:
    """The flags, each checked on its own and against the others (one-line error and exit 2 otherwise); the
    recipe's values are checked by `convlib.train.Recipe` (see `make_recipe`)."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    counts = (
        "batch_size",
        "eval_batch_size",
        "epochs",
        "steps",
        "input_size",
        "synthetic",
        "num_processes",
        "distributed_timeout",
        "heartbeat_timeout",
        "checkpoint_every",
        "rbf_j",
    )
    outputs.positive(p, args, *counts)
    if not 0 <= args.warmup_epochs < float("inf"):
        p.error(f"--warmup-epochs must be a finite number >= 0, got {args.warmup_epochs!r}")
    try:
        data.check_crop_padding(args.crop_padding, args.input_size, args.input_size)
    except ValueError as error:
        p.error(f"--crop-padding: {error} (for --input-size {args.input_size})")
    if args.synthetic is not None and args.synthetic < 5:
        p.error(f"--synthetic must be at least 5 (N training and N / 5 test images), got {args.synthetic}")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    args.lr_boundaries = lr_boundaries(p, args.lr_boundaries)
    args.model_options = checked_model_options(p, args)
    check_distributed_flags(p, args)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}_{'synthetic' if args.synthetic else args.dataset}")
    outputs.check_out(p, args.out, resume=args.resume is not None)
    args.checkpoint_dir = os.path.join(args.out, "checkpoints") if args.checkpoint_dir is None else args.checkpoint_dir
    outputs.check_folder(p, "--checkpoint-dir", args.checkpoint_dir)
    if args.data_dir is not None and (not args.data_dir or os.path.isfile(args.data_dir)):
        p.error(f"--data-dir must name a folder, got {'the file ' * bool(args.data_dir)}{args.data_dir!r}")
    return args


def lr_boundaries(p: argparse.ArgumentParser, text: str | None) -> tuple[int, ...] | None:
    """--lr-boundaries as ints (the Recipe checks that they increase)."""
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        p.error(f"--lr-boundaries must be comma-separated steps (ints), got {text!r}")


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


def check_distributed_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error naming the flag unless --coordinator, --num-processes and --process-id fit together."""
    if args.coordinator is None:
        for flag, value in (("--num-processes", args.num_processes), ("--process-id", args.process_id)):
            if value is not None and not (flag == "--num-processes" and value == 1):
                p.error(f"{flag} {value} needs --coordinator HOST:PORT (process 0's address) or --coordinator auto")
        return
    if args.parallel not in ("sharding", "shard_map"):
        p.error(f"--coordinator needs --parallel sharding or shard_map, got --parallel {args.parallel}")
    if args.coordinator == distributed.AUTO:
        return
    try:
        distributed.parse_address(args.coordinator)
    except ValueError:
        p.error(f"--coordinator must be HOST:PORT or auto, got {args.coordinator!r}")
    for flag, value in (("--num-processes", args.num_processes), ("--process-id", args.process_id)):
        if value is None:
            p.error(f"--coordinator {args.coordinator} needs {flag}")
    if not 0 <= args.process_id < args.num_processes:
        p.error(
            f"--process-id {args.process_id} is out of range for --num-processes {args.num_processes} "
            f"(0 to {args.num_processes - 1})"
        )


def join_processes(args: argparse.Namespace) -> None:
    """Joins the multi-process run of --coordinator (before any other JAX call); exits naming the coordinator when
    it cannot be reached."""
    who = "" if args.process_id is None else f"process {args.process_id} of {args.num_processes}: "
    where = f"coordinated by {args.coordinator}"
    if args.coordinator == distributed.AUTO:
        where = "described by the cluster's environment"
    print(f"{who}joining the multi-process run {where} (timeout {args.distributed_timeout} s)", file=sys.stderr)
    try:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            timeout_s=args.distributed_timeout,
            heartbeat_timeout_s=args.heartbeat_timeout,
        )
    except (ValueError, distributed.CoordinatorUnreachableError) as error:
        raise SystemExit(f"{who}{error}") from error


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
    return loop, dataset, make_recipe(p, args, loop, examples), model


def make_recipe(p: argparse.ArgumentParser, args: argparse.Namespace, loop, examples: int) -> train.Recipe:
    """The recipe of the flags for a run of `loop` over `examples` training images; a value the Recipe refuses is
    named by its flag."""
    warmup = round(args.warmup_epochs * loop.steps_per_epoch(examples)) if args.schedule == "cosine" else 0
    total = loop.total_steps(examples)
    try:
        recipe = train.Recipe(
            optimizer=args.optimizer,
            learning_rate=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            schedule=args.schedule,
            warmup_steps=warmup,
            boundaries=args.lr_boundaries,
            decay_factor=args.lr_decay,
            crop_padding=args.crop_padding,
            flip=args.flip,
        )
        recipe.learning_rate_schedule(total)
    except ValueError as error:
        field = str(error).split()[0].split("=")[0]
        if field == "warmup_steps":
            p.error(
                f"--warmup-epochs {args.warmup_epochs} is {warmup} steps, not fewer than the run's {total}: "
                "lower it (e.g. --warmup-epochs 0)"
            )
        p.error(f"{RECIPE_FLAGS.get(field, field)}: {error}")
    if args.schedule == "piecewise" and args.lr_boundaries and args.lr_boundaries[-1] >= total:
        p.error(f"--lr-boundaries {args.lr_boundaries} must lie inside the run's {total} steps")
    return recipe


def run_config(args: argparse.Namespace, recipe: train.Recipe, total: int) -> dict:
    """What a checkpoint of this run must have been made with to be resumed, by flag (dest names): everything
    that changes the maths, the run's length where the schedule depends on it (a run with a constant schedule, or
    piecewise at --lr-boundaries, may be extended); not how it is computed (--backward, --parallel, the folders)."""
    source = {"synthetic": args.synthetic} if args.synthetic else {"dataset": args.dataset}
    steps = total if recipe.depends_on_length else None
    return {**{name: getattr(args, name) for name in RUN_FLAGS}, **source, "steps": steps}


def flag(key: str) -> str:
    """The flag of a key of `run_config`."""
    return {"steps": "--steps/--epochs", "model_options": "--model-option"}.get(key, f"--{key.replace('_', '-')}")


@outputs.script
def main(argv=None) -> dict:
    """Trains and returns the results (on processes other than 0: ``{}``; process 0 writes them).

    Everything is checked before anything is written: the flags, then the data against the batch size and the
    model against the data; a user error ends with one line (exit 2).
    """
    p = make_parser()
    args = parse_args(argv, p)
    if args.coordinator is not None:
        join_processes(args)
    with p.setting_up(), stops_outside_steps():
        loop, dataset, recipe, model = set_up(p, args)
    primary = jax.process_index() == 0
    try:
        with exclusive(args.out, "--out") if primary else contextlib.nullcontext():
            outputs.check_out(p, args.out, resume=args.resume is not None)  # again, now that no other run writes
            run = outputs.Run(args, argv) if primary else None
            with stops_outside_steps():  # inside the steps, fit stops after the step under way
                result = fit(p, args, model, recipe, loop, dataset)
            return report(run, args, result) if primary else {}
    except train.FolderInUseError as error:
        p.error(str(error))


def fit(p, args: argparse.Namespace, model, recipe: train.Recipe, loop, dataset) -> train.FitResult:
    """`convlib.train.fit` as the flags say; a refused resume or a busy folder is one line naming the flag."""
    metrics = os.path.join(args.out, METRICS)
    try:
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
            checkpoints=train.CheckpointConfig(
                directory=args.checkpoint_dir,
                every=args.checkpoint_every,
                resume=args.resume or "never",
                run_config=run_config(args, recipe, loop.total_steps(len(dataset.train.labels))),
                on_corrupt=args.on_corrupt_checkpoint.replace("-", "_"),
            ),
            # process 0 writes it; every process reads it back on resume
            log=train.LogConfig(
                metrics_path=metrics + INCOMPLETE,
                finished_path=metrics,
                progress=jax.process_index() == 0 and not args.no_progress,
            ),
        )
    except train.FolderInUseError as error:
        p.error(f"--checkpoint-dir: {error}")
    except train.CheckpointExistsError as error:
        p.error(
            f"--checkpoint-dir {args.checkpoint_dir!r} holds a checkpoint (step {error.step}) of an earlier "
            "run: add --resume to continue it, or choose another --out / --checkpoint-dir"
        )
    except train.NoCheckpointError:
        p.error(f"--resume=require: no checkpoint in {args.checkpoint_dir!r}")
    except train.CheckpointMismatchError as error:
        hint = "" if error.key is None else f" (flag {flag(error.key)}: rerun with the flags of that run)"
        p.error(f"{error}{hint}")
    except OSError as error:
        stopped(error)


@contextlib.contextmanager
def stops_outside_steps():
    """Ctrl-C or SIGTERM outside the training steps (loading data, compiling) ends the script in one line, exit
    130 or 143: nothing was saved there that a resume would miss."""

    def stop(signum, frame=None):
        name = signal.Signals(signum).name
        print(
            f"train.py: stopped by {name} outside a training step; nothing saved since the last checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, train.TrainingInterrupted):
            raise
        stop(signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def stopped(error: OSError):
    """One line and exit 1 for a full disk (naming the file system); other errors keep their tracebacks."""
    full = as_disk_full(error)
    if full is None:
        raise error
    print(f"train.py: stopped: {full}", file=sys.stderr)
    raise SystemExit(1) from None


def report(run: outputs.Run, args: argparse.Namespace, result: train.FitResult) -> dict:
    """Publishes the finished run: the log under its final name, the curves (when matplotlib is there) and
    results.json; prints the test accuracy."""
    final = [r for r in result.records if r["kind"] == "epoch"][-1]
    try:
        try:
            train.plot_history(result.records, run.path("curves.png"))
        except ModuleNotFoundError as error:
            if error.name != "matplotlib":
                raise
            print("curves.png skipped: matplotlib is not installed (pip install 'convlib[plot]')", file=sys.stderr)
        results = run.finish(
            {
                "test_accuracy": final["test_accuracy"],
                "test_loss": final["test_loss"],
                "train_loss_last_epoch": final["train_loss"],
                "steps": result.steps,
                "epochs": result.epochs,
                "fit_wall_s": result.wall_s,
                "train_images_per_s": outputs.finite_or_none(result.images_per_s),
                "model_options": args.model_options,
                "data_source": None if args.synthetic else data.provenance(args.dataset, args.data_dir),
            }
        )
    except OSError as error:
        stopped(error)
    os.replace(run.path(METRICS + INCOMPLETE), run.path(METRICS))
    rate = f"{result.images_per_s:.0f} train images/s" if results["train_images_per_s"] else "no steps left to train"
    wall = f"wall {results['wall_s']:.0f} s"
    print(f"test accuracy: {final['test_accuracy']:.4f}  ({wall}, {rate}; results in {args.out})")
    return results


if __name__ == "__main__":
    main()

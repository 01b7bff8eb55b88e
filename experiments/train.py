"""Train a convlib model on an image-classification dataset and write its results.

The defaults are the main job: lenet5_modern on Fashion-MNIST with the hand-derived (custom) backward pass, on
the CPU, to >= 91 % test accuracy in a few minutes:

    python experiments/train.py

Writes into --out: metrics.jsonl (every step and epoch), curves.png, results.json (test accuracy, wall time,
images/s, configuration, machine) and checkpoints/ (Orbax; --resume continues from the newest). Prints the final
test accuracy.

Several processes (hosts) train one model with --parallel sharding: run the same command on every host, adding
--coordinator HOST:PORT (process 0's address) --num-processes N --process-id I, or --coordinator auto under SLURM,
Open MPI or on a TPU pod slice. Process 0 alone writes --out's files; --checkpoint-dir must be storage every
process sees. See docs/guides/distributed.md, "Training on several machines".
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys

from convlib.data import check_crop_padding
from convlib.train import distributed
from experiments import outputs

# Per-model defaults of --model-option. The main job widens lenet5_modern's feature maps from LeNet-5's (6, 16) to
# (16, 32): with (6, 16) this recipe ends at 0.900-0.910 test accuracy on Fashion-MNIST, with (16, 32) at 0.92.
MODEL_DEFAULTS = {"lenet5_modern": {"channels": [16, 32]}}


# Set by the script itself, so not --model-option keys.
SCRIPT_OPTIONS = ("num_classes", "in_channels", "backward", "dtype", "param_dtype", "rngs")
MAX_SEED = 2**32 - 1


def make_parser() -> outputs.Parser:
    """The flags of train.py (every one documented, with its default)."""
    p = outputs.Parser(__doc__, prog="train.py")
    add = p.add_argument
    add(
        "--model",
        default="lenet5_modern",
        help="model name in convlib.models (lenet5_modern, lenet5, resnet20, plain20, alexnet_small, vgg11_small)",
    )
    add(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='extra keyword for convlib.models.create, value parsed as JSON (e.g. channels=[6,16], head="rbf"); '
        f"repeatable; overrides the per-model defaults {MODEL_DEFAULTS}",
    )
    add(
        "--backward",
        choices=("custom", "textbook", "autodiff"),
        default="custom",
        help="gradients of conv and pool: the hand-derived custom_vjp backward, its textbook variant, or JAX's "
        "autodiff (see convlib.nn)",
    )
    add(
        "--dataset",
        choices=("fashion_mnist", "mnist", "cifar10"),
        default="fashion_mnist",
        help="dataset (fashion_mnist, mnist: 28x28 grey; cifar10: 32x32 colour, from cifar-10-python.tar.gz)",
    )
    add("--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    add(
        "--source-dir",
        default=None,
        help="fashion_mnist, mnist: folder with the four IDX files (default: the Debian package's folder, else a "
        "download); cifar10: cifar-10-python.tar.gz, its extracted folder, or a folder holding either (default: "
        "DATA_DIR/downloads/manual; never downloaded)",
    )
    add(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="instead of the dataset, N synthetic "
        "Fashion-MNIST-shaped training images (and N / 5 test images), for smoke tests",
    )
    add(
        "--input-size",
        type=int,
        default=32,
        help="image side fed to the model: smaller images (28x28) are zero-padded "
        "(centred) to it; 32 suits every model's default, 28 needs --model-option input_size=28",
    )
    add(
        "--crop-padding",
        type=int,
        default=2,
        help="training augmentation: random crop after zero-padding by this many pixels per side (0: none)",
    )
    add("--flip", action="store_true", help="training augmentation: random left-right flips")
    add("--batch-size", type=int, default=128, help="global batch size (divisible by the device count with --parallel)")
    # 250: the main job's 10,000 test images took 0.42 s a pass in batches of 250, 0.66 s in batches of 1,000
    # (2-core AMD EPYC; 200 and 125 alike to 250); it changes no count, only the float rounding of the mean loss.
    add("--eval-batch-size", type=int, default=250, help="test-set batch size")
    add("--epochs", type=int, default=12, help="training epochs")
    add("--steps", type=int, default=None, help="stop after this many steps instead (the schedule spans them)")
    add(
        "--optimizer",
        choices=("sgd", "nesterov", "adam", "adamw"),
        default="adamw",
        help="sgd/nesterov: momentum SGD with coupled L2 decay; adam: coupled L2; adamw: decoupled weight decay",
    )
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--momentum", type=float, default=0.9, help="momentum of sgd/nesterov")
    add(
        "--schedule",
        choices=("cosine", "piecewise", "constant"),
        default="cosine",
        help="cosine: linear warm-up then cosine decay to 0; piecewise: lr x --lr-decay at each --lr-boundaries; "
        "constant",
    )
    add("--warmup-epochs", type=float, default=1.0, help="linear warm-up of the cosine schedule, in epochs")
    add(
        "--lr-boundaries",
        default=None,
        help="piecewise schedule: comma-separated steps (default: 1/2 and 3/4 of "
        "the run, as He et al.'s 32k and 48k of 64k)",
    )
    add("--lr-decay", type=float, default=0.1, help="piecewise schedule: factor applied at each boundary")
    add("--weight-decay", type=float, default=5e-4, help="weight decay of kernels (biases and BatchNorm excluded)")
    add(
        "--loss",
        choices=("cross_entropy", "rbf"),
        default="cross_entropy",
        help='cross_entropy on logits, or LeCun et al.\'s RBF loss (eq. 9) for lenet5 with head="rbf"',
    )
    add("--rbf-j", type=float, default=1.0, help="the constant j of the RBF loss")
    add("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (parameters stay float32)")
    add(
        "--parallel",
        choices=("none", "pmap", "sharding", "shard_map"),
        default="none",
        help="data parallelism over all local devices (see convlib.train.parallel)",
    )
    add("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation and dropout")
    add("--out", default=None, help="output folder (default: runs/<model>_<dataset>)")
    add(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="save a checkpoint every this many steps (and at the end, and at a Ctrl-C)",
    )
    add(
        "--checkpoint-dir",
        default=None,
        help="Orbax checkpoints (default: --out/checkpoints); with several "
        "processes, a folder all of them see (shared file system)",
    )
    add(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        choices=("auto", "require"),
        help="continue from the newest intact checkpoint in --checkpoint-dir; bare --resume (auto) starts afresh, "
        "with a warning, when there is none; --resume=require stops instead. A checkpoint of other flags (model, "
        "data, recipe, batch size, steps, seed) is refused",
    )
    add(
        "--on-corrupt-checkpoint",
        default="fall-back",
        choices=("fall-back", "stop"),
        help="on --resume, when the newest checkpoint fails its checksums: set it aside (renamed <step>.corrupt) "
        "and continue from the newest intact one, or stop",
    )
    add("--no-progress", action="store_true", help="no progress bar")
    add(
        "--coordinator",
        default=None,
        metavar="HOST:PORT|auto",
        help="train across processes (hosts): process 0's "
        "address, where it listens and the others connect; 'auto': read the cluster's environment (SLURM, Open MPI, "
        "TPU pod slice); needs --parallel sharding or shard_map",
    )
    add("--num-processes", type=int, default=None, help="number of processes, with --coordinator HOST:PORT")
    add("--process-id", type=int, default=None, help="this process's index in [0, --num-processes)")
    add(
        "--distributed-timeout",
        type=int,
        default=300,
        help="seconds to wait at start-up for the coordinator and every process before stopping with an error",
    )
    add(
        "--heartbeat-timeout",
        type=int,
        default=100,
        help="seconds of silence after which a process (or the coordinator) counts as dead and the others stop",
    )
    return p


def parse_args(argv=None, parser: outputs.Parser | None = None) -> argparse.Namespace:
    """The flags, each checked on its own and against the others (one-line error and exit 2 otherwise)."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    outputs.positive(
        p,
        args,
        "batch_size",
        "eval_batch_size",
        "epochs",
        "steps",
        "lr",
        "input_size",
        "synthetic",
        "num_processes",
        "distributed_timeout",
        "heartbeat_timeout",
        "checkpoint_every",
        "lr_decay",
        "rbf_j",
    )
    for flag, value, low, high in (
        ("--lr", args.lr, 0, math.inf),
        ("--lr-decay", args.lr_decay, 0, math.inf),
        ("--rbf-j", args.rbf_j, 0, math.inf),
        ("--weight-decay", args.weight_decay, 0, math.inf),
        ("--warmup-epochs", args.warmup_epochs, 0, math.inf),
        ("--momentum", args.momentum, 0, 1),
    ):
        if not (math.isfinite(value) and low <= value and (value < high)):
            p.error(f"{flag} must be a finite number in [{low}, {high}), got {value!r}")
    try:
        check_crop_padding(args.crop_padding, args.input_size, args.input_size)
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
    return args


def lr_boundaries(p: argparse.ArgumentParser, text: str | None) -> tuple[int, ...] | None:
    """--lr-boundaries as increasing positive ints."""
    if text is None:
        return None
    try:
        boundaries = tuple(int(b) for b in text.split(","))
    except ValueError:
        p.error(f"--lr-boundaries must be comma-separated steps (ints), got {text!r}")
    if any(b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
        p.error(f"--lr-boundaries must be positive and increasing, got {text!r}")
    return boundaries


def checked_model_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The model's keyword arguments: the per-model defaults, then --model-option; none that a flag sets."""
    try:
        options = model_options(args.model_option)
    except ValueError as error:
        p.error(str(error))
    for key in options:
        if key in SCRIPT_OPTIONS:
            p.error(f"--model-option {key}=... is set by the script (from the data and the flags), not an option")
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
    where = (
        "described by the cluster's environment"
        if args.coordinator == distributed.AUTO
        else f"coordinated by {args.coordinator}"
    )
    print(
        f"{who}joining the multi-process run {where} (timeout {args.distributed_timeout} s)",
        file=sys.stderr,
        flush=True,
    )
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


def model_options(pairs: list[str]) -> dict:
    """``["key=json", ...]`` -> keyword arguments."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-option must be KEY=JSON, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare word, e.g. head=rbf
    return options


@outputs.script
def main(argv=None) -> dict:
    """Trains and returns the results (on processes other than 0: ``{}``; process 0 writes them).

    Everything is checked before anything is written: the flags, then the data against the batch size and the
    model against the data; a user error ends with one line (exit 2).
    """
    parser = make_parser()
    args = parse_args(argv, parser)
    if args.coordinator is not None:
        join_processes(args)
    import jax

    from convlib import train

    with parser.setting_up():
        job = set_up(args)
    primary = jax.process_index() == 0
    run = outputs.Run(args, argv) if primary else None
    metrics = os.path.join(args.out, METRICS)
    result = train.fit(
        job["model"],
        job["tx"],
        job["train_batches"],
        steps_per_epoch=job["steps_per_epoch"],
        epochs=job["epochs"],
        max_steps=job["total_steps"],
        key=job["train_key"],
        loss=job["loss"],
        learning_rate=job["schedule"],
        preprocess=job["preprocess"],
        augment=job["recipe"].augment(),
        eval_batches=job["eval_batches"],
        parallel=args.parallel,
        checkpoint_dir=args.checkpoint_dir or os.path.join(args.out, "checkpoints"),
        checkpoint_every=args.checkpoint_every,
        resume=job["resume"],
        run_config=job["run_config"],
        on_corrupt_checkpoint=args.on_corrupt_checkpoint.replace("-", "_"),
        metrics_path=metrics + INCOMPLETE,  # process 0 writes it; every process reads it back on resume
        progress=primary and not args.no_progress,
    )
    if not primary:
        return {}
    return report(run, args, job, result)


# While a run trains, its log is metrics.jsonl.incomplete; it becomes metrics.jsonl with the results, so no reader
# (or --resume) takes a failed or interrupted run's log for a finished one's.
METRICS, INCOMPLETE = "metrics.jsonl", ".incomplete"


def run_config(args: argparse.Namespace, recipe) -> dict:
    """What a checkpoint of this run must have been made with to be resumed: everything that changes the maths but
    the run's length (a resume may extend a run with --steps or --epochs); not how it is computed (--backward,
    --parallel and the folders may change between a run and its resume)."""
    data_source = {"synthetic": args.synthetic} if args.synthetic else {"dataset": args.dataset}
    return {
        "model": args.model,
        "model_options": args.model_options,
        **data_source,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "loss": args.loss,
        "rbf_j": args.rbf_j,
        "dtype": args.dtype,
        "seed": args.seed,
        "recipe": dataclasses.asdict(recipe),
    }


def set_up(args: argparse.Namespace) -> dict:
    """Loads the data and builds the model, recipe and batches, checking each against the flags; writes nothing
    (but the in-progress log of a resumed run, taken up from its finished log)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from convlib import data, models, train
    from experiments.fashion_training import synthetic_images

    key = jax.random.key(args.seed)
    data_key, train_key = jax.random.split(key)

    def load(split):
        if args.synthetic:
            count = args.synthetic // 5 if split == "test" else args.synthetic
            images, labels = synthetic_images(args.seed + (split == "test"), count)
        else:
            images, labels = data.load(args.dataset, split, data_dir=args.data_dir, source_dir=args.source_dir)
        return data.pad_images(jax.device_put(images), to=args.input_size), jax.device_put(labels)

    train_images, train_labels = load("train")
    test_images, test_labels = load("test")
    if args.batch_size > len(train_labels):
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train_labels)} training images")
    if args.parallel != "none" and args.batch_size % jax.device_count():
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by the {jax.device_count()} devices "
            f"({jax.process_count()} processes) of --parallel {args.parallel}"
        )
    steps_per_epoch = len(train_labels) // args.batch_size
    total_steps = args.epochs * steps_per_epoch if args.steps is None else args.steps
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if args.schedule == "cosine" and warmup_steps >= total_steps:
        raise ValueError(
            f"--warmup-epochs {args.warmup_epochs} is {warmup_steps} steps, not fewer than the run's "
            f"{total_steps}: lower it (e.g. --warmup-epochs 0)"
        )
    if args.schedule == "piecewise" and args.lr_boundaries and args.lr_boundaries[-1] >= total_steps:
        raise ValueError(f"--lr-boundaries {args.lr_boundaries} must lie inside the run's {total_steps} steps")
    recipe = train.Recipe(
        optimizer=args.optimizer,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_steps=warmup_steps if args.schedule == "cosine" else 0,  # --warmup-epochs is the cosine's
        boundaries=args.lr_boundaries,
        decay_factor=args.lr_decay,
        crop_padding=args.crop_padding,
        flip=args.flip,
    )
    tx, schedule = recipe.optimizer_for(total_steps)
    dtype = jnp.dtype(args.dtype)
    model = models.create(
        args.model,
        num_classes=10,
        in_channels=train_images.shape[-1],
        backward=args.backward,
        dtype=None if dtype == jnp.float32 else dtype,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
        **args.model_options,
    )
    side = getattr(model, "input_size", args.input_size)
    if side != args.input_size:
        raise ValueError(
            f"--model {args.model} takes {side}x{side} images but --input-size is {args.input_size} "
            "(change --input-size, or --model-option input_size=... where the model has that option)"
        )
    resume = resumable(args)
    take_up_finished_log(args)
    mean, std = data.MEAN_STD["fashion_mnist" if args.synthetic else args.dataset]  # synthetic: its shape
    return {
        "resume": resume,
        "run_config": run_config(args, recipe),
        "model": model,
        "recipe": recipe,
        "tx": tx,
        "schedule": schedule,
        "loss": train.make_loss(args.loss, rbf_j=args.rbf_j),
        "preprocess": lambda images: data.normalize(images, mean, std).astype(dtype),
        "train_key": train_key,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "epochs": -(-total_steps // steps_per_epoch),
        "train_batches": lambda epoch: distributed.process_batches(
            jax.random.fold_in(data_key, epoch), train_images, train_labels, args.batch_size
        ),
        "eval_batches": lambda: distributed.process_batches(
            key, test_images, test_labels, args.eval_batch_size, shuffle=False, drop_remainder=False
        ),
    }


def resumable(args: argparse.Namespace) -> bool:
    """Whether fit resumes: with --resume and a checkpoint there. --resume=require without one is an error; bare
    --resume says that it starts afresh."""
    from convlib import train

    if args.resume is None:
        return False
    folder = args.checkpoint_dir or os.path.join(args.out, "checkpoints")
    found = os.path.isdir(folder) and train.Checkpoints(folder).latest_step() is not None  # creates nothing
    if not found and args.resume == "require":
        raise FileNotFoundError(f"--resume=require: no checkpoint in {folder!r}")
    if not found:
        print(f"train.py: no checkpoint to resume in {folder!r}; training starts at step 0", file=sys.stderr)
    return found


def take_up_finished_log(args: argparse.Namespace) -> None:
    """On --resume of a finished run, a copy of its metrics.jsonl becomes the in-progress log again (the finished
    one stays until the resumed run replaces it)."""
    finished = os.path.join(args.out, METRICS)
    if args.resume and os.path.exists(finished) and not os.path.exists(finished + INCOMPLETE):
        shutil.copyfile(finished, finished + INCOMPLETE)


def report(run: outputs.Run, args: argparse.Namespace, job: dict, result) -> dict:
    """Publishes the finished run: the log under its final name, the curves (when matplotlib is there) and
    results.json; prints the test accuracy."""
    from convlib import train

    os.replace(run.path(METRICS + INCOMPLETE), run.path(METRICS))
    final = [r for r in result.records if r["kind"] == "epoch"][-1]
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
            "steps": job["total_steps"],
            "epochs": job["epochs"],
            "fit_wall_s": result.wall_s,
            "train_images_per_s": outputs.finite_or_none(result.images_per_s),
            "model_options": args.model_options,
        }
    )
    rate = (
        "no steps left to train"
        if results["train_images_per_s"] is None
        else f"{result.images_per_s:.0f} train images/s"
    )
    print(
        f"test accuracy: {final['test_accuracy']:.4f}  (wall {results['wall_s']:.0f} s, {rate}; results in {args.out})"
    )
    return results


if __name__ == "__main__":
    main()

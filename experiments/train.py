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
process sees. See the README, "Training on several machines".
"""

import argparse
import json
import os
import sys

from convlib.train import distributed
from experiments import outputs

# Per-model defaults of --model-option. The main job widens lenet5_modern's feature maps from LeNet-5's (6, 16) to
# (16, 32): with (6, 16) this recipe ends at 0.900-0.910 test accuracy on Fashion-MNIST, with (16, 32) at 0.92.
MODEL_DEFAULTS = {"lenet5_modern": {"channels": [16, 32]}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=outputs.HelpFormatter)
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
    add("--dataset", choices=("fashion_mnist", "mnist"), default="fashion_mnist", help="dataset (28x28 grey)")
    add("--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    add(
        "--source-dir",
        default=None,
        help="folder with the four IDX files (default: the Debian package's folder, else a download)",
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
        help="image side fed to the model: the 28x28 images are zero-padded "
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
    add("--eval-batch-size", type=int, default=1000, help="test-set batch size")
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
    add("--checkpoint-every", type=int, default=1000, help="save a checkpoint every this many steps (and at the end)")
    add(
        "--checkpoint-dir",
        default=None,
        help="Orbax checkpoints (default: --out/checkpoints); with several "
        "processes, a folder all of them see (shared file system)",
    )
    add("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
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
    )
    check_distributed_flags(p, args)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}_{'synthetic' if args.synthetic else args.dataset}")
    return args


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


def main(argv=None) -> dict:
    """Trains and returns the results (on processes other than 0: ``{}``; process 0 writes them)."""
    args = parse_args(argv)
    if args.coordinator is not None:
        join_processes(args)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from convlib import data, models, train
    from experiments.fashion_training import synthetic_images

    primary = jax.process_index() == 0
    if args.parallel != "none" and args.batch_size % jax.device_count():
        raise SystemExit(
            f"--batch-size {args.batch_size} is not divisible by the {jax.device_count()} devices "
            f"({jax.process_count()} processes) of --parallel {args.parallel}"
        )
    run = outputs.Run(args, argv) if primary else None
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
    mean, std = data.MEAN_STD[args.dataset]
    dtype = jnp.dtype(args.dtype)

    def preprocess(images):
        return data.normalize(images, mean, std).astype(dtype)

    steps_per_epoch = len(train_labels) // args.batch_size
    total_steps = args.epochs * steps_per_epoch if args.steps is None else args.steps
    epochs = -(-total_steps // steps_per_epoch)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if args.schedule == "cosine" and warmup_steps >= total_steps:
        raise SystemExit(
            f"--warmup-epochs {args.warmup_epochs} is {warmup_steps} steps, not fewer than the run's "
            f"{total_steps}: lower it (e.g. --warmup-epochs 0)"
        )
    recipe = train.Recipe(
        optimizer=args.optimizer,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_steps=warmup_steps,
        boundaries=None if args.lr_boundaries is None else tuple(int(b) for b in args.lr_boundaries.split(",")),
        decay_factor=args.lr_decay,
        crop_padding=args.crop_padding,
        flip=args.flip,
    )
    tx, schedule = recipe.optimizer_for(total_steps)
    options = {**MODEL_DEFAULTS.get(args.model, {}), **model_options(args.model_option)}
    model = models.create(
        args.model,
        num_classes=10,
        in_channels=1,
        backward=args.backward,
        dtype=None if dtype == jnp.float32 else dtype,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
        **options,
    )
    result = train.fit(
        model,
        tx,
        lambda epoch: distributed.process_batches(
            jax.random.fold_in(data_key, epoch), train_images, train_labels, args.batch_size
        ),
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        max_steps=total_steps,
        key=train_key,
        loss=train.make_loss(args.loss, rbf_j=args.rbf_j),
        learning_rate=schedule,
        preprocess=preprocess,
        augment=recipe.augment(),
        eval_batches=lambda: distributed.process_batches(
            key, test_images, test_labels, args.eval_batch_size, shuffle=False, drop_remainder=False
        ),
        parallel=args.parallel,
        checkpoint_dir=args.checkpoint_dir or os.path.join(args.out, "checkpoints"),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metrics_path=os.path.join(args.out, "metrics.jsonl"),
        progress=primary and not args.no_progress,
    )
    if not primary:
        return {}
    final = [r for r in result.records if r["kind"] == "epoch"][-1]
    train.plot_history(result.records, run.path("curves.png"))
    results = run.finish(
        {
            "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"],
            "train_loss_last_epoch": final["train_loss"],
            "steps": total_steps,
            "epochs": epochs,
            "fit_wall_s": result.wall_s,
            "train_images_per_s": result.images_per_s,
            "model_options": options,
        }
    )
    print(
        f"test accuracy: {final['test_accuracy']:.4f}  (wall {results['wall_s']:.0f} s, "
        f"{result.images_per_s:.0f} train images/s; results in {args.out})"
    )
    return results


if __name__ == "__main__":
    main()

"""The flags of a training recipe (`convlib.train.Recipe`): optimiser, learning rate and its schedule, weight decay;
their checks, and the Recipe they make for a run of a known length, a refused value named by its flag."""

from __future__ import annotations

import argparse

from convlib import train

# The flag of each Recipe field, to name it when the Recipe refuses a value.
FLAGS = {
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


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --optimizer, --lr, --momentum, --schedule, --warmup-epochs, --lr-boundaries, --lr-decay and
    --weight-decay, with the defaults of the main job."""
    add = parser.add_argument
    add("--optimizer", choices=train.OPTIMIZERS, default="adamw", help="see convlib.train.Recipe")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--momentum", type=float, default=0.9, help="momentum of sgd/nesterov")
    add("--schedule", choices=train.SCHEDULES, default="cosine", help="learning-rate schedule (see Recipe)")
    add("--warmup-epochs", type=float, default=1.0, help="linear warm-up of the cosine schedule, in epochs")
    add("--lr-boundaries", default=None, help="piecewise: comma-separated steps (default: 1/2 and 3/4 of the run)")
    add("--lr-decay", type=float, default=0.1, help="piecewise: factor applied at each boundary")
    add("--weight-decay", type=float, default=5e-4, help="weight decay of kernels (not biases, BatchNorm)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error naming the flag unless --warmup-epochs is a finite number >= 0 and --lr-boundaries are
    comma-separated ints (which it turns into a tuple; the Recipe checks that they increase)."""
    if not 0 <= args.warmup_epochs < float("inf"):
        parser.error(f"--warmup-epochs must be a finite number >= 0, got {args.warmup_epochs!r}")
    if args.lr_boundaries is not None:
        try:
            args.lr_boundaries = tuple(int(b) for b in args.lr_boundaries.split(","))
        except ValueError:
            parser.error(f"--lr-boundaries must be comma-separated steps (ints), got {args.lr_boundaries!r}")


def recipe(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, steps_per_epoch: int, total_steps: int
) -> train.Recipe:
    """The Recipe of the flags (and of the augmentation flags --crop-padding and --flip) for a run of
    `total_steps`; a value the Recipe refuses is named by its flag."""
    warmup = round(args.warmup_epochs * steps_per_epoch) if args.schedule == "cosine" else 0
    try:
        made = train.Recipe(
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
        made.learning_rate_schedule(total_steps)
    except ValueError as error:
        field = str(error).split()[0].split("=")[0]
        if field == "warmup_steps":
            parser.error(
                f"--warmup-epochs {args.warmup_epochs} is {warmup} steps, not fewer than the run's {total_steps}: "
                "lower it (e.g. --warmup-epochs 0)"
            )
        parser.error(f"{FLAGS.get(field, field)}: {error}")
    if args.schedule == "piecewise" and args.lr_boundaries and args.lr_boundaries[-1] >= total_steps:
        parser.error(f"--lr-boundaries {args.lr_boundaries} must lie inside the run's {total_steps} steps")
    return made

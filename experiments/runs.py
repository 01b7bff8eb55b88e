"""What keeps a training script's run safe, for every script that trains with `convlib.train.fit`: its checkpoint
flags, its folders checked before anything is written, one writer per --out (a lock), one line and an exit code for
each way it stops (a signal outside the steps, a full disk, a refused resume), and the finished run published."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from convlib import train
from convlib.train.atomic_files import as_disk_full
from convlib.train.locks import exclusive
from experiments import outputs

# While a run trains, its log is metrics.jsonl.incomplete; it becomes metrics.jsonl with the results, so no reader
# (or --resume) takes a failed or interrupted run's log for a finished one's.
METRICS, INCOMPLETE = "metrics.jsonl", ".incomplete"
RESUME_HELP = (
    "continue from the newest intact checkpoint; bare --resume (auto) starts afresh with a warning when there is "
    "none, --resume=require stops. A checkpoint of other flags (model, data, recipe, batch size, seed; --steps and "
    "--epochs where the schedule spans the run) is refused"
)
ON_CORRUPT_HELP = (
    "on --resume, when the newest checkpoint fails its checksums or holds non-finite parameters: set it aside "
    "(<step>.corrupt) and continue from the newest intact one, or stop"
)


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --checkpoint-every, --checkpoint-dir, --resume and --on-corrupt-checkpoint."""
    add = parser.add_argument
    add("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (also at the end, at a stop)")
    add("--checkpoint-dir", default=None, help="Orbax checkpoints (default: --out/checkpoints; shared by processes)")
    add("--resume", nargs="?", const="auto", default=None, choices=train.RESUME[1:], help=RESUME_HELP)
    add("--on-corrupt-checkpoint", default="fall-back", choices=("fall-back", "stop"), help=ON_CORRUPT_HELP)


def check_folders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error naming the flag unless --out and --checkpoint-dir (default: --out/checkpoints, which it sets)
    can hold the run's files and --data-dir, where given, names a folder."""
    outputs.check_out(parser, args.out, resume=args.resume is not None)
    args.checkpoint_dir = os.path.join(args.out, "checkpoints") if args.checkpoint_dir is None else args.checkpoint_dir
    outputs.check_folder(parser, "--checkpoint-dir", args.checkpoint_dir)
    if args.data_dir is not None and (not args.data_dir or os.path.isfile(args.data_dir)):
        parser.error(f"--data-dir must name a folder, got {'the file ' * bool(args.data_dir)}{args.data_dir!r}")


@contextlib.contextmanager
def writing(parser: argparse.ArgumentParser, args: argparse.Namespace, *, primary: bool) -> Iterator[None]:
    """Holds --out for this run alone while inside (on the `primary` process, which writes it: a second writer is
    refused in one line naming the holder), checking --out again once no other run writes there."""
    try:
        with exclusive(args.out, "--out") if primary else contextlib.nullcontext():
            outputs.check_out(parser, args.out, resume=args.resume is not None)
            yield
    except train.FolderInUseError as error:
        parser.error(str(error))


def fit_config(args: argparse.Namespace, run_config: dict, *, progress: bool) -> dict:
    """The `checkpoints` and `log` arguments of `convlib.train.fit` for the checkpoint flags and --out: the log
    written as metrics.jsonl.incomplete until `publish` (process 0 writes it; every process reads it on resume)."""
    metrics = os.path.join(args.out, METRICS)
    return {
        "checkpoints": train.CheckpointConfig(
            directory=args.checkpoint_dir,
            every=args.checkpoint_every,
            resume=args.resume or "never",
            run_config=run_config,
            on_corrupt=args.on_corrupt_checkpoint.replace("-", "_"),
        ),
        "log": train.LogConfig(metrics_path=metrics + INCOMPLETE, finished_path=metrics, progress=progress),
    }


@contextlib.contextmanager
def refusals(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: dict[str, str]) -> Iterator[None]:
    """A busy --checkpoint-dir, a checkpoint where none was asked for, none where one was required, or one of other
    flags (a key of the run configuration, named by `flags` or as --key) ends in one line naming the flag, exit 2;
    a full disk in one line, exit 1."""
    with stops_on_full_disk(parser.prog):
        try:
            yield
        except train.FolderInUseError as error:
            parser.error(f"--checkpoint-dir: {error}")
        except train.CheckpointExistsError as error:
            parser.error(
                f"--checkpoint-dir {args.checkpoint_dir!r} holds a checkpoint (step {error.step}) of an earlier "
                "run: add --resume to continue it, or choose another --out / --checkpoint-dir"
            )
        except train.NoCheckpointError:
            parser.error(f"--resume=require: no checkpoint in {args.checkpoint_dir!r}")
        except train.CheckpointMismatchError as error:
            flag = None if error.key is None else flags.get(error.key, f"--{error.key.replace('_', '-')}")
            hint = "" if flag is None else f" (flag {flag}: rerun with the flags of that run)"
            parser.error(f"{error}{hint}")


@contextlib.contextmanager
def stops_outside_steps(prog: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM outside the training steps (loading data, compiling) ends the script in one line, exit
    130 or 143: nothing was saved there that a resume would miss."""

    def stop(signum, frame=None):
        name = signal.Signals(signum).name
        print(
            f"{prog}: stopped by {name} outside a training step; nothing saved since the last checkpoint",
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


@contextlib.contextmanager
def stops_on_full_disk(prog: str) -> Iterator[None]:
    """A full disk ends the script in one line naming the file system, exit 1; other errors keep their tracebacks."""
    try:
        yield
    except OSError as error:
        full = as_disk_full(error)
        if full is None:
            raise
        print(f"{prog}: stopped: {full}", file=sys.stderr)
        raise SystemExit(1) from None


def publish(prog: str, run: outputs.Run, result: train.FitResult, **extra) -> dict:
    """Publishes a finished run: the curves (when matplotlib is there), results.json (the last epoch's figures,
    the run's counts and speed, and `extra`) and then the log under its final name. Returns the results."""
    final = [r for r in result.records if r["kind"] == "epoch"][-1]
    with stops_on_full_disk(prog):
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
                **extra,
            }
        )
    os.replace(run.path(METRICS + INCOMPLETE), run.path(METRICS))
    return results

"""The training loop: epochs of compiled steps, per-step/epoch metrics, evaluation, checkpoints and exact resume."""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from convlib.ops.checks import ArgumentTypeError, check_bool, check_choice, check_int
from convlib.train.atomic_files import read_jsonl, write_jsonl
from convlib.train.checkpoints import CheckpointMismatchError, Checkpoints, CorruptCheckpointError, signature
from convlib.train.losses import CROSS_ENTROPY, Loss
from convlib.train.parallel import DataParallel, data_parallel
from convlib.train.state import TrainState, create_train_state
from convlib.train.steps import Augment, Preprocess, make_eval_step, make_train_step

# epoch -> the batches of that epoch, in an order that depends only on (seed, epoch), so a resumed run sees the same.
EpochBatches = Callable[[int], Iterable[dict]]
"""`epoch -> iterable of {"image": (B, H, W, C), "label": (B,)}` batches, as :func:`fit` takes them."""


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient norm or parameters became NaN/inf; training stopped without saving the bad state.

    step: the number of the update that produced it (as in the metrics log); last_checkpoint: the step of the newest
    checkpoint on disk (all good), or None."""

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = "no checkpoint" if last_checkpoint is None else f"the last good checkpoint (step {last_checkpoint})"
        super().__init__(f"non-finite {what} at step {step}; training stopped, {kept} is kept")


@dataclasses.dataclass
class FitResult:
    """model: the module passed to ``fit``, updated in place with the final variables; state: the final
    ``TrainState``; records: the metrics log (see ``fit``); images_per_s: training throughput (global batches),
    excluding this process's first (compiling) step; wall_s: wall time of this call."""

    model: nnx.Module
    state: TrainState
    records: list[dict]
    images_per_s: float
    wall_s: float


def _padded(batch: dict, size: int) -> dict:
    """Pads ``batch`` (B examples) with zeros to ``size`` examples, with ``"mask": (size,)`` (1 real, 0 pad; a
    ``"mask"`` in ``batch`` is kept for its B rows)."""
    n = batch["label"].shape[0]
    if n > size:
        raise ValueError(f"eval batch of {n} examples is larger than the first eval batch ({size})")
    pad = lambda x: jnp.concatenate([jnp.asarray(x), jnp.zeros((size - n, *x.shape[1:]), x.dtype)])  # noqa: E731
    return {
        "image": pad(batch["image"]),
        "label": pad(batch["label"]),
        "mask": pad(jnp.asarray(batch.get("mask", jnp.ones(n)), jnp.float32)),
    }


def evaluate(parallel: DataParallel, placed_state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
    """``{"loss", "accuracy", "count"}`` over all examples of ``batches`` (state placed by ``parallel.put_state``).

    Every batch is padded (and masked) to the size of the first, rounded up to a multiple of the device count, so one
    compiled shape serves a ragged last batch. Across processes, each passes its rows of every global batch, as many
    batches as the others and of the same size (``convlib.train.distributed.process_batches``); the sums are global."""
    size, sums = None, []
    for batch in batches:
        if size is None:
            size = -(-batch["label"].shape[0] // parallel.num_local_devices) * parallel.num_local_devices
        sums.append(parallel.eval_step(placed_state, parallel.put_batch(_padded(batch, size))))
    if not sums:
        raise ValueError("evaluation batches are empty")
    totals = [parallel.host_metrics(s) for s in sums]
    count = sum(t["count"] for t in totals)
    return {
        "loss": sum(t["loss_sum"] for t in totals) / count,
        "accuracy": sum(t["correct"] for t in totals) / count,
        "count": int(count),
    }


def _mean(records: Sequence[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def _throughput(timed: Sequence[dict]) -> float | None:
    """Images per second over the timed step records (None without any)."""
    seconds = sum(r["time_s"] for r in timed)
    return sum(r["batch_size"] for r in timed) / seconds if seconds else None


class MetricsLog:
    """The metrics records of a run (see :func:`fit`), kept in memory and mirrored atomically to a JSON-lines file
    by process 0. On resume it starts from the file's records up to the restored step, so the log equals an
    uninterrupted run's, timings aside."""

    def __init__(self, path: str | os.PathLike | None, *, resumed_at: int = 0):
        self.path = path
        self.records = [r for r in read_jsonl(path) if r["step"] <= resumed_at] if path and resumed_at else []
        self._first_step = resumed_at  # this process's first step compiles: never timed
        self._timed: list[dict] = []

    def step(self, step: int, epoch: int, metrics: dict, batch_size: int, seconds: float) -> dict:
        """Appends the record of update number `step` (1-based)."""
        record = {"kind": "step", "step": step, "epoch": epoch, **metrics, "batch_size": batch_size}
        record.update(time_s=seconds, images_per_s=batch_size / seconds)
        self.records.append(record)
        if step > self._first_step + 1:
            self._timed.append(record)
        return record

    def steps(self, *, epoch: int | None = None, after: int = 0) -> list[dict]:
        """The step records (of `epoch`, or after step `after`)."""
        return [
            r
            for r in self.records
            if r["kind"] == "step" and r["step"] > after and (epoch is None or r["epoch"] == epoch)
        ]

    def epoch(self, epoch: int, step: int, evaluation: dict | None) -> dict:
        """Appends the summary of `epoch` (ended at `step`), with the test metrics of an evaluation there."""
        steps = self.steps(epoch=epoch)
        record = {
            "kind": "epoch",
            "step": step,
            "epoch": epoch,
            "train_loss": _mean(steps, "loss"),
            "train_accuracy": _mean(steps, "accuracy"),
            "images_per_s": _throughput([r for r in self._timed if r["epoch"] == epoch]),
        }
        if evaluation is not None:
            record.update(test_loss=evaluation["loss"], test_accuracy=evaluation["accuracy"])
        self.records.append(record)
        return record

    def evaluation(self, step: int, epoch: int, evaluation: dict) -> dict:
        """Appends an evaluation at `step` with the training means over the steps since the previous one."""
        previous = max((r["step"] for r in self.records if r["kind"] == "eval"), default=0)
        steps = self.steps(after=previous)
        record = {"kind": "eval", "step": step, "epoch": epoch}
        record.update(train_loss=_mean(steps, "loss"), train_accuracy=_mean(steps, "accuracy"))
        record.update(test_loss=evaluation["loss"], test_accuracy=evaluation["accuracy"])
        self.records.append(record)
        return record

    def images_per_s(self) -> float:
        """Training throughput of this call (global batches), its first (compiling) step excluded."""
        rate = _throughput(self._timed)
        return math.nan if rate is None else rate

    def write(self) -> None:
        if self.path is not None and jax.process_index() == 0:
            write_jsonl(self.path, self.records)


ON_CORRUPT = ("fall_back", "stop")
RESUME = (False, True, "require")


class Checkpointer:
    """Orbax checkpoints of a run: restores on resume (only verified checkpoints of the same run), saves every
    `every` steps (0: only when asked), never a state with non-finite parameters.

    `run`: a JSON description of the run (model, recipe, data) saved with each checkpoint; a resume whose `run`
    differs is refused. `on_corrupt`: a newest checkpoint failing its checksums is set aside (renamed
    ``<step>.corrupt``) and the run falls back to the newest intact one ("fall_back"), or stops ("stop").
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int,
        steps_per_epoch: int,
        run: dict | None = None,
        on_corrupt: str = "fall_back",
    ):
        self.directory, self.every, self.steps_per_epoch = os.fspath(directory), every, steps_per_epoch
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ON_CORRUPT)
        # as it reads back from the JSON metadata (tuples become lists); refuses what JSON cannot hold
        self.run = None if run is None else json.loads(json.dumps(run, allow_nan=False))
        self._checkpoints = Checkpoints(directory)
        self.last_saved = self._checkpoints.latest_step()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def restore(self, state: TrainState, resume: bool | str) -> TrainState:
        """The newest checkpoint's state when resuming (else `state`); refuses a folder that already holds one
        unless `resume`, and one without a finished checkpoint when `resume == "require"`."""
        if self.last_saved is not None and not resume:
            raise ValueError(
                f"checkpoint_dir {self.directory!r} already holds a checkpoint (step {self.last_saved}); "
                "pass resume=True to continue it, or choose an empty folder"
            )
        step = None if self.last_saved is None else self._newest_intact()
        if step is None:
            if resume == "require":
                raise FileNotFoundError(f"resume='require' but checkpoint_dir {self.directory!r} holds no checkpoint")
            if resume:
                warnings.warn(f"no checkpoint in {self.directory!r} to resume: training starts at step 0", stacklevel=3)
            return state
        meta = self._checkpoints.meta(step)
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointMismatchError(
                f"steps_per_epoch={self.steps_per_epoch} differs from the checkpoint's {meta['steps_per_epoch']}"
            )
        if self.run is not None and meta.get("run", self.run) != self.run:
            saved = meta["run"]
            key = next(k for k in sorted(saved.keys() | self.run.keys()) if saved.get(k) != self.run.get(k))
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory!r} belongs to a different run: {key} is "
                f"{saved.get(key)!r} there, {self.run.get(key)!r} here"
            )
        return self._checkpoints.restore(state, step)[0]

    def _newest_intact(self) -> int | None:
        """The newest checkpoint that passes its checksums; sets aside (or, with "stop", refuses) newer ones.

        A save cut off before its manifest (killed between Orbax's commit and the manifest) was never a checkpoint:
        when only such ones stand in the way, there is none to resume (``None``). A finished checkpoint that fails
        its checksums with no intact one behind it is an error: its run cannot be continued."""
        any_finished = False
        for step in sorted(self._checkpoints.all_steps(), reverse=True):
            problem = self._checkpoints.verify(step)
            if problem is None:
                self.last_saved = step
                return step
            if self.on_corrupt == "stop":
                raise CorruptCheckpointError(f"checkpoint step {step} is corrupt: {problem}")
            any_finished |= self._checkpoints.finished(step)
            moved = self._checkpoints.set_aside(step)
            warnings.warn(f"checkpoint step {step} is corrupt: {problem}; set aside as {moved.name}", stacklevel=4)
        self.last_saved = None
        if any_finished:
            raise CorruptCheckpointError(
                f"no intact checkpoint left in {self.directory!r} (the corrupt ones are set aside)"
            )
        return None

    def save(self, state: TrainState) -> None:
        """Saves `state` (on the host) under its step, with where the data stands; refuses non-finite parameters."""
        step = int(state.step)
        if not all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params)):
            raise NonFiniteLossError(step, "parameters", self.last_saved)
        epoch, batch = divmod(step, self.steps_per_epoch)
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": self.steps_per_epoch}
        meta |= {"signature": signature(state)} | ({} if self.run is None else {"run": self.run})
        self._checkpoints.save(state, meta)
        self.last_saved = step

    def close(self) -> None:
        self._checkpoints.close()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit`; `checkpoint` is the step a `resume` continues from (None: from scratch)."""

    def __init__(self, step: int, checkpoint: int | None):
        self.step, self.checkpoint = step, checkpoint
        where = "nothing to resume" if checkpoint is None else f"resume continues from step {checkpoint}"
        super().__init__(f"interrupted at step {step}; {where}")


def _batches(epoch_batches: EpochBatches, start: int, total: int, steps_per_epoch: int):
    """(epoch, batch) for updates start + 1 .. total: the epochs' batches, skipping those done before `start`."""
    for epoch in range(start // steps_per_epoch, -(-total // steps_per_epoch)):
        first, end = epoch * steps_per_epoch, min(total, (epoch + 1) * steps_per_epoch)
        skip = max(start - first, 0)
        count = 0
        for batch in itertools.islice(epoch_batches(epoch), skip, end - first):
            count += 1
            yield epoch, batch
        if first + skip + count != end:
            raise ValueError(f"epoch_batches({epoch}) yielded fewer batches than steps_per_epoch={steps_per_epoch}")


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    epoch_batches: EpochBatches,
    *,
    steps_per_epoch: int,
    epochs: int,
    key: jax.Array,
    max_steps: int | None = None,
    loss: Loss = CROSS_ENTROPY,
    learning_rate: float | optax.Schedule | None = None,
    preprocess: Preprocess | None = None,
    augment: Augment | None = None,
    eval_batches: Callable[[], Iterable[dict]] | None = None,
    eval_every: int | None = None,
    parallel: str = "none",
    devices: Sequence[jax.Device] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool | str = False,
    run_config: dict | None = None,
    on_corrupt_checkpoint: str = "fall_back",
    metrics_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> FitResult:
    """Trains ``model`` for ``epochs`` x ``steps_per_epoch`` steps of ``tx``, or ``max_steps`` if fewer (the last
    epoch is then partial). Returns a ``FitResult``; the model is updated in place.

    Args:
      epoch_batches: ``epoch -> iterable of {"image": (B, H, W, C), "label": (B,)}``, at least ``steps_per_epoch``
        batches. The order must depend only on (seed, epoch): a resumed run skips the batches already done. Across
        processes (``convlib.train.distributed``), each process's rows of the global batches.
      key: typed PRNG key for augmentation, folded with the step number.
      loss: the objective (``CROSS_ENTROPY`` or ``rbf(j)``).
      learning_rate: the schedule given to ``tx``, to log it (optional).
      preprocess: ``images -> images`` on device, in the train and eval steps (e.g. uint8 -> normalised float).
      augment: ``(key, images) -> images`` on device, in the train step only.
      eval_batches: ``() -> iterable of batches`` (a ragged last batch is fine), evaluated at the end of every
        epoch (into the epoch record), or with ``eval_every`` every that many steps and at the last step (into
        ``"eval"`` records).
      parallel: ``"none" | "pmap" | "sharding" | "shard_map"`` over ``devices`` (default all); see
        ``convlib.train.parallel``.
      checkpoint_dir: Orbax checkpoints, every ``checkpoint_every`` steps (0: none on the way), at the end, and at
        a Ctrl-C. A folder that already holds one raises ``ValueError`` unless ``resume``: then the run continues
        from the newest and reaches the same final state as an uninterrupted run. ``resume=True`` with no
        checkpoint warns and starts at step 0; ``resume="require"`` raises ``FileNotFoundError`` instead. A resume
        restores only a checkpoint that passes its checksums: a corrupt newest one is set aside with a warning
        naming the step and the file, and the run continues from the newest intact one, or from step 0 when
        only saves cut off before they finished stand in the way (``on_corrupt_checkpoint="stop"``: raises
        ``CorruptCheckpointError``); one made by another model or optimiser (other arrays) is refused.
      run_config: a JSON description of the run (model, recipe, data), saved with each checkpoint; a resume with a
        different one is refused with a ``ValueError`` naming the first key that differs.
      metrics_path: JSON-lines log, rewritten atomically (by process 0 only) at every epoch end, evaluation and
        checkpoint; every process reads it back on resume. Step records: ``{"kind": "step", "step", "epoch",
        "loss", "accuracy", "grad_norm", "learning_rate", "batch_size", "time_s", "images_per_s"}``
        (``batch_size``: the global batch; ``time_s``: from the previous step's metrics, or the last evaluation or
        checkpoint, to this step's; a process's first step includes compilation and is left out of the
        throughputs). A step's metrics are read while the next step runs, except where its state is evaluated or
        saved, so the host's work overlaps the device's. Epoch records:
        ``{"kind": "epoch", "step", "epoch", "train_loss", "train_accuracy", "images_per_s", "test_loss",
        "test_accuracy"}``; evaluation records
        (``eval_every``): ``{"kind": "eval", "step", "epoch", "train_loss", "train_accuracy", "test_loss",
        "test_accuracy"}`` with the training means over the steps since the previous evaluation.
      progress: show a tqdm progress bar and a line per evaluation.

    Raises:
      NonFiniteLossError: the loss or gradient norm became NaN/inf (nothing is saved after the last good step).
      TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``), after saving a checkpoint when there is a folder.
      ValueError: bad arguments, too few batches in an epoch, or a checkpoint that does not fit.
    """
    total = _checked_total(steps_per_epoch, epochs, max_steps, checkpoint_every, eval_every)
    if not any(resume is choice for choice in RESUME):
        raise ValueError(f"resume must be one of {RESUME}, got {resume!r}")
    progress = check_bool("progress", progress)
    if not isinstance(loss, Loss):
        raise ArgumentTypeError(f"loss must be a convlib.train.Loss (CROSS_ENTROPY or rbf(j)), got {loss!r}")
    started = time.perf_counter()
    graphdef, state = create_train_state(model, tx, key)
    parallel = data_parallel(
        parallel,
        lambda axis: make_train_step(
            graphdef, tx, loss, learning_rate=learning_rate, preprocess=preprocess, augment=augment, axis_name=axis
        ),
        lambda axis: make_eval_step(graphdef, loss, preprocess=preprocess, axis_name=axis),
        devices=devices,
    )
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(
            checkpoint_dir,
            every=checkpoint_every,
            steps_per_epoch=steps_per_epoch,
            run=run_config,
            on_corrupt=on_corrupt_checkpoint,
        )
        state = checkpointer.restore(state, resume)
    step = int(state.step)
    log = MetricsLog(metrics_path, resumed_at=step)
    placed = parallel.put_state(state)
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)

    def read(step: int, epoch: int, metrics, batch_size: int, *, started: float) -> float:
        """Logs and checks the metrics of update `step` (dispatched after `started`); returns when they came."""
        metrics, now = parallel.host_metrics(metrics), time.perf_counter()
        log.step(step, epoch, metrics, batch_size, now - started)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            last = None if checkpointer is None else checkpointer.last_saved
            raise NonFiniteLossError(step, f"loss {metrics['loss']} (grad_norm {metrics['grad_norm']})", last)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}", refresh=False)
        return now

    try:
        with _stop_requests() as stop_requested:
            tick = time.perf_counter()
            pending = None  # (step, epoch, device metrics, batch size) of the last step dispatched, not yet read
            for epoch, batch in _batches(epoch_batches, step, total, steps_per_epoch):
                batch = parallel.put_batch(batch)
                placed, metrics = parallel.train_step(placed, batch)
                if pending is not None:  # the previous step's metrics are read while this one runs
                    tick = read(*pending, started=tick)
                step += 1
                # the global batch, also when split across devices or processes
                pending = (step, epoch, metrics, int(batch["label"].size))
                evaluating = eval_every and eval_batches is not None and (step % eval_every == 0 or step == total)
                ends_epoch = step == min(total, (epoch + 1) * steps_per_epoch)
                stopping = stop_requested.is_set()
                saving = checkpointer is not None and (checkpointer.due(step) or step == total or stopping)
                if not (evaluating or ends_epoch or saving or stopping):
                    continue
                # this step's state is evaluated or saved: its metrics are read (and checked) first
                read(*pending, started=tick)
                pending, logged = None, len(log.records)
                if evaluating:
                    _report(bar, progress, log.evaluation(step, epoch, evaluate(parallel, placed, eval_batches())))
                if ends_epoch:
                    at_end = None if eval_every or eval_batches is None else evaluate(parallel, placed, eval_batches())
                    _report(bar, progress, log.epoch(epoch, step, at_end))
                # the log first: a process killed right after a checkpoint must not lose that checkpoint's steps
                if saving or len(log.records) > logged:
                    log.write()
                if saving:
                    checkpointer.save(parallel.get_state(placed))
                tick = time.perf_counter()  # a step's time leaves out the evaluations and saves after the previous
                if stopping:
                    raise TrainingInterrupted(step, None if checkpointer is None else checkpointer.last_saved)
    except KeyboardInterrupt as interrupt:  # a second Ctrl-C, inside a step: the newest checkpoint stands
        if isinstance(interrupt, TrainingInterrupted):
            raise
        raise TrainingInterrupted(step, None if checkpointer is None else checkpointer.last_saved) from interrupt
    finally:
        bar.close()
        log.write()
        if checkpointer is not None:
            checkpointer.close()
    state = parallel.get_state(placed)
    nnx.update(model, state.params, state.rest)
    return FitResult(model, state, log.records, log.images_per_s(), time.perf_counter() - started)


@contextlib.contextmanager
def _stop_requests():
    """An event set by Ctrl-C (SIGINT), so that the loop stops after the step under way, with its checkpoint; a
    second Ctrl-C interrupts at once. Outside the main thread (no signals there) the event is never set."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, frame):
        if requested.is_set():
            signal.default_int_handler(signum, frame)
        requested.set()

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def _checked_total(steps_per_epoch, epochs, max_steps, checkpoint_every, eval_every) -> int:
    """The number of updates of the run, after checking the step counts."""
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    epochs = check_int("epochs", epochs, minimum=1)
    check_int("checkpoint_every", checkpoint_every, minimum=0)
    if eval_every is not None:
        check_int("eval_every", eval_every, minimum=1)
    if max_steps is None:
        return epochs * steps_per_epoch
    return min(check_int("max_steps", max_steps, minimum=1), epochs * steps_per_epoch)


def _report(bar, progress: bool, record: dict) -> None:
    if progress and "test_accuracy" in record:
        bar.write(
            f"step {record['step']} (epoch {record['epoch'] + 1}): train loss {record['train_loss']:.4f}, "
            f"test accuracy {record['test_accuracy']:.4f}"
        )

"""The training loop: epochs of compiled steps, per-step/epoch metrics, evaluation, checkpoints and exact resume.

:func:`fit` is the one entry point: a model, a :class:`~convlib.train.Recipe`, the data as arrays, and three small
frozen configurations (:class:`LoopConfig`, :class:`CheckpointConfig`, :class:`LogConfig`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from convlib.ops.checks import ArgumentTypeError, check_bool, check_choice, check_int
from convlib.train import distributed
from convlib.train.atomic_files import read_jsonl, write_jsonl
from convlib.train.checkpoints import (
    RESUME,
    CheckpointError,
    CheckpointMismatchError,
    Checkpoints,
    NonFiniteParametersError,
    Resume,
    legacy_resume,
)
from convlib.train.locks import exclusive
from convlib.train.losses import CROSS_ENTROPY, Loss
from convlib.train.parallel import DataParallel, data_parallel
from convlib.train.state import TrainState, create_train_state
from convlib.train.steps import Augment, Preprocess, make_eval_step, make_train_step

if TYPE_CHECKING:
    from convlib.train.recipe import Recipe

# epoch -> the batches of that epoch, in an order that depends only on (seed, epoch), so a resumed run sees the same.
EpochBatches = Callable[[int], Iterable[dict]]
"""`epoch -> iterable of {"image": (B, H, W, C), "label": (B,)}` batches, as the keyword form of :func:`fit` takes."""
Split = tuple[jax.Array, jax.Array]
"""``(images (N, H, W, C), labels (N,) int)``, as :func:`convlib.data.load` returns them."""


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient norm or parameters became NaN/inf; training stopped without saving the bad state.

    step: the number of the update that produced it (as in the metrics log); last_checkpoint: the step of the newest
    checkpoint on disk (all good), or None."""

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = "no checkpoint" if last_checkpoint is None else f"the last good checkpoint (step {last_checkpoint})"
        super().__init__(f"non-finite {what} at step {step}; training stopped, {kept} is kept")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped :func:`fit` after the step under way, with a checkpoint; `checkpoint` is
    the step a resume continues from (None: from scratch); `exit_code`: 128 + the signal's number (130, 143)."""

    def __init__(self, step: int, checkpoint: int | None, signum: int = signal.SIGINT):
        self.step, self.checkpoint, self.exit_code = step, checkpoint, 128 + signum
        where = "nothing to resume" if checkpoint is None else f"resume continues from step {checkpoint}"
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        super().__init__(f"{how} at step {step}; {where}")


@dataclasses.dataclass
class FitResult:
    """model: the module passed to ``fit``, updated in place with the final variables; state: the final
    ``TrainState``; records: the metrics log (see ``LogConfig``); images_per_s: training throughput (global
    batches), excluding this process's first (compiling) step; wall_s: wall time of this call; steps, epochs: the
    run's length."""

    model: nnx.Module
    state: TrainState
    records: list[dict]
    images_per_s: float
    wall_s: float
    steps: int = 0
    epochs: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How the data becomes steps.

    batch_size: the global batch. epochs: passes over the training split, or steps: this many updates instead (the
    last epoch is then partial; the learning-rate schedule spans the run either way). eval_batch_size: test batch
    (default: batch_size; at most the test split). eval_every: evaluate every this many steps and at the last (into
    ``"eval"`` records); default: at every epoch's end (into the epoch records).

    >>> LoopConfig(batch_size=128, steps=300).steps
    300
    """

    batch_size: int
    epochs: int = 1
    steps: int | None = None
    eval_batch_size: int | None = None
    eval_every: int | None = None

    def steps_per_epoch(self, examples: int) -> int:
        """Full batches in a training split of ``examples`` (which must hold one)."""
        if self.batch_size > examples:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {examples} training examples")
        return examples // self.batch_size

    def total_steps(self, examples: int) -> int:
        """The run's updates over a training split of ``examples``."""
        return self.steps or self.epochs * self.steps_per_epoch(examples)

    def __post_init__(self):
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("epochs", self.epochs, minimum=1)
        for name in ("steps", "eval_batch_size", "eval_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints in ``directory``: every ``every`` steps (0: none on the way), at the end, and at a
    Ctrl-C or SIGTERM. One run writes there at a time (a lock, held for the run's life).

    resume: ``"never"`` (a folder that holds a checkpoint is refused), ``"auto"`` (continue from the newest
    usable one if there is one, else start at step 0 with a warning) or ``"require"``. A resume restores only a
    checkpoint that passes its checksums and holds finite parameters: a damaged newest one is set aside with a
    warning naming the step and the file, and the run continues from the newest intact one
    (``on_corrupt="stop"``: raises ``CorruptCheckpointError``); one made by another model or optimiser (other
    arrays) is refused. run_config: a JSON description of the run (model, recipe, data, length), saved with each
    checkpoint; a resume with a different one is refused with a ``CheckpointMismatchError`` naming the first key
    that differs."""

    directory: str | os.PathLike
    every: int = 0
    resume: Resume = "never"
    run_config: dict | None = None
    on_corrupt: str = "fall_back"

    def __post_init__(self):
        check_int("checkpoint_every", self.every, minimum=0)
        check_choice("resume", self.resume, RESUME)
        check_choice("on_corrupt", self.on_corrupt, ("fall_back", "stop"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    """metrics_path: JSON-lines log, rewritten atomically (by process 0 only) at every epoch end, evaluation and
    checkpoint; every process reads it back on resume (from ``finished_path`` when it does not exist: the log of
    the run as it last finished). progress: a tqdm progress bar and a line per evaluation.

    Step records: ``{"kind": "step", "step", "epoch", "loss", "accuracy", "grad_norm", "learning_rate",
    "batch_size", "time_s", "images_per_s"}`` (``learning_rate``: read from the optimiser state of
    ``optax.inject_hyperparams``, NaN without it; ``batch_size``: the global batch; ``time_s``: from the previous
    step's metrics, or the last evaluation or checkpoint, to this step's; a process's first step includes
    compilation and is left out of the throughputs). A step's metrics are read while the next step runs, except
    where its state is evaluated or saved. Epoch records: ``{"kind": "epoch", "step", "epoch", "train_loss",
    "train_accuracy", "images_per_s", "test_loss", "test_accuracy"}``; evaluation records (``eval_every``):
    ``{"kind": "eval", "step", "epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}`` with the
    training means over the steps since the previous evaluation."""

    metrics_path: str | os.PathLike | None = None
    finished_path: str | os.PathLike | None = None
    progress: bool = False

    def __post_init__(self):
        check_bool("progress", self.progress)


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


def check_labels(batch: dict) -> dict:
    """``batch`` if its ``"label"`` is an integer array of shape ``(B,)`` for its B images (the range is checked on
    device, in the steps: see ``bad_labels``)."""
    labels, images = batch["label"], batch["image"]
    dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ArgumentTypeError(f"labels must be integer class indices, got dtype {dtype}")
    if np.ndim(labels) != 1 or np.shape(labels)[0] != np.shape(images)[0]:
        raise ValueError(
            f"labels must have shape (B,) = ({np.shape(images)[0]},) for images of shape {np.shape(images)}, "
            f"got {np.shape(labels)}"
        )
    return batch


def _check_label_range(bad: float, num_classes_hint: str) -> None:
    if bad:
        raise ValueError(f"labels must be class indices in [0, num_classes) {num_classes_hint}: {int(bad)} are not")


def evaluate(parallel: DataParallel, placed_state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
    """``{"loss", "accuracy", "count"}`` over all examples of ``batches`` (state placed by ``parallel.put_state``).

    Every batch is padded (and masked) to the size of the first, rounded up to a multiple of the device count, so one
    compiled shape serves a ragged last batch. Across processes, each passes its rows of every global batch, as many
    batches as the others and of the same size (``convlib.train.distributed.process_batches``); the sums are global.
    Labels outside ``[0, num_classes)`` raise ``ValueError`` naming ``labels``."""
    size, sums = None, []
    for batch in batches:
        check_labels(batch)
        if size is None:
            size = -(-batch["label"].shape[0] // parallel.num_local_devices) * parallel.num_local_devices
        sums.append(parallel.eval_step(placed_state, parallel.put_batch(_padded(batch, size))))
    if not sums:
        raise ValueError("evaluation batches are empty")
    totals = [parallel.host_metrics(s) for s in sums]
    _check_label_range(sum(t.pop("bad_labels") for t in totals), "(the model's outputs) in the evaluation batches")
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
    """The metrics records of a run (see :class:`LogConfig`), kept in memory and mirrored atomically to a
    JSON-lines file by process 0. On resume it starts from the file's records up to the restored step (read from
    ``finished`` when ``path`` does not exist), so the log equals an uninterrupted run's, timings aside; a file that
    lacks those steps is refused (``CheckpointError``)."""

    def __init__(
        self, path: str | os.PathLike | None, *, resumed_at: int = 0, finished: str | os.PathLike | None = None
    ):
        self.path = path
        self.records = self._taken_up(path, finished, resumed_at) if path and resumed_at else []
        self._first_step = resumed_at  # this process's first step compiles: never timed
        self._timed: list[dict] = []

    @staticmethod
    def _taken_up(path, finished, resumed_at: int) -> list[dict]:
        source = path if os.path.exists(path) or finished is None else finished
        with warnings.catch_warnings(record=True) as damage:  # a damaged line: the records before it stand
            warnings.simplefilter("always")
            records = [r for r in read_jsonl(source, damaged="drop") if r["step"] <= resumed_at]
        logged = max((r["step"] for r in records if r["kind"] == "step"), default=0)
        if logged < resumed_at and jax.process_index() == 0:
            why = "".join(f" ({w.message})" for w in damage)
            raise CheckpointError(
                f"the metrics log {os.fspath(source)!r} holds steps up to {logged}{why} but the checkpoint to resume "
                f"is at step {resumed_at}: resume into the output folder of the run that made the checkpoint"
            )
        for w in damage:  # the dropped records come after the checkpoint: the resumed run writes them again
            warnings.warn(w.message, stacklevel=4)
        return records

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


@dataclasses.dataclass(frozen=True)
class _Job:
    """What the loop runs, however :func:`fit` was called."""

    tx: optax.GradientTransformation
    epoch_batches: EpochBatches
    eval_batches: Callable[[], Iterable[dict]] | None
    steps_per_epoch: int
    total: int
    key: jax.Array
    loss: Loss
    preprocess: Preprocess | None
    augment: Augment | None
    eval_every: int | None
    learning_rate: float | optax.Schedule | None = None  # the keyword form's; else read from the optimiser state


def fit(
    model: nnx.Module,
    recipe: Recipe,
    train_split: Split,
    test_split: Split | None = None,
    *,
    key: jax.Array,
    loop: LoopConfig | None = None,
    loss: Loss = CROSS_ENTROPY,
    preprocess: Preprocess | None = None,
    parallel: str = "none",
    checkpoints: CheckpointConfig | None = None,
    log: LogConfig | None = None,
    **keyword_form,
) -> FitResult:
    """Trains ``model`` (in place) with ``recipe`` on ``train_split`` as ``loop`` says, evaluating on ``test_split``.

    Args:
      model: any NNX module mapping images ``(B, H, W, C)`` to ``(B, num_classes)`` outputs.
      recipe: optimiser, schedule (spanning the run), weight decay and augmentation.
      train_split, test_split: ``(images (N, H, W, C), labels (N,) int in [0, num_classes))``; put them on device
        once (``jax.device_put``). Each epoch visits the training split in an order that depends only on
        ``(key, epoch)``, so a resumed run sees the same batches; across processes
        (``convlib.train.distributed``), every process passes the whole splits and gathers its rows.
      key: typed PRNG key (``jax.random.key``) of the data order and the augmentation.
      loop: the batch size, the run's length and the evaluations (:class:`LoopConfig`).
      loss: the objective (``CROSS_ENTROPY`` or ``rbf(j)``).
      preprocess: ``images -> images`` on device, in the train and eval steps (e.g. uint8 -> normalised float).
      parallel: ``"none" | "pmap" | "sharding" | "shard_map"`` over all devices; see ``convlib.train.parallel``.
      checkpoints: :class:`CheckpointConfig` (None: no checkpoints).
      log: :class:`LogConfig` (the metrics file and the progress bar).
      **keyword_form: deprecated: ``fit(model, tx, epoch_batches, *, steps_per_epoch, epochs, key, ...)`` with the
        22 keywords of earlier versions still works, with a ``DeprecationWarning``.

    Returns a :class:`FitResult`. Raises ``NonFiniteLossError`` (NaN/inf loss or gradient norm; nothing is saved
    after the last good step), ``TrainingInterrupted`` (Ctrl-C or SIGTERM: the step under way finishes, a
    checkpoint is saved and the log written; a second signal stops at once), ``FolderInUseError`` (another run
    writes into the checkpoint folder), ``ValueError`` (bad arguments or labels, naming them; a checkpoint that does
    not fit).

    >>> import optax, numpy as np
    >>> from convlib import train
    >>> images, labels = np.zeros((8, 4, 4, 1), np.float32), np.arange(8, dtype=np.int32) % 2
    >>> model = nnx.Sequential(lambda x: x.reshape(len(x), -1), nnx.Linear(16, 2, rngs=nnx.Rngs(0)))
    >>> recipe = train.Recipe(optimizer="sgd", learning_rate=0.1, schedule="constant")
    >>> result = fit(model, recipe, (images, labels), key=jax.random.key(0), loop=LoopConfig(batch_size=4, epochs=2))
    >>> [r["step"] for r in result.records if r["kind"] == "epoch"]
    [2, 4]
    """
    if isinstance(recipe, optax.GradientTransformation):
        warnings.warn(
            "fit(model, tx, epoch_batches, steps_per_epoch=..., ...) is deprecated: pass a Recipe and the splits, "
            "fit(model, recipe, (images, labels), test_split, key=..., loop=LoopConfig(...), checkpoints=..., "
            "log=...)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _fit_keywords(model, recipe, train_split, key=key, loss=loss, preprocess=preprocess,
                             parallel=parallel, **keyword_form)  # fmt: skip
    if keyword_form:
        raise TypeError(f"fit() got unexpected keyword arguments {sorted(keyword_form)}")
    if loop is None:
        raise TypeError("fit() needs loop=LoopConfig(batch_size=..., epochs=... or steps=...)")
    images, labels = train_split
    steps_per_epoch, total = loop.steps_per_epoch(len(labels)), loop.total_steps(len(labels))
    data_key, train_key = jax.random.split(key)
    eval_batches = None
    if test_split is not None:
        test_images, test_labels = test_split
        eval_size = min(loop.eval_batch_size or loop.batch_size, len(test_labels))
        eval_batches = lambda: distributed.process_batches(  # noqa: E731
            key, test_images, test_labels, eval_size, shuffle=False, drop_remainder=False
        )
    job = _Job(
        tx=recipe.tx(total),
        epoch_batches=lambda epoch: distributed.process_batches(
            jax.random.fold_in(data_key, epoch), images, labels, loop.batch_size
        ),
        eval_batches=eval_batches,
        steps_per_epoch=steps_per_epoch,
        total=total,
        key=train_key,
        loss=loss,
        preprocess=preprocess,
        augment=recipe.augment(),
        eval_every=loop.eval_every,
    )
    return _run(model, job, parallel, None, checkpoints, log or LogConfig())


def _fit_keywords(
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
    """The deprecated keyword form of :func:`fit`: ``max_steps`` caps ``epochs x steps_per_epoch``; ``resume``:
    False, True or "require" (``"never"``, ``"auto"``, ``"require"``); ``learning_rate``: the schedule given to
    ``tx``, to log it."""
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    total = check_int("epochs", epochs, minimum=1) * steps_per_epoch
    if max_steps is not None:
        total = min(check_int("max_steps", max_steps, minimum=1), total)
    if eval_every is not None:
        check_int("eval_every", eval_every, minimum=1)
    resume = check_choice("resume", legacy_resume(resume), RESUME)
    check_int("checkpoint_every", checkpoint_every, minimum=0)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = CheckpointConfig(
            directory=checkpoint_dir,
            every=checkpoint_every,
            resume=resume,
            run_config=run_config,
            on_corrupt=on_corrupt_checkpoint,
        )
    job = _Job(tx, epoch_batches, eval_batches, steps_per_epoch, total, key, loss, preprocess, augment, eval_every,
               learning_rate)  # fmt: skip
    return _run(model, job, parallel, devices, checkpoints, LogConfig(metrics_path=metrics_path, progress=progress))


def _run(
    model: nnx.Module,
    job: _Job,
    parallel: str,
    devices: Sequence[jax.Device] | None,
    checkpoints: CheckpointConfig | None,
    log: LogConfig,
) -> FitResult:
    """Runs ``job`` (the body of :func:`fit`); the checkpoint folder is locked for the run's life (process 0)."""
    if not isinstance(job.loss, Loss):
        raise ArgumentTypeError(f"loss must be a convlib.train.Loss (CROSS_ENTROPY or rbf(j)), got {job.loss!r}")
    started = time.perf_counter()
    graphdef, state = create_train_state(model, job.tx, job.key)
    steps = data_parallel(
        parallel,
        lambda axis: make_train_step(
            graphdef,
            job.tx,
            job.loss,
            learning_rate=job.learning_rate,
            preprocess=job.preprocess,
            augment=job.augment,
            axis_name=axis,
        ),
        lambda axis: make_eval_step(graphdef, job.loss, preprocess=job.preprocess, axis_name=axis),
        devices=devices,
    )
    with contextlib.ExitStack() as stack:
        saver = None
        if checkpoints is not None:
            if jax.process_index() == 0:
                stack.enter_context(exclusive(checkpoints.directory, "checkpoint_dir"))
            saver = Checkpoints(
                checkpoints.directory,
                every=checkpoints.every,
                steps_per_epoch=job.steps_per_epoch,
                run=checkpoints.run_config,
                on_corrupt=checkpoints.on_corrupt,
            )
            stack.callback(saver.close)
            state = saver.resume(state, checkpoints.resume)
            if int(state.step) > job.total:
                raise CheckpointMismatchError(
                    f"the checkpoint to resume is at step {int(state.step)}, past this run's {job.total} steps",
                    key="steps",
                )
        metrics = MetricsLog(log.metrics_path, resumed_at=int(state.step), finished=log.finished_path)
        loop = _Loop(job, steps, state, metrics, saver, log.progress)
        stack.callback(loop.close)
        loop.run()
    state = steps.get_state(loop.placed)
    nnx.update(model, state.params, state.rest)
    return FitResult(
        model,
        state,
        metrics.records,
        metrics.images_per_s(),
        time.perf_counter() - started,
        steps=job.total,
        epochs=-(-job.total // job.steps_per_epoch),
    )


def _batches(epoch_batches: EpochBatches, start: int, total: int, steps_per_epoch: int):
    """(epoch, batch) for updates start + 1 .. total: the epochs' batches, skipping those done before `start`."""
    for epoch in range(start // steps_per_epoch, -(-total // steps_per_epoch)):
        first, end = epoch * steps_per_epoch, min(total, (epoch + 1) * steps_per_epoch)
        skip = max(start - first, 0)
        count = 0
        for batch in itertools.islice(epoch_batches(epoch), skip, end - first):
            count += 1
            yield epoch, check_labels(batch)
        if first + skip + count != end:
            raise ValueError(f"epoch_batches({epoch}) yielded fewer batches than steps_per_epoch={steps_per_epoch}")


class _Loop:
    """One :func:`fit` call's steps and the work at their ends: deferred metric reads, evaluations, epoch
    records, checkpoints and stops by signal. ``placed``: the state on the devices."""

    def __init__(self, job: _Job, steps: DataParallel, state: TrainState, log: MetricsLog, saver, progress: bool):
        self.job, self.steps, self.log, self.saver = job, steps, log, saver
        self.step, self.placed = int(state.step), steps.put_state(state)
        self.progress = progress
        self.bar = tqdm(total=job.total, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        self.tick = time.perf_counter()
        self.pending = None  # (step, epoch, device metrics, batch size) of the last step dispatched, not yet read

    def run(self) -> None:
        job = self.job
        try:
            with _stop_requests() as stop:
                for epoch, batch in _batches(job.epoch_batches, self.step, job.total, job.steps_per_epoch):
                    batch = self.steps.put_batch(batch)
                    self.placed, metrics = self.steps.train_step(self.placed, batch)
                    if self.pending is not None:  # the previous step's metrics are read while this one runs
                        self.tick = self.read(*self.pending)
                    self.step += 1
                    # the global batch, also when split across devices or processes
                    self.pending = (self.step, epoch, metrics, int(batch["label"].size))
                    self.end_of_step(epoch, stop.signum)
        except KeyboardInterrupt as interrupt:  # a second signal, inside a step: the newest checkpoint stands
            if isinstance(interrupt, TrainingInterrupted):
                raise
            raise TrainingInterrupted(self.step, self.last_saved, getattr(interrupt, "signum", signal.SIGINT)) from None

    @property
    def last_saved(self) -> int | None:
        return None if self.saver is None else self.saver.last_saved

    def read(self, step: int, epoch: int, metrics, batch_size: int) -> float:
        """Logs and checks the metrics of update `step` (dispatched after `self.tick`); returns when they came."""
        metrics, now = self.steps.host_metrics(metrics), time.perf_counter()
        _check_label_range(metrics.pop("bad_labels"), f"(the model's outputs) in the batch of step {step}")
        self.log.step(step, epoch, metrics, batch_size, now - self.tick)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            what = f"loss {metrics['loss']} (grad_norm {metrics['grad_norm']})"
            raise NonFiniteLossError(step, what, self.last_saved)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}", refresh=False)
        return now

    def end_of_step(self, epoch: int, stop_signal: int | None) -> None:
        """After update ``self.step``: evaluates, ends the epoch, writes the log, saves and stops, as due."""
        job, step = self.job, self.step
        evaluating = (
            job.eval_every and job.eval_batches is not None and (step % job.eval_every == 0 or step == job.total)
        )
        ends_epoch = step == min(job.total, (epoch + 1) * job.steps_per_epoch)
        saving = self.saver is not None and (self.saver.due(step) or step == job.total or stop_signal is not None)
        if not (evaluating or ends_epoch or saving or stop_signal is not None):
            return
        # this step's state is evaluated or saved: its metrics are read (and checked) first
        self.read(*self.pending)
        self.pending, logged = None, len(self.log.records)
        if evaluating:
            self.report(self.log.evaluation(step, epoch, self.evaluate()))
        if ends_epoch:
            at_end = None if job.eval_every or job.eval_batches is None else self.evaluate()
            self.report(self.log.epoch(epoch, step, at_end))
        # the log first: a process killed right after a checkpoint must not lose that checkpoint's steps
        if saving or len(self.log.records) > logged:
            self.log.write()
        if saving:
            self.save()
        self.tick = time.perf_counter()  # a step's time leaves out the evaluations and saves after the previous
        if stop_signal is not None:
            raise TrainingInterrupted(step, self.last_saved, stop_signal)

    def evaluate(self) -> dict:
        return evaluate(self.steps, self.placed, self.job.eval_batches())

    def save(self) -> None:
        try:
            self.saver.checkpoint(self.steps.get_state(self.placed))
        except NonFiniteParametersError as error:
            raise NonFiniteLossError(self.step, "parameters", self.last_saved) from error

    def report(self, record: dict) -> None:
        if self.progress and "test_accuracy" in record:
            self.bar.write(
                f"step {record['step']} (epoch {record['epoch'] + 1}): train loss {record['train_loss']:.4f}, "
                f"test accuracy {record['test_accuracy']:.4f}"
            )

    def close(self) -> None:
        self.bar.close()
        self.log.write()


class _Stop(KeyboardInterrupt):
    """A second stop signal: the run stops at once."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclasses.dataclass
class _StopRequest:
    signum: int | None = None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop :func:`fit` gracefully (after the step under way, with a checkpoint)."""


@contextlib.contextmanager
def _stop_requests():
    """A request set by Ctrl-C (SIGINT) or SIGTERM, so that the loop stops after the step under way, with its
    checkpoint; a second signal stops at once. Outside the main thread (no signals there) it is never set."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request.signum is not None:
            raise _Stop(signum)
        request.signum = signum

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""The training loop: epochs of compiled steps, per-step/epoch metrics, evaluation, checkpoints and exact resume."""

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from convlib.train.atomic_files import read_jsonl, write_jsonl
from convlib.train.checkpoints import Checkpoints
from convlib.train.losses import CROSS_ENTROPY, Loss
from convlib.train.parallel import DataParallel, data_parallel
from convlib.train.state import TrainState, create_train_state
from convlib.train.steps import Augment, Preprocess, make_eval_step, make_train_step

# epoch -> the batches of that epoch, in an order that depends only on (seed, epoch), so a resumed run sees the same.
EpochBatches = Callable[[int], Iterable[dict]]


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


def _epoch_record(step_records: list[dict], step: int, epoch: int, timed: Sequence[dict]) -> dict:
    images = sum(r["batch_size"] for r in timed)
    seconds = sum(r["time_s"] for r in timed)
    return {
        "kind": "epoch",
        "step": step,
        "epoch": epoch,
        "train_loss": sum(r["loss"] for r in step_records) / len(step_records),
        "train_accuracy": sum(r["accuracy"] for r in step_records) / len(step_records),
        "images_per_s": images / seconds if seconds else None,
    }


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
    parallel: str = "none",
    devices: Sequence[jax.Device] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
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
      eval_batches: ``() -> iterable of batches``, evaluated after every epoch (a ragged last batch is fine).
      parallel: ``"none" | "pmap" | "sharding" | "shard_map"`` over ``devices`` (default all); see
        ``convlib.train.parallel``.
      checkpoint_dir: Orbax checkpoints, every ``checkpoint_every`` steps (0: none on the way) and at the end.
        A folder that already holds one raises ``ValueError`` unless ``resume``: then the run continues from the
        newest and reaches the same final state as an uninterrupted run.
      metrics_path: JSON-lines log, rewritten atomically (by process 0 only) at every epoch end and checkpoint; every
        process reads it back on resume. Step records:
        ``{"kind": "step", "step", "epoch", "loss", "accuracy", "grad_norm", "learning_rate", "batch_size",
        "time_s", "images_per_s"}`` (``batch_size``: the global batch; time includes fetching the batch; a
        process's first step includes compilation). Epoch records: ``{"kind": "epoch", "step", "epoch",
        "train_loss", "train_accuracy", "images_per_s", "test_loss", "test_accuracy"}``. On resume the records up
        to the checkpoint are read back, so the log equals an uninterrupted run's, timings aside.
      progress: show a tqdm progress bar and a line per epoch.

    Raises:
      NonFiniteLossError: the loss or gradient norm became NaN/inf (nothing is saved after the last good step).
      ValueError: bad arguments, too few batches in an epoch, or a checkpoint that does not fit.
    """
    for name, value, low in (
        ("steps_per_epoch", steps_per_epoch, 1),
        ("epochs", epochs, 1),
        ("checkpoint_every", checkpoint_every, 0),
        ("max_steps", epochs * steps_per_epoch if max_steps is None else max_steps, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
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
    checkpoints = None if checkpoint_dir is None else Checkpoints(checkpoint_dir)
    last_saved = None if checkpoints is None else checkpoints.latest_step()
    if last_saved is not None:
        if not resume:
            raise ValueError(
                f"checkpoint_dir {os.fspath(checkpoint_dir)!r} already holds a checkpoint (step {last_saved}); "
                "pass resume=True to continue it, or choose an empty folder"
            )
        state, meta = checkpoints.restore(state)
        if meta["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch} differs from the checkpoint's {meta['steps_per_epoch']}"
            )
    step = int(state.step)
    records = [r for r in read_jsonl(metrics_path) if r["step"] <= step] if metrics_path and step else []

    placed = parallel.put_state(state)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)

    def write_log():
        if metrics_path is not None and jax.process_index() == 0:
            write_jsonl(metrics_path, records)

    def save():
        nonlocal last_saved
        state = parallel.get_state(placed)
        if not all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params)):
            raise NonFiniteLossError(step, "parameters", last_saved)
        epoch, batch = divmod(step, steps_per_epoch)
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": steps_per_epoch}
        checkpoints.save(state, meta)
        last_saved = step
        write_log()

    def due() -> bool:
        return checkpoints is not None and checkpoint_every > 0 and step % checkpoint_every == 0

    first_step = step
    timed = []  # step records of this process after its first (compiling) step
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        for epoch in range(step // steps_per_epoch, -(-total // steps_per_epoch)) if step < total else ():
            end = min(total, (epoch + 1) * steps_per_epoch)
            first = epoch * steps_per_epoch
            batches = itertools.islice(epoch_batches(epoch), step - first, end - first)
            tick = time.perf_counter()
            for batch in batches:
                batch = parallel.put_batch(batch)
                placed, metrics = parallel.train_step(placed, batch)
                metrics = parallel.host_metrics(metrics)
                now = time.perf_counter()
                size = int(batch["label"].size)  # the global batch, also when split across devices or processes
                record = {
                    "kind": "step",
                    "step": step + 1,
                    "epoch": epoch,
                    **metrics,
                    "batch_size": size,
                    "time_s": now - tick,
                    "images_per_s": size / (now - tick),
                }
                records.append(record)
                if step > first_step:
                    timed.append(record)
                tick = now
                step += 1
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise NonFiniteLossError(
                        step, f"loss {metrics['loss']} (grad_norm {metrics['grad_norm']})", last_saved
                    )
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    lr=f"{metrics['learning_rate']:.3g}",
                    refresh=False,
                )
                if step != end and due():
                    save()
            if step != end:
                raise ValueError(f"epoch_batches({epoch}) yielded fewer batches than steps_per_epoch={steps_per_epoch}")
            epoch_steps = [r for r in records if r["kind"] == "step" and r["epoch"] == epoch]
            summary = _epoch_record(epoch_steps, step, epoch, [r for r in timed if r["epoch"] == epoch])
            if eval_batches is not None:
                result = evaluate(parallel, placed, eval_batches())
                summary.update(test_loss=result["loss"], test_accuracy=result["accuracy"])
                if progress:
                    bar.write(
                        f"epoch {epoch + 1}: train loss {summary['train_loss']:.4f}, "
                        f"test accuracy {result['accuracy']:.4f}"
                    )
            records.append(summary)
            if checkpoints is not None and (due() or step == total):
                save()
            else:
                write_log()
    finally:
        bar.close()
        write_log()
        if checkpoints is not None:
            checkpoints.close()
    state = parallel.get_state(placed)
    nnx.update(model, state.params, state.rest)
    images = sum(r["batch_size"] for r in timed)
    seconds = sum(r["time_s"] for r in timed)
    return FitResult(model, state, records, images / seconds if seconds else math.nan, time.perf_counter() - started)

"""Data parallelism: one compiled train/eval step per mode, with the matching placement of state and batches.

Modes (``PARALLEL_MODES``):

- ``"none"``: ``jax.jit`` on the default device.
- ``"pmap"``: ``jax.pmap`` over the devices; the state is replicated (stacked on a leading device axis), each batch
  is split into per-device batches ``(D, B / D, ...)``; gradients, BatchNorm batch statistics (``axis_name``) and
  metrics are averaged with ``lax.pmean`` over the axis ``"data"``.
- ``"sharding"``: ``jax.jit`` with ``NamedSharding`` over a 1-D ``("data",)`` mesh: the batch is sharded on axis 0,
  the state replicated; XLA inserts the collectives, and BatchNorm statistics are those of the global batch.
- ``"shard_map"``: ``jax.jit(jax.shard_map(...))`` over the same mesh with the explicit collectives of ``"pmap"``.

``"sharding"`` and ``"shard_map"`` also span the devices of several processes (``convlib.train.distributed``): the
mesh orders the devices by process, each process passes its rows of the global batch (process ``p`` holds rows
``[p * B / P, (p + 1) * B / P)``), and every process passes the same initial state.

All modes compute the same update as ``"none"`` on the global batch (up to float reassociation); dropout masks and
augmentation differ under ``"pmap"``/``"shard_map"``, where each device draws its own.

The ``jax.jit`` modes compile with :func:`convlib.ops.plan.compiler_options` for the devices' platform (on the CPU:
convs off YNNPACK, measured faster); ``jax.pmap`` takes no compile options and runs XLA's defaults.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convlib.ops.checks import check_choice
from convlib.ops.compiler import compiler_options
from convlib.train.state import TrainState, is_prng_key

PARALLEL_MODES = ("none", "pmap", "sharding", "shard_map")
"""The names :func:`data_parallel` (and :func:`convlib.train.fit`'s `parallel`) takes."""
AXIS = "data"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataParallel:
    """A compiled step pair for one mode, and how to move state and batches to and from its devices.

    train_step: ``(placed state, placed batch) -> (placed state, metrics)``;
    eval_step: ``(placed state, placed batch) -> sums``; see ``convlib.train.steps``.
    put_state / get_state: a ``TrainState`` to its placement and back; place_batch: a batch (checked by
    :meth:`put_batch`) to its placement; to_host: device metrics (fetched) to one copy.
    """

    mode: str
    num_devices: int
    num_local_devices: int
    train_step: Callable
    eval_step: Callable
    put_state: Callable[[TrainState], TrainState]
    get_state: Callable[[TrainState], TrainState] = lambda state: state
    place_batch: Callable[[dict], dict]
    to_host: Callable = lambda metrics: metrics

    def put_batch(self, batch: dict) -> dict:
        """Places a batch ``{"image": (B, ...), "label": (B,), ...}``: the global batch, or across processes this
        process's rows of it; ``B`` must divide by this process's device count."""
        size = batch["label"].shape[0]
        if size % self.num_local_devices:
            where = "" if self.num_local_devices == self.num_devices else " of this process"
            raise ValueError(
                f"batch size {size} is not divisible by the number of devices{where} {self.num_local_devices} "
                f"(parallel={self.mode!r})"
            )
        return self.place_batch(batch)

    def host_metrics(self, metrics: dict) -> dict[str, float]:
        """Device metrics (scalars, or per-device copies under pmap) -> Python floats; waits for the step."""
        return {name: float(value) for name, value in self.to_host(jax.device_get(metrics)).items()}


def _first_copy(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _replicate(tree, n: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def _split_batch(batch: dict, n: int) -> dict:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def _put_replicated(tree, sharding: NamedSharding):
    """Copies ``tree`` to every device of ``sharding``. Across processes ``device_put`` takes host values (and
    checks that every process passes the same); PRNG keys go as their raw data."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        if is_prng_key(x):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


StepMaker = Callable[[str | None], Callable]  # axis_name (None: no named axis) -> step


def _single_device(devices, make_train_step: StepMaker, make_eval_step: StepMaker) -> DataParallel:
    """``jax.jit`` on the first device."""
    put = functools.partial(jax.device_put, device=devices[0])
    options = compiler_options(devices[0].platform)
    return DataParallel(
        mode="none",
        num_devices=1,
        num_local_devices=1,
        train_step=jax.jit(make_train_step(None), donate_argnums=0, compiler_options=options),
        eval_step=jax.jit(make_eval_step(None), compiler_options=options),
        put_state=put,
        place_batch=put,
    )


def _pmapped(devices, make_train_step: StepMaker, make_eval_step: StepMaker) -> DataParallel:
    """``jax.pmap``: state stacked on a leading device axis, batches split into ``(D, B / D, ...)``."""
    n = len(devices)
    return DataParallel(
        mode="pmap",
        num_devices=n,
        num_local_devices=n,
        train_step=jax.pmap(make_train_step(AXIS), axis_name=AXIS, devices=devices, donate_argnums=0),
        eval_step=jax.pmap(make_eval_step(AXIS), axis_name=AXIS, devices=devices),
        put_state=lambda state: _replicate(state, n),
        get_state=_first_copy,
        place_batch=lambda batch: _split_batch(batch, n),
        to_host=_first_copy,
    )


def _on_mesh(mode: str, devices, make_train_step: StepMaker, make_eval_step: StepMaker) -> DataParallel:
    """``"sharding"`` (XLA partitions one global step) or ``"shard_map"`` (explicit collectives) over a 1-D mesh."""
    mesh = Mesh(np.asarray(devices), (AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    jit = functools.partial(jax.jit, compiler_options=compiler_options(devices[0].platform))
    if mode == "sharding":
        train_step = jit(
            make_train_step(None),
            in_shardings=(replicated, sharded),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        eval_step = jit(make_eval_step(None), in_shardings=(replicated, sharded), out_shardings=replicated)
    else:
        # check_vma=False: pmap's semantics, so one axis-named step serves both. (With check_vma=True, the gradient
        # of a per-device loss w.r.t. replicated parameters comes back already summed over devices.)
        specs = {"in_specs": (PartitionSpec(), PartitionSpec(AXIS)), "mesh": mesh, "check_vma": False}
        train_step = jit(
            jax.shard_map(make_train_step(AXIS), out_specs=(PartitionSpec(), PartitionSpec()), **specs),
            donate_argnums=0,
        )
        eval_step = jit(jax.shard_map(make_eval_step(AXIS), out_specs=PartitionSpec(), **specs))
    return DataParallel(
        mode=mode,
        num_devices=len(devices),
        num_local_devices=sum(d.process_index == jax.process_index() for d in devices),
        train_step=train_step,
        eval_step=eval_step,
        put_state=lambda state: _put_replicated(state, replicated),
        place_batch=lambda batch: jax.make_array_from_process_local_data(sharded, batch),
    )


def data_parallel(
    mode: str,
    make_train_step: StepMaker,
    make_eval_step: StepMaker,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> DataParallel:
    """Compiles the steps for ``mode``.

    make_train_step / make_eval_step: ``axis_name -> step`` (``None`` for the modes without a named axis), e.g.
    ``functools.partial(convlib.train.make_train_step, graphdef, tx, loss)`` taking ``axis_name=``.
    devices: the devices to use (default: all, of every process); ``"none"`` uses the first.
    """
    check_choice("parallel", mode, PARALLEL_MODES)
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: d.process_index)
    local = sum(d.process_index == jax.process_index() for d in devices)
    if mode in ("none", "pmap") and local < len(devices):
        raise ValueError(
            f"parallel={mode!r} runs on this process's devices only; across processes use 'sharding' or 'shard_map'"
        )
    if mode == "none":
        return _single_device(devices, make_train_step, make_eval_step)
    if mode == "pmap":
        return _pmapped(devices, make_train_step, make_eval_step)
    return _on_mesh(mode, devices, make_train_step, make_eval_step)

"""Orbax checkpoints of a ``TrainState`` plus JSON metadata (step, data position, ...).

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed while saving
leaves the previous checkpoints intact, and ``latest_step`` only sees complete ones.

Across processes (``convlib.train.distributed``), every process opens the same directory (storage they all see) and
calls ``save`` / ``restore`` together: Orbax writes each array once, from the process holding it, and process 0 (the
primary host) creates and finalises the folder, with barriers between them.
"""

import os

import jax
import orbax.checkpoint as ocp

from convlib.train.state import TrainState, is_prng_key


def _keys_to_data(state: TrainState) -> TrainState:
    """Typed PRNG keys -> their raw uint32 data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, state)


def _abstract_saved(like: TrainState) -> TrainState:
    """Shape/dtype/sharding of what ``save`` writes for a state shaped like ``like``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(like))


class Checkpoints:
    """Saves and restores ``TrainState``s under ``directory`` (one sub-folder per step; keeps the newest
    ``max_to_keep``)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep!r}")
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=False,
                create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint on disk now (also one written by another process), or ``None``."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints kept on disk."""
        self._manager.reload()
        return list(self._manager.all_steps())

    def save(self, state: TrainState, meta: dict) -> None:
        """Writes ``state`` and the JSON-serialisable ``meta`` under step ``int(state.step)``; returns when on disk."""
        step = int(jax.device_get(state.step))
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """``(state, meta)`` of checkpoint ``step`` (default: the newest); ``like`` gives the tree structure, shapes,
        dtypes, shardings and PRNG key implementations."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract_saved(like)), meta=ocp.args.JsonRestore()),
        )
        state = jax.tree.map(
            lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if is_prng_key(ref) else x,
            restored.state,
            like,
        )
        return state, restored.meta

    def close(self) -> None:
        self._manager.close()

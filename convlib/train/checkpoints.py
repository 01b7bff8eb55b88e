"""Orbax checkpoints of a ``TrainState`` plus JSON metadata (step, data position, ...).

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed while saving
leaves the previous checkpoints intact, and ``latest_step`` only sees complete ones.

Orbax cannot tell a flipped byte or a truncated file from good data, so every saved step also carries a manifest
(``convlib.sha256.json``: the SHA-256 of each of its files, written last, by process 0). :meth:`Checkpoints.verify`
checks a step against it; a step without one was cut off before its save finished (killed between Orbax's commit
and the manifest), and a resume treats it as no checkpoint.

Across processes (``convlib.train.distributed``), every process opens the same directory (storage they all see) and
calls ``save`` / ``restore`` together: Orbax writes each array once, from the process holding it, and process 0 (the
primary host) creates and finalises the folder, with barriers between them.
"""

import hashlib
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from convlib.train.atomic_files import write_json
from convlib.train.state import TrainState, is_prng_key

MANIFEST = "convlib.sha256.json"


class CheckpointError(ValueError):
    """A checkpoint that a resume cannot continue from."""


class CorruptCheckpointError(CheckpointError):
    """It fails its checksums (with ``on_corrupt="stop"``), or no intact checkpoint is left."""


class CheckpointMismatchError(CheckpointError):
    """It was made by another model, optimiser or run."""


def _keys_to_data(state: TrainState) -> TrainState:
    """Typed PRNG keys -> their raw uint32 data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, state)


def signature(state: TrainState) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of every array of ``state``: what a checkpoint must match to be restored into it."""
    leaves = jax.tree_util.tree_flatten_with_path(_keys_to_data(state))[0]
    return {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)] for path, x in leaves}


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (the manifest aside), by path relative to it."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            with open(path, "rb") as f:
                digests[path.relative_to(folder).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


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
        if jax.process_index() == 0:
            folder = self.folder(step)
            write_json(folder / MANIFEST, _digests(folder))
        self._sync(f"convlib_manifest_{step}")

    def folder(self, step: int) -> Path:
        """The folder of checkpoint ``step``."""
        return Path(self._manager.directory) / str(step)

    def finished(self, step: int) -> bool:
        """Whether the save of checkpoint ``step`` got as far as its manifest (intact or not)."""
        return (self.folder(step) / MANIFEST).exists()

    def verify(self, step: int) -> str | None:
        """``None`` if checkpoint ``step`` is intact (every file as saved), else what is wrong, naming the file."""
        folder = self.folder(step)
        try:
            expected = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            return f"{folder / MANIFEST} is missing: the save did not finish"
        except (OSError, ValueError) as error:
            return f"{folder / MANIFEST} is unreadable ({error})"
        found = _digests(folder)
        for name, digest in expected.items():
            if name not in found:
                return f"{folder / name} is missing"
            if found[name] != digest:
                return f"{folder / name} differs from what was saved (SHA-256 mismatch)"
        return None

    def set_aside(self, step: int) -> Path:
        """Renames checkpoint ``step`` to ``<step>.corrupt`` (kept for inspection, no longer a step); returns it."""
        target = self.folder(step).with_name(f"{step}.corrupt")
        if jax.process_index() == 0:
            n = 1
            while target.exists():
                target, n = self.folder(step).with_name(f"{step}.corrupt.{n}"), n + 1
            self.folder(step).rename(target)
        self._sync(f"convlib_set_aside_{step}")
        self._manager.reload()
        return target

    @staticmethod
    def _sync(name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """``(state, meta)`` of checkpoint ``step`` (default: the newest); ``like`` gives the tree structure, shapes,
        dtypes, shardings and PRNG key implementations."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
        saved = self.meta(step).get("signature")
        if saved is not None and saved != signature(like):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self._manager.directory} {_difference(saved, signature(like))}"
            )
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

    def meta(self, step: int) -> dict:
        """The JSON metadata saved with checkpoint ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self._manager.close()


def _difference(saved: dict[str, list], wanted: dict[str, list]) -> str:
    """Says how a checkpoint's arrays differ from the state it should restore into (a different model or optimiser)."""
    only_saved, only_wanted = sorted(saved.keys() - wanted.keys()), sorted(wanted.keys() - saved.keys())
    if only_saved or only_wanted:
        sides = [
            f"{len(paths)} arrays only {where} (first: {paths[0]})"
            for paths, where in ((only_saved, "in the checkpoint"), (only_wanted, "in this run"))
            if paths
        ]
        return f"was made by a different model or optimiser: {', '.join(sides)}"
    path = next(p for p in saved if saved[p] != wanted[p])  # in the state's order: step, params, ...

    def described(shape, dtype) -> str:
        return f"{dtype}[{', '.join(map(str, shape))}]"

    return (
        f"was made by a different model or optimiser: {path} is {described(*saved[path])} there, "
        f"{described(*wanted[path])} here"
    )

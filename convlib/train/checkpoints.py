"""Orbax checkpoints of a ``TrainState`` plus JSON metadata (step, data position, ...).

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed while saving
leaves the previous checkpoints intact, and ``latest_step`` only sees complete ones.

Orbax cannot tell a flipped byte or a truncated file from good data, so every saved step also carries a manifest
(``convlib.sha256.json``: the SHA-256 of each of its files, written last, by process 0). :meth:`Checkpoints.verify`
checks a step against it; a step without one was cut off before its save finished (killed between Orbax's commit
and the manifest), and a resume treats it as no checkpoint.

A run's checkpoints (:meth:`Checkpoints.resume`, :meth:`Checkpoints.checkpoint`) also carry where the data
stands and a JSON description of the run; a resume trusts only intact checkpoints with finite parameters of the same
run, and falls back past damaged ones.

Across processes (``convlib.train.distributed``), every process opens the same directory (storage they all see) and
calls ``save`` / ``restore`` together: Orbax writes each array once, from the process holding it, and process 0 (the
primary host) creates and finalises the folder, with barriers between them.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from convlib.ops.checks import check_choice
from convlib.train.atomic_files import as_disk_full, write_json
from convlib.train.state import TrainState, is_prng_key

MANIFEST = "convlib.sha256.json"
Resume = Literal["never", "auto", "require"]
"""What a run does with a checkpoint it finds: "never" starts afresh (and refuses a folder holding one), "auto"
resumes from the newest intact one if there is one, "require" resumes or refuses to start."""
RESUME = get_args(Resume)
"""The values of :data:`Resume`, for choices and checks."""
ON_CORRUPT = ("fall_back", "stop")


def legacy_resume(resume):
    """The :data:`Resume` of the older bool form (True: "auto", False: "never"); anything else passes unchanged."""
    return {True: "auto", False: "never"}[resume] if isinstance(resume, bool) else resume


class CheckpointError(ValueError):
    """A checkpoint that a resume cannot continue from."""


class CorruptCheckpointError(CheckpointError):
    """It fails its checksums (with ``on_corrupt="stop"``), or no intact checkpoint is left."""


class CheckpointMismatchError(CheckpointError):
    """It was made by another model, optimiser or run; ``key``: the first key of the run description that differs
    (None: other arrays, or where the data stands)."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class CheckpointExistsError(CheckpointError):
    """A run that does not resume found a checkpoint in its folder. ``directory``, ``step``: where and which."""

    def __init__(self, directory: str, step: int):
        self.directory, self.step = directory, step
        super().__init__(
            f"checkpoint_dir {directory!r} already holds a checkpoint (step {step}); pass resume='auto' "
            "(resume=True in the keyword form) to continue it, or choose an empty folder"
        )


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """``resume="require"`` found no checkpoint to continue."""


class NonFiniteParametersError(FloatingPointError):
    """A state to be saved holds NaN/inf parameters (training diverged); nothing was saved."""


def _first_non_finite(state: TrainState) -> str | None:
    """The path of the first parameter array of ``state`` holding NaN/inf, or None."""
    for path, p in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        if not bool(jnp.all(jnp.isfinite(p))):
            return f"parameter {jax.tree_util.keystr(path)}"
    return None


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
    ``max_to_keep``), and a run's checkpoints: :meth:`resume` and :meth:`checkpoint` (every ``every`` steps in
    :func:`convlib.train.fit`).

    steps_per_epoch: where the data stands, saved with each checkpoint. run: a JSON description of the run (model,
    recipe, data, length) saved with each checkpoint; a resume whose ``run`` differs is refused naming the first
    key that differs. on_corrupt: a newest checkpoint failing its checksums or holding non-finite parameters is set
    aside (renamed ``<step>.corrupt``) and the run falls back to the newest intact one (``"fall_back"``), or stops
    (``"stop"``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        every: int = 0,
        steps_per_epoch: int | None = None,
        run: dict | None = None,
        on_corrupt: str = "fall_back",
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep!r}")
        self.directory, self.every, self.steps_per_epoch = os.fspath(directory), every, steps_per_epoch
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ON_CORRUPT)
        # as it reads back from the JSON metadata (tuples become lists); refuses what JSON cannot hold
        self.run = None if run is None else json.loads(json.dumps(run, allow_nan=False))
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=False,
                create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
            ),
        )
        self.last_saved = self.latest_step()

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
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                folder = self.folder(step)
                write_json(folder / MANIFEST, _digests(folder))
        except Exception as error:  # Orbax wraps the OSError of a full disk
            needed = sum(x.nbytes for x in jax.tree.leaves(_keys_to_data(state)))
            full = as_disk_full(error, self.folder(step), needed)
            if full is None or full is error:
                raise
            raise full from error
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

    # --- a run's checkpoints ----------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after update ``step`` (every ``every`` steps)."""
        return self.every > 0 and step % self.every == 0

    def resume(self, state: TrainState, resume: Resume) -> TrainState:
        """The newest usable checkpoint's state (else ``state``), as ``resume`` asks (see :data:`RESUME`): a
        folder that holds one is refused with ``"never"`` (:class:`CheckpointExistsError`), and one without any
        with ``"require"`` (``FileNotFoundError``)."""
        if resume == "never":
            if self.last_saved is not None:
                raise CheckpointExistsError(self.directory, self.last_saved)
            return state
        damaged_finished = False
        for step in sorted(self.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is None:
                self._check_same_run(step, self.meta(step))
                restored = self.restore(state, step)[0]
                bad = _first_non_finite(restored)
                if bad is None:
                    self.last_saved = step
                    return restored
                problem = f"{bad} holds non-finite values"
            if self.on_corrupt == "stop":
                raise CorruptCheckpointError(f"checkpoint step {step} is corrupt: {problem}")
            damaged_finished |= self.finished(step)
            moved = self.set_aside(step)
            warnings.warn(f"checkpoint step {step} is corrupt: {problem}; set aside as {moved.name}", stacklevel=3)
        self.last_saved = None
        if damaged_finished:  # a finished checkpoint failed: its run cannot go on from there
            raise CorruptCheckpointError(
                f"no intact checkpoint left in {self.directory!r} (the corrupt ones are set aside)"
            )
        if resume == "require":  # saves cut off before their manifests were never checkpoints
            raise NoCheckpointError(f"resume='require' but checkpoint_dir {self.directory!r} holds no checkpoint")
        warnings.warn(f"no checkpoint in {self.directory!r} to resume: training starts at step 0", stacklevel=3)
        return state

    def _check_same_run(self, step: int, meta: dict) -> None:
        if self.run is not None and meta.get("run", self.run) != self.run:
            saved = meta["run"]
            key = next(k for k in sorted(saved.keys() | self.run.keys()) if saved.get(k) != self.run.get(k))
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory!r} belongs to a different run: {key} is "
                f"{saved.get(key)!r} there, {self.run.get(key)!r} here",
                key=key,
            )
        if self.steps_per_epoch is not None and meta["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointMismatchError(
                f"steps_per_epoch={self.steps_per_epoch} differs from the checkpoint's {meta['steps_per_epoch']}"
            )

    def checkpoint(self, state: TrainState) -> None:
        """Saves ``state`` (on the host) under its step, with where the data stands and the run; refuses
        non-finite parameters (:class:`NonFiniteParametersError`, nothing saved)."""
        step = int(state.step)
        bad = _first_non_finite(state)
        if bad is not None:
            raise NonFiniteParametersError(f"{bad} holds non-finite values at step {step}")
        epoch, batch = divmod(step, self.steps_per_epoch)
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": self.steps_per_epoch}
        meta |= {"signature": signature(state)} | ({} if self.run is None else {"run": self.run})
        Checkpoints.save(self, state, meta)
        self.last_saved = step


class Checkpointer(Checkpoints):
    """Deprecated: :class:`Checkpoints` with ``every``, ``steps_per_epoch``, ``run`` and ``on_corrupt`` is a run's
    checkpoints; ``restore(state, resume)`` is :meth:`Checkpoints.resume`, ``save(state)`` is
    :meth:`Checkpoints.checkpoint`."""

    def __init__(self, directory, *, every: int, steps_per_epoch: int, run=None, on_corrupt: str = "fall_back"):
        warnings.warn(
            "Checkpointer is deprecated: use Checkpoints(directory, every=..., steps_per_epoch=..., run=..., "
            "on_corrupt=...) and its resume() / checkpoint()",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(directory, every=every, steps_per_epoch=steps_per_epoch, run=run, on_corrupt=on_corrupt)

    def restore(self, state, resume=None, *args):
        if isinstance(resume, bool | str):  # the old (state, resume) form
            return self.resume(state, legacy_resume(resume))
        return super().restore(state, resume, *args)

    def save(self, state, meta=None) -> None:
        if meta is None:  # the old (state) form
            self.checkpoint(state)
        else:
            super().save(state, meta)


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

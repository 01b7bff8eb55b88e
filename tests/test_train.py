"""Tests of convlib.train on CPU with tiny inline models and synthetic batches.

Run as a script (``python tests/test_train.py resume-child ...``) it is the child process of the kill-and-resume test.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convlib.train as T

CHILD_TIMEOUT_S = 120


class TinyCNN(nnx.Module):
    """Conv(3x3, 4) -> BatchNorm -> ReLU -> [Dropout] -> global mean -> Linear(3). x: (N, 8, 8, 1) -> (N, 3)."""

    def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.0):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        if self.drop is not None:
            x = self.drop(x)
        return self.head(x.mean(axis=(1, 2)))


def synthetic_data(n: int = 64, seed: int = 0):
    """Images (n, 8, 8, 1) float32 and labels (n,) in {0, 1, 2} that a tiny CNN can learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) * 0.5
    images[labels == 1, :4] += 1.0
    images[labels == 2, :, :4] -= 1.0
    return images, labels


def epoch_batches_for(images, labels, batch_size: int, seed: int = 0, nan_at: int | None = None):
    """``epoch -> batches``: a permutation that depends only on (seed, epoch); ``nan_at`` poisons that global batch."""
    per_epoch = len(labels) // batch_size

    def epoch_batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(labels))
        for i in range(per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = images[idx]
            if nan_at == epoch * per_epoch + i:
                x = np.full_like(x, np.nan)
            yield {"image": jnp.asarray(x), "label": jnp.asarray(labels[idx])}

    return epoch_batches


def tiny_optimizer(total_steps: int):
    schedule = T.make_schedule("cosine", 0.1, total_steps=total_steps, warmup_steps=1)
    return T.make_optimizer("nesterov", schedule, weight_decay=1e-4), schedule


TINY_RECIPE = T.Recipe(optimizer="nesterov", learning_rate=0.1, warmup_steps=1, weight_decay=1e-4, crop_padding=1)
RESUMES = {False: "never", True: "auto", "require": "require"}


def tiny_fit(
    tmp=None,
    *,
    epochs=2,
    batch_size=16,
    dropout=0.1,
    nan_at=None,
    max_steps=None,
    checkpoint_every=0,
    resume=False,
    run_config=None,
    on_corrupt_checkpoint="fall_back",
    model=None,
):
    """A few-step run of ``fit`` on the tiny CNN (or ``model``); ``tmp``: folder for checkpoints and the metrics
    log. ``nan_at``: the global batch whose images are NaN (through the keyword form, which takes any batches)."""
    model = model or TinyCNN(rngs=nnx.Rngs(0, dropout=1), dropout=dropout)
    images, labels = synthetic_data()
    checkpoints = None
    if tmp is not None:
        checkpoints = T.CheckpointConfig(
            directory=os.path.join(tmp, "ckpt"),
            every=checkpoint_every,
            resume=RESUMES[resume],
            run_config=run_config,
            on_corrupt=on_corrupt_checkpoint,
        )
    log = T.LogConfig(metrics_path=None if tmp is None else os.path.join(tmp, "metrics.jsonl"))
    if nan_at is not None:
        tx, schedule = tiny_optimizer(epochs * len(labels) // batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return T.fit(
                model,
                tx,
                epoch_batches_for(images, labels, batch_size, nan_at=nan_at),
                steps_per_epoch=len(labels) // batch_size,
                epochs=epochs,
                key=jax.random.key(0),
                learning_rate=schedule,
                checkpoint_dir=checkpoints.directory,
                checkpoint_every=checkpoint_every,
                metrics_path=log.metrics_path,
            )
    return T.fit(
        model,
        TINY_RECIPE,
        (images, labels),
        (images, labels),
        key=jax.random.key(0),
        loop=T.LoopConfig(batch_size=batch_size, epochs=epochs, steps=max_steps, eval_batch_size=24),
        checkpoints=checkpoints,
        log=log,
    )


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in records]


def flat_state(state) -> dict[str, np.ndarray]:
    """Every array leaf of (params, rest, opt_state) by path, PRNG keys as raw data."""
    tree = (state.params, state.rest, state.opt_state)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path): np.asarray(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for path, x in leaves
    }


# --- optimisers, schedules, losses ---------------------------------------------------------------------------------


def test_piecewise_schedule_values_at_boundaries():
    schedule = T.make_schedule("piecewise", 0.1, total_steps=64_000, boundaries=(32_000, 48_000))
    values = {s: float(schedule(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)}
    assert values == pytest.approx({0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001, 63_999: 0.001})
    default = T.make_schedule("piecewise", 0.1, total_steps=64_000)  # He et al.'s 1/2 and 3/4 of the run
    assert float(default(31_999)) == pytest.approx(0.1) and float(default(48_000)) == pytest.approx(0.001)


def test_piecewise_schedule_warm_up():
    """He et al.'s ResNet-110 recipe: 0.01 for the first steps, then 0.1, /10 at 32k and 48k."""
    schedule = T.make_schedule("piecewise", 0.1, total_steps=64_000, boundaries=(32_000, 48_000), warmup_steps=400)
    values = {s: float(schedule(s)) for s in (0, 399, 400, 31_999, 32_000, 48_000)}
    assert values == pytest.approx({0: 0.01, 399: 0.01, 400: 0.1, 31_999: 0.1, 32_000: 0.01, 48_000: 0.001})
    with pytest.raises(ValueError, match="warmup_steps"):
        T.make_schedule("piecewise", 0.1, total_steps=10, warmup_steps=10)


def test_cosine_and_constant_schedules():
    schedule = T.make_schedule("cosine", 0.2, total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.1)
    assert float(schedule(10)) == pytest.approx(0.2)
    assert float(schedule(55)) == pytest.approx(0.1, rel=1e-5)  # half-way through the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    assert float(T.make_schedule("constant", 0.3, total_steps=5)(4)) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: T.make_schedule("linear", 0.1, total_steps=10), "'linear'"),
        (lambda: T.make_schedule("cosine", 0.1, total_steps=10, warmup_steps=10), "warmup_steps"),
        (lambda: T.make_schedule("piecewise", 0.1, total_steps=10, boundaries=(8, 4)), "boundaries"),
        (lambda: T.make_optimizer("rmsprop", 0.1), "'rmsprop'"),
        (lambda: T.make_optimizer("sgd", 0.1, weight_decay=-1.0), "weight_decay"),
        (lambda: T.make_loss("hinge"), "'hinge'"),
        (lambda: T.data_parallel("ring", None, None), "'ring'"),
    ],
)
def test_bad_names_and_values_raise_value_error(call, word):
    with pytest.raises(ValueError, match=word):
        call()


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
def test_weight_decay_reaches_kernels_only(name):
    model = TinyCNN(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    params = jax.tree.map(lambda p: p + 1.0, params)  # biases and BatchNorm offsets non-zero too
    tx = T.make_optimizer(name, 0.1, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    changed = {
        jax.tree_util.keystr(path): bool(jnp.any(u != 0))
        for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    assert changed == {path: "kernel" in path for path in changed}, changed
    assert sum(changed.values()) == 2  # conv and linear kernels


def test_rbf_loss_matches_lecun_eq_9():
    distances = jnp.array([[0.5, 3.0, 2.0], [4.0, 1.0, 0.2]])
    labels = jnp.array([0, 1])
    j = 1.5
    expected = [
        d[c] + math.log(math.exp(-j) + sum(math.exp(-v) for v in d)) for d, c in zip(distances.tolist(), [0, 1])
    ]
    np.testing.assert_allclose(T.rbf_loss(distances, labels, j), expected, rtol=1e-6)
    assert T.rbf(j).predict(distances).tolist() == [0, 2]  # nearest prototype
    # The gradient pushes the correct distance down and the others up.
    grad = jax.grad(lambda d: T.rbf_loss(d, labels, j).sum())(distances)
    assert grad[0, 0] > 0 and grad[0, 1] < 0 and grad[1, 1] > 0 and grad[1, 2] < 0


# --- the loop --------------------------------------------------------------------------------------------------------


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    result = tiny_fit(str(tmp_path), epochs=4)
    steps = [r for r in result.records if r["kind"] == "step"]
    epochs = [r for r in result.records if r["kind"] == "epoch"]
    assert len(steps) == 16 and [r["step"] for r in steps] == list(range(1, 17))
    assert np.mean([r["loss"] for r in steps[-4:]]) < 0.8 * np.mean([r["loss"] for r in steps[:4]])
    assert epochs[-1]["test_accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert steps[0]["learning_rate"] == pytest.approx(0.0) and steps[1]["learning_rate"] == pytest.approx(0.1)
    assert T.read_jsonl(tmp_path / "metrics.jsonl") == result.records
    assert result.images_per_s > 0
    # The model passed in carries the final variables.
    model_params = nnx.state(result.model, nnx.Param)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), model_params, result.state.params)))
    T.plot_history(result.records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_identical_metrics_and_params():
    first, second = tiny_fit(epochs=1), tiny_fit(epochs=1)
    assert without_times(first.records) == without_times(second.records)
    a, b = flat_state(first.state), flat_state(second.state)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(T.NonFiniteLossError, match="at step 6") as error:
        tiny_fit(str(tmp_path), nan_at=5, checkpoint_every=2)
    assert error.value.step == 6 and error.value.last_checkpoint == 4
    checkpoints = T.Checkpoints(tmp_path / "ckpt")
    assert checkpoints.latest_step() == 4
    model = TinyCNN(rngs=nnx.Rngs(0, dropout=1), dropout=0.1)
    _, like = T.create_train_state(model, tiny_optimizer(8)[0], jax.random.key(0))
    state, meta = checkpoints.restore(like)
    assert int(state.step) == 4 and meta["batch_in_epoch"] == 0 and meta["epoch"] == 1
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params))
    assert T.read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == 6  # the bad step is logged


def test_non_finite_loss_between_checkpoints_is_caught_at_its_own_step(tmp_path):
    # fit reads a step's metrics while the next one runs; step 6 is neither an epoch end (4 steps an epoch) nor a
    # checkpoint, so step 7 is under way when its NaN is read: the error, the log and the saves stop at step 6.
    with pytest.raises(T.NonFiniteLossError, match="at step 6") as error:
        tiny_fit(str(tmp_path), nan_at=5, checkpoint_every=4)
    assert error.value.step == 6 and error.value.last_checkpoint == 4
    assert T.Checkpoints(tmp_path / "ckpt").all_steps() == [4]
    assert [r["step"] for r in T.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"] == list(range(1, 7))


def test_max_steps_ends_in_a_partial_epoch_with_a_final_checkpoint(tmp_path):
    result = tiny_fit(str(tmp_path), epochs=3, max_steps=6, checkpoint_every=4)
    assert [r["step"] for r in result.records if r["kind"] == "step"] == list(range(1, 7))
    assert [(r["epoch"], r["step"]) for r in result.records if r["kind"] == "epoch"] == [(0, 4), (1, 6)]
    assert sorted(T.Checkpoints(tmp_path / "ckpt").all_steps()) == [4, 6]


def test_existing_checkpoint_needs_resume_and_a_finished_run_resumes_as_is(tmp_path):
    finished = tiny_fit(str(tmp_path), epochs=1)
    with pytest.raises(ValueError, match="resume=True"):
        tiny_fit(str(tmp_path), epochs=1)
    again = tiny_fit(str(tmp_path), epochs=1, resume=True)
    assert again.records == finished.records
    a, b = flat_state(finished.state), flat_state(again.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_each_checkpoint_finds_its_steps_already_in_the_metrics_file(tmp_path, monkeypatch):
    # a process killed right after a checkpoint's save must find every step up to it in the log on resume
    logged_at_save = {}
    save = T.Checkpoints.save

    def save_and_look(self, state, meta):
        save(self, state, meta)
        logged = {r["step"] for r in T.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"}
        logged_at_save[meta["step"]] = logged

    monkeypatch.setattr(T.Checkpoints, "save", save_and_look)
    tiny_fit(str(tmp_path), epochs=2, checkpoint_every=3)
    assert logged_at_save == {step: set(range(1, step + 1)) for step in (3, 6, 8)}


# --- kill and resume ------------------------------------------------------------------------------------------------


def run_child(folder, *, slow: bool) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "resume-child", str(folder), "1" if slow else "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def resume_child(folder: str, slow: bool) -> None:
    """Trains 3 epochs x 4 steps, checkpointing every 3 steps (mid-epoch); saves the final state to state.npz."""
    images, labels = synthetic_data()
    batches = epoch_batches_for(images, labels, 16)

    def slow_batches(epoch):
        for batch in batches(epoch):
            time.sleep(0.5 if slow else 0)
            yield batch

    result = T.fit(
        TinyCNN(rngs=nnx.Rngs(0, dropout=1), dropout=0.1),
        T.make_optimizer("adamw", T.make_schedule("cosine", 0.05, total_steps=12, warmup_steps=2), weight_decay=1e-2),
        slow_batches,
        steps_per_epoch=4,
        epochs=3,
        key=jax.random.key(0),
        augment=lambda key, x: x + 0.01 * jax.random.normal(key, x.shape),
        checkpoint_dir=os.path.join(folder, "ckpt"),
        checkpoint_every=3,
        resume=True,
        metrics_path=os.path.join(folder, "metrics.jsonl"),
    )
    np.savez(os.path.join(folder, "state.npz"), **flat_state(result.state))


def has_a_finished_checkpoint(checkpoints) -> bool:
    """Orbax's commit and then the manifest: a kill between the two leaves no checkpoint to resume."""
    latest = checkpoints.latest_step()
    return latest is not None and checkpoints.finished(latest)


def test_sigkill_and_resume_reaches_the_same_final_state(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = run_child(straight, slow=False)
    victim = run_child(killed, slow=True)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        checkpoints = T.Checkpoints(killed / "ckpt")
        while not has_a_finished_checkpoint(checkpoints) and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        assert victim.returncode == -signal.SIGKILL
        assert 3 <= checkpoints.latest_step() < 12, "the run must be killed mid-way, after a checkpoint"
        _, err = reference.communicate(timeout=CHILD_TIMEOUT_S)
        assert reference.returncode == 0, err
        resumed = run_child(killed, slow=False)
        _, err = resumed.communicate(timeout=CHILD_TIMEOUT_S)
        assert resumed.returncode == 0, err
    finally:
        for child in (reference, victim):
            if child.poll() is None:
                child.kill()
    a, b = np.load(straight / "state.npz"), np.load(killed / "state.npz")
    assert sorted(a.files) == sorted(b.files)
    assert all(np.array_equal(a[k], b[k]) for k in a.files), [k for k in a.files if not np.array_equal(a[k], b[k])]
    logs = [without_times(T.read_jsonl(folder / "metrics.jsonl")) for folder in (straight, killed)]
    assert logs[0] == logs[1]


if __name__ == "__main__" and sys.argv[1:2] == ["resume-child"]:
    resume_child(sys.argv[2], sys.argv[3] == "1")


# --- checkpoint faults: a resume trusts only verified checkpoints of the same run -----------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run with checkpoints at steps 4 and 8 (and its result): each fault test damages a copy."""
    folder = tmp_path_factory.mktemp("finished")
    return folder, tiny_fit(str(folder), checkpoint_every=4, run_config=RUN)


RUN = {"model": "tiny_cnn", "optimizer": "nesterov", "batch_size": 16}


def copy_of(finished_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished_run[0], folder)
    return folder


def largest_data_file(step_folder):
    return max((p for p in (step_folder / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


FAULTS = {
    # fault name: (damage to the step folder, the file the message must name)
    "truncated file": (lambda step: truncate(largest_data_file(step)), lambda step: largest_data_file(step).name),
    "flipped byte": (lambda step: flip_a_byte(largest_data_file(step)), lambda step: largest_data_file(step).name),
    "missing folder": (lambda step: shutil.rmtree(step / "state"), lambda step: "state"),
    "garbled metadata": (lambda step: (step / "_CHECKPOINT_METADATA").write_text("{garbled"), lambda step: "METADATA"),
    "save cut off before its manifest": (lambda step: (step / "convlib.sha256.json").unlink(), lambda step: "sha256"),
    "garbled manifest": (lambda step: (step / "convlib.sha256.json").write_text("[1,"), lambda step: "sha256"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_intact_one(
    finished_run, tmp_path, fault
):
    folder = copy_of(finished_run, tmp_path)
    damage, named = FAULTS[fault]
    step8 = folder / "ckpt" / "8"
    name = named(step8)
    damage(step8)
    with pytest.warns(UserWarning, match=r"checkpoint step 8 is corrupt") as caught:
        resumed = tiny_fit(str(folder), checkpoint_every=4, run_config=RUN, resume=True)
    assert name in str(caught[0].message)
    assert (folder / "ckpt" / "8.corrupt").is_dir()  # kept for inspection, no longer a step
    # from step 4 the run is replayed exactly: the same final state as the undamaged run
    a, b = flat_state(finished_run[1].state), flat_state(resumed.state)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(T.Checkpoints(folder / "ckpt").all_steps()) == [4, 8]
    assert T.Checkpoints(folder / "ckpt").verify(8) is None


def test_on_corrupt_stop_refuses_and_moves_nothing(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    data_file = largest_data_file(folder / "ckpt" / "8")
    flip_a_byte(data_file)
    with pytest.raises(T.CorruptCheckpointError, match=rf"step 8 is corrupt: .*{data_file.name}.*SHA-256"):
        tiny_fit(str(folder), checkpoint_every=4, run_config=RUN, resume=True, on_corrupt_checkpoint="stop")
    assert (folder / "ckpt" / "8").is_dir() and not (folder / "ckpt" / "8.corrupt").exists()


def test_no_intact_checkpoint_left_is_an_error(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    for step in (4, 8):
        truncate(largest_data_file(folder / "ckpt" / str(step)))
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(T.CorruptCheckpointError, match="no intact"):
        tiny_fit(str(folder), checkpoint_every=4, run_config=RUN, resume=True)


def test_saves_cut_off_before_their_manifests_are_no_checkpoint_to_resume(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    for step in (4, 8):
        (folder / "ckpt" / str(step) / "convlib.sha256.json").unlink()
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        tiny_fit(str(folder), checkpoint_every=4, run_config=RUN, resume="require")
    with pytest.warns(UserWarning, match="training starts at step 0"):
        again = tiny_fit(str(folder), checkpoint_every=4, run_config=RUN, resume=True)
    assert without_times(again.records) == without_times(finished_run[1].records)
    a, b = flat_state(finished_run[1].state), flat_state(again.state)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"different run: batch_size is 16 there, 32 here"):
        tiny_fit(str(folder), checkpoint_every=4, run_config={**RUN, "batch_size": 32}, resume=True)


class WiderCNN(TinyCNN):
    """TinyCNN with 5 conv features instead of 4: the same arrays by name, other shapes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv, self.bn = nnx.Conv(1, 5, (3, 3), rngs=rngs), nnx.BatchNorm(5, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)


def test_a_checkpoint_of_another_model_is_refused_naming_the_array(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    with pytest.raises(
        ValueError, match=r"step 8 .* different model or optimiser: .params.* is float32\[4\] there, float32\[5\] here"
    ):
        tiny_fit(str(folder), resume=True, model=WiderCNN(rngs=nnx.Rngs(0, dropout=1)))


def test_metrics_and_json_files_are_strict_json(tmp_path):
    T.write_json(tmp_path / "r.json", {"loss": float("nan"), "best": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail) == {
        "loss": None,
        "best": [None, 1.5],
    }

"""experiments/train.py and convlib.train.fit when the environment misbehaves: two writers, SIGTERM, resumes of
another run, full disks, damaged logs, non-finite checkpoints, bad labels. Each ends in one line (or one named
exception) and leaves --out as it was, or resumes exactly."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_train import TinyCNN, epoch_batches_for, flat_state, synthetic_data, tiny_fit, without_times
from test_train_cli_errors import BASE, one_line_failure, snapshot

import convlib.train as T
from experiments import train as script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train.py")
RUN = [*BASE, "--steps", "6", "--checkpoint-every", "4"]
TIMINGS = ("time_s", "images_per_s", "wall_s", "fit_wall_s", "train_images_per_s", "date", "command", "out")


def finished(tmp_path, *flags):
    """A finished short run in tmp_path/out (checkpoints at steps 4 and 6)."""
    out = tmp_path / "out"
    script.main([*RUN, "--out", str(out), *flags])
    return out


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    return finished(tmp_path_factory.mktemp("finished"))


@pytest.fixture
def stopped_run(finished_once, tmp_path):
    """A copy of the finished run without its results.json: as if stopped right after its last checkpoint."""
    out = tmp_path / "out"
    shutil.copytree(finished_once, out)
    (out / "results.json").unlink()
    return out


def masked(obj):
    """`obj` without timings, dates and paths (what two equal runs may differ in)."""
    if isinstance(obj, dict):
        return {k: masked(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [masked(v) for v in obj]
    return obj


def results_of(out) -> tuple:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    how = ("out", "checkpoint_dir", "resume")  # where and how it was started, not what it computed
    results["config"] = {k: v for k, v in results["config"].items() if k not in how}
    return masked(metrics), masked({k: v for k, v in results.items() if k not in ("machine", "git")})


# --- one writer per folder ------------------------------------------------------------------------------------------


HOLD = (
    "import sys, time\nfrom convlib.train.locks import exclusive\n"
    "with exclusive(sys.argv[1]):\n    print(flush=True)\n    time.sleep(600)"
)


def holder(folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a run training there would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE
    )
    proc.stdout.readline()  # holds it now
    return proc


@pytest.mark.parametrize("where", ["--out", "--checkpoint-dir"])
def test_a_second_writer_is_refused_naming_the_holder_and_writes_nothing(capsys, tmp_path, where):
    out, busy = tmp_path / "out", tmp_path / "busy"
    busy.mkdir()
    (busy / "results.json").write_text("{}")  # an earlier run's files stay as they were
    before = snapshot(busy)
    proc = holder(busy)
    try:
        flags = [*RUN, "--out", str(busy if where == "--out" else out), "--resume"]
        if where == "--checkpoint-dir":
            flags += ["--checkpoint-dir", str(busy)]
        line = one_line_failure(capsys, flags, 2)
    finally:
        proc.kill()
        proc.wait()
    assert where in line and f"{str(busy)!r} is in use by process {proc.pid}" in line, line
    assert snapshot(busy) == {**before, ".convlib.lock": f"{proc.pid}\n".encode()}  # the holder's lock, as it was
    assert not out.exists()


def test_checkpoints_kept_in_the_output_folder_itself_are_one_writer(tmp_path):
    out = tmp_path / "out"
    assert script.main([*RUN, "--out", str(out), "--checkpoint-dir", str(out)])["steps"] == 6
    assert {"4", "6", "results.json"} <= set(os.listdir(out)) and ".convlib.lock" not in os.listdir(out)


def test_a_stale_lock_of_a_killed_run_never_blocks(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".convlib.lock").write_text("999999\n")  # left by a run killed with SIGKILL: no process holds it
    assert script.main([*RUN, "--out", str(out)])["steps"] == 6
    assert sorted(os.listdir(out)) == ["checkpoints", "curves.png", "metrics.jsonl", "results.json"]


def start(out, *flags) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *RUN, "--out", str(out), *flags],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_runs_started_at_once_one_trains_the_other_exits_2(tmp_path):
    out, solo = tmp_path / "out", tmp_path / "solo"
    runs = [start(out), start(out)]
    done = [run.communicate(timeout=300) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], done
    refused = done[[run.returncode for run in runs].index(2)][1]
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --out"), refused
    alone = start(solo)
    alone.communicate(timeout=300)
    assert alone.returncode == 0
    assert results_of(out) == results_of(solo)
    assert sorted(os.listdir(out)) == sorted(os.listdir(solo))


# --- SIGTERM is a graceful stop -------------------------------------------------------------------------------------


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ["--steps", "300", "--checkpoint-every", "25", "--schedule", "constant"]
    reference, victim = start(straight, *flags), start(stopped, *flags)
    try:
        deadline = time.monotonic() + 240
        first = stopped / "checkpoints" / "25" / "convlib.sha256.json"
        while not first.exists() and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.05)
        victim.send_signal(signal.SIGTERM)
        _, err = victim.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert victim.returncode == 143, err
        assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], err
        step = int(lines[0].split("at step ")[1].split(";")[0])
        assert 25 <= step < 300 and f"resume continues from step {step}" in lines[0], lines[0]
        assert not (stopped / "results.json").exists()
        reference.communicate(timeout=240)
        assert reference.returncode == 0
        resumed = start(stopped, *flags, "--resume")
        _, err = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, err
    finally:
        for child in (reference, victim):
            if child.poll() is None:
                child.kill()
    assert results_of(stopped) == results_of(straight)


def sends_itself(signals: int, at: int):
    """Epoch batches of the tiny data that send this process `signals` SIGTERMs while batch `at` is drawn."""
    images, labels = synthetic_data()
    batches = epoch_batches_for(images, labels, 16)

    def epoch_batches(epoch):
        for i, batch in enumerate(batches(epoch)):
            if epoch * 4 + i == at:
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    return epoch_batches


def keyword_fit(folder, epoch_batches, resume=False):
    with pytest.warns(DeprecationWarning):
        return T.fit(
            TinyCNN(rngs=nnx.Rngs(0)),
            T.Recipe(optimizer="sgd", learning_rate=0.1, schedule="constant").tx(8),  # logs its learning rate
            epoch_batches,
            steps_per_epoch=4,
            epochs=2,
            key=jax.random.key(0),
            checkpoint_dir=folder / "ckpt",
            checkpoint_every=4,
            resume=resume,
            metrics_path=folder / "metrics.jsonl",
        )


def test_sigterm_in_the_api_saves_the_step_and_a_second_stops_at_once(tmp_path):
    handler = signal.getsignal(signal.SIGTERM)
    straight = keyword_fit(tmp_path / "straight", sends_itself(0, 0))
    with pytest.raises(T.TrainingInterrupted, match="stopped by SIGTERM at step 6") as stop:
        keyword_fit(tmp_path / "once", sends_itself(1, 5))
    assert stop.value.exit_code == 143 and stop.value.checkpoint == 6
    resumed = keyword_fit(tmp_path / "once", sends_itself(0, 0), resume=True)
    a, b = flat_state(straight.state), flat_state(resumed.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert without_times(resumed.records) == without_times(straight.records)
    with pytest.raises(T.TrainingInterrupted) as stop:  # the second signal: no step finishes, the last save stands
        keyword_fit(tmp_path / "twice", sends_itself(2, 5))
    assert stop.value.exit_code == 143 and stop.value.checkpoint == 4
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_setting_up_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, signum):
    load = script.fashion_training.load_splits

    def load_and_stop(*args, **kwargs):
        loaded = load(*args, **kwargs)
        os.kill(os.getpid(), signum)  # SIGINT: Python's KeyboardInterrupt
        return loaded

    monkeypatch.setattr(script.fashion_training, "load_splits", load_and_stop)
    line = one_line_failure(capsys, [*RUN, "--out", str(tmp_path / "out")], 128 + signum)
    assert f"stopped by {signal.Signals(signum).name} outside a training step" in line, line
    assert not (tmp_path / "out").exists()


# --- resume is honest -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "8"], "--steps/--epochs"),
        (["--steps", "5"], "--steps/--epochs"),
        (["--batch-size", "32", "--warmup-epochs", "0"], "--batch-size"),
        (["--warmup-epochs", "0.5"], "--warmup-epochs"),
        (["--lr", "0.01"], "--lr"),
        (["--crop-padding", "1"], "--crop-padding"),
    ],
)
def test_a_resume_with_other_flags_is_refused_naming_the_flag_and_writes_nothing(capsys, stopped_run, flags, named):
    out = stopped_run
    before = snapshot(out)
    line = one_line_failure(capsys, [*RUN, "--out", str(out), "--resume", *flags], 2)
    assert f"flag {named}" in line, line
    assert snapshot(out) == before  # no metrics.jsonl.incomplete either


def test_a_run_with_a_constant_schedule_may_be_extended(tmp_path):
    constant = ["--schedule", "constant", "--warmup-epochs", "0"]
    out = finished(tmp_path, *constant)
    extended = script.main([*RUN, "--out", str(out), *constant, "--resume", "--steps", "8"])
    straight = script.main([*RUN, "--out", str(tmp_path / "straight"), *constant, "--steps", "8"])
    assert extended["test_accuracy"] == straight["test_accuracy"]
    steps = [[r for r in results_of(folder)[0] if r["kind"] == "step"] for folder in (out, tmp_path / "straight")]
    assert steps[0] == steps[1] and len(steps[0]) == 8


def test_rerunning_an_interrupted_run_without_resume_says_to_add_it(capsys, stopped_run):
    out = stopped_run
    before = snapshot(out)
    line = one_line_failure(capsys, [*RUN, "--out", str(out)], 2)
    assert "holds a checkpoint (step 6)" in line and "add --resume" in line, line
    assert snapshot(out) == before


def test_resuming_a_finished_run_into_a_new_out_is_refused(capsys, finished_once, tmp_path):
    out = finished_once
    new = tmp_path / "new"
    line = one_line_failure(
        capsys, [*RUN, "--out", str(new), "--checkpoint-dir", str(out / "checkpoints"), "--resume"], 2
    )
    assert "holds steps up to 0 but the checkpoint to resume is at step 6" in line, line
    assert not new.exists()


def test_a_damaged_last_line_of_the_log_is_dropped_and_replayed(capsys, finished_once, stopped_run):
    out = stopped_run
    first = results_of(finished_once)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "st')  # a line cut off
    script.main([*RUN, "--out", str(out), "--resume"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "metrics.jsonl line 9 is damaged" in warnings[0], warnings
    assert results_of(out) == first


def test_a_log_damaged_before_the_checkpoint_is_refused(capsys, stopped_run):
    out = stopped_run
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3]) + "{garbled\n" + "".join(lines[4:]))
    line = one_line_failure(capsys, [*RUN, "--out", str(out), "--resume"], 2)
    assert "holds steps up to 3" in line and "line 4 is damaged" in line and "at step 6" in line, line


# --- recovery paths end in one line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--checkpoint-dir", "a_file", "--checkpoint-dir '{}' is an existing file"),
        ("--checkpoint-dir", "a_file/below", "--checkpoint-dir '{}' cannot be created"),
        ("--data-dir", "a_file", "--data-dir must name a folder, got the file '{}'"),
        ("--out", "", "--out must name a folder, got ''"),
        ("--data-dir", "", "--data-dir must name a folder, got ''"),
    ],
)
def test_folders_that_cannot_serve_are_refused_before_any_training(capsys, tmp_path, flag, value, message):
    (tmp_path / "a_file").write_text("x")
    path = str(tmp_path / value) if value else ""
    flags = [*RUN, "--out", str(tmp_path / "out"), flag, path]
    started = time.monotonic()
    line = one_line_failure(capsys, flags, 2)
    assert message.format(path) in line, line
    assert time.monotonic() - started < 5  # refused while parsing the flags, before loading data or compiling
    assert not (tmp_path / "out").exists() or flag == "--out"


def no_space(*args, **kwargs):
    raise RuntimeError("Orbax: failed to write") from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_file_system(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
    out = tmp_path / "out"
    line = one_line_failure(capsys, [*RUN, "--out", str(out)], 1)
    assert line.startswith("train.py: stopped: no space left on the file system mounted at /"), line
    assert "bytes free, about" in line and "needed" in line and "checkpoints" in line, line
    assert not (out / "results.json").exists()


def test_a_full_disk_while_writing_the_results_is_one_line_and_leaves_no_results(capsys, tmp_path, monkeypatch):
    fsync = os.fsync

    def full_for_results(fd):
        if "results.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_results)
    out = tmp_path / "out"
    line = one_line_failure(capsys, [*RUN, "--out", str(out)], 1)
    assert "no space left on the file system mounted at" in line and "results.json" in line, line
    assert not (out / "results.json").exists() and (out / "metrics.jsonl.incomplete").exists()
    monkeypatch.setattr(os, "fsync", fsync)
    assert script.main([*RUN, "--out", str(out), "--resume"])["steps"] == 6  # space again: the run is finished


# --- a checkpoint with non-finite parameters is a corrupt one -------------------------------------------------------


def test_a_checkpoint_with_non_finite_parameters_is_set_aside_and_the_intact_one_restored(tmp_path):
    folder = tmp_path / "run"
    reference = tiny_fit(str(folder), checkpoint_every=4)
    checkpoints = T.Checkpoints(folder / "ckpt")
    state, meta = checkpoints.restore(reference.state, 8)
    poisoned = state._replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params))
    shutil.rmtree(checkpoints.folder(8))
    checkpoints.close()
    checkpoints = T.Checkpoints(folder / "ckpt")
    checkpoints.save(poisoned, meta)  # a valid manifest over NaN parameters
    checkpoints.close()
    assert T.Checkpoints(folder / "ckpt").verify(8) is None
    with pytest.warns(UserWarning, match=r"checkpoint step 8 is corrupt: parameter .* non-finite.*8\.corrupt"):
        resumed = tiny_fit(str(folder), checkpoint_every=4, resume=True)
    a, b = flat_state(reference.state), flat_state(resumed.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (folder / "ckpt" / "8.corrupt").is_dir()


# --- labels are checked at the boundary -----------------------------------------------------------------------------


def labelled(labels):
    images, _ = synthetic_data()
    return images, labels


LABELS = synthetic_data()[1]
BAD_LABELS = [
    (np.where(np.arange(64) == 5, -1, LABELS), ValueError),
    (np.where(np.arange(64) == 5, 3, LABELS), ValueError),  # == num_classes of the tiny CNN
    (LABELS * 3, ValueError),  # 0, 3, 6: a 3-class model given labels of more classes
    (LABELS.astype(np.float32), TypeError),
    (LABELS[:, None], ValueError),
]


@pytest.mark.parametrize("labels, error", BAD_LABELS, ids=["-1", "num_classes", "more classes", "float", "(B, 1)"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_bad_labels_are_named(labels, error, split):
    good = synthetic_data()
    bad = labelled(labels)
    train_split, test_split = (bad, good) if split == "train" else (good, bad)
    with pytest.raises(error, match="labels"):
        T.fit(
            TinyCNN(rngs=nnx.Rngs(0)),
            T.Recipe(schedule="constant"),
            train_split,
            test_split,
            key=jax.random.key(0),
            loop=T.LoopConfig(batch_size=64, epochs=1),
        )

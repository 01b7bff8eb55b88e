"""Multi-host data parallelism for real, over loopback: experiments/train.py as 2 processes x 2 CPU devices (JAX's
distributed runtime, gloo collectives) trains exactly like 1 process x 4 devices, resumes from the checkpoints the
processes wrote together, and only process 0 writes files; a process whose coordinator never comes up stops with an
error naming it. Each child is its own process group: when one fails or the deadline passes, all are killed."""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convlib import data
from convlib.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train.py")
DEADLINE_S = 300
# float32: 2 processes sum gradients and BatchNorm moments in another order than 1 process with 4 devices; after 10
# AdamW steps the reassociation error stays near 1e-7, while a wrong row, batch or statistic shows at 1e-2.
TOLERANCE = 1e-5
# ResNet-8 (BatchNorm) on synthetic data: 80 training images = 5 steps of 16 per epoch, 16 test images in eval batches
# of 5 (the last holds 1 row: process 1's share of it is all padding).
FLAGS = [
    "--model",
    "resnet20",
    "--model-option",
    "depth=8",
    "--model-option",
    "widths=[2,4,4]",
    "--synthetic",
    "80",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "5",
    "--schedule",
    "constant",
    "--warmup-epochs",
    "0",
    "--parallel",
    "sharding",
    "--no-progress",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], devices: int, log) -> subprocess.Popen:
    """experiments/train.py with ``args`` on ``devices`` forced CPU devices, in a new process group."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def kill(procs: dict) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path, lines: int = 15) -> str:
    with open(path) as f:
        return "".join([line for line in f if not line.startswith(("W0", "I0", "[Gloo]"))][-lines:])


def run_together(
    tmp_path, runs: dict[str, tuple[list[str], int]], deadline_s: float = DEADLINE_S, procs: dict | None = None
) -> None:
    """Starts ``{name: (args, devices)}`` at once (into ``procs``) and waits for all; on the first failure (or the
    deadline) kills every survivor's process group and fails naming the culprit with the tail of its log."""
    logs = {name: tmp_path / f"{name}.log" for name in runs}
    procs = {} if procs is None else procs
    try:
        for name, (args, devices) in runs.items():
            with open(logs[name], "w") as log:
                procs[name] = start(args, devices, log)
        deadline = time.monotonic() + deadline_s
        while True:
            codes = {name: proc.poll() for name, proc in procs.items()}
            failed = [name for name, code in codes.items() if code not in (None, 0)]
            if failed:
                pytest.fail(
                    f"{failed[0]} exited with {codes[failed[0]]}; killed the others. Its log:\n{tail(logs[failed[0]])}"
                )
            if all(code == 0 for code in codes.values()):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{[n for n, c in codes.items() if c is None]} still running after {deadline_s} s; killed")
            time.sleep(0.2)
    finally:
        kill(procs)


def two_processes(tmp_path, *flags: str) -> dict[str, tuple[list[str], int]]:
    coordinator = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    return {
        f"process{i}": (
            [
                *FLAGS,
                *flags,
                *coordinator,
                "--process-id",
                str(i),
                "--out",
                str(tmp_path / f"out{i}"),
                "--checkpoint-dir",
                str(tmp_path / "checkpoints"),
            ],
            2,
        )
        for i in (0, 1)
    }


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """Every array of an Orbax ``TrainState`` checkpoint, by path, as numpy."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, restore_args=as_numpy)
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 4 devices for 2 epochs, and 2 processes x 2 devices: 1 epoch, then resumed to 2."""
    tmp = tmp_path_factory.mktemp("multihost")
    first = two_processes(tmp, "--epochs", "1")
    run_together(tmp, {"reference": ([*FLAGS, "--epochs", "2", "--out", str(tmp / "reference")], 4), **first})
    after_first = records(tmp / "out0" / "metrics.jsonl")
    run_together(tmp, two_processes(tmp, "--epochs", "2", "--resume"))
    return tmp, after_first


def test_two_processes_train_like_one_and_resume(runs):
    tmp, after_first = runs
    assert [r["step"] for r in after_first if r["kind"] == "step"] == [1, 2, 3, 4, 5]
    one, two = records(tmp / "reference" / "metrics.jsonl"), records(tmp / "out0" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]
    steps = lambda log, key: [r[key] for r in log if r["kind"] == "step"]
    assert steps(two, "batch_size") == [16] * 10
    np.testing.assert_allclose(steps(two, "loss"), steps(one, "loss"), rtol=TOLERANCE, atol=TOLERANCE)
    epochs = lambda log, key: [r[key] for r in log if r["kind"] == "epoch"]
    np.testing.assert_allclose(epochs(two, "test_loss"), epochs(one, "test_loss"), rtol=TOLERANCE, atol=TOLERANCE)
    assert epochs(two, "test_accuracy") == epochs(one, "test_accuracy")
    results = {name: json.loads((tmp / name / "results.json").read_text()) for name in ("reference", "out0")}
    assert results["out0"]["test_accuracy"] == results["reference"]["test_accuracy"]
    assert results["out0"]["machine"]["device_count"] == 4

    assert sorted(os.listdir(tmp / "checkpoints")) == ["10", "5"]
    expected = read_checkpoint(tmp / "reference" / "checkpoints" / "10" / "state")
    final = read_checkpoint(tmp / "checkpoints" / "10" / "state")
    assert final.keys() == expected.keys() and any("mean" in name for name in final), "BatchNorm statistics"
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


def test_only_process_zero_writes_files(runs):
    tmp, _ = runs
    assert sorted(os.listdir(tmp / "out0")) == ["curves.png", "metrics.jsonl", "results.json"]
    assert not (tmp / "out1").exists()
    assert "test accuracy:" in tail(tmp / "process0.log") and "test accuracy:" not in tail(tmp / "process1.log")


def test_a_failed_process_gets_its_peer_killed(tmp_path):
    runs = two_processes(tmp_path)
    runs["process1"][0].extend(["--process-id", "5"])  # exits at once; process 0 would wait for it for 300 s
    procs, started = {}, time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="process1 exited with 2; killed the others") as failure:
        run_together(tmp_path, runs, procs=procs)
    assert "--process-id 5 is out of range for --num-processes 2" in str(failure.value)
    assert time.monotonic() - started < 60 and all(proc.poll() is not None for proc in procs.values())
    assert procs["process0"].returncode == -signal.SIGKILL


def test_process_without_coordinator_stops_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with open(tmp_path / "lonely.log", "w") as log:
        proc = start(
            [
                *FLAGS,
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                "1",
                "--distributed-timeout",
                "5",
                "--out",
                str(tmp_path / "out"),
            ],
            2,
            log,
        )
    try:
        code = proc.wait(timeout=60)
    finally:
        kill({"lonely": proc})
    assert code != 0 and time.monotonic() - started >= 5
    message = tail(tmp_path / "lonely.log", 3)
    assert f"no coordinator answered at {address} within 5 s" in message, message


def test_auto_outside_a_cluster_says_so(tmp_path):
    cluster = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_")  # what JAX's auto-detection reads
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster)}
    done = subprocess.run(
        [sys.executable, SCRIPT, *FLAGS, "--coordinator", "auto", "--distributed-timeout", "5", "--out", str(tmp_path)],
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "coordinator='auto': JAX found no cluster environment" in done.stderr, done.stderr[-2000:]


def test_global_batch_not_divisible_by_devices_is_named(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, *FLAGS, "--batch-size", "6", "--out", str(tmp_path)],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--batch-size 6 is not divisible by the 4 devices (1 processes) of --parallel sharding" in done.stderr


def test_process_batches_split_the_global_batches():
    images = np.arange(22 * 2 * 2).reshape(22, 2, 2, 1).astype(np.float32)
    labels = np.arange(22, dtype=np.int32)
    key = jax.random.key(3)
    whole = list(data.batches(key, images, labels, 6))
    split = [
        list(distributed.process_batches(key, images, labels, 6, process_index=p, process_count=3)) for p in range(3)
    ]
    assert len(whole) == 3 and all(len(parts) == 3 for parts in split)
    for b, batch in enumerate(whole):
        for name in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([split[p][b][name] for p in range(3)]), batch[name])
    # Evaluation: in order, every process yields ceil(5 / 2) = 3 rows per batch; the mask marks the 22 real rows.
    evals = [
        list(
            distributed.process_batches(
                key, images, labels, 5, shuffle=False, drop_remainder=False, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert [len(e) for e in evals] == [5, 5] and all(b["label"].shape == (3,) for e in evals for b in e)
    real = np.concatenate([b["label"][b["mask"] == 1] for batches in zip(*evals) for b in batches])
    np.testing.assert_array_equal(real, labels)
    assert [float(evals[1][-1]["mask"].sum()), float(evals[0][-1]["mask"].sum())] == [0.0, 2.0]


def train_script():
    return importlib.import_module("experiments.train")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "2"], "--num-processes 2 needs --coordinator"),
        (
            ["--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id 2 is out of range for --num-processes 2",
        ),
        (
            ["--coordinator", "10.0.0.1", "--num-processes", "2", "--process-id", "0"],
            "--coordinator must be HOST:PORT or auto, got '10.0.0.1'",
        ),
        (["--coordinator", "10.0.0.1:1234", "--process-id", "0"], "--coordinator 10.0.0.1:1234 needs --num-processes"),
        (["--coordinator", "auto", "--parallel", "none"], "--coordinator needs --parallel sharding or shard_map"),
    ],
)
def test_bad_distributed_flags_are_named(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_script().parse_args(["--parallel", "sharding", *flags])
    assert message in capsys.readouterr().err

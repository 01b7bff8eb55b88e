"""experiments/train.py: every flag is documented, and a few steps on the real data write complete results."""

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "train.py")
TIMEOUT_S = 300


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


def test_help_explains_every_flag():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    flags = set(re.findall(r"^  (--[a-z-]+)", done.stdout, flags=re.M))
    for flag in (
        "--model",
        "--dataset",
        "--batch-size",
        "--epochs",
        "--steps",
        "--optimizer",
        "--lr",
        "--schedule",
        "--weight-decay",
        "--backward",
        "--parallel",
        "--dtype",
        "--seed",
        "--out",
        "--resume",
        "--checkpoint-every",
        "--data-dir",
    ):
        assert flag in flags, flag
    # Every flag line is followed by a description with its default.
    assert done.stdout.count("(default:") >= len(flags) - 3  # --help, --resume/--flip/--no-progress are switches


def test_a_few_steps_write_results_and_resume(tmp_path):
    pytest.importorskip("matplotlib")
    flags = [
        "--synthetic",
        "640",
        "--steps",
        "6",
        "--batch-size",
        "64",
        "--warmup-epochs",
        "0",
        "--checkpoint-every",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    done = run(*flags)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["steps"] == 6 and results["epochs"] == 1
    assert results["model_options"] == {"channels": [16, 32]}  # the main job's lenet5_modern
    assert results["train_images_per_s"] > 0 and results["machine"]["cpu_cores"] >= 1
    assert f"test accuracy: {results['test_accuracy']:.4f}" in done.stdout
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 7))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]

    resumed = run(*flags, "--resume")  # nothing left to train: reports the same result
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]

"""The prepared GPU run (experiments/benchmarks/gpu_suite.py), checked on a CPU: its parts' time limits, its
report from a dry run of the smallest part, and its refusal to time anything without a GPU."""

import json
import sys

import pytest

from experiments.benchmarks import gpu_suite


def test_a_part_past_its_limit_is_cut_off(tmp_path):
    with open(tmp_path / "log", "w") as log:
        status, _ = gpu_suite.run_part([sys.executable, "-c", "import time; time.sleep(60)"], 1, log)
    assert status["cut_off"] and status["exit"] != 0 and status["seconds"] < 40


def test_dry_run_writes_the_report_with_the_goals(tmp_path):
    gpu_suite.main(["--dry-run", "--parts", "layers", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["parts"]["layers"]["exit"] == 0 and not results["parts"]["layers"]["cut_off"]
    assert results["environment"]["versions"]["jax"]
    assert [g["figure"] for g in results["goals"]] == ["quick down: custom/autodiff fwd+bwd"]
    assert "### Goals: " in (tmp_path / "gpu.md").read_text()


def test_without_a_gpu_nothing_is_timed(tmp_path):
    if gpu_suite.jax_backend() == "gpu":
        pytest.skip("a GPU is here")
    results = gpu_suite.main(["--out", str(tmp_path)])
    assert results["parts"] == {} and "not a GPU" in results["skipped"]


def test_unknown_part_is_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--parts", "layers,nope", "--out", "unused"])
    assert "--parts: unknown ['nope']" in capsys.readouterr().err

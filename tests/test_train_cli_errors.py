"""experiments/train.py under bad flags: one line on stderr, exit 2 (1 for a run stopped by non-finite values), no
traceback, and --out as it was. All invocations share this process, through the script's main(argv)."""

import os

import pytest

from experiments import train as script

BASE = ["--synthetic", "256", "--epochs", "2", "--batch-size", "64", "--no-progress"]

BAD_FLAGS = [
    # (flags beyond BASE, a part of the one line)
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--model", "vgg16"], "takes 224x224 images but --input-size is 32"),
    (["--batch-size", "1000"], "--batch-size 1000 exceeds the 256 training images"),
    (["--synthetic", "3"], "--synthetic must be at least 5"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"),
    (["--warmup-epochs", "3"], "--warmup-epochs 3.0 is 12 steps, not fewer than the run's 8"),
    (["--schedule", "piecewise", "--lr-boundaries", "a,b"], "--lr-boundaries"),
    (["--schedule", "piecewise", "--lr-boundaries", "10,5"], "--lr-boundaries"),
    (["--schedule", "piecewise", "--lr-boundaries", "1000"], "must lie inside the run's 8 steps"),
    (["--lr-decay", "-1"], "--lr-decay"),
    (["--momentum", "1.5"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--lr", "0"], "--lr"),
    (["--crop-padding", "-1"], "--crop-padding"),
    (["--crop-padding", "100"], "--crop-padding"),
    (["--input-size", "28"], "--input-size"),
    (["--model-option", "channels"], "--model-option must be KEY=JSON"),
    (["--model-option", "foo=1"], "unknown option 'foo' for lenet5_modern"),
    (["--model-option", "num_classes=5"], "--model-option num_classes=... is set by the script"),
    (["--model-option", "channels=[6,"], "channels"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--loss", "rbf"], "--loss rbf does not fit the model's head"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--model", "lenet5", "--model-option", 'head="rbf"'], "--loss cross_entropy does not fit the model's head"),
    (["--optimizer", "sgdd"], "--optimizer: invalid choice: 'sgdd'"),
    (["--dtype", "int8"], "--dtype: invalid choice"),
    (["--resume=maybe"], "--resume: invalid choice: 'maybe'"),
    (["--resume=require"], "--resume=require: no checkpoint"),
    (["--on-corrupt-checkpoint", "ignore"], "--on-corrupt-checkpoint: invalid choice"),
    (["--num-processes", "2"], "--num-processes 2 needs --coordinator"),
]


def snapshot(folder):
    """Every path below `folder` with its bytes (None: no folder)."""
    if not os.path.exists(folder):
        return None
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def one_line_failure(capsys, argv, code):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_.value.code == code, stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f)[:50] for f, _ in BAD_FLAGS])
@pytest.mark.parametrize("out_exists", [True, False], ids=["earlier run in --out", "no --out yet"])
def test_a_bad_flag_is_one_line_exit_2_and_leaves_out_as_it_was(capsys, tmp_path, flags, message, out_exists):
    out = tmp_path / "out"
    if out_exists:  # an earlier good run's files must survive
        out.mkdir()
        (out / "results.json").write_text('{"test_accuracy": 0.9}\n')
        (out / "metrics.jsonl").write_text('{"kind": "epoch"}\n')
        flags = [*flags, "--resume"] if not any(f.startswith("--resume") for f in flags) else flags
    before = snapshot(out)
    line = one_line_failure(capsys, [*BASE, "--out", str(out), *flags], 2)
    assert line.startswith("train.py: error: ") and message in line, line
    assert snapshot(out) == before


def test_out_that_cannot_hold_the_run_is_refused(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is an existing file" in one_line_failure(capsys, [*BASE, "--out", str(a_file)], 2)
    assert "cannot be created" in one_line_failure(capsys, [*BASE, "--out", str(a_file / "below")], 2)
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    assert "holds a finished run's results.json" in one_line_failure(capsys, [*BASE, "--out", str(finished)], 2)


def test_the_table_is_large():
    assert len(BAD_FLAGS) >= 25


def test_non_finite_loss_is_one_line_exit_1_and_leaves_no_finished_log(capsys, tmp_path):
    out = tmp_path / "out"
    line = one_line_failure(capsys, [*BASE, "--out", str(out), "--lr", "1e30", "--optimizer", "sgd"], 1)
    assert line.startswith("train.py: stopped: ") and "at step" in line, line
    assert not (out / "metrics.jsonl").exists() and not (out / "results.json").exists()


def test_resume_refuses_other_flags_and_falls_back_past_a_corrupt_checkpoint(capsys, tmp_path):
    out = tmp_path / "out"
    flags = [*BASE, "--steps", "6", "--checkpoint-every", "4", "--out", str(out)]
    first = script.main(flags)
    capsys.readouterr()
    line = one_line_failure(capsys, [*flags, "--resume", "--seed", "1"], 2)
    assert "checkpoint step 6" in line and "different run: seed is 0 there, 1 here" in line, line

    data_file = max((out / "checkpoints" / "6" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:-1])  # truncated
    again = script.main([*flags, "--resume"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "checkpoint step 6 is corrupt" in warnings[0] and data_file.name in warnings[0]
    assert (out / "checkpoints" / "6.corrupt").is_dir()
    assert again["test_accuracy"] == first["test_accuracy"]  # steps 5 and 6 replayed exactly

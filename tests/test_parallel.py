"""1 device vs 4 (forced host) devices: pmap, NamedSharding and shard_map training match plain jit.

XLA_FLAGS must be set before jax is imported, so the 4-device runs happen in a child process: this file run as a
script (``python tests/test_parallel.py child OUT``) trains in every mode and writes the results to OUT.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

MODES = ("none", "pmap", "sharding", "shard_map")
DEVICES = 4
CHILD_TIMEOUT_S = 240
# float32: the modes sum the same gradients and BatchNorm moments in a different order (per device, then across);
# after 8 SGD steps the reassociation error stays around 1e-6, far below any real mismatch (which shows at 1e-2).
TOLERANCE = 1e-5


def child(out: str) -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from test_train import TinyCNN, epoch_batches_for, flat_state, synthetic_data

    import convlib.train as T

    assert jax.device_count() == DEVICES, jax.devices()
    images, labels = synthetic_data()
    report = {}
    for mode in MODES:
        result = T.fit(
            TinyCNN(rngs=nnx.Rngs(0)),  # BatchNorm, no dropout: every mode sees the same randomness
            T.make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=1e-3),
            epoch_batches_for(images, labels, 16),
            steps_per_epoch=4,
            epochs=2,
            key=jax.random.key(0),
            eval_batches=lambda: epoch_batches_for(images, labels, 24)(0),  # 64 = 24 + 24 + 16 (padded to 24)
            parallel=mode,
        )
        np.savez(os.path.join(out, f"{mode}.npz"), **flat_state(result.state))
        report[mode] = {
            "losses": [r["loss"] for r in result.records if r["kind"] == "step"],
            "test_accuracy": [r["test_accuracy"] for r in result.records if r["kind"] == "epoch"],
            "test_loss": [r["test_loss"] for r in result.records if r["kind"] == "epoch"],
        }
        if mode != "none":
            step = lambda axis: lambda state, batch: batch
            parallel = T.data_parallel(mode, step, step)
            try:
                parallel.put_batch({"image": jnp.zeros((6, 8, 8, 1)), "label": jnp.zeros(6, jnp.int32)})
            except ValueError as error:
                report[mode]["indivisible_error"] = str(error)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "child", str(out)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    return report, {mode: dict(np.load(out / f"{mode}.npz")) for mode in MODES}


@pytest.mark.parametrize("mode", MODES[1:])
def test_four_devices_match_one_device(runs, mode):
    report, states = runs
    one, many = report["none"], report[mode]
    assert len(one["losses"]) == 8
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(many["test_loss"], one["test_loss"], rtol=TOLERANCE, atol=TOLERANCE)
    assert many["test_accuracy"] == one["test_accuracy"]
    assert states[mode].keys() == states["none"].keys()
    batch_stats = [k for k in states[mode] if "mean" in k or "var" in k]
    assert batch_stats, "the model must carry BatchNorm statistics"
    for name, expected in states["none"].items():
        np.testing.assert_allclose(states[mode][name], expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("mode", MODES[1:])
def test_batch_not_divisible_by_devices_raises(runs, mode):
    message = runs[0][mode]["indivisible_error"]
    assert "batch size 6" in message and f"{DEVICES}" in message and mode in message


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2])

"""experiments/construction.py: a deeper plain net built from a shallower one computes exactly what the shallower
net computes in evaluation mode; the script runs end to end and reuses a matching reference run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from convlib import models
from experiments import construction

WIDTHS = (2, 3, 3)


def plain(depth, seed=0):
    return models.create(f"plain{depth}", widths=WIDTHS, in_channels=1, rngs=nnx.Rngs(seed))


def trained_looking(model, key):
    """Randomises every BatchNorm's scale, bias and running statistics, as training would leave them (at
    initialisation they are 1, 0, 0, 1, which would hide a wrong scale or bias of the identity blocks)."""
    for _, norm in nnx.iter_modules(model):
        if isinstance(norm, nnx.BatchNorm):
            key, *keys = jax.random.split(key, 5)
            shape = norm.scale.shape
            norm.scale[...] = jax.random.uniform(keys[0], shape, minval=0.5, maxval=2.0)
            norm.bias[...] = jax.random.normal(keys[1], shape)
            norm.mean[...] = jax.random.normal(keys[2], shape)
            norm.var[...] = jax.random.uniform(keys[3], shape, minval=0.2, maxval=3.0)
    return model


def test_constructed_net_equals_the_shallow_net_in_evaluation_mode():
    shallow = trained_looking(plain(20), jax.random.key(1))
    deep = plain(32, seed=2)
    images = jax.random.normal(jax.random.key(3), (6, 8, 8, 1))
    construction.deepen(shallow, deep, images[:4])  # statistics from some images, compared on all
    shallow.eval()
    deep.eval()
    expected, got = nnx.jit(lambda m, x: m(x))(shallow, images), nnx.jit(lambda m, x: m(x))(deep, images)
    # float32: each identity BatchNorm rounds (z - m) / s * s + m a few times (eps 1.2e-7 relative), 12 of them
    assert float(jnp.max(jnp.abs(got - expected))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(expected))))
    # the inserted blocks' statistics are not BatchNorm's initial ones (0 and 1), which would hide a wrong bias
    inserted = deep.stages[2].layers[-1].norm2
    assert float(jnp.min(jnp.abs(inserted.mean[...]))) > 0 and not jnp.allclose(inserted.var[...], 1.0)


def test_deepen_rejects_a_net_with_fewer_blocks():
    with pytest.raises(ValueError, match="blocks per stage"):
        construction.deepen(plain(32), plain(20), jnp.ones((1, 8, 8, 1)))


def test_identity_block_rejects_a_strided_block():
    with pytest.raises(ValueError, match="stride 1"):
        construction.identity_block(plain(20).stages[1].layers[0], jnp.zeros(3), jnp.ones(3))


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        construction.main(["--shallow", "56", "--deep", "20"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--deep must exceed --shallow" in err


def test_script_reuses_a_matching_reference_run(tmp_path):
    flags = ["--widths", "2,2,2", "--shallow", "20", "--deep", "32", "--steps", "2", "--batch-size", "16"]
    flags += ["--train-size", "32", "--test-size", "32"]
    args = construction.parse_args(["--quick", *flags])
    curve = [{"step": 2, "train_loss": 2.3, "train_error": 0.9, "test_loss": 2.3, "test_error": 0.9}]
    row = {"model": "plain32", "seed": 0, "final_train_error": 0.9, "final_test_error": 0.9, "curve": curve}
    reference = tmp_path / "reference.json"
    recipe = dataclasses.asdict(construction.degradation.RECIPES["short"].for_run(2, flip=False))
    reference.write_text(json.dumps({"config": vars(args), "recipe": recipe, "models": [row]}))
    out = tmp_path / "out"
    r = construction.main(["--quick", "--no-progress", "--out", str(out), "--reference", str(reference), *flags])
    assert json.loads((out / "results.json").read_text())["claims"] == r["claims"]
    assert (out / "construction.png").stat().st_size > 0 and (out / "curves.csv").stat().st_size > 0
    scratch = r["runs"]["plain32 from scratch (reused)"]
    assert scratch["source"].startswith("reused") and scratch["final_train_error"] == 0.9
    claims = list(r["claims"].values())
    assert claims[0] and claims[1] == (0.9 > r["runs"]["plain20 from scratch"]["final_train_error"])
    assert r["construction"]["max_abs_test_logit_difference"] <= 1e-5 * max(
        1.0, r["construction"]["max_abs_test_logit"]
    )

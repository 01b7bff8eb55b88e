"""The research scripts in experiments/ run end to end in --smoke mode (tiny sizes, synthetic Fashion-MNIST-shaped
data), in this process through their main(argv), and write sane, checkable results."""

import importlib
import json
import math

import pytest


def script(name):
    """The experiments/<name>.py module."""
    return importlib.import_module(f"experiments.{name}")


def run_smoke(name, tmp_path, *flags):
    results = script(name).main(["--smoke", "--no-progress", "--out", str(tmp_path), *flags])
    with open(tmp_path / "results.json") as f:
        written = json.load(f)
    assert written["machine"]["jax"] and written["machine"]["cpu_cores"] >= 1 and written["machine"]["date"]
    assert written["config"]["size"] == "smoke" and written["wall_s"] > 0 and "commit" in written["git"]
    assert set(written) == set(results)
    return written


def assert_files(folder, *names):
    for name in names:
        path = folder / name
        assert path.exists() and path.stat().st_size > 0, name


def finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_compare_vjp(tmp_path):
    r = run_smoke("compare_vjp", tmp_path)
    assert_files(tmp_path, "layers.csv", "layers.md", "models.csv", "training.csv", "time_ratios.png", "training.png")
    custom = r["summary"]["custom"]
    assert custom["max_rel_error_float32"] < 1e-5
    assert custom["max_rel_error_float64"] < 1e-12
    assert custom["max_model_rel_error_float32"] < 1e-4
    assert custom["max_model_rel_error_float64"] < 1e-12
    assert custom["max_forward_abs_error"] < 1e-5
    for row in r["layers"]:
        assert all(
            finite_positive(row[f"{m}_{f}_ms"])
            for m in ("custom", "autodiff")
            for f in ("forward", "dX", "dW", "fwd+bwd")
        )
        assert row["custom_rel32_vs_64"] < 1e-5 and row["autodiff_rel32_vs_64"] < 1e-5
    training = r["training"]
    assert training["custom_max_loss_diff"] < 1e-4
    assert len(training["custom_curve"]) == len(training["autodiff_curve"]) >= 1


def test_receptive_field(tmp_path):
    r = run_smoke("receptive_field", tmp_path)
    assert_files(tmp_path, "fields.csv", "networks.csv", "rf_vs_depth.png", "erf.png")
    assert r["all_match"]
    sizes = {(f["stack"], f["depth"]): f for f in r["fields"]}
    assert sizes[("3x3 conv", 2)]["empirical_size"] == 5
    assert sizes[("dilated 3x3: 1,1,2,4,8,...", 2)]["dense"]
    assert not sizes[("dilated 3x3: 2,2,2,...", 2)]["dense"]  # dilation without a dilation-1 layer leaves holes
    networks = {(n["network"], n["layer"]): n["size"] for n in r["networks"]}
    assert networks[("LeNet-5 (32x32 input)", "C5")] == 32
    assert networks[("AlexNet (224x224)", "pool5")] == 195
    assert networks[("VGG-16 (224x224)", "conv5_3")] == 196
    erf = r["erf"]
    assert 0 < erf["untrained"]["radius_90"] <= erf["theoretical_size"]


def test_implementations(tmp_path):
    r = run_smoke("implementations", tmp_path)
    assert_files(tmp_path, "implementations.csv", "time_vs_flops.png")
    s = r["summary"]
    assert s["max_forward_rel_error_float32"] < 1e-5 and s["max_forward_rel_error_float64"] < 1e-12
    assert s["max_gradient_rel_error_float32"] < 1e-5
    assert s["loops_fd_dX_rel_error"] < 1e-6 and s["loops_fd_dW_rel_error"] < 1e-6
    assert all(
        finite_positive(row["loops_forward_ms"]) and finite_positive(row["lax_forward_ms"]) for row in r["sizes"]
    )


def test_degradation(tmp_path):
    r = run_smoke("degradation", tmp_path, "--depths", "8,14", "--seeds", "3", "--recipe", "he2016")
    assert_files(tmp_path, "curves.csv", "degradation.png")
    assert r["seeds"] == [3]
    assert [(m["model"], m["seed"]) for m in r["models"]] == [
        (f"{family}{depth}", 3) for family in ("plain", "resnet") for depth in (8, 14)
    ]
    for m in r["models"]:
        assert 0 <= m["final_test_error"] <= 1 and 0 <= m["final_train_error"] <= 1
        assert m["curve"][-1]["step"] == r["config"]["steps"]
    by_model = {(m["model"], m["seed"]): m for m in r["models"]}
    assert by_model[("plain8", 3)]["parameters"] == by_model[("resnet8", 3)]["parameters"]  # option A: no parameters
    assert r["recipe"]["momentum"] == 0.9 and r["recipe"]["weight_decay"] == 1e-4
    assert not r["recipe"]["flip"]  # He et al.'s flips stay off on Fashion-MNIST('s synthetic stand-in)
    assert set(r["summary"]["claims"]) == {
        "plain-14 training error above plain-8's",
        "plain-14 test error above plain-8's",
        "ResNet-14 training error at or below ResNet-8's",
    }
    assert r["git"]["commit"] and r["machine"]["cpu_cores"] >= 1


def test_degradation_aggregates_over_seeds():
    degradation = script("degradation")

    def curve(*errors):
        return [{"step": 10 * (i + 1), "train_error": e, "test_error": 2 * e} for i, e in enumerate(errors)]

    rows = [
        {"model": "plain8", "seed": 0, "final_train_error": 0.4, "final_test_error": 0.8, "curve": curve(0.5, 0.4)},
        {"model": "plain8", "seed": 1, "final_train_error": 0.2, "final_test_error": 0.4, "curve": curve(0.3, 0.2)},
    ]
    a = degradation.aggregate(rows, "plain8")
    assert a["step"] == [10, 20]
    assert a["train_mean"] == pytest.approx([0.4, 0.3]) and a["test_max"] == pytest.approx([1.0, 0.8])
    assert a["train_min"] == pytest.approx([0.3, 0.2])
    deeper = [{**r, "model": "plain14", "final_train_error": r["final_train_error"] + 0.1} for r in rows]
    residual = [{**r, "model": f"resnet{d}"} for r in rows for d in (8, 14)]
    summary = degradation.summarize(rows + deeper + residual, [8, 14])
    assert summary["mean over seeds"]["plain: 14 minus 8, final train error"] == pytest.approx(0.1)
    assert summary["claims"]["plain-14 training error above plain-8's"]
    assert not summary["claims"]["plain-14 test error above plain-8's"]
    assert summary["claims"]["ResNet-14 training error at or below ResNet-8's"]  # equal counts as at or below


def test_degradation_recipes_scale_to_the_run():
    degradation = script("degradation")
    assert degradation.parse_args([]).seeds == degradation.parse_args(["--full"]).seeds == [0, 1]
    assert degradation.parse_args(["--full"]).recipe == "he2016"
    he = degradation.RECIPES["he2016"]
    assert (he.steps, he.batch_size, he.recipe.learning_rate) == (64_000, 128, 0.1)
    assert he.recipe.boundaries == (32_000, 48_000) and he.recipe.warmup_steps == 0
    assert he.recipe.crop_padding == 4 and he.recipe.flip and he.recipe.optimizer == "sgd"
    assert he.for_run(64_000, flip=True) == he.recipe
    half = he.for_run(32_000, flip=False)
    assert half.boundaries == (16_000, 24_000) and not half.flip


def test_visualize(tmp_path):
    r = run_smoke("visualize", tmp_path)
    assert_files(tmp_path, "filters.png", "feature_maps.png", "top_patches.png")
    assert [f["size"] for f in r["fields"]] == [6, 16]  # conv5-pool2-conv5-pool2
    for stage in r["top_patches"]:
        for entries in stage["patches"]:
            activations = [e["activation"] for e in entries]
            assert activations == sorted(activations, reverse=True)


def test_groups(tmp_path):
    r = run_smoke("groups", tmp_path)
    assert_files(tmp_path, "layer.csv", "training.csv", "groups_layer.png", "groups_training.png")
    c = r["config"]["channels"]
    assert [row["parameters"] for row in r["layer"]] == [9 * c * c // row["groups"] + c for row in r["layer"]]
    assert r["layer"][-1]["depthwise"]
    params = [row["parameters"] for row in r["training"]]
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params)


@pytest.mark.parametrize(
    "name, flags",
    [
        ("compare_vjp", ["--modes", "autodiff"]),
        ("compare_vjp", ["--models", "no_such_net"]),
        ("receptive_field", ["--depth", "0"]),
        ("implementations", ["--repeats", "-1"]),
        ("degradation", ["--depths", "21"]),
        ("degradation", ["--seeds", "0,0"]),
        ("degradation", ["--recipe", "he2015"]),
        ("degradation", ["--dataset", "cifar100"]),
        ("visualize", ["--from-run", "/nonexistent"]),
        ("groups", ["--widths", "3,5,7"]),
        ("groups", ["--smoke", "--full"]),
    ],
)
def test_bad_flags_are_argparse_errors(name, flags, capsys):
    with pytest.raises(SystemExit) as raised:
        script(name).parse_args(flags)
    assert raised.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_groups_split_implementation_equals_grouped_conv():
    """The CPU-friendly SplitConv computes the grouped conv's function, given the same weights."""
    import jax
    import numpy as np
    from flax import nnx

    groups = script("groups")
    grouped = groups.GroupedNet(2, (4, 8, 8), implementation="conv", rngs=nnx.Rngs(0))
    split = groups.GroupedNet(2, (4, 8, 8), implementation="split", rngs=nnx.Rngs(1))
    split.convs[0].kernel[...], split.convs[0].bias[...] = grouped.convs[0].kernel[...], grouped.convs[0].bias[...]
    for conv, parts in zip(grouped.convs[1:], split.convs[1:]):
        out = conv.out_features // 2
        for i, part in enumerate(parts.convs):
            part.kernel[...] = conv.kernel[..., i * out : (i + 1) * out]
            part.bias[...] = conv.bias[i * out : (i + 1) * out]
    split.fc.kernel[...], split.fc.bias[...] = grouped.fc.kernel[...], grouped.fc.bias[...]
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
    np.testing.assert_allclose(split(x), grouped(x), rtol=1e-5, atol=1e-5)
    assert sum(p.size for p in jax.tree.leaves(nnx.state(split, nnx.Param))) == sum(
        p.size for p in jax.tree.leaves(nnx.state(grouped, nnx.Param))
    )

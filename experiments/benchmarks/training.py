"""Training-step suite: images/s of whole jit-compiled training steps (forward, backward, SGD-momentum update
with Optax, through `convlib.train.make_train_step`) with each backward mode, timed in turns in one process;
with PyTorch importable, the same architecture in PyTorch eager (channels_last) as a reference row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import models, train
from experiments.benchmarks.machine import torch_module
from experiments.timing import interleaved_times, jit

MODES = ("autodiff", "custom", "composable")
# name -> (batch, input channels, input side)
MODELS = {
    "lenet5_modern": (256, 1, 32),
    "resnet20": (128, 3, 32),
    "vgg11_small": (128, 3, 32),
    "alexnet_small": (128, 3, 32),
}
RESNET50 = ("resnet50", 224)


def jax_step(name: str, batch: int, in_channels: int, size: int, backward: str, seed: int, dtype=None):
    """(jitted train_step, (state, batch)) for model `name` on a random batch; `dtype` the compute dtype."""
    model = models.create(
        name, num_classes=10, in_channels=in_channels, rngs=nnx.Rngs(seed), backward=backward, dtype=dtype
    )
    tx = train.make_optimizer("sgd", 0.01, momentum=0.9)
    graphdef, state = train.create_train_state(model, tx, jax.random.key(seed))
    step = jit(train.make_train_step(graphdef, tx, train.CROSS_ENTROPY))
    key = jax.random.key(seed + 1)
    data = {
        "image": jax.random.normal(key, (batch, size, size, in_channels), dtype or jnp.float32),
        "label": jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 10),
    }
    return step, (state, data)


def model_row(
    name: str, batch: int, in_channels: int, size: int, repeats: int, with_torch: bool, seed: int, dtype=None
) -> dict:
    """images/s of one model's training step per backward mode (and PyTorch's), timed in turns."""
    calls = {mode: jax_step(name, batch, in_channels, size, mode, seed, dtype) for mode in MODES}
    torch = torch_module() if with_torch and name in _torch_models() else None
    if torch is not None:
        calls["torch"] = (_torch_models()[name](name, batch, in_channels, size, dtype == jnp.bfloat16), ())
    # PyTorch's spinning OpenMP workers slow the JAX step right after its own: each timed step follows one untimed
    times = interleaved_times(calls, repeats, lead_in=1 if torch is not None else 0)
    row = {
        "model": name,
        "batch": batch,
        "input": f"{size}x{size}x{in_channels}",
        "dtype": jnp.dtype(dtype or jnp.float32).name,
    }
    for mode, t in times.items():
        row[f"{mode} ms"], row[f"{mode} best ms"], row[f"{mode} cpu_ms"] = t["ms"], t["best_ms"], t["cpu_ms"]
        row[f"{mode} images/s"] = batch / t["ms"] * 1e3
    # custom's speed over the others', from the median steps and from the fastest ones
    for other in [m for m in ("autodiff", "composable", "torch") if m in times]:
        row[f"custom/{other} images/s"] = times[other]["ms"] / times["custom"]["ms"]
        row[f"custom/{other} images/s best"] = times[other]["best_ms"] / times["custom"]["best_ms"]
    return row


def _torch_models() -> dict:
    """Model name -> train-step builder of the PyTorch twins (empty without PyTorch)."""
    if torch_module() is None:
        return {}
    from experiments.benchmarks import torch_models

    return {name: torch_models.train_step for name in torch_models.MODELS}


def run(
    names,
    repeats: int,
    with_torch: bool,
    batch: int | None,
    resnet50_batch: int,
    seed: int,
    progress,
    resnet50_size: int = RESNET50[1],
) -> dict:
    """Rows of the training suite for the models `names` (keys of MODELS, or "resnet50": bfloat16 on
    `resnet50_size`-square inputs with batch `resnet50_batch`); `batch` overrides every model's batch."""
    specs = {**MODELS, RESNET50[0]: (resnet50_batch, 3, resnet50_size)}
    jobs = [(name, batch or specs[name][0], *specs[name][1:]) for name in names]
    rows = [
        model_row(name, n, channels, size, repeats, with_torch, seed, jnp.bfloat16 if name == RESNET50[0] else None)
        for name, n, channels, size in progress(jobs, "training steps")
    ]
    return {"models": rows}


COLUMNS = (
    "model",
    "batch",
    "input",
    "dtype",
    "autodiff images/s",
    "custom images/s",
    "custom/autodiff images/s",
    "composable images/s",
    "custom/composable images/s",
    "torch images/s",
    "custom/torch images/s",
    "custom/torch images/s best",
)

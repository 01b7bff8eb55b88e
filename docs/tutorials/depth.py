# %% [markdown]
# # Depth: plain and residual networks
#
# *Is learning better networks as easy as stacking more layers?* He et al. (2016) answered no for **plain** nets:
# a 56-layer stack of 3x3 convolutions trains to a *higher* training error than a 20-layer one (their Figure 6,
# left). That is not over-fitting, since the training error itself is worse: the deeper net is harder to
# optimise. Their fix is the **residual block**: each block adds its input back to what its layers compute,
#
# $$y = \operatorname{relu}\big(F(x) + x\big) \quad \text{instead of} \quad y = \operatorname{relu}\big(F(x)\big),$$
#
# where $F$ is conv, BN, ReLU, conv, BN. If the best a block can do is to pass its input on, a residual block
# needs $F = 0$, while a plain block must fit the identity with two convolutions. With the shortcuts, ResNet-56
# trains *better* than ResNet-20 (Figure 6, right).
#
# **What this page checks**: first, on tiny nets built by `convlib.models`, that a residual block whose branch is
# zero is exactly the identity, and a plain block with the same weights is not; then, from the committed results
# of `experiments/degradation.py` (the figure at CPU scale: Fashion-MNIST, 2 seeds, 41 minutes on 2 cores, not
# re-run here), that the deeper plain net ends with a higher training error than the shallower one in every seed,
# and the deeper residual net with a lower one. Each claim is an `assert`, run when the site is built.

# %%
import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from convlib import models

# the repository's root: the first folder up from here with experiments/ (the build runs this in docs/tutorials/)
ROOT = next(folder for folder in (Path.cwd(), *Path.cwd().parents) if (folder / "experiments").is_dir())
RESULTS = ROOT / "experiments" / "results" / "degradation_fig6_short"

# %% [markdown]
# ## The shortcut is an identity by construction
#
# The plain net is the residual net without its shortcuts: the same layers, the same parameters (option A
# shortcuts have none). Build both at depth 8 (one block per stage, widths 4-8-16) in evaluation mode, where BN
# uses its running statistics, and set the last BN of the first block to scale 0 and offset 0, so $F(x) = 0$:


# %%
def first_block(residual: bool):
    model = models.create("resnet20", depth=8, widths=(4, 8, 16), in_channels=1, residual=residual,
                          rngs=nnx.Rngs(0))  # fmt: skip
    model.eval()
    block = model.stages[0].layers[0]  # stride 1, 4 -> 4 channels: its shortcut is x itself
    block.norm2.scale[...] = jnp.zeros_like(block.norm2.scale[...])
    block.norm2.bias[...] = jnp.zeros_like(block.norm2.bias[...])
    return model, block


residual_net, residual_block = first_block(residual=True)
plain_net, plain_block = first_block(residual=False)
assert models.param_count(residual_net) == models.param_count(plain_net)
print(f"depth 8, widths 4-8-16: {models.param_count(residual_net):,} parameters, plain and residual alike")

# a block's input is the ReLU output of the layer before: non-negative
x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 4))
residual_out, plain_out = residual_block(x), plain_block(x)
print(f"residual block, F = 0: max |y - x| = {float(jnp.max(jnp.abs(residual_out - x))):.1e}")
print(f"plain block,    F = 0: max |y - x| = {float(jnp.max(jnp.abs(plain_out - x))):.2f}, max |y| = "
      f"{float(jnp.max(jnp.abs(plain_out))):.1e}")  # fmt: skip
assert jnp.array_equal(residual_out, x)  # relu(0 + x) = x for x >= 0, exactly
assert not jnp.any(plain_out)  # relu(0) = 0: the signal stops

# %% [markdown]
# The residual block passes its input on *exactly*, with no learning at all, and so does a stack of them: a deep
# residual net can always fall back on the shallower net inside it. The plain block must learn the identity, and
# the optimiser finds that hard, as the curves below show.
#
# ## Figure 6 at CPU scale
#
# `python experiments/degradation.py` trained plain-20, plain-56, ResNet-20 and ResNet-56 (widths 8-16-32, a
# quarter of the paper's FLOPs at the same depths) on 2500 Fashion-MNIST images padded to 32x32, 1200 steps of 32
# with SGD and He et al.'s schedule, two seeds each. Its results are committed; this page reads them.

# %%
results = json.loads((RESULTS / "results.json").read_text())
machine = results["machine"]
print(f"{results['command']}\n  {machine['cpu']}, {machine['cpu_cores']} cores, JAX {machine['jax']}, "
      f"{machine['date'][:10]}, {results['wall_s'] / 60:.0f} min, commit {results['git']['commit'][:7]}")  # fmt: skip

final = {(m["model"], m["seed"]): m for m in results["models"]}
seeds = results["seeds"]
print(f"\n{'net':10s} {'parameters':>10s}  final training error  final test error   (seeds {seeds})")
for name in ("plain20", "plain56", "resnet20", "resnet56"):
    runs = [final[name, seed] for seed in seeds]
    train = [100 * r["final_train_error"] for r in runs]
    test = [100 * r["final_test_error"] for r in runs]
    print(f"{name:10s} {runs[0]['parameters']:>10,}  "
          f"{', '.join(f'{e:.1f}' for e in train):>12s}; {np.mean(train):4.1f} %  "
          f"{', '.join(f'{e:.1f}' for e in test):>12s}; {np.mean(test):4.1f} %")  # fmt: skip
    assert final[name, seeds[0]]["parameters"] == final[name.replace("plain", "resnet"), seeds[0]]["parameters"]

# %% [markdown]
# The training error is the running mean over the steps between two evaluations (in training mode, on augmented
# batches), like the paper's thin curves; the test error is measured on 1000 held-out images.

# %%
with open(RESULTS / "curves.csv", newline="") as f:
    rows = list(csv.DictReader(f))


def curve(name, seed, column):
    points = [(int(r["step"]), 100 * float(r[column])) for r in rows if r["model"] == name and int(r["seed"]) == seed]
    return np.array(points).T


fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, family in zip(axes, ("plain", "resnet")):
    for depth, color in ((20, "tab:orange"), (56, "tab:red")):
        name = f"{family}{depth}"
        for seed in seeds:
            label = {"plain": "plain", "resnet": "ResNet"}[family] + f"-{depth}" if seed == seeds[0] else None
            ax.plot(*curve(name, seed, "train_error"), "--", color=color, lw=1)
            ax.plot(*curve(name, seed, "test_error"), "-", color=color, lw=2, label=label)
    ax.set(title={"plain": "plain networks", "resnet": "residual networks"}[family], xlabel="step", ylim=(0, 60))
    ax.legend(title="test: bold, train: dashed")
axes[0].set_ylabel("error (%)")
fig.tight_layout()
# alt: Training (dashed) and test (bold) error against step for two seeds: left, plain-56 stays above plain-20
#   throughout; right, ResNet-56 ends below ResNet-20.
plt.show()

# %% [markdown]
# ## The two halves of the result


# %%
def gap(column, family, seed):
    """How much higher the 56-layer net's final error is than the 20-layer one's, in points."""
    return 100 * (final[f"{family}56", seed][column] - final[f"{family}20", seed][column])


plain_gaps = [gap("final_train_error", "plain", seed) for seed in seeds]
residual_gaps = [gap("final_train_error", "resnet", seed) for seed in seeds]
print(f"plain-56 minus plain-20, training error:   {', '.join(f'{g:+.1f}' for g in plain_gaps)} points")
print(f"ResNet-56 minus ResNet-20, training error: {', '.join(f'{g:+.1f}' for g in residual_gaps)} points")
assert all(g > 0 for g in plain_gaps)  # degradation: the deeper plain net trains worse, in every seed
assert np.mean(residual_gaps) < 0  # with shortcuts, the deeper net trains better
claims = results["summary"]["claims"]
assert all(claims.values()), claims  # the experiment's own verdicts agree
print(*claims, sep="\n")

# %% [markdown]
# Plain-56 ends about 11 points above plain-20 in training error, in both seeds: degradation. ResNet-56 ends about
# 2 points *below* ResNet-20: with the shortcuts, depth helps. The scale is far from the paper's (Fashion-MNIST,
# not CIFAR-10; 1200 iterations of 32 on 2500 images, not 64k of 128 on 50k), and two seeds give a spread, not a
# significance test; [Experiments](../experiments.html) has the recipe, the earlier runs, and the command for the
# paper's full recipe on a GPU.

# %% [markdown]
# ## A solution by construction
#
# Why is the deeper plain net's higher training error an optimisation failure and not a lack of capacity? Because
# a plain-56 that fits at least as well as plain-20 exists, and can be written down: copy plain-20's layers and
# make every extra block the identity (identity kernels, and each BatchNorm set to undo its own normalisation:
# scale $\sqrt{\sigma^2 + \epsilon}$, bias $\mu$; a block's input comes out of a ReLU, so the ReLUs inside pass it
# unchanged). `experiments/construction.py` builds that net from a trained plain-20, checks that it computes the
# same function, and trains it further with the same optimiser. Its committed results:

# %%
construction = json.loads((ROOT / "experiments" / "results" / "construction" / "results.json").read_text())
shallow, built = (construction["construction"][name] for name in ("plain20", "plain56 as constructed"))
runs = construction["runs"]
print(f"plain-20:                 training error {shallow['train_error']:.2%}, test error {shallow['test_error']:.2%}")
print(f"plain-56 as constructed:  training error {built['train_error']:.2%}, test error {built['test_error']:.2%}")
for name, run in runs.items():
    print(f"{name + ':':<40} final running training error {run['final_train_error']:.2%}")
assert built == shallow  # the same function: the same errors, exactly
assert construction["construction"]["max_abs_test_logit_difference"] < 1e-4  # float32 rounding over 56 layers
assert all(construction["claims"].values()), construction["claims"]

# %% [markdown]
# The constructed plain-56 has plain-20's errors to the last image, and further training keeps its training error
# at or below plain-20's, while the same architecture trained from scratch ends well above: the solver, not the
# architecture, is what fails. The shortcut of a residual block builds this identity into the architecture, so the
# solver starts from it.

# %% [markdown]
# # Training LeNet-5 on Fashion-MNIST
#
# A short run of the whole stack: `convlib.data` loads Fashion-MNIST (the Debian package's IDX files, through the
# offline TFDS builder), `convlib.models` builds LeNet-5 (the modern variant: ReLU, max-pooling, full C3),
# `convlib.train` trains it with AdamW and the hand-derived backward, and matplotlib draws what it learned.
#
# `make train` runs the full recipe (12 epochs, 0.92 test accuracy; see [Train from the CLI](../guides/train-cli.html)).
# Here: 300 steps of 128 images, about two thirds of an epoch, to fit the build's time.
#
# **What this page checks**: the training loss falls, and the test accuracy after 300 steps is above 75 % (chance
# is 10 %). Both are `assert`s, so a change that breaks learning breaks the site's build.

# %%
import warnings

import jax
import matplotlib.pyplot as plt
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from tqdm import TqdmWarning

# a static page shows no widgets: tqdm's notebook bar needs ipywidgets, and falls back to its text bar without it
warnings.filterwarnings("ignore", category=TqdmWarning)
from convlib import data, models, train  # noqa: E402

# XLA:CPU compiles the default (threefry) random-bit generator slowly on this build's 2 cores; "rbg" is quick.
jax.config.update("jax_default_prng_impl", "rbg")
tfds.disable_progress_bar()  # the first build prepares the dataset; its progress bars would fill this page
STEPS, BATCH, EVALUATIONS, TEST_IMAGES = 300, 128, 6, 2000

# the Debian package's files only: no apt-get and no download while the site builds
train_images, train_labels = data.load("fashion_mnist", "train", apt_install=None, download=False)
test_images, test_labels = data.load("fashion_mnist", "test", apt_install=None, download=False)
test_images, test_labels = test_images[:TEST_IMAGES], test_labels[:TEST_IMAGES]
print("train", train_images.shape, train_images.dtype, " test", test_images.shape)
assert train_images.shape == (60_000, 28, 28, 1)

# %% [markdown]
# The model reads 28x28 images (`input_size=28` pads C1 by 2, as the paper centred its digits in a 32x32 field).
# The images stay uint8 on the device; `preprocess` normalises each batch inside the compiled step.

# %%
model = models.create("lenet5_modern", num_classes=10, in_channels=1, input_size=28, rngs=nnx.Rngs(0))
print(f"lenet5_modern: {models.param_count(model):,} parameters")
mean, std = data.MEAN_STD["fashion_mnist"]
recipe = train.Recipe(optimizer="adamw", learning_rate=3e-3, warmup_steps=30, weight_decay=5e-4)
train_x, train_y = jax.device_put(train_images), jax.device_put(train_labels)
test_x, test_y = jax.device_put(test_images), jax.device_put(test_labels)

result = train.fit(
    model,
    recipe,
    (train_x, train_y),
    (test_x, test_y),
    key=jax.random.key(0),  # the data order of each epoch
    loop=train.LoopConfig(batch_size=BATCH, steps=STEPS, eval_batch_size=1000, eval_every=STEPS // EVALUATIONS),
    preprocess=lambda images: data.normalize(images, mean, std),
)
steps = [r for r in result.records if r["kind"] == "step"]
evals = [r for r in result.records if r["kind"] == "eval"]
print(f"{len(steps)} steps in {result.wall_s:.1f} s ({result.images_per_s:.0f} training images/s, this machine)")
for r in evals:
    print(f"step {r['step']:3d}: train loss {r['train_loss']:.3f}, test accuracy {r['test_accuracy']:.3f}")

# %%
first, last = np.mean([r["loss"] for r in steps[:20]]), np.mean([r["loss"] for r in steps[-20:]])
print(f"mean training loss, first 20 steps {first:.3f}, last 20 steps {last:.3f}")
assert last < first / 2
assert evals[-1]["test_accuracy"] > 0.75

# %% [markdown]
# ## The learning curve
#
# Per-step training loss (noisy: one batch each), and the test error at each evaluation.

# %%
fig, (ax_loss, ax_error) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="per step (one batch)")
ax_loss.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="mean since last evaluation")
ax_loss.set(xlabel="training step (batch of 128)", ylabel="cross-entropy loss (nats)", title="training loss")
ax_loss.legend()
ax_error.plot([r["step"] for r in evals], [100 * (1 - r["test_accuracy"]) for r in evals], "o-", color="C3")
ax_error.set(xlabel="training step (batch of 128)", ylabel="test error (%)", title=f"{TEST_IMAGES} test images")
ax_error.set_ylim(bottom=0)
# alt: Left, LeNet-5's training loss per step over 300 steps, falling, with its mean between evaluations;
#   right, the test error at each of the six evaluations.
plt.show()

# %% [markdown]
# ## What C1 learned
#
# The six 5x5 kernels of the first layer (the weights, on one colour scale centred at 0), and the six feature maps
# they produce on one test image, after ReLU.

# %%
kernels = np.asarray(model.conv1.kernel[...])[:, :, 0, :]  # HWIO -> (5, 5, 6)
image = test_x[:1]
maps = np.asarray(jax.nn.relu(model.conv1(data.normalize(image, mean, std))))[0]  # (28, 28, 6)
classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

fig, axes = plt.subplots(2, 7, figsize=(13, 4.2), constrained_layout=True)
limit = np.abs(kernels).max()
for c in range(6):  # one colour scale per row, so that kernels and maps compare
    shown = axes[0, c].imshow(kernels[:, :, c], cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes[0, c].set_title(f"C1 kernel {c}")
    feature = axes[1, c].imshow(maps[:, :, c], cmap="magma", vmin=0, vmax=maps.max())
    axes[1, c].set_title(f"map {c}")
fig.colorbar(shown, ax=axes[0, :6].tolist(), label="weight (per normalised input unit)", shrink=0.8)
axes[0, 6].axis("off")
axes[1, 6].imshow(np.asarray(image[0, :, :, 0]), cmap="gray")
axes[1, 6].set_title(f"input: {classes[int(test_y[0])]}")
fig.colorbar(feature, ax=axes[1, :6].tolist(), label="activation after ReLU", shrink=0.8)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("5 pixels")
axes[1, 0].set_ylabel("28 pixels")
# alt: Top row, the six 5x5 kernels of LeNet-5's first layer in red and blue; bottom row, the six feature maps they
#   produce on one Fashion-MNIST test image, shown last.
plt.show()

# %% [markdown]
# After two thirds of an epoch the kernels are noisy oriented edge and blob detectors, and the maps are edge and
# contrast images that still look like the input. `experiments/visualize.py` trains longer and shows the second
# stage and the top-activating patches ([Experiments](../experiments.html)).

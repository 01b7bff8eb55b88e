"""Pure train and eval steps over a ``TrainState``; the caller compiles them (``jax.jit``, ``jax.pmap``, ...)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from convlib.train.losses import Loss
from convlib.train.state import TrainState, is_prng_key, split_model

# (key, images (B, H, W, C)) -> images: random augmentation applied inside the compiled train step.
Augment = Callable[[jax.Array, jax.Array], jax.Array]
# images (B, H, W, C) -> images: deterministic preprocessing (e.g. uint8 -> normalised float) for train and eval.
Preprocess = Callable[[jax.Array], jax.Array]


def _fold_keys(tree, data: jax.Array):
    """Folds ``data`` into every PRNG key leaf of ``tree`` (so that each device draws different dropout masks)."""
    return jax.tree.map(lambda x: jax.random.fold_in(x, data) if is_prng_key(x) else x, tree)


def _keep_keys(before, after):
    """``after`` with its PRNG key leaves taken from ``before`` (a forward pass never changes keys, only counts)."""
    return jax.tree.map(lambda b, a: b if is_prng_key(b) else a, before, after)


def _out_of_range(labels: jax.Array, num_classes: int, mask: jax.Array | None = None) -> jax.Array:
    """How many ``labels`` (B,) (where ``mask`` is 1) lie outside ``[0, num_classes)``, as a float32 scalar."""
    bad = (labels < 0) | (labels >= num_classes)
    return jnp.sum(bad if mask is None else bad * mask, dtype=jnp.float32)


def _sync_batch_norm(model: nnx.Module, axis_name: str) -> None:
    """Makes every ``nnx.BatchNorm`` compute its batch statistics across the mapped axis ``axis_name``."""
    for _, module in model.iter_modules():
        if isinstance(module, nnx.BatchNorm):
            module.axis_name = axis_name


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss: Loss,
    *,
    learning_rate: float | optax.Schedule | None = None,
    preprocess: Preprocess | None = None,
    augment: Augment | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)``, one optimiser update on ``batch``.

    batch: ``{"image": (B, H, W, C), "label": (B,) int}``. metrics: scalars ``loss`` (mean over the batch, before the
    update), ``accuracy``, ``grad_norm``, ``learning_rate`` (of this update: the ``learning_rate`` hyperparameter
    of an ``optax.inject_hyperparams`` optimiser, else ``learning_rate`` at this step, NaN when neither) and
    ``bad_labels`` (how many labels lie outside ``[0, K)`` for the model's K outputs; the caller refuses them).
    With ``axis_name`` the step runs per device under a mapped axis of that name (``pmap`` / ``shard_map``):
    BatchNorm statistics, gradients and metrics are averaged over it, and dropout keys and the augmentation key are
    folded with the device index.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        rest = state.rest
        if axis_name is not None:
            device = jax.lax.axis_index(axis_name)
            key, rest = jax.random.fold_in(key, device), _fold_keys(rest, device)
        images, labels = batch["image"], batch["label"]
        if preprocess is not None:
            images = preprocess(images)
        if augment is not None:
            images = augment(key, images)

        def objective(params, rest):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.train()
            if axis_name is not None:
                _sync_batch_norm(model, axis_name)
            outputs = model(images).astype(jnp.float32)
            _, _, new_rest = split_model(model)
            return jnp.mean(loss.per_example(outputs, labels)), (outputs, new_rest)

        (value, (outputs, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(state.params, rest)
        accuracy = jnp.mean(loss.predict(outputs) == labels)
        if axis_name is not None:
            grads, value, accuracy = jax.lax.pmean((grads, value, accuracy), axis_name)
            new_rest = _keep_keys(state.rest, new_rest)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = learning_rate(state.step) if callable(learning_rate) else learning_rate
        if lr is None:
            lr = optax.tree_utils.tree_get(opt_state, "learning_rate", jnp.nan, lambda _, x: isinstance(x, jax.Array))
        bad_labels = _out_of_range(labels, outputs.shape[-1])
        metrics = {
            "loss": value,
            "accuracy": accuracy,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(lr, jnp.float32),
            "bad_labels": bad_labels if axis_name is None else jax.lax.psum(bad_labels, axis_name),
        }
        return TrainState(state.step + 1, params, new_rest, opt_state, state.key), metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    loss: Loss,
    *,
    preprocess: Preprocess | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, dict], dict]:
    """``eval_step(state, batch) -> {"loss_sum", "correct", "count"}`` in evaluation mode (running BatchNorm
    statistics, no dropout). ``batch`` may hold ``"mask": (B,)`` (1 = real example, 0 = padding); sums are over
    real examples, and over devices with ``axis_name``; ``bad_labels``: how many real labels lie outside
    ``[0, K)``."""

    def eval_step(state: TrainState, batch: dict) -> dict:
        images, labels = batch["image"], batch["label"]
        if preprocess is not None:
            images = preprocess(images)
        model = nnx.merge(graphdef, state.params, state.rest)
        model.eval()
        outputs = model(images).astype(jnp.float32)
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
        sums = {
            "loss_sum": jnp.sum(loss.per_example(outputs, labels) * mask),
            "correct": jnp.sum((loss.predict(outputs) == labels) * mask),
            "count": jnp.sum(mask),
            "bad_labels": _out_of_range(labels, outputs.shape[-1], mask),
        }
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    return eval_step

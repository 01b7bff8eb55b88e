"""Optax optimisers and learning-rate schedules by name, with a weight-decay mask over NNX parameters."""

from collections.abc import Sequence

import jax
import optax

from convlib.ops.checks import check_choice, check_float, check_int

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
"""The names :func:`make_optimizer` takes."""
SCHEDULES = ("constant", "piecewise", "cosine")
"""The names :func:`make_schedule` takes."""
PIECEWISE_WARMUP = 0.1  # the piecewise schedule's warm-up runs at base_lr x this


def decay_kernels_only(params) -> object:
    """Weight-decay mask: True for kernels (ndim > 1), False for biases and BatchNorm scale/offset.

    params: any pytree of arrays (e.g. the ``nnx.State`` of ``nnx.Param``s); returns the same tree of bools.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def check_learning_rate(learning_rate) -> None:
    """Raises unless `learning_rate` is a positive finite number or a schedule (a callable `step -> lr`)."""
    if not callable(learning_rate):
        check_float("learning_rate", learning_rate, minimum=0.0, open_minimum=True)


def make_schedule(
    name: str,
    base_lr: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    boundaries: Sequence[int] | None = None,
    decay_factor: float = 0.1,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """A learning-rate schedule ``step -> lr``.

    - ``"constant"``: ``base_lr`` throughout.
    - ``"piecewise"``: ``base_lr``, multiplied by ``decay_factor`` at each of ``boundaries`` (steps). The default
      boundaries are 1/2 and 3/4 of ``total_steps``: He et al. (2016) use 0.1, /10 at 32k and 48k of 64k iterations.
      The new value applies from the boundary step on. With ``warmup_steps``, the first ``warmup_steps`` run at
      ``base_lr / 10`` (He et al.'s warm-up of ResNet-110: 0.01 until training starts, then 0.1).
    - ``"cosine"``: linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``end_lr`` at
      ``total_steps``.
    """
    check_choice("schedule", name, SCHEDULES)
    base_lr = check_float("base_lr", base_lr, minimum=0.0, open_minimum=True)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    if name != "constant":
        check_warmup(warmup_steps, total_steps)
    decay_factor = check_float("decay_factor", decay_factor, minimum=0.0)
    end_lr = check_float("end_lr", end_lr, minimum=0.0)
    if name == "piecewise":
        boundaries = None if boundaries is None else check_boundaries(boundaries)
    return build_schedule(name, base_lr, total_steps, warmup_steps, boundaries, decay_factor, end_lr)


def check_warmup(warmup_steps: int, total_steps: int) -> int:
    """``warmup_steps`` (an int >= 0) if it is shorter than the run's ``total_steps``."""
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps!r}")
    return warmup_steps


def check_boundaries(boundaries: Sequence[int]) -> tuple[int, ...]:
    """``boundaries`` as a tuple if they are positive, increasing ints."""
    boundaries = tuple(check_int("boundaries", b) for b in boundaries)
    if any(b <= 0 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"boundaries must be positive and increasing, got {boundaries!r}")
    return boundaries


def build_schedule(
    name: str,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    boundaries: tuple[int, ...] | None,
    decay_factor: float,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """:func:`make_schedule` for arguments already checked (by it, or by a :class:`~convlib.train.Recipe`)."""
    if name == "constant":
        return optax.constant_schedule(base_lr)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=end_lr
        )
    if boundaries is None:
        boundaries = (total_steps // 2, (3 * total_steps) // 4)
    scales = {int(b): decay_factor for b in boundaries}
    if not warmup_steps:
        return optax.piecewise_constant_schedule(base_lr, scales)
    scales[warmup_steps] = scales.get(warmup_steps, 1.0) / PIECEWISE_WARMUP
    return optax.piecewise_constant_schedule(base_lr * PIECEWISE_WARMUP, scales)


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    decay_mask=decay_kernels_only,
) -> optax.GradientTransformation:
    """An Optax optimiser by name.

    - ``"sgd"``: SGD with heavy-ball ``momentum`` (0 gives plain SGD); ``"nesterov"``: SGD with Nesterov momentum.
      Weight decay is coupled (L2 added to the gradient, as in He et al.).
    - ``"adam"``: Adam with coupled L2 weight decay; ``"adamw"``: Adam with decoupled weight decay (Loshchilov &
      Hutter).

    ``decay_mask``: a pytree of bools or a callable ``params -> pytree of bools`` choosing the decayed parameters;
    by default kernels only (biases and BatchNorm parameters are left out). ``None`` decays every parameter.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    check_learning_rate(learning_rate)
    weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)
    momentum = check_float("momentum", momentum, 0.0, 1.0, open_maximum=True)
    return build_optimizer(name, learning_rate, momentum, weight_decay, decay_mask)


def build_optimizer(
    name: str, learning_rate, momentum: float, weight_decay: float, decay_mask=decay_kernels_only
) -> optax.GradientTransformation:
    """:func:`make_optimizer` for arguments already checked (by it, or by a :class:`~convlib.train.Recipe`)."""
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)
    if name == "adam":
        base = optax.adam(learning_rate)
    else:
        base = optax.sgd(learning_rate, momentum=momentum or None, nesterov=name == "nesterov")
    if weight_decay == 0:
        return base
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base)

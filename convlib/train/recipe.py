"""A training recipe: everything about how a model is trained apart from the model, the data and the run's length.

One frozen object holds the optimiser, the learning-rate schedule, the weight decay and the augmentation, so that
every script states its recipe once and builds the Optax pieces from it the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from convlib import data
from convlib.ops.checks import check_bool, check_choice, check_float, check_int
from convlib.train.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    build_schedule,
    check_boundaries,
    check_warmup,
)
from convlib.train.steps import Augment


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """Optimiser, schedule, weight decay and augmentation of a training run.

    Attributes:
      optimizer: one of :data:`~convlib.train.OPTIMIZERS` ("sgd" and "nesterov": momentum SGD with coupled L2 decay;
        "adam": coupled L2; "adamw": decoupled weight decay).
      learning_rate: the peak (cosine) or initial (piecewise) learning rate.
      momentum: of "sgd" / "nesterov", in [0, 1).
      weight_decay: of the kernels (biases and BatchNorm parameters are not decayed), >= 0.
      schedule: "cosine" (linear warm-up over `warmup_steps`, cosine decay to 0 at the run's end), "piecewise"
        (`learning_rate / 10` for the first `warmup_steps`, then times `decay_factor` at each of `boundaries`,
        default 1/2 and 3/4 of the run) or "constant".
      crop_padding: random crops after zero-padding each side by this many pixels (0: none).
      flip: random left-right flips.

    >>> recipe = Recipe(optimizer="sgd", learning_rate=0.1, schedule="piecewise", boundaries=(32_000, 48_000))
    >>> round(float(recipe.learning_rate_schedule(64_000)(40_000)), 6)
    0.01
    """

    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    boundaries: tuple[int, ...] | None = None
    decay_factor: float = 0.1
    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_float("learning_rate", self.learning_rate, minimum=0.0, open_minimum=True)
        check_float("momentum", self.momentum, 0.0, 1.0, open_maximum=True)
        check_float("weight_decay", self.weight_decay, minimum=0.0)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_float("decay_factor", self.decay_factor, minimum=0.0)
        check_int("crop_padding", self.crop_padding, minimum=0)
        check_bool("flip", self.flip)
        if self.boundaries is not None:
            object.__setattr__(self, "boundaries", check_boundaries(self.boundaries))

    @property
    def depends_on_length(self) -> bool:
        """Whether the schedule depends on the run's length (cosine; piecewise at default boundaries): a run
        resumed with another length would follow another schedule."""
        return self.schedule == "cosine" or (self.schedule == "piecewise" and self.boundaries is None)

    def learning_rate_schedule(self, total_steps: int) -> optax.Schedule:
        """The schedule `step -> learning rate` of a run of `total_steps` updates (which must outlast the
        warm-up)."""
        total_steps = check_int("total_steps", total_steps, minimum=1)
        if self.schedule != "constant":
            check_warmup(self.warmup_steps, total_steps)
        return build_schedule(
            self.schedule, self.learning_rate, total_steps, self.warmup_steps, self.boundaries, self.decay_factor
        )

    def tx(self, total_steps: int) -> optax.GradientTransformation:
        """The Optax optimiser of a run of `total_steps` updates, its learning rate an
        ``optax.inject_hyperparams`` hyperparameter (so the optimiser state says the rate of every update)."""
        return optax.inject_hyperparams(
            lambda learning_rate: build_optimizer(self.optimizer, learning_rate, self.momentum, self.weight_decay)
        )(learning_rate=self.learning_rate_schedule(total_steps))

    def optimizer_for(self, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """`(tx, schedule)` for a run of `total_steps` updates: :meth:`tx` and its schedule."""
        return self.tx(total_steps), self.learning_rate_schedule(total_steps)

    def augment(self) -> Augment | None:
        """`(key, images) -> images`, the recipe's augmentation inside the train step; None without one."""
        if not (self.crop_padding or self.flip):
            return None
        return _Augmentation(self.crop_padding, self.flip)


@dataclasses.dataclass(frozen=True)
class _Augmentation:
    """Random crop (after zero-padding by `crop_padding`) then random left-right flip, on device. Hashable, so a
    compiled step is reused for equal recipes."""

    crop_padding: int
    flip: bool

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        crop_key, flip_key = jax.random.split(key)
        if self.crop_padding:
            images = data.random_crop(crop_key, images, self.crop_padding)
        return data.random_flip(flip_key, images) if self.flip else images

"""Device-side image transforms: pure, jit-able functions on NHWC batches.

Random ones take a ``jax.random`` key and are deterministic for a given key; each image
gets its own random draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from convlib.ops.checks import check_int, check_key


def _check_nhwc(images) -> None:
    if jnp.ndim(images) != 4:
        raise ValueError(f"images: expected shape (N, H, W, C), got {jnp.shape(images)}")


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 images, scaled to [0, 1].

    Args:
      images: uint8 (N, H, W, C).

    Returns:
      mean float64 (C,), std float64 (C,).
    """
    images = np.asarray(images)
    _check_nhwc(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images: expected dtype uint8, got {images.dtype}")
    values = np.arange(256) / 255.0
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])])  # (C, 256)
    mean = counts @ values / counts.sum(axis=1)
    var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / counts.sum(axis=1)
    return mean, np.sqrt(var)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """``(images / 255 - mean) / std`` as float32.

    Args:
      images: uint8 (N, H, W, C) in [0, 255].
      mean, std: scalars or (C,), in [0, 1] units (e.g. ``MEAN_STD[name]``).

    Returns:
      float32 (N, H, W, C).
    """
    _check_nhwc(images)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if not isinstance(std, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(std) & (std > 0))):
        raise ValueError(f"std must be positive and finite, got {np.asarray(std).tolist()!r}")
    return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def pad_images(images: jax.Array, to: int = 32) -> jax.Array:
    """Zero-pads images to ``to x to``, centred (an odd extra pixel goes bottom/right).

    E.g. 28x28 Fashion-MNIST to 32x32 for LeNet-5 and the ResNets.

    Args:
      images: (N, H, W, C) with H, W <= ``to``.

    Returns:
      (N, to, to, C), same dtype.
    """
    _check_nhwc(images)
    _, h, w, _ = jnp.shape(images)
    if not isinstance(to, int) or to < max(h, w):
        raise ValueError(f"to={to!r}: expected an int >= the image size {h}x{w}")
    top, left = (to - h) // 2, (to - w) // 2
    return jnp.pad(images, ((0, 0), (top, to - h - top), (left, to - w - left), (0, 0)))


def check_crop_padding(padding, height: int, width: int) -> int:
    """`padding` if it is an int in [0, min(height, width)): a larger one lets a crop miss the image entirely."""
    return check_int("padding", padding, minimum=0, maximum=min(height, width) - 1)


def random_crop(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """Zero-pads by ``padding`` on each side, then crops each image back at a random offset.

    Args:
      key: ``jax.random`` key.
      images: (N, H, W, C).
      padding: pixels added per side, less than the image's height and width (see :func:`check_crop_padding`);
        offsets are uniform in [0, 2 * padding].

    Returns:
      (N, H, W, C), same dtype.
    """
    key = check_key("key", key)
    _check_nhwc(images)
    n, h, w, c = jnp.shape(images)
    padding = check_crop_padding(padding, h, w)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(image, yx):
        return jax.lax.dynamic_slice(image, (yx[0], yx[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2.

    Suits natural images (CIFAR); not digits, whose mirror images are not digits.

    Args:
      key: ``jax.random`` key.
      images: (N, H, W, C).

    Returns:
      (N, H, W, C), same dtype.
    """
    key = check_key("key", key)
    _check_nhwc(images)
    flip = jax.random.bernoulli(key, 0.5, (jnp.shape(images)[0], 1, 1, 1))
    return jnp.where(flip, jnp.flip(images, axis=2), images)

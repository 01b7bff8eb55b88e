"""Device-side epoch iteration: shuffle, batch and transform with ``jax.random``.

A small dataset lives in device memory as two arrays; each batch is gathered on device
(``jnp.take`` of a ``jax.random.permutation``) and optionally transformed there. Batches
are dicts ``{"image": (B, H, W, C), "label": (B,)}``, the form training code consumes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

Transform = Callable[[jax.Array, jax.Array], jax.Array]  # (key, images) -> images


@functools.partial(jax.jit, static_argnames=("batch_size", "transform"))
def _take_batch(images, labels, order, start, key, *, batch_size, transform):
    index = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
    image = jnp.take(images, index, axis=0)
    if transform is not None:
        image = transform(key, image)
    return {"image": image, "label": jnp.take(labels, index, axis=0)}


def epoch_order(key: jax.Array, n: int, shuffle: bool) -> jax.Array:
    """The order (n,) in which one epoch of :func:`batches` visits the examples: a permutation drawn from the
    first key of ``jax.random.split(key)``, or ``0 .. n-1``."""
    return jax.random.permutation(jax.random.split(key)[0], n) if shuffle else jnp.arange(n)


def batch_starts(n: int, batch_size: int, drop_remainder: bool) -> range:
    """The first position (in :func:`epoch_order`) of each batch of one epoch."""
    return range(0, n - n % batch_size if drop_remainder else n, batch_size)


def _iterate(key, images, labels, batch_size, shuffle, drop_remainder, transform):
    n = images.shape[0]
    order, transform_key = epoch_order(key, n, shuffle), jax.random.split(key)[1]
    for step, start in enumerate(batch_starts(n, batch_size, drop_remainder)):
        yield _take_batch(
            images,
            labels,
            order,
            start,
            jax.random.fold_in(transform_key, step),
            batch_size=min(batch_size, n - start),
            transform=transform,
        )


def batches(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_remainder: bool = True,
    transform: Transform | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """One epoch of batches, shuffled, gathered and transformed on device.

    Deterministic for a given ``key``: it is split into a permutation key and a transform
    key, folded with the step number for each batch.

    Args:
      key: ``jax.random`` key; one per epoch.
      images: (N, H, W, C); put it on device once (``jax.device_put``) to avoid a copy per epoch.
      labels: (N,).
      batch_size: B, a positive int.
      shuffle: visit examples in a random permutation, else in order.
      drop_remainder: skip the last N % B examples; else the last batch is smaller (and
        compiles once more).
      transform: ``(key, images (B, H, W, C)) -> images``, jitted with the gather, e.g.
        ``functools.partial(random_crop, padding=4)``; pass the same object every epoch so
        it compiles once.

    Yields:
      ``{"image": (B, H, W, C), "label": (B,)}`` of jax arrays.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (N, H, W, C), got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
    return _iterate(key, images, labels, batch_size, shuffle, drop_remainder, transform)


def pipeline_throughput(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    batch_size: int,
    *,
    transform: Transform | None = None,
    epochs: int = 1,
) -> float:
    """Images per second delivered by ``batches`` (with ``transform``) after compilation.

    The data is put on device first; one batch is drawn beforehand to compile. Each batch
    is waited for before the next, as a training loop would.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: expected a positive int")
    if batch_size > len(images):
        raise ValueError(f"batch_size={batch_size!r}: more than the {len(images)} images")
    images, labels = jax.device_put(images), jax.device_put(labels)
    warmup_key, key = jax.random.split(key)
    jax.block_until_ready(next(batches(warmup_key, images, labels, batch_size, transform=transform)))
    count = 0
    start = time.perf_counter()
    for epoch_key in jax.random.split(key, epochs):
        for batch in batches(epoch_key, images, labels, batch_size, transform=transform):
            jax.block_until_ready(batch)
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)

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

from convlib.ops.checks import check_bool, check_int, check_key

Transform = Callable[[jax.Array, jax.Array], jax.Array]  # (key, images) -> images


@functools.partial(jax.jit, static_argnames=("rows", "masked", "transform"))
def _take_batch(images, labels, order, first, end, key, *, rows, masked, transform):
    """Rows `first .. first + rows` of the epoch's `order` (those at `end` or later repeat the last example and
    are masked out)."""
    positions = first + jnp.arange(rows)
    index = order[jnp.minimum(positions, order.shape[0] - 1)]
    image = jnp.take(images, index, axis=0)
    if transform is not None:
        image = transform(key, image)
    batch = {"image": image, "label": jnp.take(labels, index, axis=0)}
    if masked:
        batch["mask"] = (positions < end).astype(jnp.float32)
    return batch


def epoch_order(key: jax.Array, n: int, shuffle: bool) -> jax.Array:
    """The order (n,) in which one epoch of :func:`batches` visits the examples: a permutation drawn from the
    first key of ``jax.random.split(key)``, or ``0 .. n-1``."""
    return jax.random.permutation(jax.random.split(key)[0], n) if shuffle else jnp.arange(n)


def batch_starts(n: int, batch_size: int, drop_remainder: bool) -> range:
    """The first position (in :func:`epoch_order`) of each batch of one epoch."""
    return range(0, n - n % batch_size if drop_remainder else n, batch_size)


def _iterate(key, images, labels, batch_size, shuffle, drop_remainder, transform, process_index, process_count):
    n = images.shape[0]
    order, transform_key = epoch_order(key, n, shuffle), jax.random.split(key)[1]
    rows = -(-batch_size // process_count)  # this process's share of each global batch
    for step, start in enumerate(batch_starts(n, batch_size, drop_remainder)):
        end = min(start + batch_size, n)
        first, size = (start, end - start) if process_count == 1 else (start + process_index * rows, rows)
        yield _take_batch(
            images,
            labels,
            order,
            first,
            end,
            jax.random.fold_in(transform_key, step),
            rows=size,
            masked=process_count > 1 and not drop_remainder,
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
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, jax.Array]]:
    """One epoch of batches, shuffled, gathered and transformed on device; with several processes, this process's
    rows of each global batch.

    Deterministic for a given ``key``: it is split into a permutation key and a transform key, folded with the step
    number for each batch. Every process computes the same permutation from ``key``; process ``p`` of ``P``
    gathers rows ``[p * L, (p + 1) * L)`` of each global batch, ``L = ceil(batch_size / P)`` (the order in which
    ``convlib.train``'s ``"sharding"`` mode lays them out). With several processes and ``drop_remainder=False``
    every batch has ``L`` rows and a ``"mask"`` (1 real, 0 padding past the last example), so that all processes
    run the same number of equally shaped steps; ``convlib.train.evaluate`` counts only the real rows.

    Args:
      key: ``jax.random`` key; one per epoch.
      images: (N, H, W, C); put it on device once (``jax.device_put``) to avoid a copy per epoch.
      labels: (N,).
      batch_size: B, the global batch, a positive int (with ``drop_remainder``, a multiple of ``process_count``).
      shuffle: visit examples in a random permutation, else in order.
      drop_remainder: skip the last N % B examples; else the last batch is smaller (one process; it compiles
        once more) or padded and masked (several).
      transform: ``(key, images (B, H, W, C)) -> images``, jitted with the gather, e.g.
        ``functools.partial(random_crop, padding=4)``; pass the same object every epoch so it compiles once.
      process_index, process_count: this process and how many share each batch (default: one).

    Yields:
      ``{"image": (B, H, W, C), "label": (B,)}`` of jax arrays (``L`` rows and a ``"mask"`` as above).

    >>> import jax, numpy as np
    >>> images, labels = np.zeros((10, 2, 2, 1), np.uint8), np.arange(10)
    >>> [b["label"].shape for b in batches(jax.random.key(0), images, labels, 4, drop_remainder=False)]
    [(4,), (4,), (2,)]
    """
    key = check_key("key", key)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    shuffle, drop_remainder = check_bool("shuffle", shuffle), check_bool("drop_remainder", drop_remainder)
    process_count = check_int("process_count", process_count, minimum=1)
    check_int("process_index", process_index, minimum=0, maximum=process_count - 1)
    if drop_remainder and batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (N, H, W, C), got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
    if drop_remainder and batch_size > len(labels):
        raise ValueError(
            f"batch_size={batch_size} is larger than the {len(labels)} examples: with drop_remainder no batch is left"
        )
    args = (shuffle, drop_remainder, transform, process_index, process_count)
    return _iterate(key, images, labels, batch_size, *args)


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

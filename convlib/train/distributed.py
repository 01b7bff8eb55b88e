"""Multi-process (multi-host) training on JAX's own distributed runtime.

Every process (one per host, or per group of accelerators) runs the same program. ``initialize`` joins it to the
others through the coordinator, which process 0 hosts, and must come before any other JAX call; afterwards
``jax.devices()`` lists the devices of all processes. The ``"sharding"`` (or ``"shard_map"``) mode of
``convlib.train.data_parallel`` then spans them: each process loads only its rows of every global batch
(``process_batches``), ``put_batch`` assembles them into one global array (``jax.make_array_from_process_local_data``),
the state is replicated, and the compiled step is the one-host step.
"""

import math
import socket
import time
from collections.abc import Iterator

import jax

from convlib import data

AUTO = "auto"


class CoordinatorUnreachableError(ConnectionError):
    """No coordinator answered at the given address within the start-up timeout."""


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 host in brackets, ``"[::1]:1234"``) -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once ``address`` accepts a TCP connection; raises ``CoordinatorUnreachableError`` after ``timeout_s``."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachableError(
                    f"no coordinator answered at {address} within {timeout_s:g} s ({error}); process 0 hosts it: "
                    "start process 0 with the same coordinator address, and check the host, port and firewall"
                ) from error
            time.sleep(0.2)


def initialize(
    coordinator: str,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> None:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``); call it before any other JAX
    call. On CPU, cross-process collectives use gloo.

    Args:
      coordinator: process 0's ``"HOST:PORT"`` (process 0 listens there, the others connect), or ``"auto"``: JAX
        detects the cluster (SLURM, Open MPI, TPU pod slices, ...) and fills in what is ``None``.
      num_processes, process_id: the run's process count and this process's index in ``[0, num_processes)``;
        required with an address.
      timeout_s: start-up limit: a process that cannot reach the coordinator, or whose peers do not all join, stops
        with an error after this long instead of waiting forever.
      heartbeat_timeout_s: a process (or the coordinator) silent this long is declared dead, and the runtime stops
        the others.

    Raises:
      ValueError: bad arguments, or ``"auto"`` outside a cluster JAX recognises.
      CoordinatorUnreachableError: (``process_id`` > 0) nothing answered at ``coordinator`` within ``timeout_s``.
    """
    for name, value in (("timeout_s", timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = {"initialization_timeout": timeout_s, "heartbeat_timeout_seconds": heartbeat_timeout_s}
    if coordinator == AUTO:
        try:
            jax.distributed.initialize(num_processes=num_processes, process_id=process_id, **timeouts)
        except ValueError as error:
            raise ValueError(
                f"coordinator={AUTO!r}: JAX found no cluster environment to read ({error}); give process 0's "
                "HOST:PORT, the process count and this process's id instead"
            ) from error
        return
    parse_address(coordinator)
    if num_processes is None or process_id is None:
        raise ValueError(
            f"coordinator {coordinator!r} needs num_processes and process_id, got {num_processes!r} and {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, {num_processes}) for num_processes={num_processes}, got {process_id!r}"
        )
    started = time.monotonic()
    if process_id > 0:  # else the runtime aborts the process after the timeout, without naming the address
        wait_for_coordinator(coordinator, timeout_s)
    timeouts["initialization_timeout"] = max(1, math.ceil(timeout_s - (time.monotonic() - started)))
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)


def process_batches(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """This process's rows of each global batch of one epoch: :func:`convlib.data.batches` with the process
    defaulting to ``jax.process_index()`` of ``jax.process_count()`` (kept as the multi-process spelling)."""
    return data.batches(
        key,
        images,
        labels,
        batch_size,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
    )

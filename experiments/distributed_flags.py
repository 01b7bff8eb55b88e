"""The flags of a script that trains across processes (hosts): --coordinator, --num-processes, --process-id and the
two time-outs, their checks against each other, and joining the run they name (before any other JAX call)."""

from __future__ import annotations

import argparse
import sys

from convlib.train import distributed

# The flags (dest names) that must be positive numbers where given.
COUNTS = ("num_processes", "distributed_timeout", "heartbeat_timeout")
COORDINATOR_HELP = (
    "train across processes: process 0's address; 'auto': from the cluster's environment (SLURM, Open MPI, TPU); "
    "needs --parallel sharding or shard_map"
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --coordinator, --num-processes, --process-id, --distributed-timeout and --heartbeat-timeout."""
    add = parser.add_argument
    add("--coordinator", default=None, metavar="HOST:PORT|auto", help=COORDINATOR_HELP)
    add("--num-processes", type=int, default=None, help="number of processes, with --coordinator HOST:PORT")
    add("--process-id", type=int, default=None, help="this process's index in [0, --num-processes)")
    add("--distributed-timeout", type=int, default=300, help="seconds to wait at start-up for every process")
    add("--heartbeat-timeout", type=int, default=100, help="seconds of silence after which a process counts as dead")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error naming the flag unless --coordinator, --num-processes and --process-id fit together (and with
    --parallel)."""
    if args.coordinator is None:
        for flag, value in (("--num-processes", args.num_processes), ("--process-id", args.process_id)):
            if value is not None and not (flag == "--num-processes" and value == 1):
                parser.error(
                    f"{flag} {value} needs --coordinator HOST:PORT (process 0's address) or --coordinator auto"
                )
        return
    if args.parallel not in ("sharding", "shard_map"):
        parser.error(f"--coordinator needs --parallel sharding or shard_map, got --parallel {args.parallel}")
    if args.coordinator == distributed.AUTO:
        return
    try:
        distributed.parse_address(args.coordinator)
    except ValueError:
        parser.error(f"--coordinator must be HOST:PORT or auto, got {args.coordinator!r}")
    for flag, value in (("--num-processes", args.num_processes), ("--process-id", args.process_id)):
        if value is None:
            parser.error(f"--coordinator {args.coordinator} needs {flag}")
    if not 0 <= args.process_id < args.num_processes:
        parser.error(
            f"--process-id {args.process_id} is out of range for --num-processes {args.num_processes} "
            f"(0 to {args.num_processes - 1})"
        )


def join(args: argparse.Namespace) -> None:
    """Joins the multi-process run of --coordinator, if given (before any other JAX call); exits naming the
    coordinator when it cannot be reached."""
    if args.coordinator is None:
        return
    who = "" if args.process_id is None else f"process {args.process_id} of {args.num_processes}: "
    where = f"coordinated by {args.coordinator}"
    if args.coordinator == distributed.AUTO:
        where = "described by the cluster's environment"
    print(f"{who}joining the multi-process run {where} (timeout {args.distributed_timeout} s)", file=sys.stderr)
    try:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            timeout_s=args.distributed_timeout,
            heartbeat_timeout_s=args.heartbeat_timeout,
        )
    except (ValueError, distributed.CoordinatorUnreachableError) as error:
        raise SystemExit(f"{who}{error}") from error

"""Benchmarks of convlib's convolutions, pools and training steps: backward="custom" against JAX's autodiff
(and the textbook formulation, and the composable primitives), with PyTorch eager (channels_last) as a reference row
when it is importable.

    python experiments/benchmarks/bench.py all --out experiments/benchmarks/results   # layers + training
    python experiments/benchmarks/bench.py layers --quick --out /tmp/bench           # seconds: a smoke run

Suites: `layers` (conv: forward, dX, dW, forward + backward per mode; pools), `training` (images/s of whole
train steps), `all` (both). Times are medians and minima of repeated calls after compilation, all modes of a
case timed in turns in one process; GFLOP/s are also given as a fraction of the machine's float32 GEMM, measured
in the same run. Writes <out>/<name>.json (every number, the machine, the command) and <out>/<name>.md (the
tables), <name> defaulting to the machine's short name (e.g. cpu-amd-epyc).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from convlib.train import write_json
from convlib.train.atomic_files import write_text
from experiments import outputs
from experiments.benchmarks import layers, machine, training


def parse_args(argv=None) -> argparse.Namespace:
    p = outputs.Parser(__doc__, prog="bench.py")
    p.add_argument("suite", choices=("layers", "training", "all"), help="what to run")
    p.add_argument("--out", default="runs/benchmarks", help="output folder (created if missing)")
    p.add_argument("--name", default=None, help="file stem of the results (default: the machine's short name)")
    p.add_argument("--quick", action="store_true", help="one tiny case per suite, 2 repeats (a smoke run)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per function after one compiling call (default: 2 with --quick, else 7)",
    )
    p.add_argument("--training-repeats", type=int, default=None, help="timed steps per model (default: --repeats)")
    p.add_argument("--layouts", default="NHWC,NCHW", help="comma-separated layouts of the conv cases")
    p.add_argument(
        "--gemm-size",
        type=int,
        default=None,
        help="side of the float32 GEMM ceiling, timed on its "
        "own and in every conv case's rounds (default: 256 with --quick, 1024 on a CPU, 8192 on an "
        "accelerator)",
    )
    p.add_argument(
        "--modes",
        default=",".join(layers.CONV_MODES),
        help="comma-separated conv backward modes of the layer suite; autodiff, the baseline, always runs",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated models of the training suite, from "
        f"{', '.join(training.MODELS)} and resnet50 (bfloat16, 224x224; meant for a GPU) (default: "
        "lenet5_modern with --quick, else the first four)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch of every training-suite model (default: 8 "
        "with --quick, else each model's own: " + ", ".join(f"{k} {v[0]}" for k, v in training.MODELS.items()) + ")",
    )
    p.add_argument("--resnet50-batch", type=int, default=64, help="batch of resnet50 in the training suite")
    p.add_argument(
        "--resnet50-size",
        type=int,
        default=training.RESNET50[1],
        help=f"side of resnet50's square inputs (default {training.RESNET50[1]}; smaller only for smoke runs)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    for name in ("repeats", "training_repeats", "gemm_size", "batch", "resnet50_batch", "resnet50_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.training_repeats = args.training_repeats or args.repeats
    args.layouts = tuple(s.strip().upper() for s in args.layouts.split(","))
    if not set(args.layouts) <= {"NHWC", "NCHW"}:
        p.error(f"--layouts must list NHWC and/or NCHW, got {args.layouts!r}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip() != "autodiff")
    if not set(modes) <= set(layers.CONV_MODES) or "custom" not in modes:
        p.error(f"--modes must list custom and other modes from {layers.CONV_MODES}, got {args.modes!r}")
    args.modes = ("autodiff", *modes)
    args.models = tuple((args.models or ("lenet5_modern" if args.quick else ",".join(training.MODELS))).split(","))
    unknown = set(args.models) - {*training.MODELS, training.RESNET50[0]}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(training.MODELS)}, resnet50")
    args.batch = args.batch or (8 if args.quick else None)
    return args


def progress_printer(enabled: bool):
    """progress(items, what) -> the items, printing 'what i/n: item' to stderr as each is reached."""

    def progress(items, what):
        items = list(items)
        for i, item in enumerate(items):
            if enabled:
                first = item[0] if isinstance(item, tuple) else item
                label = getattr(first, "name", first)
                print(f"{what} {i + 1}/{len(items)}: {label}", file=sys.stderr, flush=True)
            yield item

    return progress


ESTIMATE_DESCRIPTIONS = {"median": "medians of wall time", "best": "fastest calls", "cpu": "medians of CPU time"}


def _layers_summary_lines(summary: dict) -> list[str]:
    """One line per estimate: geometric mean, worst row, worst of custom's own programs and the noise range."""

    def worst(w):
        return "none" if w is None else f"{w['ratio']:.2f} ({w['layer']}, {w['layout']})"

    lines = [
        "custom / autodiff forward+backward time (ratios < 1: custom is faster). On "
        f"{summary[layers.SAME_PROGRAM_ROWS]} rows custom compiles to the very program autodiff does, so there the "
        "ratio is the machine's noise.",
        "",
    ]
    for name in layers.ESTIMATE_NAMES:
        s, noise = summary[name], summary[name][layers.NOISE_RANGE]
        lines.append(
            f"- {ESTIMATE_DESCRIPTIONS[name]}: geometric mean {s['geomean']:.2f}, worst {worst(s['worst'])}, worst "
            f"of custom's own programs {worst(s[layers.OWN_PROGRAMS_WORST])}"
            + ("" if noise is None else f"; on autodiff's program {noise[0]:.2f}-{noise[1]:.2f}")
        )
    return [*lines, ""]


def markdown(results: dict) -> str:
    """The report: machine line, GEMM ceiling, summary and the tables."""
    info, gemm = results["machine"], results["machine"]["gemm"]
    lines = [
        f"# convlib benchmarks, {info['date'][:10]}",
        "",
        f"Machine: {outputs.describe(info)}; PyTorch {info['torch'] or 'not installed'}. "
        f"GEMM ceiling: {gemm['gflops']:.0f} GFLOP/s (float32 {gemm['size']}^3 matmul, same run; each conv "
        "row's fraction of GEMM uses the GEMM timed in that row's own rounds).",
        f"Command: `{results['command']}`. Load average (1, 5, 15 min) at start "
        f"{', '.join(f'{v:.1f}' for v in results['load_average_at_start'])}, at end "
        f"{', '.join(f'{v:.1f}' for v in results['load_average_at_end'])} (2 cores: above 2 the machine was "
        "shared).",
        "",
    ]
    if "layers" in results:
        s = results["layers"]["summary"]
        lines += [
            "## Layers",
            "",
            *_layers_summary_lines(s),
            "custom dW as a fraction of the GEMM timed in the same rounds (3x3 layers with >= 16 channels): "
            + ", ".join(f"{k} {v:.2f}" for k, v in s["custom dW of GEMM (3x3, >= 16 channels)"].items()),
            "",
            outputs.markdown_table(results["layers"]["conv"], layers.CONV_COLUMNS, "Convolutions"),
            outputs.markdown_table(results["layers"]["pool"], layers.POOL_COLUMNS, "Pools"),
        ]
    if "training" in results:
        lines += [
            "## Training steps",
            "",
            outputs.markdown_table(results["training"]["models"], training.COLUMNS, "images/s"),
        ]
    return "\n".join(lines)


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    progress = progress_printer(not args.no_progress)
    gemm_size = args.gemm_size or (256 if args.quick else 8192 if jax.default_backend() != "cpu" else 1024)
    gemm = machine.gemm_ceiling(gemm_size, args.repeats)
    info = machine.record(gemm)
    command = " ".join(["python", "experiments/benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)])
    results = {
        "command": command,
        "config": vars(args),
        "machine": info,
        "git": outputs.source_version(),
        "load_average_at_start": os.getloadavg(),
    }
    with_torch = not args.no_torch
    if args.suite in ("layers", "all"):
        results["layers"] = layers.run(
            args.quick, args.repeats, args.layouts, args.modes, gemm_size, with_torch, args.seed, progress
        )
    if args.suite in ("training", "all"):
        results["training"] = training.run(
            args.models,
            args.training_repeats,
            with_torch,
            args.batch,
            args.resnet50_batch,
            args.seed,
            progress,
            args.resnet50_size,
        )
    results["load_average_at_end"] = os.getloadavg()
    name = args.name or machine.short_name(info)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, f"{name}.json"), results)
    write_text(os.path.join(args.out, f"{name}.md"), markdown(results))
    return results


if __name__ == "__main__":
    main()

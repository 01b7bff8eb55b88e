"""One bounded run on one NVIDIA GPU: the tests, the benchmarks and the goals they are read against.

    python experiments/benchmarks/gpu_suite.py --out OUT                # on the GPU, about 9 minutes
    python experiments/benchmarks/gpu_suite.py --dry-run --out /tmp/g   # every part at its smallest, any machine

Parts, each a subprocess under a hard time limit (`PARTS`; a part cut off is recorded as such, the others kept):
`tests` (the ops, nn and models test files, pytest -x -q, float32 at JAX's "highest" matmul precision: no TF32),
`layers` (the benchmark's layer grid, NHWC, fwd+bwd autodiff against custom, with PyTorch's), `training` (training
steps of the four small models: autodiff, custom and PyTorch CUDA eager channels_last, interleaved), `resnet50`
(ResNet-50 224x224 bfloat16 training steps against torchvision's under `torch.autocast(bfloat16)`, channels_last,
same batch). The benchmarks run at each library's default precision. Writes OUT/gpu.json (every number, the device,
driver and versions, each part's status, the goals of issue 30 with their figures), OUT/gpu.md (the same as tables),
OUT/gpu.log (every part's output) and OUT/xla-dump.tar.gz (the optimised HLO of every jitted training step, per model
in the order compiled: autodiff, then custom). Without a GPU (and without --dry-run) it writes why and times nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

from convlib.train import write_json
from convlib.train.atomic_files import write_text
from experiments import outputs
from experiments.benchmarks import training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_FILES = (
    "tests/test_ops_conv.py",
    "tests/test_ops_pool.py",
    "tests/test_ops_reference.py",
    "tests/test_ops_errors.py",
    "tests/test_ops_torch.py",
    "tests/test_fast_backward.py",
    "tests/test_ops_plan.py",
    "tests/test_nn.py",
    "tests/test_models.py",
    "tests/test_models_gradients.py",
)
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy", "torch", "torchvision")
GOALS = {  # issue 30's goals on the GPU: (key of a row, comparison, bound)
    "layers": ("custom/autodiff fwd+bwd", "<=", 1.05),
    "training custom/autodiff": ("custom/autodiff images/s", ">=", 1.0),
    "training custom/torch": ("custom/torch images/s", ">=", 1.0),
}
# JAX and PyTorch share the GPU in one process: JAX takes half of its memory up front, PyTorch the rest as needed.
GPU_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5", "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass(frozen=True)
class Part:
    """One subprocess of the run: `command` with `full` on the GPU, with `smallest` in a dry run; cut off after
    `seconds`; `env`: environment variables of its own."""

    name: str
    seconds: int
    command: tuple[str, ...]
    full: tuple[str, ...] = ()
    smallest: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, dry_run: bool) -> tuple[str, ...]:
        return (*self.command, *(self.smallest if dry_run else self.full))


def parts(repeats: int, resnet50_batch: int, results: str) -> tuple[Part, ...]:
    """The run's parts, 500 s of limits in all; the benchmarks write <results>/<part>.json."""

    def bench(name, seconds, *flags, full=(), smallest=(), env=()):
        command = (sys.executable, "experiments/benchmarks/bench.py", *flags, "--name", name, "--out", results)
        full, smallest = (*full, "--repeats", str(repeats)), ("--quick", "--repeats", "1", *smallest)
        return Part(name, seconds, (*command, "--no-progress"), full, smallest, env)

    pytest = (sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TEST_FILES)
    return (
        Part("tests", 120, pytest, smallest=("--collect-only",), env=(("JAX_DEFAULT_MATMUL_PRECISION", "highest"),)),
        bench("layers", 150, "layers", "--layouts", "NHWC", "--modes", "autodiff,custom"),
        bench("training", 100, "training", env=dump_training_steps(results, "training")),
        bench(
            "resnet50",
            130,
            "training",
            "--models",
            "resnet50",
            full=("--resnet50-batch", str(resnet50_batch)),
            smallest=("--resnet50-size", "32"),
            env=dump_training_steps(results, "resnet50"),
        ),
    )


def dump_training_steps(results: str, name: str) -> tuple[tuple[str, str], ...]:
    """XLA_FLAGS that dump the HLO of each compiled training step into <results>/xla/<name> (the profile a missed
    goal is read from: fusions, cuDNN and cuBLAS calls, copies)."""
    flags = f"--xla_dump_to={os.path.join(results, 'xla', name)} --xla_dump_hlo_as_text"
    return (("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {flags} --xla_dump_hlo_module_re=train_step".strip()),)


def archive_dumps(results: str, path: str) -> list[str]:
    """Packs the optimised HLO of every dumped training step into the tar.gz `path`; returns their names."""
    names = sorted(glob.glob(os.path.join(results, "xla", "*", "*after_optimizations.txt")))
    if names:
        with tarfile.open(path, "w:gz") as archive:
            for name in names:
                archive.add(name, os.path.relpath(name, os.path.join(results, "xla")))
    return [os.path.relpath(n, os.path.join(results, "xla")) for n in names]


def run_part(argv, seconds: float, log, env: dict | None = None) -> tuple[dict, str]:
    """Runs `argv` from the repository root; after `seconds` it gets SIGINT (pytest then reports what ran), 15 s
    later SIGKILL. Returns (its exit code, time and whether it was cut off; its output), the output also appended
    to the open file `log`."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        cut_off = False
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            cut_off = True
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        output.seek(0)
        text = output.read()
    status = {"exit": process.returncode, "seconds": round(time.monotonic() - start, 1), "limit": seconds}
    log.write(f"\n== {' '.join(argv)}\n{text}")
    log.flush()
    return {**status, "cut_off": cut_off}, text


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ('3 passed, 1 failed in 2.0s' -> {'passed': 3, 'failed': 1}).

    >>> pytest_counts("... \\n2 failed, 10 passed, 1 skipped in 3.10s\\n")
    {'failed': 2, 'passed': 10, 'skipped': 1}
    """
    summaries = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|tests? collected)", line)]
    found = (
        re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|tests? collected)", summaries[-1])
        if summaries
        else []
    )
    return {word: int(n) for n, word in found}


def environment() -> dict:
    """The GPU (name, memory, driver by nvidia-smi) and the versions of the libraries, without starting JAX."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        gpus = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpus": [dict(zip(("name", "memory", "driver"), (s.strip() for s in g.split(",")))) for g in gpus],
        "python": sys.version.split()[0],
        "versions": versions,
        "git_commit": os.environ.get("GIT_COMMIT") or outputs.source_version()["commit"],
    }


def jax_backend() -> str:
    """JAX's default backend, asked in a subprocess (this process keeps the GPU's memory free for the parts)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True, text=True, timeout=120
    )
    return probe.stdout.strip() or f"none ({probe.stderr.strip().splitlines()[-1:]})"


def goals(results: dict) -> list[dict]:
    """Each figure of issue 30's goals that the run measured: its value, the bound and whether it is met."""
    rows = []
    checks = [("layers", r["layer"], r) for r in (results.get("layers") or {}).get("conv", [])]
    for part in ("training", "resnet50"):
        checks += [
            (f"training {other}", r["model"], r)
            for r in results.get(part) or []
            for other in ("custom/autodiff", "custom/torch")
        ]
    for goal, what, row in checks:
        key, comparison, bound = GOALS[goal]
        if key in row:
            value = row[key]
            met = value <= bound if comparison == "<=" else value >= bound
            rows.append({"figure": f"{what}: {key}", "value": value, "goal": f"{comparison} {bound}", "met": met})
    return rows


def markdown(results: dict) -> str:
    env = results["environment"]
    gpus = "; ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})" for g in env["gpus"]) or "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"# convlib on the GPU, {env['date'][:10]}",
        "",
        f"Device: {gpus}. Python {env['python']}, {versions}. Commit {env['git_commit']}. "
        f"JAX's backend: {results['backend']}{' (dry run: smallest sizes)' if results['dry_run'] else ''}.",
        "",
        outputs.markdown_table(
            [{"part": k, **v} for k, v in results["parts"].items()],
            ("part", "exit", "seconds", "limit", "cut_off"),
            "Parts",
        ),
    ]
    if results.get("tests") is not None:
        counts = ", ".join(f"{n} {w}" for w, n in results["tests"].items()) or "no summary"
        lines += [f"Tests (JAX_DEFAULT_MATMUL_PRECISION=highest): {counts}.", ""]
    if results["goals"]:
        met = sum(g["met"] for g in results["goals"])
        lines += [outputs.markdown_table(results["goals"], None, f"Goals: {met} of {len(results['goals'])} met")]
    if results.get("layers"):
        lines += [outputs.markdown_table(results["layers"]["conv"], LAYER_COLUMNS, "Layers (NHWC, float32)")]
    rows = (results.get("training") or []) + (results.get("resnet50") or [])
    if rows:
        lines += [outputs.markdown_table(rows, training.COLUMNS, "Training steps, images/s")]
    if results.get("resnet50"):
        lines += [RESNET50_NOTE]
    return "\n".join(lines)


RESNET50_NOTE = (
    "ResNet-50: convlib's is the paper's (v1, stride on the first 1x1 conv of a block, 3.86 G multiply-adds per "
    "224x224 image), torchvision's is v1.5 (stride on the 3x3, 4.09 G): PyTorch does 6 % more work."
)
LAYER_COLUMNS = (
    "layer",
    "shape",
    "autodiff fwd+bwd ms",
    "custom fwd+bwd ms",
    "custom/autodiff fwd+bwd",
    "custom/autodiff fwd+bwd best",
    "torch fwd+bwd ms",
    "custom plan",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = outputs.Parser(__doc__, prog="gpu_suite.py")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="every part at its smallest size, on any machine")
    p.add_argument("--parts", default=None, help="comma-separated parts to run (default: all)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per function in the benchmarks")
    p.add_argument("--resnet50-batch", type=int, default=128, help="batch of the ResNet-50 training steps")
    args = p.parse_args(argv)
    for name in ("repeats", "resnet50_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    names = [q.name for q in parts(1, 1, "")]
    args.parts = tuple(args.parts.split(",")) if args.parts else tuple(names)
    unknown = sorted(set(args.parts) - set(names))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(names)}")
    return args


@outputs.script
def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    backend = jax_backend()
    results = {"environment": environment(), "backend": backend, "dry_run": args.dry_run, "parts": {}}
    results["command"] = " ".join(
        ["python", "experiments/benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
    )
    with tempfile.TemporaryDirectory() as folder, open(os.path.join(args.out, "gpu.log"), "a") as log:
        if backend != "gpu" and not args.dry_run:
            results["skipped"] = f"JAX's backend is {backend}, not a GPU: nothing timed"
        else:
            for part in parts(args.repeats, args.resnet50_batch, folder):
                if part.name in args.parts:
                    status, text = run_part(part.argv(args.dry_run), part.seconds, log, {**GPU_ENV, **dict(part.env)})
                    results["parts"][part.name] = status
                    if part.name == "tests":
                        results["tests"] = pytest_counts(text)
        for name in ("layers", "training", "resnet50"):
            path = os.path.join(folder, f"{name}.json")
            if os.path.exists(path):
                with open(path) as f:
                    bench = json.load(f)
                results.setdefault("machine", bench["machine"])
                results[name] = bench["layers"] if name == "layers" else bench["training"]["models"]
        results["xla_dumps"] = archive_dumps(folder, os.path.join(args.out, "xla-dump.tar.gz"))
    results["goals"] = goals(results)
    write_json(os.path.join(args.out, "gpu.json"), results)
    write_text(os.path.join(args.out, "gpu.md"), markdown(results))
    return results


if __name__ == "__main__":
    main()

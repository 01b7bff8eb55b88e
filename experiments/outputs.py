"""What every experiment script shares: its parser (one-line errors), its entry wrapper, its common flags, its output
folder, the record of the machine, and atomic writing of JSON, CSV, Markdown tables and PNG figures (matplotlib,
Agg backend)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import io
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

from convlib.train import CheckpointError, NonFiniteLossError, write_json
from convlib.train.atomic_files import atomic_path, write_text

SIZES = ("smoke", "default", "full")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (unless its help already says it) and keeps the description's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` for the scripts: every user error is one line `prog: error: ...` and exit status 2 (no
    usage block, no traceback), and flags must be spelt out (`--epoch` is not taken for `--epochs`)."""

    def __init__(self, description: str, prog: str, **kwargs):
        super().__init__(
            description=description, prog=prog, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")

    @contextlib.contextmanager
    def setting_up(self):
        """Turns the library's `ValueError` / `TypeError` (bad arguments, named by the library) raised while the
        script sets up, before it writes anything, into `error`. Later failures keep their tracebacks."""
        try:
            yield
        except (ValueError, TypeError, FileNotFoundError) as error:
            self.error(str(error))


def script(main: Callable) -> Callable:
    """The entry wrapper of every script's `main(argv)`: a training run stopped by non-finite values ends with one
    line naming the step and what was kept (exit 1), Ctrl-C with one line saying what a resume continues from
    (exit 130; SIGTERM: 143), a checkpoint that cannot be resumed with one line naming it (exit 2); warnings are one
    line each;
    anything else (a bug) keeps its traceback."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None):
        module = main.__module__
        prog = os.path.basename(sys.argv[0]) if module == "__main__" else module.rsplit(".", 1)[-1] + ".py"

        def one_line(message, category, filename, lineno, file=None, line=None):
            print(f"{prog}: warning: {message}", file=sys.stderr)

        try:
            with warnings.catch_warnings():
                warnings.showwarning = one_line
                return main(argv)
        except CheckpointError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteLossError as error:
            print(f"{prog}: stopped: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt as error:  # TrainingInterrupted, data.PreparationInterrupted, or a plain Ctrl-C
            print(f"{prog}: {error or 'interrupted'}", file=sys.stderr)
            raise SystemExit(getattr(error, "exit_code", 130)) from None

    return run


def check_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """`parser.error` naming `flag` unless `folder` is a writable folder or a path one can be created at."""
    if not folder:
        parser.error(f"{flag} must name a folder, got {folder!r}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"{flag} {folder!r} is an existing file, not a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:  # the honest test (permission bits say little to root): make a folder there, and remove it
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".convlib-probe-"))
    except OSError as error:
        parser.error(f"{flag} {folder!r} cannot be created or written ({existing!r}: {error.strerror})")


def check_out(parser: argparse.ArgumentParser, out: str, *, resume: bool) -> None:
    """`parser.error` unless `out` can hold this run's files: a folder (or a path one can be created at) that is
    writable, and without a finished run's results unless resuming."""
    check_folder(parser, "--out", out)
    if not resume and os.path.exists(os.path.join(out, "results.json")):
        parser.error(f"--out {out!r} holds a finished run's results.json: choose another folder (or --resume)")


def finite_or_none(value: float | None) -> float | None:
    """`value`, or None where it is NaN or infinite (JSON has no such numbers)."""
    return value if value is not None and math.isfinite(value) else None


def make_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """A parser with the flags every experiment has: --out, --seed, --smoke / --full, --no-progress."""
    p = Parser(doc, prog=f"{name}.py")
    p.add_argument("--out", default=os.path.join("runs", name), help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (jax.random keys, nnx.Rngs)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--smoke",
        dest="size",
        action="store_const",
        const="smoke",
        default="default",
        help="tiny sizes and a few steps (seconds; for the tests)",
    )
    size.add_argument(
        "--full", dest="size", action="store_const", const="full", help="the real-scale run (meant for a GPU)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def pick(size: str, smoke, default, full):
    """The value for the run size `size` ("smoke", "default" or "full")."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {"smoke": smoke, "default": default, "full": full}[size]


def positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """parser.error naming the flag unless each of `names` (attribute names) is None or a positive number."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value!r}")


def machine() -> dict:
    """CPU model, core count, the JAX devices (GPU name), library versions and the date, for the results."""
    import flax
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "backend": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def source_version() -> dict:
    """The git commit of this checkout and whether convlib/ had uncommitted changes when the run started."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "convlib"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "convlib_modified": None}
    return {"commit": commit or None, "convlib_modified": bool(dirty)}


def describe(info: dict) -> str:
    """One line naming the machine of `machine()`, e.g. 'cpu: AMD EPYC ... (2 cores), JAX 0.10.2'."""
    where = f"{info['cpu']} ({info['cpu_cores']} cores)" if info["backend"] == "cpu" else info["device"]
    return f"{info['backend']}: {where}, JAX {info['jax']}"


class Run:
    """The output folder of one experiment run: writes files atomically and, at the end, results.json.

    results.json holds what the script passes to `finish`, plus the command, the flags, the machine, the git commit
    and the wall time.
    """

    def __init__(self, args: argparse.Namespace, argv: Sequence[str] | None):
        self.args, self.folder = args, args.out
        self.started = time.perf_counter()
        self.git = source_version()
        self.command = " ".join(
            ["python", sys.argv[0] if argv is None else "<main>", *(sys.argv[1:] if argv is None else argv)]
        )
        os.makedirs(self.folder, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def write_json(self, name: str, obj) -> str:
        write_json(self.path(name), obj)
        return self.path(name)

    def write_csv(self, name: str, rows: Sequence[dict]) -> str:
        """Rows of dicts (the first row's keys are the columns) as CSV."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path(name), text.getvalue())
        return self.path(name)

    def write_markdown(
        self, name: str, rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None
    ) -> str:
        """Rows of dicts as a Markdown table (floats with 3 significant digits)."""
        write_text(self.path(name), markdown_table(rows, columns, title))
        return self.path(name)

    def save_figure(self, fig, name: str, dpi: int = 90) -> str:
        """Saves a matplotlib figure as PNG and closes it."""
        import matplotlib.pyplot as plt

        with atomic_path(self.path(name)) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return self.path(name)

    def finish(self, results: dict) -> dict:
        """Writes results.json (results + command, flags, machine, wall time) and returns it."""
        results = {
            **results,
            "command": self.command,
            "config": vars(self.args),
            "machine": machine(),
            "git": self.git,
            "wall_s": time.perf_counter() - self.started,
        }
        self.write_json("results.json", results)
        return results


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    columns = list(columns or rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = [f"### {title}\n"] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

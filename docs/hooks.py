"""mkdocs hooks of the convlib site.

- The committed figures of `experiments/results/` are served from where they are, under `results/`, instead of
  being copied into docs/.
- A fenced block in the language `console` whose lines start with `$ ` is run at build time, from the repository
  root, and shows its real output; `$OUT` in a command is a fresh temporary folder of that build. A Python block
  right after a `<!-- run -->` line is run the same way, its output not shown. A command or block that fails (or
  runs past `TIMEOUT_S`) fails the build. Only cheap commands belong there: the guides link the tests that cover
  the expensive ones.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
CONSOLE = re.compile(r"^```console\n(.*?)^```$", re.M | re.S)
PYTHON = re.compile(r"^<!-- run -->\n```python\n(.*?)^```$", re.M | re.S)
TIMEOUT_S = 180
MAX_LINES = 200


def on_files(files, config):
    for path in sorted(RESULTS.glob("*/*.png")):
        relative = path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"results/{relative}", abs_src_path=str(path)))
    return files


def _run(argv: list[str], shown: str, out: str) -> str:
    # `python`, alone or after `env VAR=value ...`: the project's interpreter, the one running this build
    start = 0
    if argv[0] == "env":
        start = next(i for i, arg in enumerate(argv) if i and "=" not in arg)
    if argv[start] == "python":
        argv = [*argv[:start], sys.executable, *argv[start + 1 :]]
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OUT": out}
        )
    except subprocess.TimeoutExpired as error:
        raise PluginError(f"`{shown}` ran past {TIMEOUT_S} s") from error
    if done.returncode != 0:
        raise PluginError(f"`{shown}` exited {done.returncode}:\n{done.stderr[-2000:]}")
    lines = done.stdout.replace(out, "$OUT").rstrip("\n").split("\n")
    if len(lines) > MAX_LINES:
        lines = [*lines[:MAX_LINES], f"... ({len(lines) - MAX_LINES} more lines)"]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    with tempfile.TemporaryDirectory(prefix="convlib-docs-") as out:

        def console(match: re.Match) -> str:
            commands = [line[2:] for line in match.group(1).splitlines() if line.startswith("$ ")]
            if not commands:
                return match.group(0)
            runs = []
            for command in commands:
                argv = [arg.replace("$OUT", out) for arg in shlex.split(command)]
                runs.append(f"$ {command}\n{_run(argv, command, out)}".rstrip("\n"))
            return "```console\n" + "\n".join(runs) + "\n```"

        def python(match: re.Match) -> str:
            _run(["python", "-c", match.group(1)], f"the Python block of {page.file.src_uri}", out)
            return f"```python\n{match.group(1)}```"

        return CONSOLE.sub(console, PYTHON.sub(python, markdown))

"""mkdocs hooks of the convlib site.

- The committed figures of `experiments/results/` are served from where they are, under `results/`, instead of
  being copied into docs/.
- A fenced block in the language `console` whose lines start with `$ ` is run at build time, from the repository
  root, and gets its real output; a command that fails (or runs past a minute) fails the build. Only cheap
  commands belong there: the expensive ones are covered by the tests the guides link.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
CONSOLE = re.compile(r"^```console\n(.*?)^```$", re.M | re.S)
TIMEOUT_S = 60
MAX_LINES = 40


def on_files(files, config):
    for path in sorted(RESULTS.glob("*/*.png")):
        relative = path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"results/{relative}", abs_src_path=str(path)))
    return files


def _run(command: str) -> str:
    argv = shlex.split(command)
    if argv[0] == "python":  # the project's interpreter, the one running this build
        argv[0] = sys.executable
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise PluginError(f"`{command}` ran past {TIMEOUT_S} s") from error
    if done.returncode != 0:
        raise PluginError(f"`{command}` exited {done.returncode}:\n{done.stderr[-2000:]}")
    lines = (done.stdout + done.stderr).rstrip("\n").split("\n")
    if len(lines) > MAX_LINES:
        lines = [*lines[:MAX_LINES], f"... ({len(lines) - MAX_LINES} more lines)"]
    return "\n".join(lines)


def _executed(match: re.Match) -> str:
    commands = [line[2:] for line in match.group(1).splitlines() if line.startswith("$ ")]
    if not commands:
        return match.group(0)
    body = "\n".join(f"$ {command}\n{_run(command)}" for command in commands)
    return f"```console\n{body}\n```"


def on_page_markdown(markdown, page, config, files):
    return CONSOLE.sub(_executed, markdown)

"""mkdocs hooks of the convlib site.

- The committed figures of `experiments/results/` are served from where they are, under `results/`, instead of
  being copied into docs/.
- A fenced block in the language `console` whose lines start with `$ ` is run at build time, from the repository
  root, and shows its real output; `$OUT` in a command is a fresh temporary folder of that build. A Python block
  right after a `<!-- run -->` line is run the same way, its output not shown. A command or block that fails (or
  runs past `TIMEOUT_S`) fails the build. Only cheap commands belong there: the guides link the tests that cover
  the expensive ones.
- Maths is typeset at build time as MathML, which browsers render natively: no script and no network when reading.
  LaTeX between `$...$` / `$$...$$` (tutorials: Jupyter's delimiters) or `\\(...\\)` / `\\[...\\]` (the Markdown
  pages, through `pymdownx.arithmatex`) outside code becomes `<math>`; a formula latex2mathml cannot read fails the
  build. The tutorials' notebook template would load MathJax from a CDN: that script is dropped.
- Each tutorial page links its source script and the notebook jupytext makes of it, both written into the site.
  A tutorial's figures are written as PNG files beside it (so that a click opens one full size), each with the alt
  text of the `# alt: ...` line in the cell that draws it; a figure without one fails the build.
- After the build, every internal link and image of every page must point to a file of the site, and every
  `#anchor` to an id in that file; and no page may load a script, style or image from the network. Either fails
  the build.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import shlex
import subprocess
import sys
import tempfile
from html import escape, unescape
from pathlib import Path

import jupytext
from latex2mathml.converter import convert as latex_to_mathml
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
CONSOLE = re.compile(r"^```console\n(.*?)^```$", re.M | re.S)
PYTHON = re.compile(r"^<!-- run -->\n```python\n(.*?)^```$", re.M | re.S)
TIMEOUT_S = 180
MAX_LINES = 200
# text outside these elements may hold maths; tags split the page into text and markup
VERBATIM = ("pre", "code", "script", "style", "textarea", "title")
TAG = re.compile(r"(<!--.*?-->|<[^>]+>)", re.S)
MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\\w$])\$(?=\S)([^$]+?)(?<=\S)\$(?![\w$])", re.S)
CDN_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)
TUTORIALS = Path(__file__).resolve().parent / "tutorials"
ALT = re.compile(r"^# alt: (.+(?:\n#   .+)*)$", re.M)  # continued on lines indented by three spaces
FIGURE = re.compile(r'<img [^>]*?src="data:image/png;base64,([^"]+)"[^>]*>')
LINK = re.compile(r'(?:href|src)="([^"]*)"')
ID = re.compile(r'\bid="([^"]*)"')
# what a browser loads by itself (scripts, styles, images, frames), not what a reader may follow (<a href>)
REMOTE = re.compile(r'<(?:script|img|iframe|source|link)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]*)"')


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


def _mathml(match: re.Match, where: str) -> str:
    display_math = match.group(1) or match.group(2)
    latex = unescape(display_math or match.group(3) or match.group(4)).strip()
    try:
        mathml = latex_to_mathml(latex, display="block" if display_math else "inline")
    except Exception as error:  # latex2mathml raises its own exception classes, one per kind of mistake
        raise PluginError(f"{where}: the formula {latex!r} does not convert to MathML: {error}") from error
    # latex2mathml keeps what it does not know as text: an unknown command, or the `&` of an unknown environment
    unknown = re.search(r">(\\[a-zA-Z]+|&amp;|&)<", mathml)
    if unknown:
        raise PluginError(f"{where}: the formula {latex!r} uses {unknown.group(1)!r}, which latex2mathml cannot read")
    # a display formula scrolls inside its own box when it is wider than the page
    return f'<span class="math-display">{mathml}</span>' if display_math else mathml


def typeset(html: str, where: str) -> str:
    """The LaTeX of `html`'s text (never of its code) as MathML."""
    parts, verbatim = TAG.split(html), []
    for i, part in enumerate(parts):
        if i % 2:  # a tag or a comment
            name = re.match(r"<(/?)([a-zA-Z0-9]+)", part)
            if name and name.group(2).lower() in VERBATIM and not part.endswith("/>"):
                if name.group(1):
                    verbatim = verbatim[:-1]
                else:
                    verbatim.append(name.group(2))
        elif not verbatim and ("$" in part or "\\" in part):
            parts[i] = MATH.sub(lambda m: _mathml(m, where), part)
    return "".join(parts)


def on_post_page(output, page, config):
    return typeset(CDN_MATHJAX.sub("", output), page.file.src_uri)


@event_priority(100)  # before glightbox, which links each figure to its full-size file
def on_page_content(html, page, config, files):
    if not page.file.src_uri.startswith("tutorials/"):
        return html
    name = Path(page.file.src_uri).stem
    alts = [re.sub(r"\n#\s+", " ", alt) for alt in ALT.findall((TUTORIALS / f"{name}.py").read_text())]
    if len(alts) != len(FIGURE.findall(html)):
        raise PluginError(
            f"{page.file.src_uri}: {len(FIGURE.findall(html))} figures but {len(alts)} `# alt:` lines; each cell that "
            "draws a figure says in one `# alt: ...` line what it shows"
        )
    out = Path(config["site_dir"]) / "tutorials"
    out.mkdir(parents=True, exist_ok=True)
    numbers = itertools.count(1)

    def save(match: re.Match) -> str:
        number = next(numbers)
        (out / f"{name}-{number}.png").write_bytes(base64.b64decode(unescape(match.group(1))))
        return f'<img src="{name}-{number}.png" alt="{escape(alts[number - 1])}">'

    links = (
        f'<p class="downloads">Download this tutorial: <a href="{name}.py" download>{name}.py</a> (the source, a '
        f'jupytext script) · <a href="{name}.ipynb" download>{name}.ipynb</a> (a notebook made from it, without '
        "outputs)</p>"
    )
    return links + FIGURE.sub(save, html)


def on_post_build(config):
    site = Path(config["site_dir"])
    for script in sorted(TUTORIALS.glob("*.py")):  # the notebooks, made from the scripts the site is built from
        jupytext.write(jupytext.read(script), site / "tutorials" / f"{script.stem}.ipynb")
    broken = broken_links(site)
    if broken:
        raise PluginError("broken links in the site:\n" + "\n".join(broken[:50]))
    pages = sorted(site.rglob("*.html"))
    fetched = [f"{path.relative_to(site)}: {url}" for path in pages for url in REMOTE.findall(path.read_text())]
    if fetched:
        raise PluginError("pages that would fetch from the network when read:\n" + "\n".join(fetched[:50]))


def broken_links(site: Path) -> list[str]:
    """`page: link` for every internal link or image of the site's pages whose file or `#anchor` is missing."""
    pages = {path: path.read_text() for path in site.rglob("*.html")}
    ids = {path: set(ID.findall(text)) for path, text in pages.items()}
    broken = []
    for path, text in pages.items():
        for link in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("//"):  # another scheme: http, data, mailto
                continue
            target, _, anchor = unescape(link).partition("#")
            target = target.split("?")[0]
            if target.startswith("/"):  # the 404 page's links start at the site's root
                target_path = site / target.lstrip("/")
            else:
                target_path = (path.parent / target).resolve() if target else path
            if target_path.is_dir():
                target_path = target_path / "index.html"
            if not target_path.exists() or (anchor and target_path in ids and anchor not in ids[target_path]):
                broken.append(f"{path.relative_to(site)}: {link}")
    return broken

"""A griffe extension: the `>>>` examples of convlib's docstrings (doctests, run by `make test`) rendered as Python
console code blocks. The docstrings have them as plain paragraphs, which Markdown would read as nested quotes."""

from __future__ import annotations

import griffe


def fence_doctests(text: str) -> str:
    """Wraps every run of lines from a `>>>` line to the next blank line in a ```pycon fence of the same indent."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        end = i
        while end < len(lines) and lines[end].strip():
            end += 1
        out += [f"{indent}```pycon", *lines[i:end], f"{indent}```"]
        i = end
    return "\n".join(out)


class Doctests(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)

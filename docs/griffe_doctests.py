"""griffe extensions of the API reference: convlib's docstrings as the site renders them.

- `Doctests`: the `>>>` examples (doctests, run by `make test`) as Python console code blocks. The docstrings have
  them as plain paragraphs, which Markdown would read as nested quotes.
- `JointParameters`: a Google-style `Args:` entry that documents several parameters together (`stride, dilation:
  ...`) becomes one entry per parameter with the same text, so that each shows its own type and default.
- `SphinxRoles`: a Sphinx role (`:func:`conv``, `:class:`~convlib.ops.Geometry``) becomes a cross-reference to the
  name's entry in the API reference when the reference shows it, and inline code when it does not (a private
  helper, a module without its own page). Names resolve in the docstring's own scope, as Python would read them.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

PACKAGES = ("ops", "nn", "models", "data", "train")
API_PAGES = Path(__file__).resolve().parent / "api"
ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|exc|obj):`(~?)([\w.]+)`")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes):\s*$")
JOINT = re.compile(r"^(\s*)([\w*]+(?:,\s*[\w*]+)+)(\s*\([^)]*\))?:(.*)$")


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


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_joint_parameters(text: str) -> str:
    """`a, b (type): text` in an `Args:` section as `a (type): text` and `b (type): text`, continuation lines too."""
    out, lines, i, section = [], text.split("\n"), 0, None
    while i < len(lines):
        line = lines[i]
        if SECTION.match(line):
            section = _indent(line)
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        joint = JOINT.match(line) if section is not None else None
        if not joint:
            out.append(line)
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() and _indent(lines[end]) > _indent(line):
            end += 1
        indent, names, kind, description = joint.groups()
        for name in re.split(r",\s*", names):
            out += [f"{indent}{name}{kind or ''}:{description}", *lines[i + 1 : end]]
        i = end
    return "\n".join(out)


class Doctests(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)


class JointParameters(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = split_joint_parameters(obj.docstring.value)


def _documented(pkg: griffe.Module) -> dict[str, str]:
    """Where each object the API reference shows is defined -> its identifier in the reference."""
    shown = {}
    for name in PACKAGES:
        module = pkg[name]
        shown[module.path] = module.path
        for member in module.members.values():
            if member.is_public and not member.is_module:
                shown[member.final_target.path if member.is_alias else member.path] = f"{module.path}.{member.name}"
    for page in API_PAGES.glob("*.md"):  # objects a page shows by their own path (`::: convlib.ops.conv.conv`)
        for path in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M):
            shown.setdefault(path, path)
    return shown


def _object(pkg: griffe.Module, path: str) -> griffe.Object | None:
    try:
        found = pkg.modules_collection[path]
    except KeyError:
        return None
    # a module shadowed by the function it defines (`convlib.ops.conv`): the function
    if found.is_module and path.rsplit(".", 1)[-1] in found.members:
        found = found.members[path.rsplit(".", 1)[-1]]
    return found.final_target if found.is_alias else found


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The defining path of `name` as read in `obj`'s docstring, or None."""
    head, _, rest = name.partition(".")
    if head == "convlib":
        return name
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return f"{path}.{rest}" if rest else path


def _identifier(pkg: griffe.Module, shown: dict[str, str], path: str) -> str | None:
    """The reference's identifier of the object at `path` (its defining path or a public one), or None."""
    target = _object(pkg, path)
    for candidate in [path] if target is None else [target.path, path]:
        if candidate in shown:
            return shown[candidate]
        owner, _, member = candidate.rpartition(".")  # a public member of a shown class
        owner_object = _object(pkg, owner)
        if owner in shown and owner_object is not None and owner_object.is_class and not member.startswith("_"):
            return f"{shown[owner]}.{member}"
    return None


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != "convlib":
            return
        shown = _documented(pkg)

        def rewrite(obj: griffe.Object) -> None:
            if obj.docstring is not None:

                def link(match: re.Match) -> str:
                    short, name = match.groups()
                    text = f"`{name.rsplit('.', 1)[-1] if short else name}`"
                    path = _resolve(obj, name)
                    identifier = path and _identifier(pkg, shown, path)
                    return f"[{text}][{identifier}]" if identifier else text

                obj.docstring.value = ROLE.sub(link, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    rewrite(member)

        rewrite(pkg)

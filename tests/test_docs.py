"""The docs site's API reference is generated from the docstrings: every public name of the five packages has one,
and each package has its reference page. `make docs` runs this before `mkdocs build --strict`."""

import ast
import importlib
import inspect
import itertools
from pathlib import Path

import pytest

PACKAGES = ("ops", "nn", "models", "data", "train")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def attribute_docstrings(package) -> dict[str, str]:
    """`NAME = value` followed by a string literal, at the top level of the package's modules (what griffe reads
    as the constant's docstring; Python keeps none at run time)."""
    found = {}
    for path in Path(package.__file__).parent.glob("*.py"):
        body = ast.parse(path.read_text()).body
        for node, after in itertools.pairwise(body):
            is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if is_doc and isinstance(after.value.value, str) and isinstance(node, ast.Assign | ast.AnnAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        found[target.id] = after.value.value
    return found


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_has_a_docstring(name):
    package = importlib.import_module(f"convlib.{name}")
    attributes = attribute_docstrings(package)
    missing = []
    for public in package.__all__:
        obj = getattr(package, public)
        if inspect.isclass(obj):
            doc = obj.__dict__.get("__doc__")  # its own, not a base class's
            if doc and doc.startswith(f"{obj.__name__}("):  # the signature dataclasses and NamedTuples fill in
                doc = None
        elif callable(obj) and not hasattr(obj, "__origin__"):  # typing aliases are callable too
            doc = inspect.getdoc(obj)
        else:
            doc = attributes.get(public)
        if not (doc and doc.strip()):
            missing.append(public)
    assert not missing, f"convlib.{name}: public names without a docstring: {missing}"


@pytest.mark.parametrize("name", PACKAGES)
def test_every_package_has_its_reference_page(name):
    page = DOCS / "api" / f"{name}.md"
    assert f"::: convlib.{name}" in page.read_text(), page

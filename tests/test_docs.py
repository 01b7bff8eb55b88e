"""The docs site's API reference is generated from the docstrings: every public name of the five packages has one,
and each package has its reference page. `make docs` runs this before `mkdocs build --strict`."""

import ast
import importlib.util
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


# The site's build machinery (docs/hooks.py, docs/griffe_doctests.py), checked without building the site.
# `make docs` runs the link check itself over the whole built site; these tests pin what each piece must do.
@pytest.fixture(scope="module")
def hooks():
    return _docs_module("hooks")


@pytest.fixture(scope="module")
def docstrings():
    return _docs_module("griffe_doctests")


def _docs_module(name):
    spec = importlib.util.spec_from_file_location(f"convlib_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formulas_become_mathml_outside_code_only(hooks):
    html = hooks.typeset(
        '<p>$x_i$ and <code>$OUT</code></p><span class="arithmatex">\\(K\\)</span><p>$$\\sum_i a_i$$</p><pre>$a$</pre>',
        "page",
    )
    assert html.count("<math") == 3 and "<code>$OUT</code>" in html and "<pre>$a$</pre>" in html
    assert '<span class="math-display"><math' in html and "$" not in html.replace("$OUT", "").replace("$a$", "")


@pytest.mark.parametrize("latex", ["$\\foo{x}$", "$$\\begin{aligned} a &= b \\end{aligned}$$"])
def test_a_formula_mathml_cannot_show_fails_the_build(hooks, latex):
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="latex2mathml cannot read"):
        hooks.typeset(f"<p>{latex}</p>", "page")


def test_link_check_finds_missing_files_and_anchors(hooks, tmp_path):
    (tmp_path / "a.html").write_text('<h2 id="here">x</h2><a href="b.html#there"></a><a href="#here"></a>')
    (tmp_path / "b.html").write_text('<a href="a.html#gone"></a><img src="missing.png"><a href="https://x.org">')
    broken = ["a.html: b.html#there", "b.html: a.html#gone", "b.html: missing.png"]
    assert sorted(hooks.broken_links(tmp_path)) == broken


def test_jointly_documented_parameters_are_split(docstrings):
    text = "Summary.\n\nArgs:\n  x: input.\n  stride, dilation: one int\n    per dim.\n\nReturns:\n  a, b: kept."
    assert docstrings.split_joint_parameters(text) == (
        "Summary.\n\nArgs:\n  x: input.\n  stride: one int\n    per dim.\n  dilation: one int\n    per dim.\n\n"
        "Returns:\n  a, b: kept."
    )


def test_sphinx_roles_become_cross_references(docstrings):
    import griffe

    extensions = griffe.load_extensions(docstrings.SphinxRoles)
    package = griffe.load("convlib", search_paths=[str(DOCS.parent)], extensions=extensions)
    texts = []

    def collect(obj):
        if obj.docstring is not None:
            texts.append(obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                collect(member)

    collect(package)
    everything = "\n".join(texts)
    assert not docstrings.ROLE.search(everything)
    assert "[`convlib.ops.conv`][convlib.ops.conv.conv]" in everything  # the function, not its module
    assert "[`Geometry`][convlib.ops.Geometry]" in everything  # a short name, resolved in its module's scope

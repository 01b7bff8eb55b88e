"""The wheel: `convlib` alone at the top level (experiments/ stays in the clone), every module, and the `py.typed`
marker that lets a user's type checker read the annotations."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of what packaging reads (the clone itself gets no build/ or egg-info)."""
    pytest.importorskip("setuptools")
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "convlib", src / "convlib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "experiments", src / "experiments", ignore=shutil.ignore_patterns("__pycache__", "results"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src]
    run = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = dist.glob("convlib-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_convlib_alone(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"convlib"}


def test_wheel_holds_every_module_and_py_typed(wheel):
    names = set(wheel.namelist())
    assert "convlib/py.typed" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "convlib").rglob("*.py")}
    assert modules <= names, sorted(modules - names)

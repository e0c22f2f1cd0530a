"""Our import names, `mistral` and `kernels`, are also PyPI distributions of other projects: make
sure ours are the ones imported, and that a foreign `kernels` is refused rather than run."""

import subprocess
import sys
import tomllib
from pathlib import Path

import kernels
import mistral

ROOT = Path(__file__).resolve().parents[1]


def test_imports_come_from_this_tree():
    assert Path(mistral.__file__).resolve().parent == ROOT / "mistral"
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert kernels.MISTRAL_FROM_SCRATCH is True


def test_distribution_name_is_our_own():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] not in ("mistral", "kernels")
    assert project["scripts"]["mistral"] == "mistral.cli:main"


def test_a_foreign_kernels_package_is_refused(tmp_path):
    impostor = tmp_path / "kernels"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("rms_norm = 'someone else'\n")
    code = "from mistral.ops import get_ops\nget_ops('triton')\n"
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode != 0
    assert "is not this project's" in run.stderr and str(impostor) in run.stderr


def test_every_package_of_ours_is_in_the_wheel():
    """setuptools ships only the packages pyproject.toml lists: a sub-package left out installs
    without its files (`mistral bench` would then fail on an installed copy)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for top in ("mistral", "kernels")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found == listed

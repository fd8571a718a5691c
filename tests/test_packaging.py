"""environment.yml mirrors pyproject.toml's dependencies; the CI script runs the README's commands."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch", "lmdb": "python-lmdb"}  # conda-forge names of PyTorch and the lmdb binding


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {CONDA_NAMES.get(name, name): spec for name, spec in (re.match(r"([\w-]+)(.*)", d).groups() for d in deps)}


def _conda_dependencies():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    deps = {}
    for line in lines[lines.index("dependencies:") + 1:]:
        match = re.match(r"  - ([\w-]+)(.*)$", line)
        if match and match.group(1) not in ("python", "pip"):
            deps[match.group(1)] = match.group(2).strip()
    return deps


def test_environment_yml_mirrors_pyproject():
    assert _conda_dependencies() == _requirements()
    assert "-e .[dev]" in (ROOT / "environment.yml").read_text()


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in readme and 'pip install -e ".[dev]"' in ci
    assert "python -m pytest" in readme and "python -m pytest" in ci

"""pyproject.toml is the one list of dependencies: environment.yml and docker/ must agree with it."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_matches_pyproject():
    project = _pyproject()
    wanted = project["dependencies"] + project["optional-dependencies"]["notebooks"]
    text = (ROOT / "environment.yml").read_text()
    pip_section = text.split("- pip:", 1)[1]
    listed = [ln.strip()[2:] for ln in pip_section.splitlines() if ln.strip().startswith("- ")]
    listed = [p for p in listed if not p.startswith("-e")]
    assert sorted(listed) == sorted(wanted)  # same packages, same version bounds
    assert "- -e ." in text


def test_docker_installs_from_pyproject():
    setup = (ROOT / "docker" / "runpod_setup.sh").read_text()
    assert 'pip install -e ".[notebooks]"' in setup
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+:\S+$", dockerfile, re.M), "base image must have a fixed tag"
    assert "runpod_setup.sh" in dockerfile


def test_required_dependencies_present():
    names = {_name(r) for r in _pyproject()["dependencies"]}
    assert {"torch", "triton", "numpy", "matplotlib", "seaborn", "tqdm"} <= names
    extras = _pyproject()["optional-dependencies"]
    assert {"jupyterlab", "ipywidgets"} <= {_name(r) for r in extras["notebooks"]}
    assert "pytest" in {_name(r) for r in extras["test"]}


def test_triton_range_includes_the_versions_we_run():
    spec = next(r for r in _pyproject()["dependencies"] if _name(r) == "triton")
    assert ">=3.4" in spec and "<3.10" in spec  # GPU image and CI: 3.6.0


def test_console_script():
    assert _pyproject()["scripts"]["moe-bench"] == "moe_tut.bench.cli:main"

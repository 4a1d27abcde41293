"""A non-editable install: the wheel built from pyproject.toml holds every module and config file of the checkout,
and the installed package composes and checks a run from outside the checkout."""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, run_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("glm_ft", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    built = run_process([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                         "-w", str(out), str(source)])
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = out.glob("glm_ft-*.whl")
    return found


def test_the_wheel_holds_every_module_and_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for folder in ("glm_ft", "hydra_plugins") for p in (ROOT / folder).rglob("*")
                if p.suffix in (".py", ".model") and "__pycache__" not in p.parts}
    expected |= {"glm_ft/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected - names == set()


def test_the_installed_package_checks_a_run_from_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    installed = run_process([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                             str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    work = tmp_path / "work"
    work.mkdir()
    out = run_process([sys.executable, "-m", "glm_ft", "train", "method=lora", "model.path=/nonexistent",
                       f"hydra.run.dir={tmp_path / 'run'}", "dry_run=true"], cwd=work, env=env)
    # the installed copy answered (not the checkout), through its own conf/ and method modules
    assert out.returncode == 1 and "model.path" in out.stderr, out.stderr[-3000:]
    where = run_process([sys.executable, "-c", "import glm_ft.methods.lora as m; print(m.__file__)"], cwd=work,
                        env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    conf = run_process([sys.executable, "-c", "from glm_ft.config.locations import config_dir; print(config_dir())"],
                       cwd=work, env=env)
    assert conf.stdout.strip() == str(target / "glm_ft" / "conf"), conf.stdout + conf.stderr

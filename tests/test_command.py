"""The `glm-ft` command (`python -m glm_ft`, the console script's function): run from another folder as an installed
package is, it trains there (run folder, MLflow store), takes the user's own configs with --config-dir, dispatches
every subcommand; the wheel ships the configs and the tiny tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_process, serving

SUBCOMMANDS = ["train", "chat", "predict", "export", "compare", "serve", "ui"]


def glm_ft(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m glm_ft ARGS` from `cwd`, glm_ft importable through PYTHONPATH only (as an install makes it)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    return run_process([sys.executable, "-m", "glm_ft", *args], cwd=cwd, env=full_env)


def test_help_lists_the_subcommands_and_unknown_ones_fail(tmp_path):
    result = glm_ft(["--help"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: glm-ft {" + ",".join(SUBCOMMANDS) + "}")
    bad = glm_ft(["fly"], tmp_path)
    assert bad.returncode == 2 and "unknown subcommand 'fly'" in bad.stderr
    missing = glm_ft(["serve", str(tmp_path / "nope")], tmp_path)
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nope'}: not found"
    export_help = glm_ft(["export", "--help"], tmp_path)
    assert export_help.returncode == 0 and "--format {chatglm3,hf}" in export_help.stdout


@pytest.mark.slow
def test_train_from_another_folder_writes_its_run_and_mlflow_store_there(tmp_path):
    import mlflow

    work = tmp_path / "work"
    work.mkdir()
    before = {p.name: p.stat().st_mtime for p in ROOT.iterdir()}
    result = glm_ft(["train", "experiment=quickstart", "training_args.max_steps=2", "training_args.save_steps=2",
                     "data.val_file=null", "data.test_file=null"], work)
    assert result.returncode == 0, result.stderr[-3000:]
    runs_dirs = list((work / "outputs").glob("*/*"))
    assert len(runs_dirs) == 1 and (runs_dirs[0] / "final").is_dir()
    assert (work / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["training_args.max_steps"] == "2"
    # nothing new or touched in the checkout: no mlflow.db, outputs/ or artifacts written there
    after = {p.name: p.stat().st_mtime for p in ROOT.iterdir()}
    for name in ("mlflow.db", "outputs", "mlartifacts", "multirun"):
        assert after.get(name) == before.get(name), name


def test_users_own_configs_through_config_dir(tmp_path):
    mine = tmp_path / "my-configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - quickstart\n\nmax_input_length: 48\n"
                                    "training_args:\n  learning_rate: 7e-4\n")
    result = glm_ft(["train", "--config-dir", str(tmp_path / "my-configs"), "experiment=mine", "dry_run=true"],
                    tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [finetune] = list((tmp_path / "outputs").glob("*/*/finetune.yaml"))
    import yaml

    rendered = yaml.safe_load(finetune.read_text())
    assert rendered["max_input_length"] == 48 and rendered["training_args"]["learning_rate"] == 7e-4
    assert rendered["max_output_length"] == 64  # the rest from the shipped quickstart it extends


@pytest.mark.slow
def test_ui_serves_this_folders_store_on_loopback(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    with serving([sys.executable, "-m", "glm_ft", "ui", "--port", str(port)], f"http://127.0.0.1:{port}/health",
                 tmp_path / "ui.log", cwd=tmp_path, env=env):
        assert (tmp_path / "mlflow.db").is_file()  # the store it opened is this folder's


@pytest.mark.slow
def test_wheel_ships_the_configs_the_tiny_tokenizer_and_the_command(tmp_path):
    result = run_process([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = list(tmp_path.glob("glm_ft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"glm_ft/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert "glm_ft/chatglm3/assets/tiny_tokenizer.model" in names
    # Hydra finds glm-ft's sweepers (optuna, basic) as plugins of the installed package.
    assert {f"hydra_plugins/glm_ft_sweepers/{m}.py" for m in ("config", "optuna_sweeper", "basic_sweeper")} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "glm-ft = glm_ft.command:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

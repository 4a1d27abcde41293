"""The README's make targets: install is idempotent, `make ui` serves the store on loopback only, `make clean` removes
what runs derive and nothing else."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, serving


def make(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def installed() -> None:
    if not (ROOT / ".venv" / ".installed").is_file():
        pytest.skip("no `make install` here (.venv/.installed is missing)")


def test_install_is_idempotent_and_reruns_when_the_pins_change(installed):
    assert make("-q", "install").returncode == 0, "a second `make install` would reinstall"
    for pins in ("requirements.txt", "constraints.txt"):
        assert make("-q", "-W", pins, "install").returncode == 1, f"changing {pins} must reinstall"


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.slow
def test_make_ui_serves_the_store_on_loopback(installed, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("glm-ft", artifact_location=str(tmp_path / "mlartifacts"))
    logged = client.create_run(experiment, run_name="lora-r8")
    client.log_metric(logged.info.run_id, "eval_rouge-l", 41.5, step=100)
    client.set_terminated(logged.info.run_id)

    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with serving(["make", "-C", str(ROOT), "ui", f"UI_STORE={store}", f"UI_PORT={port}"],
                 f"http://127.0.0.1:{port}/health", tmp_path / "ui.log", env=env):
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 and nothing else
        runs = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").search_runs([experiment])
        assert [(r.info.run_name, r.data.metrics["eval_rouge-l"]) for r in runs] == [("lora-r8", 41.5)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert page.status == 200 and b"MLflow" in page.read()


def test_make_clean_removes_run_folders_and_derived_data_only(tmp_path):
    """In a scratch folder (a checkout's own runs are never touched by the suite)."""
    from glm_ft.config.schema import DATA_CACHE, PROJECT_ROOT, TINY_MODEL_DIR

    removed = ["outputs/run/finetune.yaml", "multirun/sweep/multirun.yaml",
               f"{DATA_CACHE.relative_to(PROJECT_ROOT)}/checked/record"]
    kept = ["mlflow.db", f"{TINY_MODEL_DIR.relative_to(PROJECT_ROOT)}/config.json", "data/sample/train.jsonl"]
    for name in removed + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    out = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "clean"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert [name for name in removed if (tmp_path / name).exists()] == []
    assert all((tmp_path / name).is_file() for name in kept)

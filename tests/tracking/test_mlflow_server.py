"""train.py against a real `mlflow server` over HTTP, and against one that isn't there."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, run_process, run_train, serving

from glm_ft.tracking.compare import main as compare_main


def without_tracking_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port> with its own SQLite store and proxied artifacts; stopped by pid."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with serving(cmd, f"{uri}/health", root / "server.log", cwd=root,
                 env={**without_tracking_env(), "MLFLOW_DISABLE_TELEMETRY": "true"}):
        yield {"uri": uri, "root": root}


@pytest.mark.slow
def test_three_job_training_sweep_over_http(server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "sweep"
    env = {**without_tracking_env(), "MLFLOW_TRACKING_URI": server["uri"]}
    out = run_process(
        [sys.executable, str(ROOT / "train.py"), "-m", "experiment=quickstart", "method=lora", "method.r=2,4,8",
         "training_args.max_steps=2", "training_args.logging_steps=1", "eval_subset=4",
         "training_args.generation_config.max_new_tokens=4", f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    # Each job's closing line points at the server it logged to, not at the project's local store.
    logs = [p.read_text(encoding="utf-8") for p in sorted(sweep_dir.glob("*/cli.log"))]
    assert len(logs) == 3 and all(f"in {server['uri']}; open {server['uri']}" in text for text in logs)

    client = MlflowClient(server["uri"])
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"sweep.method.r": "2,4,8"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["method.r=2", "method.r=4", "method.r=8"]
    best = max(c.data.metrics["eval_rouge-l"] for c in children)
    assert parent.data.metrics["best_eval_rouge-l"] == pytest.approx(best)

    for child in children:
        r = child.info.run_name.split("=")[1]
        assert child.info.status == "FINISHED"
        assert child.data.params["method.r"] == r and child.data.params["training_args.max_steps"] == "2"
        assert child.data.tags["glm_ft.method"] == "lora" and child.data.tags["glm_ft.model"] == "tiny"
        run_id = child.info.run_id
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
        assert {"eval_rouge-l", "test_rouge-l", "test_bleu-4", "train_runtime"} <= set(child.data.metrics)
        assert child.data.tags["data.train.rows_read"] == "400"  # counts are tags, not metrics
        # Artifacts went through the server's proxy, not to a local path.
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        assert yaml.safe_load((local / "finetune.yaml").read_text())["peft_config"]["r"] == int(r)
        assert f"method.r={r}" in yaml.safe_load((local / ".hydra" / "overrides.yaml").read_text())
        assert json.loads((local / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[0])
        assert (local / "model" / "adapter_model.safetensors").stat().st_size > 0

    # The comparison report reads the same server and logs its plot to the parent.
    assert compare_main(["--tracking-uri", server["uri"], "--sweep", str(sweep_dir)]) == 0
    assert "method.r=" in capsys.readouterr().out
    assert "compare_eval_rouge-l.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def test_unreachable_server_fails_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out = run_train(["experiment=quickstart", "method=lora", f"tracking.tracking_uri={uri}",
                     f"hydra.run.dir={tmp_path}"], env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 1
    assert f"tracking.tracking_uri: MLflow tracking server {uri} is unreachable" in out.stderr
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_unreachable_server_stops_a_sweep_before_its_first_job(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    sweep_dir = tmp_path / "sweep"
    out = run_train(["-m", "experiment=quickstart", "method=lora", "method.r=4,8", f"hydra.sweep.dir={sweep_dir}"],
                    env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 1
    assert f"MLFLOW_TRACKING_URI: MLflow tracking server {uri} is unreachable" in out.stderr
    assert not (sweep_dir / "0").exists()

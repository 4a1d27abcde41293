"""Sweeps (`-m`) through the real conf/ and its MLflow sweep callback, with each launcher.

The jobs are tests/fixtures/sweep_app.py: real composition, validation, rendering and tracking, but a made-up score
instead of training, so each sweep costs seconds. The real training job runs a sweep in test_mlflow_server.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, compose, end_process_group, free_port, run_process, run_train
from test_bad_input import SHORT, assert_refused_light, probe_train

APP = ROOT / "tests" / "fixtures" / "sweep_app.py"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, MlflowClient) of one SQLite store shared by this module's sweeps."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(uri)


def app_env(uri: str, **extra: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), **extra}
    for key in ("HYDRA_FULL_ERROR", "CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                "MASTER_PORT", "FAKE_FAIL_R", "FAKE_NAN_R", "FAKE_SLEEP_S", "FAKE_SLEEP_JOB", "FAKE_EVALS",
                "GLM_FT_OPTUNA_TRIAL", "GLM_FT_OPTUNA_STUDY", "GLM_FT_OPTUNA_STORAGE"):
        if key not in extra:
            env.pop(key, None)
    return env


def run_app(args: list[str], cwd: Path, uri: str, **extra: str):
    return run_process([sys.executable, str(APP), *args], cwd=cwd, env=app_env(uri, **extra))


def sweep_runs(client, sweep_dir: Path):
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, {c.info.run_name: c for c in children}


def score(r: int, alpha: int = 32) -> float:  # sweep_app's made-up metric
    return r * 0.01 + alpha * 0.0001


@pytest.mark.slow
def test_failed_job_fails_the_parent_and_the_others_still_run(tmp_path, store):
    """Also a job whose score is NaN, the last to start (the first child in the store's order): no score, so a
    failed job (as an Optuna trial's NaN is FAIL), counted, listed and its run FAILED; neither the parent's best nor
    compare's first row."""
    uri, client = store
    out = run_app(["-m", "experiment=quickstart", "method=lora", "method.r=4,8,16,32"], tmp_path, uri,
                  FAKE_FAIL_R="8", FAKE_NAN_R="32")
    assert out.returncode == 1, out.stderr
    assert "fake failure at method.r=8" in out.stderr
    end = [line for line in out.stderr.splitlines() if line.startswith(("job #", "error: "))]
    assert end == ["job #1 (method.r=8): RuntimeError: fake failure at method.r=8",
                   "job #3 (method.r=32): no score: eval_rouge-l is nan; its training completed and its checkpoints "
                   "are kept", "error: 2 of 4 jobs failed"]

    # Hydra's default layout: multirun/<date>/<time>/<job>, relative to where train.py was started.
    (sweep_dir,) = list(tmp_path.glob("multirun/*/*"))
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", f"{sweep_dir.parent.name}/{sweep_dir.name}")
    parent, children = sweep_runs(client, sweep_dir)

    assert parent.info.status == "FAILED"
    assert parent.info.run_name == "lora r=4,8,16,32"  # what was swept; the folder is a tag
    assert parent.data.tags["glm_ft.sweep_dir"] == str(sweep_dir)
    assert json.loads(parent.data.tags["glm_ft.swept_params"]) == ["method.r"]
    assert parent.data.params == {"sweep.method.r": "4,8,16,32"}
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_failed"] == 2
    assert parent.data.metrics["best_eval_rouge-l"] == pytest.approx(score(16))
    assert parent.data.tags["glm_ft.best_run_name"] == "method.r=16"

    assert {name: c.info.status for name, c in children.items()} == {
        "method.r=4": "FINISHED", "method.r=8": "FAILED", "method.r=16": "FINISHED", "method.r=32": "FAILED"}
    assert parent.data.metrics["jobs_failed"] == sum(c.info.status == "FAILED" for c in children.values())
    assert children["method.r=32"].data.tags["glm_ft.error"].startswith("no score: eval_rouge-l is nan")
    # the same best, read straight from the store: the highest finite value among the FINISHED children
    newest_first = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert newest_first[0].info.run_name == "method.r=32" and math.isnan(newest_first[0].data.metrics["eval_rouge-l"])
    finished = {c.info.run_id: c.data.metrics["eval_rouge-l"] for c in newest_first if c.info.status == "FINISHED"}
    assert all(math.isfinite(value) for value in finished.values())
    best = max((run_id for run_id, value in finished.items() if math.isfinite(value)), key=finished.get)
    assert parent.data.tags["glm_ft.best_run_id"] == best
    assert parent.data.metrics["best_eval_rouge-l"] == finished[best]
    from glm_ft.tracking.compare import compare

    table = compare(str(sweep_dir), tracking_uri=uri)
    assert [r["name"] for r in table.rows] == ["method.r=16", "method.r=4", "method.r=32", "method.r=8"]
    for num, r in enumerate((4, 8, 16)):
        child = children[f"method.r={r}"]
        assert child.data.params["method.r"] == str(r)
        assert child.data.tags["glm_ft.run_dir"] == str(sweep_dir / str(num))
        assert (sweep_dir / str(num) / ".hydra" / "overrides.yaml").is_file()
    assert children["method.r=8"].data.tags["glm_ft.error"] == "RuntimeError: fake failure at method.r=8"


@pytest.mark.slow
def test_optuna_search_maximises_the_metric_and_the_parent_holds_the_study(tmp_path, store):
    uri, client = store
    sweep_dir = tmp_path / "optuna"
    out = run_app(["hparams_search=lora_optuna", "experiment=quickstart", "hydra.sweeper.n_trials=3",
                   f"hydra.sweep.dir={sweep_dir}"], tmp_path, uri)
    assert out.returncode == 0, out.stderr
    parent, children = sweep_runs(client, sweep_dir)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["glm_ft.sweeper"] == "OptunaSweeper"
    assert parent.info.run_name == "lora optuna r,lora_alpha,lora_dropout,learning_rate"
    assert parent.data.params == {"sweep.method.r": "choice(4, 8, 16, 32)",
                                  "sweep.method.lora_alpha": "choice(8, 16, 32, 64)",
                                  "sweep.method.lora_dropout": "interval(0.0, 0.2)",
                                  "sweep.training_args.learning_rate": "tag(log, interval(5e-5, 5e-3))"}
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children.values())

    import optuna

    study = optuna.load_study(study_name="lora_optuna", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna_journal.log"))))
    by_trial = {int(c.data.tags["glm_ft.trial"]): c for c in children.values()}
    assert sorted(by_trial) == [t.number for t in study.trials] == [0, 1, 2]
    for trial in study.trials:
        child = by_trial[trial.number]
        params = child.data.params
        assert child.data.tags["glm_ft.job_num"] == str(trial.number)  # trial N runs in folder N
        assert child.info.run_name == ",".join(f"{k}={params[k]}" for k in trial.params)
        for key, value in trial.params.items():  # what the job trained with is what the study recorded
            assert float(params[key]) == pytest.approx(value, rel=1e-12)
        r, alpha = int(params["method.r"]), int(params["method.lora_alpha"])
        assert 0.0 <= float(params["method.lora_dropout"]) <= 0.2
        assert 5e-5 <= float(params["training_args.learning_rate"]) <= 5e-3
        assert child.data.metrics["eval_rouge-l"] == pytest.approx(score(r, alpha)) == pytest.approx(trial.value)

    optuna_results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(c.data.metrics["eval_rouge-l"] for c in children.values())
    assert optuna_results["best_value"] == pytest.approx(best) == pytest.approx(study.best_value)
    assert parent.data.metrics["best_eval_rouge-l"] == pytest.approx(best)
    assert parent.data.metrics["trials_complete"] == 3
    assert parent.data.tags["glm_ft.best_trial"] == str(study.best_trial.number)
    assert json.loads(parent.data.tags["glm_ft.best_params"]) == study.best_params
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {f"study/{name}" for name in ("optimization_history.png", "param_importances.png",
                                         "parallel_coordinate.png", "summary.json", "trials.csv")} <= artifacts
    assert "optimization_results.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    from PIL import Image

    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        with Image.open(sweep_dir / "study" / f"{name}.png") as image:
            assert image.size == (900, 600)


def test_search_configs_compose():
    lora = compose(["hparams_search=lora_optuna", "experiment=quickstart"])
    assert lora.method.name == "lora" and lora.optimized_metric == "eval_rouge-l"
    prefix = compose(["hparams_search=ptuning_v2_optuna", "experiment=quickstart"])
    assert prefix.method.name == "ptuning_v2" and prefix.optimized_metric == "eval_rouge-l"


@pytest.mark.slow
def test_joblib_pins_each_worker_to_one_gpu_and_nests_its_jobs(tmp_path, store):
    uri, client = store
    sweep_dir = tmp_path / "joblib"
    out = run_app(["-m", "hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2", "experiment=quickstart",
                   "method=lora", "method.r=4,8,16,32", f"hydra.sweep.dir={sweep_dir}"], tmp_path, uri,
                  CUDA_VISIBLE_DEVICES="0,1")
    assert out.returncode == 0, out.stderr
    parent, children = sweep_runs(client, sweep_dir)
    assert parent.info.status == "FINISHED" and parent.data.tags["glm_ft.launcher"] == "JoblibLauncher"
    assert sorted(children) == sorted(f"method.r={r}" for r in (4, 8, 16, 32))
    gpu_of_worker = {}
    for child in children.values():
        assert child.info.status == "FINISHED"
        pid, gpu = child.data.tags["test.pid"], child.data.tags["test.cuda_visible_devices"]
        assert gpu in ("0", "1")
        assert gpu_of_worker.setdefault(pid, gpu) == gpu  # a worker keeps its GPU
    assert len(set(gpu_of_worker.values())) == len(gpu_of_worker)  # no two workers share one


@pytest.mark.slow
def test_submitit_jobs_are_nested_children_logged_by_rank_0_only(tmp_path, store):
    """The SLURM launcher's code path, on submitit's local executor: each job in two tasks (ranks). The submitting
    shell has leftovers of a one-process run (everything but RANK): they must not make every task rank 0."""
    uri, client = store
    sweep_dir = tmp_path / "submitit"
    out = run_app(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                   "hydra.launcher.timeout_min=600", "experiment=quickstart", "method=lora", "method.r=4,8",
                   f"hydra.sweep.dir={sweep_dir}"], tmp_path, uri,
                  WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert out.returncode == 0, out.stderr
    parent, children = sweep_runs(client, sweep_dir)
    assert parent.info.status == "FINISHED" and parent.data.tags["glm_ft.launcher"] == "LocalLauncher"
    assert sorted(children) == ["method.r=4", "method.r=8"]
    seen = {name: (c.info.status, c.data.tags.get("test.rank")) for name, c in children.items()}
    assert seen == {"method.r=4": ("FINISHED", "0"), "method.r=8": ("FINISHED", "0")}, _job_logs(sweep_dir)
    assert parent.data.metrics["best_eval_rouge-l"] == pytest.approx(score(8))


def _job_logs(sweep_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(sweep_dir.rglob("*_log.*")))


@pytest.mark.slow
def test_sigterm_to_a_sweep_ends_parent_and_running_child_killed(tmp_path, store):
    uri, client = store
    sweep_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(APP), "-m", "experiment=quickstart", "method=lora", "method.r=4,8",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=app_env(uri, FAKE_SLEEP_S="120"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while proc.poll() is None:
            if (sweep_dir / "mlflow_parent_run_id").is_file() and sweep_runs(client, sweep_dir)[1]:
                break
            time.sleep(0.3)
        parent, children = sweep_runs(client, sweep_dir)
        assert [c.info.status for c in children.values()] == ["RUNNING"], proc.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 128 + signal.SIGTERM
    finally:
        end_process_group(proc)
    parent, children = sweep_runs(client, sweep_dir)
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children.values()] == ["KILLED"]


def test_dry_run_sweep_records_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    sweep_dir = tmp_path / "sweep"
    out = run_train(["-m", "experiment=quickstart", "method=lora", "method.r=4,8", "dry_run=true",
                     f"hydra.sweep.dir={sweep_dir}"], env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert out.returncode == 0, out.stderr
    assert (sweep_dir / "1" / "finetune.yaml").is_file()
    assert not db.exists() and not (sweep_dir / "mlflow_parent_run_id").exists()


def test_a_value_every_job_refuses_fails_the_sweep_once_before_anything_starts(tmp_path):
    """A fixed value that glm-ft refuses: each job refused it in turn, after the sweep had made its folder and its
    MLflow parent run. The sweep now refuses it in the one line a single run prints, before anything heavy loads,
    with no sweep folder and no MLflow store made."""
    sweep_dir = tmp_path / "sweep"
    out = probe_train(["-m", *SHORT, "training_args.learning_rate=-1", "method=lora", "method.r=4,8",
                       f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert_refused_light(out, "error: training_args.learning_rate: must be > 0, got -1.0")
    assert not sweep_dir.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_swept_value_only_some_jobs_reach_fails_those_jobs_alone(tmp_path):
    """method.r=0 is refused, method.r=4 is not: the sweep runs both (in batches of one, where Hydra stopped at the
    first failed batch), job 0 fails in its line and job 1 runs; the sweep ends with one line per failed job and the
    count, exit 1, no traceback."""
    sweep_dir = tmp_path / "sweep"
    out = run_train(["-m", *SHORT, "method=lora", "method.r=0,4", "dry_run=true", "hydra.sweeper.max_batch_size=1",
                     f"hydra.sweep.dir={sweep_dir}"], env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'db'}"})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and 'File "' not in out.stderr
    assert out.stderr.strip().splitlines()[:2] == ["job #0 (method.r=0): method.r: must be > 0, got 0",
                                                   "error: 1 of 2 jobs failed"], out.stderr[-3000:]
    assert not (sweep_dir / "0" / "finetune.yaml").exists() and (sweep_dir / "1" / "finetune.yaml").is_file()


def test_the_best_child_is_a_finished_one(store, tmp_path):
    """A killed, failed or pruned child's score is from part of its training, and a re-run sweep keeps the killed
    copy of a job beside the finished one: the parent's best is picked among FINISHED children only, and a NaN is
    no score."""
    from types import SimpleNamespace

    from glm_ft.search.sweep import best_child

    uri, client = store
    exp = client.create_experiment(f"best-{tmp_path.name}")
    parent = client.create_run(exp).info.run_id
    ids = {}
    # the newest child first in the store's order: max and min both kept its NaN, which compares false to all
    for name, score, status in [("done-low", 30.0, "FINISHED"), ("killed-high", 90.0, "KILLED"),
                                ("done-high", 50.0, "FINISHED"), ("failed-higher", 95.0, "FAILED"),
                                ("done-nan", float("nan"), "FINISHED")]:
        tags = {"mlflow.parentRunId": parent, "glm_ft.trial": str(len(ids))}
        ids[name] = client.create_run(exp, run_name=name, tags=tags, start_time=1000 + len(ids)).info.run_id
        client.log_metric(ids[name], "eval_rouge-l", score, step=10)
        client.set_terminated(ids[name], status)
    found = SimpleNamespace(client=client, experiment_id=exp)
    assert best_child(found, parent, "eval_rouge-l", "maximize").info.run_id == ids["done-high"]
    assert best_child(found, parent, "eval_rouge-l", "minimize").info.run_id == ids["done-low"]
    assert best_child(found, parent, "eval_bleu-4", "maximize") is None
    # a study names its best trial (ties are broken its way): that trial's run, if it finished
    assert best_child(found, parent, "eval_rouge-l", "maximize", trial=0).info.run_id == ids["done-low"]
    assert best_child(found, parent, "eval_rouge-l", "maximize", trial=1).info.run_id == ids["done-high"]


def test_a_bad_data_row_fails_the_sweep_once_with_its_file_and_line(tmp_path):
    """Each job read and refused the same row in turn, after the sweep had made its folder and its parent run."""
    from test_bad_input import CONVERSATION, data_dir_with

    good = json.dumps(CONVERSATION, ensure_ascii=False)
    data = data_dir_with(tmp_path, "train.jsonl", f"{good}\n{good.replace('user', 'bot')}\n")
    sweep_dir = tmp_path / "sweep"
    out = probe_train(["-m", *SHORT, *data, "method=lora", "method.r=4,8", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert_refused_light(out, f"error: {tmp_path / 'data' / 'train.jsonl'}:2: message 1 has unknown role 'bot'")
    assert not sweep_dir.exists() and not (tmp_path / "mlflow.db").exists()

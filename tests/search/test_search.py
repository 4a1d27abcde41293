"""glm-ft's Optuna sweeper and the resumable grid sweeper (hydra_plugins/glm_ft_sweepers, glm_ft/search/study.py).

Most sweeps run tests/fixtures/sweep_app.py (real conf/, callback, tracking and study; a made-up score reported at
made-up evaluations). Pruning of a real training job, and a killed study resuming its trial from a checkpoint, run
train.py on the tiny model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_train
from test_sweep import APP, app_env, run_app, score, sweep_runs
from test_bad_input import SHORT, assert_refused_light, probe_train
from lifecycle_helpers import sigkill_once


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(uri)


def load_study(sweep_dir: Path, name: str):
    import optuna

    backend = optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna_journal.log"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    """Poll an event (a file, a run) while the process lives (pytest-timeout guards against a hang)."""
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)


def running_child(client, sweep_dir: Path, job: int, tag: str = "glm_ft.job_num") -> bool:
    """Job `job`'s run is RUNNING (and has `tag`, which the job may set after the run started)."""
    if not (sweep_dir / "mlflow_parent_run_id").is_file():
        return False
    return any(c.data.tags.get("glm_ft.job_num") == str(job) and c.info.status == "RUNNING" and tag in c.data.tags
               for c in sweep_runs(client, sweep_dir)[1].values())


def all_children(client, parent) -> list:
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def kill_when(args: list[str], cwd: Path, uri: str, event, client, sweep_dir: Path, **extra: str) -> None:
    """Start a sweep in its own process group and SIGKILL the whole group once `event()` holds."""
    proc = subprocess.Popen([sys.executable, str(APP), *args], cwd=cwd, env=app_env(uri, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(event, proc, "the event to kill on")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_search_continues_where_it_stopped(tmp_path, store):
    """SIGKILL while trial 2 runs; the same command then keeps trials 0-1, retries trial 2's parameters as a new
    trial, and stops at n_trials in all; MLflow has one parent, trial 2's first run KILLED."""
    uri, client = store
    sweep_dir = tmp_path / "search"
    args = ["hparams_search=lora_optuna", "experiment=quickstart", "hydra.sweeper.n_trials=4",
            f"hydra.sweep.dir={sweep_dir}"]
    kill_when(args, tmp_path, uri, lambda: running_child(client, sweep_dir, 2, "glm_ft.trial"), client, sweep_dir,
              FAKE_SLEEP_JOB="2", FAKE_SLEEP_S="600")
    before = load_study(sweep_dir, "lora_optuna")
    assert [t.state.name for t in before.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    first_parent = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    done_mtimes = {n: (sweep_dir / ".glm_ft_jobs" / f"{n}.json").stat().st_mtime_ns for n in (0, 1)}

    out = run_app(args, tmp_path, uri)
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert "trials [2] were running when it stopped and are retried" in log
    assert "2 of 4 trials done" in log

    study = load_study(sweep_dir, "lora_optuna")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL", 3: "COMPLETE", 4: "COMPLETE"}
    assert study.trials[2].system_attrs["glm_ft_stale"] is True
    assert study.trials[3].params == before.trials[2].params  # the interrupted trial, tried again
    assert study.trials[3].user_attrs["glm_ft_retry_of"] == 2
    for n in (0, 1):  # finished trials were not re-run
        assert study.trials[n].params == before.trials[n].params and study.trials[n].value == before.trials[n].value
        assert (sweep_dir / ".glm_ft_jobs" / f"{n}.json").stat().st_mtime_ns == done_mtimes[n]
    # The continued sampler does not replay the study's start (the same seed would give trial 0's point again).
    assert study.trials[4].params not in [study.trials[n].params for n in (0, 1, 3)]

    parent, _ = sweep_runs(client, sweep_dir)
    assert parent.info.run_id == first_parent and parent.info.status == "FINISHED"
    by_trial = {}
    for child in all_children(client, parent):  # trials 2 and 3 share a name: their parameters
        by_trial.setdefault(int(child.data.tags["glm_ft.trial"]), []).append(child)
    assert sorted(by_trial) == [0, 1, 2, 3, 4] and all(len(runs) == 1 for runs in by_trial.values())
    assert by_trial[2][0].info.status == "KILLED"
    assert by_trial[2][0].data.tags["glm_ft.error"] == "its sweep stopped while it ran"
    for n in (0, 1, 3, 4):
        child = by_trial[n][0]
        assert child.info.status == "FINISHED"
        assert child.data.metrics["eval_rouge-l"] == pytest.approx(study.trials[n].value)
    assert parent.data.metrics["trials_complete"] == 4 and parent.data.metrics["jobs"] == 4
    assert parent.data.metrics["best_eval_rouge-l"] == pytest.approx(study.best_value)
    assert parent.data.tags["glm_ft.best_run_id"] == by_trial[study.best_trial.number][0].info.run_id


@pytest.mark.slow
def test_median_pruning_with_joblib_workers_sharing_the_study(tmp_path, store):
    """Two joblib workers report to one journal file; each trial is pruned exactly when Optuna's median rule says
    so, checked here from the study's own intermediate values, and shows as pruned in MLflow and compare."""
    uri, client = store
    sweep_dir = tmp_path / "pruned"
    out = run_app(["hparams_search=lora_optuna", "experiment=quickstart", "hydra.sweeper.n_trials=8",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                   "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2",
                   "hydra/sweeper/sampler=random", f"hydra.sweep.dir={sweep_dir}"], tmp_path, uri, FAKE_EVALS="3")
    assert out.returncode == 0, out.stderr
    study = load_study(sweep_dir, "lora_optuna")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 8
    pruned = [t.number for t in trials if t.state.name == "PRUNED"]
    assert pruned, "the random sampler's trials should include some below the median"

    # Re-derive each decision: batch k (trials 2k, 2k+1) ran while only batches < k were finished.
    for trial in trials:
        r, alpha = trial.params["method.r"], trial.params["method.lora_alpha"]
        # MedianPruner compares with finished (COMPLETE) trials only.
        earlier = [t for t in trials if t.number < 2 * (trial.number // 2) and t.state.name == "COMPLETE"]
        expect_pruned_at = None
        if len(earlier) >= 2:
            for step in (1, 2, 3):
                others = [t.intermediate_values[step] for t in earlier if step in t.intermediate_values]
                if others and score(r, alpha) * step / 3 < statistics.median(others):
                    expect_pruned_at = step
                    break
        if expect_pruned_at is None:
            assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(score(r, alpha))
        else:
            assert trial.state.name == "PRUNED" and max(trial.intermediate_values) == expect_pruned_at

    parent, children = sweep_runs(client, sweep_dir)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_failed"] == 0
    assert parent.data.metrics["trials_pruned"] == len(pruned)
    for child in children.values():
        trial = trials[int(child.data.tags["glm_ft.trial"])]
        history = client.get_metric_history(child.info.run_id, "eval_rouge-l")
        reported = {m.step: m.value for m in history}
        assert {s: reported[s] for s in trial.intermediate_values} == pytest.approx(trial.intermediate_values)
        if trial.state.name == "PRUNED":
            assert child.info.status == "KILLED" and child.data.tags["glm_ft.pruned"] == "true"
            assert "glm_ft.error" not in child.data.tags
        else:
            assert child.info.status == "FINISHED" and "glm_ft.pruned" not in child.data.tags

    from glm_ft.tracking.compare import compare

    result = compare(str(sweep_dir), tracking_uri=uri, out=tmp_path / "compare.png")
    statuses = [row["status"] for row in result.rows]
    assert statuses.count("PRUNED") == len(pruned)
    assert statuses == sorted(statuses, key=lambda s: s == "PRUNED")  # pruned trials listed after finished ones


@pytest.mark.slow
def test_grid_and_random_samplers_from_config(tmp_path, store):
    uri, client = store
    # Grid: every value once, n_trials capped to the grid's size.
    grid_dir = tmp_path / "grid"
    out = run_app(["hparams_search=lora_optuna", "experiment=quickstart", "hydra/sweeper/sampler=grid",
                   "method.r=choice(4,8,16)", "method.lora_alpha=32", "method.lora_dropout=0.1",
                   "training_args.learning_rate=0.001", f"hydra.sweep.dir={grid_dir}"], tmp_path, uri)
    assert out.returncode == 0, out.stderr
    grid = load_study(grid_dir, "lora_optuna")
    assert sorted(t.params["method.r"] for t in grid.trials) == [4, 8, 16]
    assert all(set(t.params) == {"method.r"} for t in grid.trials)
    assert grid.best_value == pytest.approx(score(16, 32))
    # The command line wins over hparams_search's space, as in the sweeper: the parent run says what the trials ran
    # over (method.r from the command line; the keys it fixed are out), not the yaml's space.
    parent, _ = sweep_runs(client, grid_dir)
    assert parent.info.run_name == "lora optuna r"
    assert json.loads(parent.data.tags["glm_ft.swept_params"]) == ["method.r"]
    assert parent.data.params == {"sweep.method.r": "choice(4,8,16)"}

    # Random: the sweeper's seed makes the search repeatable.
    def params(seed: int, name: str):
        folder = tmp_path / name
        result = run_app(["hparams_search=ptuning_v2_optuna", "experiment=quickstart", "hydra.sweeper.n_trials=2",
                          "hydra/sweeper/sampler=random", f"hydra.sweeper.seed={seed}", f"hydra.sweep.dir={folder}"],
                         tmp_path, uri)
        assert result.returncode == 0, result.stderr
        return [t.params for t in load_study(folder, "ptuning_v2_optuna").trials]

    first, again, other = params(1, "r1"), params(1, "r2"), params(2, "r3")
    assert first == again and first != other
    assert all(1e-4 <= p["training_args.learning_rate"] <= 2e-2 for p in first + other)


def test_bad_search_settings_fail_in_a_line(tmp_path, store):
    uri, _ = store
    out = run_app(["hparams_search=lora_optuna", "experiment=quickstart", "hydra/sweeper/sampler=grid",
                   f"hydra.sweep.dir={tmp_path / 'bad'}", "tracking.enabled=false"], tmp_path, uri)
    assert out.returncode == 1
    assert "hydra.sweeper.params.method.lora_dropout: the grid sampler needs choice(...) or range(...)" in (
        out.stdout + out.stderr)
    out = run_app(["hparams_search=lora_optuna", "experiment=quickstart", "hydra.sweeper.direction=upward",
                   f"hydra.sweep.dir={tmp_path / 'bad2'}", "tracking.enabled=false"], tmp_path, uri)
    assert out.returncode == 1 and "hydra.sweeper.direction: 'upward'" in out.stdout + out.stderr


def test_a_value_every_trial_refuses_fails_the_search_once_before_the_study_exists(tmp_path):
    """eval_rouge-l without a validation split: each of the trials refused it in turn, Optuna recorded them FAIL in
    the journal (counted in n_trials, so a re-run of the fixed command ran fewer), and the sweep ended in a
    traceback. It is refused in the one line a single run prints, with no study, sweep folder or MLflow store."""
    sweep_dir = tmp_path / "sweep"
    out = probe_train(["hparams_search=lora_optuna", *SHORT, "data.val_file=null", "hydra.sweeper.n_trials=3",
                       f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert_refused_light(out, "error: optimized_metric: eval_rouge-l needs data.val_file, which is null")
    assert not sweep_dir.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_trial_whose_score_is_nan_is_failed_in_the_study_the_store_and_the_counts(tmp_path, store):
    """A trial returning NaN is FAIL in the study; its MLflow child was FINISHED and the parent's jobs_failed did
    not count it. Now the three agree (FAILED, with why), and its run folder stays as the job left it."""
    uri, client = store
    sweep_dir = tmp_path / "sweep"
    out = run_app(["hparams_search=lora_optuna", "experiment=quickstart", "hydra/sweeper/sampler=grid",
                   "method.r=choice(8,32)", "method.lora_alpha=32", "method.lora_dropout=0.1",
                   "training_args.learning_rate=0.001", f"hydra.sweep.dir={sweep_dir}"], tmp_path, uri,
                  FAKE_NAN_R="32")
    assert out.returncode == 1, out.stderr
    trials = load_study(sweep_dir, "lora_optuna").trials
    assert {t.params["method.r"]: t.state.name for t in trials} == {8: "COMPLETE", 32: "FAIL"}
    nan_trial = next(t.number for t in trials if t.params["method.r"] == 32)
    why = "no score: eval_rouge-l is nan; its training completed and its checkpoints are kept"
    end = [line for line in out.stderr.splitlines() if line.startswith(("trial ", "error: "))]
    assert end == [f"trial {nan_trial} (method.r=32): {why}", "error: 1 of 2 trials failed"]

    parent, children = sweep_runs(client, sweep_dir)
    by_trial = {int(c.data.tags["glm_ft.trial"]): c for c in children.values()}
    nan_run = by_trial[nan_trial]
    assert nan_run.info.status == "FAILED" and nan_run.data.tags["glm_ft.error"] == why
    assert math.isnan(nan_run.data.metrics["eval_rouge-l"]) and nan_run.info.end_time is not None
    assert by_trial[1 - nan_trial].info.status == "FINISHED"
    # Each count, against what the study, the store and the job records hold independently.
    fail_in_study = sum(t.state.name == "FAIL" for t in trials)
    failed_children = sum(c.info.status == "FAILED" for c in children.values())
    outcomes = [json.loads(p.read_text()) for p in (sweep_dir / ".glm_ft_jobs").glob("*.json")]
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["jobs"] == len(trials) == len(outcomes) == 2
    assert parent.data.metrics["jobs_failed"] == parent.data.metrics["trials_fail"] == fail_in_study \
        == failed_children == sum(o["status"] == "FAILED" for o in outcomes) == 1
    assert parent.data.tags["glm_ft.best_trial"] == str(1 - nan_trial)
    # The job's folder is as it left it, and its record says how its run ended.
    job_dir = sweep_dir / str(nan_trial)
    assert (job_dir / "predictions.jsonl").is_file()
    assert json.loads((job_dir / "mlflow_run.json").read_text())["ended"]["status"] == "FAILED"


@pytest.mark.slow
def test_a_search_space_reaching_a_refused_value_fails_only_those_trials(tmp_path):
    """method.r=choice(0, 4) on the grid: the trial at r=0 is refused and FAIL in the study, the one at r=4 trains;
    the search ends with one line per failed trial and the count, exit 1, no traceback, its parent run FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    out = run_train(["hparams_search=lora_optuna", *SHORT, "hydra/sweeper/sampler=grid", "method.r=choice(0,4)",
                     "method.lora_alpha=32", "method.lora_dropout=0.1", "training_args.learning_rate=1e-3",
                     "training_args.generation_config.max_new_tokens=4", "data.test_file=null",
                     f"hydra.sweep.dir={sweep_dir}"], env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and 'File "' not in out.stderr
    states = {t.params["method.r"]: t.state.name for t in load_study(sweep_dir, "lora_optuna").trials}
    assert states == {0: "FAIL", 4: "COMPLETE"}
    failed = next(t.number for t in load_study(sweep_dir, "lora_optuna").trials if t.params["method.r"] == 0)
    end = [line for line in out.stderr.splitlines() if line.startswith(("trial ", "error: "))]
    assert end == [f"trial {failed} (method.r=0): method.r: must be > 0, got 0", "error: 1 of 2 trials failed"]

    from mlflow.tracking import MlflowClient

    parent, _ = sweep_runs(MlflowClient(uri), sweep_dir)
    assert parent.info.status == "FAILED" and parent.data.metrics["trials_complete"] == 1


@pytest.mark.slow
def test_a_second_sweep_in_a_running_sweep_folder_is_refused(tmp_path, store):
    uri, client = store
    sweep_dir = tmp_path / "busy"
    args = ["-m", "experiment=quickstart", "method=lora", "method.r=4", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen([sys.executable, str(APP), *args], cwd=tmp_path, env=app_env(uri, FAKE_SLEEP_S="600"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: running_child(client, sweep_dir, 0), proc, "job 0 running")
        out = run_app(args, tmp_path, uri)
        assert out.returncode == 1
        assert f"another sweep (pid {proc.pid}) is running in {sweep_dir}" in out.stderr
        assert running_child(client, sweep_dir, 0)  # the running sweep's child was left alone
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_killed_grid_sweep_rerun_skips_finished_jobs(tmp_path, store):
    uri, client = store
    sweep_dir = tmp_path / "grid"
    args = ["-m", "experiment=quickstart", "method=lora", "method.r=4,8,16", f"hydra.sweep.dir={sweep_dir}"]
    kill_when(args, tmp_path, uri, lambda: running_child(client, sweep_dir, 2), client, sweep_dir,
              FAKE_SLEEP_JOB="2", FAKE_SLEEP_S="600")
    first_parent = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    finished_runs = {name: c.info.run_id for name, c in sweep_runs(client, sweep_dir)[1].items()
                     if c.info.status == "FINISHED"}
    assert sorted(finished_runs) == ["method.r=4", "method.r=8"]

    out = run_app(args, tmp_path, uri)
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert (f"Skipping 2 job(s) that finished in an earlier run of {sweep_dir}: "
            "#0 (experiment=quickstart method=lora method.r=4), #1 (experiment=quickstart method=lora method.r=8)"
            in log)
    assert "#2 : experiment=quickstart method=lora method.r=16" in log
    assert "#0 : " not in log and "#1 : " not in log

    parent, _ = sweep_runs(client, sweep_dir)
    assert parent.info.run_id == first_parent and parent.info.status == "FINISHED"
    children = all_children(client, parent)
    seen = sorted((c.info.run_name, c.info.status) for c in children)
    assert seen == [("method.r=16", "FINISHED"), ("method.r=16", "KILLED"), ("method.r=4", "FINISHED"),
                    ("method.r=8", "FINISHED")]
    assert {c.info.run_name: c.info.run_id for c in children if c.info.run_name != "method.r=16"} == finished_runs
    assert parent.data.metrics["jobs"] == 3 and parent.data.metrics["jobs_failed"] == 0
    assert parent.data.metrics["best_eval_rouge-l"] == pytest.approx(score(16))


@pytest.mark.slow
def test_real_training_trial_is_pruned_at_its_first_evaluation(tmp_path):
    """train.py on the tiny model, a threshold no ROUGE-L can reach: the pruning callback stops the trial at its
    first evaluation, saves that checkpoint, and the run ends KILLED + glm_ft.pruned; the study has the value the
    run logged."""
    db = tmp_path / "mlflow.db"
    sweep_dir = tmp_path / "sweep"
    out = run_train(["hparams_search=lora_optuna", "experiment=quickstart", "hydra.sweeper.n_trials=1",
                     "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=101",
                     "training_args.max_steps=8", "training_args.eval_steps=4", "training_args.save_steps=100",
                     "eval_subset=4", "training_args.generation_config.max_new_tokens=8",
                     f"hydra.sweep.dir={sweep_dir}"],
                    cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert out.returncode == 0, out.stderr[-3000:]
    study = load_study(sweep_dir, "lora_optuna")
    (trial,) = study.trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [4]

    run_dir = sweep_dir / "0"
    assert (run_dir / "checkpoint-4" / "glm_ft_complete").is_file()
    assert not (run_dir / "final").exists() and not (run_dir / "predictions.jsonl").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    parent, children = sweep_runs(client, sweep_dir)
    (child,) = children.values()
    assert child.info.status == "KILLED" and child.data.tags["glm_ft.pruned"] == "true"
    assert child.data.tags["glm_ft.pruned_at_step"] == "4" and child.data.tags["glm_ft.trial"] == "0"
    (logged,) = [m for m in client.get_metric_history(child.info.run_id, "eval_rouge-l")]
    assert logged.step == 4 and logged.value == pytest.approx(trial.intermediate_values[4])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_pruned"] == 1
    assert "test_rouge-l" not in child.data.metrics
    # A pruned trial's training_curves.png draws its training up to where it stopped, in its folder and its run.
    from glm_ft.runs import CURVES_FILE
    from glm_ft.tracking.curves import read_series

    history = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    series = read_series(run_dir / CURVES_FILE)
    assert series.get("loss", []) == [[h["step"], h["loss"]] for h in history if "loss" in h]
    assert series["eval_rouge-l"] == [[4, trial.intermediate_values[4]]]
    assert CURVES_FILE in {a.path for a in client.list_artifacts(child.info.run_id)}


@pytest.mark.slow
def test_killed_search_resumes_its_cut_short_trial_from_its_checkpoint(tmp_path):
    """train.py on the tiny model, SIGKILL to the whole sweep once trial 0 has a complete checkpoint; the same command
    again continues trial 0 itself in its folder from that checkpoint (not its parameters from step 0 as a new
    trial): the loss and the intermediate values of an uninterrupted trial, one COMPLETE trial, and one MLflow run
    for it, continued (glm_ft.resumes=1) and FINISHED."""
    from glm_ft.runs import last_complete_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("HYDRA_FULL_ERROR", None)
    trial = ["hparams_search=lora_optuna", "experiment=quickstart", "hydra/sweeper/sampler=grid", "method.r=choice(4)",
             "method.lora_alpha=32", "method.lora_dropout=0.1", "training_args.learning_rate=0.001",
             "training_args.max_steps=8", "training_args.save_steps=2", "training_args.eval_steps=2",
             "training_args.logging_steps=1", "eval_subset=4", "training_args.generation_config.max_new_tokens=8",
             "data.test_file=null"]
    sweep_dir = tmp_path / "search"
    cmd = [sys.executable, str(ROOT / "train.py"), *trial, f"hydra.sweep.dir={sweep_dir}"]
    sigkill_once(cmd, env, lambda: list((sweep_dir / "0").glob("checkpoint-*/glm_ft_complete")))
    cut_at = last_complete_checkpoint(sweep_dir / "0")
    assert [t.state.name for t in load_study(sweep_dir, "lora_optuna").trials] == ["RUNNING"]

    again = run_train([*trial, f"hydra.sweep.dir={sweep_dir}"], env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "trials [0] were running when it stopped and resume from their last complete checkpoint" in log
    assert f"resuming from {cut_at}" in log
    assert "already reported" not in log

    whole_dir = tmp_path / "whole"
    whole = run_train([*trial, f"hydra.sweep.dir={whole_dir}", "tracking.enabled=false"])
    assert whole.returncode == 0, whole.stderr[-3000:]

    def history(run_dir: Path) -> list[dict]:
        return json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]

    resumed, uninterrupted = history(sweep_dir / "0"), history(whole_dir / "0")
    # every step exactly, LoRA's dropout included
    assert [(h["loss"], h["grad_norm"]) for h in resumed if "loss" in h] == [
        (h["loss"], h["grad_norm"]) for h in uninterrupted if "loss" in h]
    (study_trial,) = load_study(sweep_dir, "lora_optuna").trials
    (whole_trial,) = load_study(whole_dir, "lora_optuna").trials
    assert study_trial.state.name == "COMPLETE" and study_trial.value == pytest.approx(whole_trial.value)
    assert study_trial.intermediate_values == pytest.approx(whole_trial.intermediate_values)
    assert sorted(study_trial.intermediate_values) == [2, 4, 6, 8]
    assert json.loads((sweep_dir / "study" / "summary.json").read_text())["trials"] == {"COMPLETE": 1}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent, _ = sweep_runs(client, sweep_dir)
    (child,) = all_children(client, parent)
    assert (child.info.status, child.data.tags["glm_ft.resumes"], child.data.tags["glm_ft.trial"]) == (
        "FINISHED", "1", "0")
    assert child.data.tags["glm_ft.resumed_from"] == str(cut_at)
    assert "glm_ft.error" not in child.data.tags  # the re-run sweep closed the dead child with one; it finished
    evals = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "eval_rouge-l")}
    assert {s: evals[s] for s in study_trial.intermediate_values} == pytest.approx(study_trial.intermediate_values)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 1


@pytest.mark.slow
def test_a_trial_pruned_just_before_the_kill_is_not_trained_on_when_resumed(tmp_path):
    """The pruner stopped trial 0 at its first evaluation and its job saved checkpoint-4; SIGKILL to the sweep before
    the study was told. The re-run resumes the trial and ends it PRUNED at step 4 at once, as the uninterrupted
    sweep did, instead of training it on to its next evaluation."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("HYDRA_FULL_ERROR", None)
    sweep_dir = tmp_path / "sweep"
    args = ["hparams_search=lora_optuna", "experiment=quickstart", "hydra.sweeper.n_trials=1",
            "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=101", "training_args.max_steps=8",
            "training_args.eval_steps=4", "training_args.save_steps=100", "eval_subset=4",
            "training_args.generation_config.max_new_tokens=8", f"hydra.sweep.dir={sweep_dir}"]
    sigkill_once([sys.executable, str(ROOT / "train.py"), *args], env,
                  lambda: (sweep_dir / "0" / "checkpoint-4" / "glm_ft_complete").is_file())
    (before,) = load_study(sweep_dir, "lora_optuna").trials
    assert before.state.name == "RUNNING" and list(before.intermediate_values) == [4]

    again = run_train(args, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trials [0] were running when it stopped and resume from their last complete checkpoint" in (
        again.stdout + again.stderr)
    (trial,) = load_study(sweep_dir, "lora_optuna").trials
    assert trial.state.name == "PRUNED" and trial.intermediate_values == before.intermediate_values
    assert not list((sweep_dir / "0").glob("checkpoint-[5-9]")) and not (sweep_dir / "0" / "final").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent, _ = sweep_runs(client, sweep_dir)
    (child,) = all_children(client, parent)
    assert child.info.status == "KILLED" and child.data.tags["glm_ft.pruned"] == "true"
    assert child.data.tags["glm_ft.pruned_at_step"] == "4" and child.data.tags["glm_ft.resumes"] == "1"
    assert "glm_ft.error" not in child.data.tags  # pruned, not failed: the tag the dead sweep's closing set goes
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_pruned"] == 1


@pytest.mark.parametrize("setting, expect", [
    ("hydra.sweeper.direction=upward", "error: hydra.sweeper.direction: 'upward' is not maximize or minimize"),
    ("hydra.sweeper.n_trials=0", "error: hydra.sweeper.n_trials: must be at least 1, got 0"),
    ("hydra/sweeper/sampler=grid", "error: hydra.sweeper.params.method.lora_dropout: the grid sampler needs "
                                   "choice(...) or range(...), not a continuous interval"),
])
def test_bad_sweeper_settings_are_refused_before_the_parent_run_exists(setting, expect, tmp_path):
    """Hydra makes the sweeper after the callbacks' on_multirun_start: its constructor's refusal came after the
    sweep's MLflow parent run was made, and left it FAILED in the store."""
    sweep_dir = tmp_path / "sweep"
    out = probe_train(["hparams_search=lora_optuna", *SHORT, setting, f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert assert_refused_light(out, expect) == expect
    assert not sweep_dir.exists() and not (tmp_path / "mlflow.db").exists()

"""A sweep stopped from outside, and the sweep run after it: Ctrl-C ends in one line and exit 130; SIGTERM to a joblib
sweep leaves no child run RUNNING (joblib SIGKILLs its workers as the sweep process stops); a re-run sweep settles
the children its dead predecessor left RUNNING from their own run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, end_process_group, run_process
from glm_ft.runs import last_complete_checkpoint
from lifecycle_helpers import sigkill_once
from test_sweep import APP, app_env, sweep_runs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stopped_sweep_ends_in_one_line_and_its_runs_killed(tmp_path, signum):
    """Ctrl-C in the terminal, or SIGTERM from a scheduler: one line (not one per layer the stop unwinds through)
    naming the job, its step and checkpoint and how to continue the sweep, the signal's exit code, runs KILLED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=quickstart", "method=lora", "method.r=4,8",
           "training_args.max_steps=1000000", "training_args.save_steps=2", "training_args.eval_steps=1000000",
           "eval_subset=4", "training_args.generation_config.max_new_tokens=8", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not list((sweep_dir / "0").glob("checkpoint-*/glm_ft_complete")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # what Ctrl-C in the terminal does, or a scheduler stopping the job
        _, stderr = proc.communicate()
    finally:
        end_process_group(proc)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("interrupted at step") == 1, stderr[-3000:]
    last = stderr[stderr.rindex("interrupted at step"):].splitlines()[0]  # after the progress bar's last \r
    assert "sweep job #0" in last and f"last complete checkpoint: {sweep_dir / '0' / 'checkpoint-'}" in last
    assert f"hydra.sweep.dir={sweep_dir}" in last and "resume=auto" not in last

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]
    assert not (sweep_dir / "1").exists()  # no further job was launched


def test_sigterm_to_a_joblib_sweep_leaves_no_child_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    sweep_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(APP), "-m", "hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2",
                             "experiment=quickstart", "method=lora", "method.r=4,8", f"hydra.sweep.dir={sweep_dir}"],
                            cwd=tmp_path, env=app_env(uri, FAKE_SLEEP_S="120"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while proc.poll() is None:
            if (sweep_dir / "mlflow_parent_run_id").is_file():
                children = sweep_runs(client, sweep_dir)[1]
                if len(children) == 2 and all("test.pid" in c.data.tags for c in children.values()):
                    break
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or `kill -TERM -- -PGID` stops the sweep
        assert proc.wait() == 128 + signal.SIGTERM
    finally:
        end_process_group(proc)
    parent, children = sweep_runs(client, sweep_dir)
    assert parent.info.status == "KILLED"
    assert {name: c.info.status for name, c in children.items()} == {"method.r=4": "KILLED", "method.r=8": "KILLED"}


def test_rerun_sweep_closes_a_job_that_ended_during_an_outage_with_its_status_and_points(tmp_path):
    """A job that finished while only the store was down recorded FINISHED and its unsent points in its folder; the
    re-run sweep skips that job, so no later start in the folder sends them: reopening the parent must, instead of
    closing the child KILLED ("its sweep stopped while it ran") without its final metrics."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.entities import Metric

    from glm_ft.config.schema import TrackingConfig
    from glm_ft.runs import write_json
    from glm_ft.search.sweep import best_child, reopen_parent
    from glm_ft.tracking.parent import PARENT_FILE
    from glm_ft.tracking.run_record import MLFLOW_RUN_FILE, mark_mlflow_run_ended, read_mlflow_run, write_mlflow_run
    from glm_ft.tracking.sender import UNSENT_FILE, save_unsent
    from glm_ft.tracking.store import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mlflow.db").touch()
    store = Store(OmegaConf.structured(TrackingConfig(tracking_uri=uri, experiment_name="settle")))
    sweep_dir = tmp_path / "sweep"
    parent = store.create_run("lora r=4,8", {"glm_ft.sweep": "true"})
    (sweep_dir).mkdir()
    (sweep_dir / PARENT_FILE).write_text(parent + "\n")

    def child(num: int, ended: str | None) -> str:
        run_dir = sweep_dir / str(num)
        run_id = store.create_run(f"method.r={4 * (num + 1)}", {"glm_ft.job_num": str(num)}, parent)
        store.client.log_param(run_id, "training_args.output_dir", str(run_dir))
        store.client.log_metric(run_id, "eval_rouge-l", 10.0, step=100)
        write_mlflow_run(run_dir, run_id, store.experiment_id, uri)
        record = read_mlflow_run(run_dir)
        record["owner"].update(pid=2**22 + 1, pid_start="0")  # the dead sweep's process
        write_json(run_dir / MLFLOW_RUN_FILE, record)
        if ended:
            mark_mlflow_run_ended(run_dir, ended, closed=False)
            now = int(time.time() * 1000)
            save_unsent(run_dir, run_id, [("metric", Metric("eval_rouge-l", 30.0, now, 200)),
                                          ("metric", Metric("test_rouge-l", 25.0, now, 200))])
        return run_id

    finished = child(0, "FINISHED")  # ended during the outage: its job is recorded COMPLETED and will be skipped
    killed = child(1, None)  # the sweep died while it trained

    assert reopen_parent(store, sweep_dir) == parent
    done = store.client.get_run(finished)
    assert done.info.status == "FINISHED"
    assert "glm_ft.error" not in done.data.tags
    assert done.data.metrics["eval_rouge-l"] == 30.0 and done.data.metrics["test_rouge-l"] == 25.0
    assert not (sweep_dir / "0" / UNSENT_FILE).exists()
    dead = store.client.get_run(killed)
    assert dead.info.status == "KILLED" and dead.data.tags["glm_ft.error"] == "its sweep stopped while it ran"
    assert best_child(store, parent, "eval_rouge-l", "maximize").info.run_id == finished


def test_a_killed_sweep_run_again_resumes_its_cut_short_job_from_its_checkpoint(tmp_path):
    """SIGKILL to the whole sweep (a preempted node) in the middle of its job; the same command again resumes that
    job from its last complete checkpoint, to the loss an uninterrupted run reaches, in the same MLflow run; a third
    run finds the job finished and skips it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    job = ["experiment=quickstart", "method=lora", "method.r=4", "training_args.max_steps=40",
           "training_args.save_steps=4", "training_args.eval_steps=1000", "training_args.logging_steps=1",
           "eval_subset=4", "training_args.generation_config.max_new_tokens=8", "data.test_file=null"]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *job, f"hydra.sweep.dir={sweep_dir}"]
    sigkill_once(cmd, env, lambda: list((sweep_dir / "0").glob("checkpoint-*/glm_ft_complete")))
    cut_at = last_complete_checkpoint(sweep_dir / "0")
    assert not (sweep_dir / "0" / "final").exists()

    again = run_process(cmd, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f"Resuming #0 from the checkpoints an earlier run of {sweep_dir} left (resume=auto)" in log
    assert f"resuming from {cut_at}" in log

    whole = run_process([sys.executable, str(ROOT / "train.py"), *job, f"hydra.run.dir={tmp_path / 'whole'}",
                         "tracking.enabled=false"], env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    def last_loss(run_dir):
        history = json.loads((run_dir / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h][-1]

    assert last_loss(sweep_dir / "0") == pytest.approx(last_loss(tmp_path / "whole"), rel=1e-5)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [(c.info.status, c.data.tags.get("glm_ft.resumes")) for c in children] == [("FINISHED", "1")]
    assert parent.info.status == "FINISHED"

    third = run_process(cmd, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Skipping 1 job(s) that finished in an earlier run of {sweep_dir}" in third.stdout + third.stderr


def test_a_job_killed_before_it_trains_does_not_leave_another_jobs_checkpoint_as_its_own(tmp_path):
    """Job #0 of a sweep with learning_rate=0.001 is killed after its first checkpoint; the sweep dir is then run
    with learning_rate=0.005, killed as soon as Hydra recorded job #0's overrides (while the job loads data and
    model, before it trains), and run again: job #0 must train 0.005 from scratch, not resume=auto from the 0.001
    job's checkpoint-2 (the folder's overrides.yaml then said 0.005, and the checkpoint was still complete)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    job = ["experiment=quickstart", "training_args.max_steps=6", "training_args.save_steps=2",
           "training_args.eval_steps=1000", "training_args.logging_steps=1", "eval_subset=2",
           "training_args.per_device_train_batch_size=2", "training_args.generation_config.max_new_tokens=4",
           "data.test_file=null", "training_args.save_total_limit=null"]

    def cmd(rate: str) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), "-m", *job, f"training_args.learning_rate={rate}",
                f"hydra.sweep.dir={sweep_dir}"]

    sigkill_once(cmd("0.001"), env, lambda: list((sweep_dir / "0").glob("checkpoint-*/glm_ft_complete")))
    overrides = sweep_dir / "0" / ".hydra" / "overrides.yaml"
    sigkill_once(cmd("0.005"), env, lambda: overrides.is_file() and "learning_rate=0.005" in overrides.read_text())
    again = run_process(cmd("0.005"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" not in again.stdout + again.stderr
    history = json.loads((sweep_dir / "0" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    rates = {h["step"]: h["learning_rate"] for h in history if "loss" in h}
    assert rates[2] == pytest.approx(0.005 / 20)  # the quickstart's 20 warmup steps, from 0.005 (not 0.001)


# --- a sweep stopped as its second job, or the sweep itself, closes: the same command again finishes it -----------

GRID = ["method.r=4,8"]
OPTUNA = ["hparams_search=lora_optuna", "hydra/sweeper/sampler=grid", "method.r=choice(4,8)", "method.lora_alpha=32",
          "method.lora_dropout=0.1"]
CLOSING_JOB = ("interrupted while closing the run; every stage is done: {job} holds the trained model, its metrics "
               "and predictions: sweep job #1 (")


@pytest.mark.parametrize(("sweeper", "stop_at", "said", "child_after_stop"), [
    # the job's run files uploading: its child run KILLED
    (GRID, "glm_ft.tracking.tracker:Tracker._log_run_files", CLOSING_JOB, "KILLED"),
    (OPTUNA, "glm_ft.tracking.tracker:Tracker._log_run_files", CLOSING_JOB, "KILLED"),
    # the job's run closed FINISHED, its end not yet recorded in .glm_ft_jobs/: said "before training started;
    # nothing was trained or saved (continue with the same command)", which started another sweep
    (GRID, "glm_ft.search.sweep:MlflowSweepCallback.on_job_end", "interrupted between the jobs of the sweep in {sweep}",
     "FINISHED"),
    # every job done, the sweep's parent run closing: it stayed RUNNING, and the line said nothing was trained
    (GRID, "glm_ft.search.sweep:best_child", "interrupted while closing the sweep's MLflow parent run; every job is "
     "done", "FINISHED"),
], ids=["grid_job_closing", "optuna_job_closing", "grid_job_end_recorded", "grid_parent_closing"])
def test_a_sweep_stopped_as_it_closes_finishes_with_the_same_command_training_nothing_again(
        sweeper, stop_at, said, child_after_stop, tmp_path):
    """SIGTERM as the second job or the sweep itself closes, after both jobs trained: one line saying where and how
    to continue; no run left RUNNING. The same command again trains nothing: the stopped job's own child run is
    reopened and ends FINISHED with its run files (no duplicate beside a KILLED one), the first job's results stay,
    and the parent ends FINISHED counting both jobs completed."""
    from mlflow.tracking import MlflowClient

    from lifecycle_helpers import QUICK, STOPPING_TRAIN, background, stopped, wait_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    env = {"MLFLOW_TRACKING_URI": uri}
    sweep_dir, log = tmp_path / "sweep", tmp_path / "first.log"
    args = ["-m", *QUICK, "training_args.max_steps=2", "training_args.save_steps=2", *sweeper,
            f"hydra.sweep.dir={sweep_dir}"]
    with background([sys.executable, "-c", STOPPING_TRAIN, stop_at, *args], log, env=env) as proc:
        # stopped there each time it gets there: the first job's passes go on; the second job's (its folder made)
        # gets the signal
        while not (wait_for(lambda: stopped(proc), stop_at, proc, log) and (sweep_dir / "1").is_dir()):
            os.kill(proc.pid, signal.SIGCONT)
            wait_for(lambda: not stopped(proc), "SIGCONT", proc, log)
        os.kill(proc.pid, signal.SIGTERM)  # held while it is stopped, delivered as it continues
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait() == 128 + signal.SIGTERM, log.read_text()[-3000:]
    parent, children = jobs_runs(client, sweep_dir)
    assert parent.info.status == "KILLED"  # not left RUNNING
    assert {num: c.info.status for num, c in children.items()} == {"0": "FINISHED", "1": child_after_stop}
    out = log.read_text()
    lines = [line.rpartition("\r")[2] for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert lines[0].startswith(said.format(job=sweep_dir / "1", sweep=sweep_dir)), lines
    assert f"continue the sweep with the same command and hydra.sweep.dir={sweep_dir}" in lines[0], lines

    first, second = children["0"], children["1"]
    trained = {path: path.read_bytes() for path in sorted(sweep_dir.rglob("*"))
               if path.is_file() and ("checkpoint-" in str(path) or "/final/" in str(path))}
    assert any("/1/final/" in str(path) for path in trained)

    again = run_process([sys.executable, str(ROOT / "train.py"), *args], env={**os.environ, **env})
    assert again.returncode == 0, again.stderr[-3000:]
    said_again = again.stdout + again.stderr
    assert "resuming from" not in said_again and "train_runtime" not in said_again  # nothing trained again
    assert {path: path.read_bytes() for path in trained} == trained
    parent, children = jobs_runs(client, sweep_dir)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs"] == 2 and parent.data.metrics["jobs_failed"] == 0
    assert {num: (c.info.run_id, c.info.status) for num, c in children.items()} == {
        "0": (first.info.run_id, "FINISHED"), "1": (second.info.run_id, "FINISHED")}
    artifacts = {a.path for a in client.list_artifacts(second.info.run_id)} | {
        a.path for a in client.list_artifacts(second.info.run_id, "model")}
    assert {"finetune.yaml", "eval_predictions.jsonl", "model/adapter_model.safetensors"} <= artifacts
    # the first job's run as its own job left it
    kept = children["0"]
    assert (kept.info.end_time, kept.data.metrics) == (first.info.end_time, first.data.metrics)
    outcomes = {p.name: json.loads(p.read_text())["status"] for p in (sweep_dir / ".glm_ft_jobs").glob("*.json")}
    assert outcomes == {"0.json": "COMPLETED", "1.json": "COMPLETED"}
    if sweeper is OPTUNA:
        assert parent.data.metrics["trials_complete"] == 2
        assert OmegaConf.load(sweep_dir / "optimization_results.yaml").trials == {"COMPLETE": 2}


def jobs_runs(client, sweep_dir):
    """The sweep's parent run and its children by job number (an Optuna grid need not run method.r=4 first), one
    each."""
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_job = {c.data.tags["glm_ft.job_num"]: c for c in children}
    assert len(by_job) == len(children), [(c.info.run_name, c.info.status) for c in children]  # no duplicate
    return parent, by_job

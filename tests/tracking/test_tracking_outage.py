"""Item: tracking never costs training. A real `mlflow server` killed and restarted, or frozen with SIGSTOP, and a
real SQLite store on a full tmpfs, each while train.py runs: training goes on and checkpoints, the outage is reported
once, and afterwards the whole loss curve is in MLflow (held against the run folder's trainer_state.json) and the
run is FINISHED."""

from __future__ import annotations

import contextlib
import signal
import subprocess

import pytest

from conftest import free_port, run_train
from lifecycle_helpers import (QUICK, background, fill, kill_group, log_has, logged_losses, mlflow_run_id,
                               mlflow_server, tmpfs, train_cmd, trainer_losses, wait_for,
                               wait_until_stopped)

pytestmark = pytest.mark.slow

STEPS, SAVE = 24, 4
ARGS = [*QUICK, f"training_args.max_steps={STEPS}", f"training_args.save_steps={SAVE}"]
DOWN = "is unavailable"
BACK = "is back after"
# The end of the run waits for the store as long as the test may take to bring it back.
ENV = {"GLM_FT_MLFLOW_FLUSH_TIMEOUT_S": "1500"}


def complete_steps(run_dir) -> set[int]:
    return {int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoint-*/glm_ft_complete")}


def stopped_at_first_checkpoint(client, proc, log, run_dir) -> None:
    """The job stops itself once checkpoint-SAVE is complete (train_cmd's stop_after), so the test breaks the store
    at that exact point however fast training runs; the points up to it have reached the store by then."""
    wait_until_stopped(proc, log, f"checkpoint-{SAVE}")
    assert complete_steps(run_dir) == {SAVE}
    assert sorted(logged_losses(client, mlflow_run_id(run_dir))) == list(range(1, SAVE + 1))


def wait_for_training_during_outage(proc, log, run_dir) -> None:
    """The job resumes with the store broken: a new checkpoint is completed (training did not wait), and the outage
    is reported."""
    before = complete_steps(run_dir)
    kill_group(proc, signal.SIGCONT)
    wait_for(lambda: complete_steps(run_dir) - before, "a checkpoint completed while the store is down", proc, log)
    wait_for(lambda: log_has(log, DOWN), "the outage warning", proc, log)
    assert not log_has(log, BACK)


def check_everything_arrived(client, proc, log, run_dir) -> None:
    wait_for(lambda: proc.poll() is not None, "the end of training", may_exit=True)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert text.count(DOWN) == 1 and BACK in text  # warned once, and said when it was over
    assert "Traceback" not in text
    assert complete_steps(run_dir) >= {STEPS}
    run_id = mlflow_run_id(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    expected = trainer_losses(run_dir, STEPS)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert logged_losses(client, run_id) == expected  # every step's loss, as the Trainer recorded it
    assert not (run_dir / "mlflow_unsent.jsonl").exists()


def outage_setup(tmp_path):
    """The server's folder, a free loopback port and its URI, the run folder and the job's log."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    return root, port, f"http://127.0.0.1:{port}", tmp_path / "run", tmp_path / "train.log"


@pytest.mark.parametrize("outage", ["killed_and_restarted", "sigstop_then_sigcont"])
def test_a_server_outage_costs_no_training(outage, tmp_path):
    from mlflow.tracking import MlflowClient

    root, port, uri, run_dir, log = outage_setup(tmp_path)
    with contextlib.ExitStack() as servers:
        server = servers.enter_context(mlflow_server(root, port))
        client = MlflowClient(uri)
        cmd = train_cmd(ARGS, run_dir, stop_after=f"checkpoint-{SAVE}")
        with background(cmd, log, env={**ENV, "MLFLOW_TRACKING_URI": uri}) as proc:
            stopped_at_first_checkpoint(client, proc, log, run_dir)
            if outage == "killed_and_restarted":
                kill_group(server)
                server.wait()
                wait_for_training_during_outage(proc, log, run_dir)
                servers.enter_context(mlflow_server(root, port, "restarted"))
            else:
                kill_group(server, signal.SIGSTOP)
                try:
                    wait_for_training_during_outage(proc, log, run_dir)
                finally:
                    kill_group(server, signal.SIGCONT)
            check_everything_arrived(client, proc, log, run_dir)


def test_a_full_sqlite_store_costs_no_training(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    with tmpfs(tmp_path / "store", "32m") as store:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        client = MlflowClient(uri)
        cmd = train_cmd(ARGS, run_dir, stop_after=f"checkpoint-{SAVE}")
        with background(cmd, log, env={**ENV, "MLFLOW_TRACKING_URI": uri}) as proc:
            stopped_at_first_checkpoint(client, proc, log, run_dir)
            filler = fill(store)
            try:
                wait_for_training_during_outage(proc, log, run_dir)
            finally:
                filler.unlink()
            check_everything_arrived(client, proc, log, run_dir)


# Between SIGTERM and SIGKILL: Kubernetes' default terminationGracePeriodSeconds, and SLURM's default KillWait.
GRACE_S = 30


def terminated_with_grace(proc) -> None:
    """A scheduler stopping the job: SIGTERM, then SIGKILL if it is still there GRACE_S later."""
    kill_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=GRACE_S)
    kill_group(proc)
    proc.wait()


@pytest.mark.parametrize("outage", ["killed", "sigstop"])
def test_sigterm_during_an_outage_keeps_the_points_within_a_schedulers_grace(outage, tmp_path):
    """Stopped by its scheduler while the server is away, the job keeps the outage's points in the run folder at
    once, rather than waiting GLM_FT_MLFLOW_FLUSH_TIMEOUT_S for a store known down (it was SIGKILLed first, and the
    points were lost without a word); resume=auto, the server back, sends them: the curve has every step once."""
    from mlflow.tracking import MlflowClient

    args = [*QUICK, "training_args.max_steps=400", f"training_args.save_steps={SAVE}"]  # still training at SIGTERM
    root, port, uri, run_dir, log = outage_setup(tmp_path)
    with contextlib.ExitStack() as servers:
        server = servers.enter_context(mlflow_server(root, port))
        client = MlflowClient(uri)
        cmd = train_cmd(args, run_dir, stop_after=f"checkpoint-{SAVE}")
        with background(cmd, log, env={"MLFLOW_TRACKING_URI": uri}) as proc:
            stopped_at_first_checkpoint(client, proc, log, run_dir)
            if outage == "killed":
                kill_group(server)
                server.wait()
                wait_for_training_during_outage(proc, log, run_dir)
                terminated_with_grace(proc)
                servers.enter_context(mlflow_server(root, port, "restarted"))
            else:
                kill_group(server, signal.SIGSTOP)
                try:
                    wait_for_training_during_outage(proc, log, run_dir)
                    terminated_with_grace(proc)
                finally:
                    kill_group(server, signal.SIGCONT)
        text = log.read_text(errors="replace")
        assert "did not take" in text and (run_dir / "mlflow_unsent.jsonl").is_file(), text[-3000:]
        if outage == "killed":
            assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]  # it ended by itself, within the grace
        # resume=auto to the last complete checkpoint: nothing left to train, the kept points sent, the run closed.
        last = max(complete_steps(run_dir))
        resumed = run_train([*args, "resume=auto", f"training_args.max_steps={last}", f"hydra.run.dir={run_dir}"],
                            env={"MLFLOW_TRACKING_URI": uri})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        run_id = mlflow_run_id(run_dir)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not (run_dir / "mlflow_unsent.jsonl").exists()
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, max(steps) + 1))  # every step logged before SIGTERM, once
        assert max(steps) >= last
        losses = logged_losses(client, run_id)
        assert {step: loss for step, loss in losses.items() if step <= last} == trainer_losses(run_dir, last)


@pytest.mark.parametrize("again", ["resume_auto", "new_run"])
def test_run_files_of_a_run_that_ended_during_an_outage_are_logged_with_its_kept_points(again, tmp_path):
    """A job that ends while the server is down keeps its last points in mlflow_unsent.jsonl, which a later start in
    the folder sends; its run files (config, curves, the adapter) were never logged, not even then. resume=auto with
    the server back now logs them with the points. A new run started in the folder (no resume) has already replaced
    the config that ended run's files are, so it says so in one line naming the folder instead."""
    from mlflow.tracking import MlflowClient

    args = [*QUICK, f"training_args.max_steps={SAVE}", f"training_args.save_steps={SAVE}"]
    root, port, uri, run_dir, log = outage_setup(tmp_path)
    with contextlib.ExitStack() as servers:
        server = servers.enter_context(mlflow_server(root, port))
        client = MlflowClient(uri)
        env = {"MLFLOW_TRACKING_URI": uri, "GLM_FT_MLFLOW_FLUSH_TIMEOUT_S": "0"}  # the store is not waited for
        with background(train_cmd(args, run_dir, stop_after="final"), log, env=env) as proc:
            wait_until_stopped(proc, log, "final/")
            kill_group(server)
            server.wait()
            kill_group(proc, signal.SIGCONT)  # evaluation's points and the run files, with the store down
            wait_for(lambda: proc.poll() is not None, "the end of the job", may_exit=True)
        text = log.read_text(errors="replace")
        assert proc.returncode == 0 and (run_dir / "mlflow_unsent.jsonl").is_file(), text[-3000:]
        servers.enter_context(mlflow_server(root, port, "restarted"))
        run_id = mlflow_run_id(run_dir)
        assert client.list_artifacts(run_id) == []

        later = run_train([*args, f"hydra.run.dir={run_dir}", *(["resume=auto"] if again == "resume_auto" else [])],
                          env={"MLFLOW_TRACKING_URI": uri})
        assert later.returncode == 0, later.stderr[-3000:]
        assert not (run_dir / "mlflow_unsent.jsonl").exists()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "eval_rouge-l" in run.data.metrics  # the kept points arrived
        logged = {a.path for a in client.list_artifacts(run_id)}
        if again == "resume_auto":
            assert logged == {".hydra", "finetune.yaml", "eval_predictions.jsonl", "training_curves.png", "model"}
            assert "adapter_model.safetensors" in {a.path.rsplit("/", 1)[-1]
                                                   for a in client.list_artifacts(run_id, "model")}
            assert run.data.tags["glm_ft.model_path"] == str(run_dir / "final")
        else:
            assert logged == set()
            said = [line for line in (later.stdout + later.stderr).splitlines()
                    if f"the run files of MLflow run {run_id} were not logged" in line]
            assert len(said) == 1 and str(run_dir) in said[0], later.stdout[-3000:]

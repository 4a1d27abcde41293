"""Item: tracking never costs training. A real `mlflow server` killed and restarted, or frozen with SIGSTOP, and a
real SQLite store on a full tmpfs, each while train.py runs: training goes on and checkpoints, the outage is reported
once, and afterwards the whole loss curve is in MLflow (held against the run folder's trainer_state.json) and the
run is FINISHED."""

from __future__ import annotations

import contextlib
import signal

import pytest

from conftest import free_port
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


@pytest.mark.parametrize("outage", ["killed_and_restarted", "sigstop_then_sigcont"])
def test_a_server_outage_costs_no_training(outage, tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
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

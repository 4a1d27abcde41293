"""Several processes opening one fresh SQLite store at once: every run succeeds (MLflow's schema creation races
without the lock beside the database)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, run_train
from lifecycle_helpers import wait_for

pytestmark = pytest.mark.slow

PROCESSES = 4
JOB = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import compose
    cfg = compose(["experiment=quickstart", "tracking.experiment_name=concurrent"])
    open({ready!r} + str(os.getpid()), "w").close()
    while not os.path.exists({go!r}):
        time.sleep(0.01)
    from glm_ft.tracking.tracker import start_run
    with start_run(cfg, {run_dir!r} + str(os.getpid())) as tracker:
        tracker.log_metrics({{"loss": 1.0, "proc": os.getpid()}}, step=1)
    print(tracker.run_id)
""")


@pytest.mark.parametrize("trial", range(2))
def test_four_processes_start_runs_on_one_fresh_store(trial, tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    ready, go = tmp_path / "ready-", tmp_path / "go"
    code = JOB.format(tests=str(ROOT / "tests"), ready=str(ready), go=str(go), run_dir=str(tmp_path / "run-"))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(PROCESSES)]
    try:
        # All imported and composed, then released together: the first use of the store is simultaneous.
        wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == PROCESSES, "all processes ready")
        assert not db.exists()
        go.touch()
        outputs = [p.communicate() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            p.wait()
    assert [p.returncode for p in procs] == [0] * PROCESSES, [err[-2000:] for _, err in outputs]
    run_ids = {out.strip() for out, _ in outputs}
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert {r.info.run_id for r in runs} == run_ids and len(run_ids) == PROCESSES
    assert all(r.info.status == "FINISHED" for r in runs)
    # Each run holds its own process's metrics.
    assert sorted(int(r.data.metrics["proc"]) for r in runs) == sorted(p.pid for p in procs)


def test_a_real_joblib_sweep_on_a_fresh_store(tmp_path):
    """Two joblib workers run real training jobs and open one fresh SQLite store together with the sweep's parent:
    every job's run is FINISHED, none failed, and the store holds them all."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    sweep_dir = tmp_path / "sweep"
    out = run_train(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=quickstart",
                     "method=lora", "method.r=2,4", "training_args.max_steps=1", "training_args.save_steps=1",
                     "training_args.eval_steps=1", "training_args.logging_steps=1", "eval_subset=2",
                     "training_args.per_device_train_batch_size=2", "training_args.generation_config.max_new_tokens=2",
                     "data.test_file=null", f"tracking.tracking_uri=sqlite:///{db}", f"hydra.sweep.dir={sweep_dir}"],
                    cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert db.with_name("mlflow.db.lock").is_file()  # the first use went through the lock
    client = MlflowClient(f"sqlite:///{db}")
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.data.tags["glm_ft.launcher"] == "JoblibLauncher"
    assert sorted(c.info.run_name for c in children) == ["method.r=2", "method.r=4"]
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_failed"] == 0
    assert parent.data.metrics["jobs"] == 2
    # Both jobs trained and logged their loss into the one store.
    assert all(len(client.get_metric_history(c.info.run_id, "loss")) == 1 for c in children)

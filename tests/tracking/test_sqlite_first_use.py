"""Several processes opening one fresh SQLite store at once: every run succeeds (MLflow's schema creation races
without the lock beside the database)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
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

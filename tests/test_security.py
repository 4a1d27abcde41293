"""Nothing reachable from outside, nothing secret written: during real runs every listening socket of glm-ft's
process tree is on loopback (one-process DeepSpeed; torchrun ×2 through glm_ft.launch), and a password in the
tracking URI appears in no param, tag, artifact, run-folder file or console line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_train
from lifecycle_helpers import QUICK, background, mlflow_server, wait_for

pytestmark = pytest.mark.slow

LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def process_tree(root_pid: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, added = {root_pid}, True
    while added:
        children = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= children
        added = bool(children)
    return tree


def listening_sockets(pids: set[int]) -> set[tuple[str, int, int]]:
    """(local address in /proc/net hex, port, pid) of every TCP socket in LISTEN state that these processes hold."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.exists(f"/proc/{pid}/fd/{fd}") else ""
                if with_target.startswith("socket:["):
                    inodes[with_target[8:-1]] = pid
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.add((address, int(port, 16), inodes[fields[9]]))
    return found


def watch_sockets(cmd: list[str], tmp_path: Path, env: dict) -> tuple[int, set, str]:
    """Run cmd, sampling its process tree's listening sockets until it exits."""
    log = tmp_path / "run.log"
    seen: set = set()
    with background(cmd, log, env=env) as proc:
        def sample():
            seen.update(listening_sockets(process_tree(proc.pid)))
            return proc.poll() is not None
        wait_for(sample, "the end of the run", may_exit=True)
    return proc.returncode, seen, log.read_text(errors="replace")


DS = [*QUICK, "deepspeed=zero2", "training_args.max_steps=3", "training_args.save_steps=3"]


def clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "GLOO_SOCKET_IFNAME")}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_one_process_deepspeed_listens_on_loopback_only(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *DS, f"hydra.run.dir={tmp_path / 'run'}"]
    rc, seen, text = watch_sockets(cmd, tmp_path, clean_env(tmp_path))
    assert rc == 0, text[-3000:]
    assert {s for s in seen if s[0] not in LOOPBACK} == set()


def test_torchrun_through_glm_ft_launch_listens_on_loopback_only(tmp_path):
    cmd = [sys.executable, "-m", "glm_ft.launch", "--nproc_per_node", "2", str(ROOT / "train.py"), *DS,
           f"hydra.run.dir={tmp_path / 'run'}"]
    rc, seen, text = watch_sockets(cmd, tmp_path, clean_env(tmp_path))
    assert rc == 0, text[-3000:]
    assert seen, "the rendezvous store must have been seen listening"  # the sampling works
    assert {s for s in seen if s[0] not in LOOPBACK} == set()
    assert (tmp_path / "run" / "checkpoint-3" / "glm_ft_complete").is_file()


SECRET = "s3cr3t-Pa55word"


@pytest.fixture
def secret_server(tmp_path):
    """A real MLflow server on loopback, its URI with a password in it, and an env without MLflow's variables."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    with mlflow_server(root, port):
        yield f"http://glmuser:{SECRET}@127.0.0.1:{port}", port, env


def test_a_password_in_the_tracking_uri_is_written_nowhere(tmp_path, secret_server):
    from mlflow.tracking import MlflowClient

    uri, port, env = secret_server
    run_dir = tmp_path / "run"
    out = run_train([*QUICK, "training_args.max_steps=2", "training_args.save_steps=2",
                     f"tracking.tracking_uri={uri}", f"hydra.run.dir={run_dir}"], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert SECRET not in out.stdout + out.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert "glmuser:***@" in (run_dir / ".hydra" / "overrides.yaml").read_text()  # masked, not dropped

    client = MlflowClient(uri)  # the credentials still reach the server as basic auth
    exp = client.get_experiment_by_name("glm-ft")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    texts = [run.info.run_name or "", *run.data.params.values(), *run.data.tags.values()]
    assert not [t for t in texts if SECRET in t]
    assert run.data.params["tracking.tracking_uri"] == f"http://glmuser:***@127.0.0.1:{port}"
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_an_unreachable_tracking_server_is_named_without_its_password(tmp_path):
    port = free_port()  # nothing listens there
    uri = f"http://glmuser:{SECRET}@127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    # the error names the URI, without the password
    gone = run_train(["experiment=quickstart", f"tracking.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'r2'}"],
                     env=env)
    assert gone.returncode == 1
    assert f"http://glmuser:***@127.0.0.1:{port} is unreachable" in gone.stderr
    assert SECRET not in gone.stdout + gone.stderr
    # the refused run's folder holds Hydra's record of the command line: masked there too
    written = [p for p in (tmp_path / "r2").rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]


def test_a_password_in_the_tracking_uri_of_a_sweep_is_written_nowhere(tmp_path, secret_server):
    """Hydra writes a sweep's overrides with their colons escaped (`http\\://user\\:password@`), and into the sweep
    folder's multirun.yaml and the launcher's log lines as well."""
    from mlflow.tracking import MlflowClient

    uri, _, env = secret_server
    sweep_dir = tmp_path / "sweep"
    out = run_train(["-m", *QUICK, "method.r=2,4", "training_args.max_steps=1", "training_args.save_steps=1",
                     f"tracking.tracking_uri={uri}", f"hydra.sweep.dir={sweep_dir}"], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "#1 : " in out.stdout + out.stderr  # the launcher's line for each job was shown, masked
    assert SECRET not in out.stdout + out.stderr
    written = [p for p in sweep_dir.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    assert len(runs) == 3  # the parent and its two jobs
    for run in runs:
        texts = [run.info.run_name or "", *run.data.params.values(), *run.data.tags.values()]
        assert not [t for t in texts if SECRET in t], run.info.run_name
        if "glm_ft.parent_run_id" not in run.data.tags and "mlflow.parentRunId" not in run.data.tags:
            continue
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        files = [p for p in local.rglob("*") if p.is_file()]
        assert any(p.name == "overrides.yaml" for p in files)
        assert not [p for p in files if SECRET.encode() in p.read_bytes()]

    # run again: the jobs recorded finished are skipped (their records hold the masked overrides), and the sweeper's
    # new multirun.yaml is masked although no job starts
    again = run_train(["-m", *QUICK, "method.r=2,4", "training_args.max_steps=1", "training_args.save_steps=1",
                       f"tracking.tracking_uri={uri}", f"hydra.sweep.dir={sweep_dir}"], env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Skipping 2 job(s)" in again.stdout + again.stderr and SECRET not in again.stdout + again.stderr
    assert not [p for p in sweep_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]

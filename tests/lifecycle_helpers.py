"""Helpers for tests that run real training processes and real MLflow servers, and break them on purpose.

Every wait is for an event (a file, a log line, a metric in the store), with no deadline of its own (pytest-timeout
is the safety net); every process started here runs in its own session and is killed as a group when the test ends,
pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import ROOT, end_process_group, serving


# Small training: no evaluation until the end, no test split, a checkpoint every few steps.
QUICK = ["experiment=quickstart", "method=lora", "training_args.logging_steps=1", "eval_subset=2",
         "training_args.per_device_train_batch_size=2", "training_args.generation_config.max_new_tokens=4",
         "training_args.eval_steps=100000", "data.test_file=null", "training_args.learning_rate=1e-3"]


def mlflow_bin() -> str:
    return str(Path(sys.executable).parent / "mlflow")


def server_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "HYDRA_FULL_ERROR"}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true"}


@contextlib.contextmanager
def mlflow_server(root: Path, port: int, name: str = "server") -> Iterator[subprocess.Popen]:
    """`mlflow server` on 127.0.0.1:port over root/db (the same store each time it is started)."""
    cmd = [mlflow_bin(), "server", "--backend-store-uri", f"sqlite:///{root / 'db'}", "--artifacts-destination",
           str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = root / f"{name}-{time.monotonic_ns()}.log"
    with serving(cmd, f"http://127.0.0.1:{port}/health", log, cwd=root, env=server_env()) as proc:
        yield proc


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def background(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> Iterator[subprocess.Popen]:
    """A process in its own session, output to `log`; SIGKILLed with its whole group at the end."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                kill_group(proc, signal.SIGCONT)
                kill_group(proc)
            proc.wait()


def train_cmd(args: list[str], run_dir: Path, stop_after: str | None = None) -> list[str]:
    """`python train.py ARGS`; with `stop_after` the job stops itself with SIGSTOP at that exact point, so the test
    breaks things there however fast training is (see `stopped`), then SIGKILLs it or sends a signal and SIGCONT.
    `stop_after`: a folder name (checkpoint-4, final), once that folder is complete; or `module:function` (a method
    as `module:Class.method`), as that function is entered, every time. Under glm_ft.launch (the script written to a
    file), only the rank that the env's STOP_RANK names stops, if it is set."""
    if stop_after is None:
        return [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    return [sys.executable, "-c", STOPPING_TRAIN, stop_after, *args, f"hydra.run.dir={run_dir}"]


STOPPING_TRAIN = """
import importlib, os, signal, sys
sys.path.insert(0, os.getcwd())
import glm_ft.runs as runs
stop_after, mark_complete = sys.argv[1], runs.mark_complete
if os.environ.get("STOP_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
    stop_after = ""  # under a launcher with STOP_RANK set, the other ranks run on
def mark_then_stop(folder, step, **facts):
    mark_complete(folder, step, **facts)
    if folder.name == stop_after:
        os.kill(os.getpid(), signal.SIGSTOP)
runs.mark_complete = mark_then_stop  # before glm_ft.train imports it by name
if ":" in stop_after:  # patched before glm_ft.cli (and what it imports later) imports the function by name
    module, _, name = stop_after.partition(":")
    owner = importlib.import_module(module)
    *outer, attribute = name.split(".")
    for part in outer:
        owner = getattr(owner, part)
    entered = getattr(owner, attribute)
    def stop_then_enter(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGSTOP)
        return entered(*args, **kwargs)
    setattr(owner, attribute, stop_then_enter)
sys.argv = ["train.py", *sys.argv[2:]]
from glm_ft.cli import main
main()
"""


def stopped(proc: subprocess.Popen) -> bool:
    """Whether the process is stopped by a signal (state T in /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def wait_until_stopped(proc: subprocess.Popen, log: Path, folder: str) -> None:
    """Wait for a job started with `train_cmd(..., stop_after=folder)` to stop itself there."""
    wait_for(lambda: stopped(proc), f"{folder} (the job stops there)", proc, log)


def signalled_at(stop_after: str, signum: int, args: list[str], run_dir: Path, env: dict) -> tuple[int, str]:
    """Run the job until it stops itself at `stop_after` (see `train_cmd`), send it `signum` there (Ctrl-C's SIGINT,
    a scheduler's SIGTERM), let it go on; its exit code and output."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with background(train_cmd(args, run_dir, stop_after=stop_after), log, env=env) as proc:
        wait_until_stopped(proc, log, stop_after)
        os.kill(proc.pid, signum)  # held while it is stopped, delivered as it continues
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def killed_once_final_is_saved(args: list[str], run_dir: Path, env: dict) -> None:
    """Run the job until it has marked final/ complete, then SIGKILL it there (before any later stage)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with background(train_cmd(args, run_dir, stop_after="final"), log, env=env) as proc:
        wait_until_stopped(proc, log, "final/")
        kill_group(proc)
        proc.wait()


def wait_for(condition: Callable[[], object], what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, may_exit: bool = False) -> object:
    """Poll until condition() is truthy; fail at once if `proc` died first (with its log's tail)."""
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None and not may_exit:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.2)


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / f"checkpoint-{step}" / "glm_ft_complete").is_file()


def trainer_losses(run_dir: Path, step: int) -> dict[int, float]:
    history = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def logged_losses(client, run_id: str) -> dict[int, float]:
    """The loss curve in MLflow; a step logged twice (redone after a resume) keeps its last value."""
    points = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


def mlflow_run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def log_has(log: Path, text: str) -> bool:
    return log.is_file() and text in log.read_text(errors="replace")


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted on folder (needs root); unmounted at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Fill folder's filesystem up to `leave_bytes` free with one file; returns it (delete it to free space)."""
    filler = folder / "filler.bin"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb") as out:
        while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave_bytes + len(chunk):
            try:
                out.write(chunk)
                out.flush()
            except OSError:
                break
    return filler


def sigkill_once(cmd: list[str], env: dict, ready) -> None:
    """Start the sweep `cmd` and SIGKILL its whole process group (a preempted node) as soon as `ready()`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while not ready():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        end_process_group(proc)

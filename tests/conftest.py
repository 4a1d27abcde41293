"""Shared fixtures: the real Hydra configs composed in-process, and paths to the real ChatGLM3 fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CHATGLM3 = ROOT.parent / "shared" / "chatglm3"
SEED_DOC = ROOT.parent / "shared" / "seed" / "finetune_configs_zh.md"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A suite started in the background (`make test &` from a script) inherits SIGINT ignored, as POSIX has it for
# asynchronous commands: the Ctrl-C tests would wait on a training that never stops. A Python handler here gives
# every process the tests start the default SIGINT again (exec resets a handled signal, not an ignored one).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def environment_restored():
    """Code run in-process may export variables (RANK, MASTER_PORT, ...); later tests, and the subprocesses they
    start, must not inherit them."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def real_chatglm3_dir() -> Path:
    """The published chatglm3-6b config and tokenizer files (test fixtures kept outside the repo)."""
    if not (REAL_CHATGLM3 / "tokenizer.model").is_file():
        pytest.skip(f"real ChatGLM3 fixtures absent: {REAL_CHATGLM3} (shared/chatglm3 beside the repo)")
    return REAL_CHATGLM3


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml exactly as train.py does, with these command-line overrides."""
    import glm_ft.config.schema  # noqa: F401
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=False)


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(extra: dict | None = None) -> dict:
    """This process's environment for a command that starts its own ranks (glm_ft.launch, torchrun): without any
    rank variables a shell or an earlier test left behind, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    return {**env, **(extra or {})}


def run_process(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None,
                input: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` to its end and capture its output, like subprocess.run, but with no wall-clock limit of its own
    (a slow machine is only slower; pytest-timeout is the safety net) and in a session of its own, so that whatever
    ends the test early (a failure, pytest-timeout, Ctrl-C) also ends the process and everything it started."""
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdin=subprocess.PIPE if input is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(input)
    finally:
        end_process_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def end_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process's whole session (it was started with start_new_session=True) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_train(args: list[str], cwd: Path | None = None, env: dict | None = None,
              python: str = sys.executable) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return run_process([python, str(ROOT / "train.py"), *args], cwd=cwd or ROOT, env=full_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], health_url: str, log_path: Path, **popen):
    """Start a server process (its own session), wait until `health_url` answers 200 or the process exits (no
    deadline: a loaded machine is only slower), yield the process; stop it with SIGTERM, then SIGKILL to the whole
    group."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            while True:
                try:
                    with urllib.request.urlopen(health_url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None:
                    pytest.fail(f"{' '.join(cmd[:3])} did not become healthy: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)  # a graceful stop first; the group is killed either way
            end_process_group(proc)

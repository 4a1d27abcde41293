"""What a run folder remembers across processes about tracking: its MLflow run and the process that has it open.

- `mlflow_run.json`: the MLflow run of this folder (run id, experiment, the URI without its password), the process
  that holds it (host, pid, the pid's start time, so a reused pid is not taken for it) and, once the run has ended,
  the status it ended with. A later glm-ft start on the folder continues that run (resume) or closes it if a dead
  process left it RUNNING.

Written atomically (temp file + rename): a kill leaves the old version or the new, never half of one. The training
stages done (`glm_ft_progress.json`) and the rest of the run folder are glm_ft.runs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from glm_ft.runs import read_json, write_json
from glm_ft.tracking.redact import redact

MLFLOW_RUN_FILE = "mlflow_run.json"


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_time(os.getpid())}


def process_gone(owner: dict[str, Any]) -> bool:
    """True unless the recorded process is alive on this host. A process on another host can't be checked: a run
    folder seen from another node is taken as abandoned (a requeued SLURM job lands on another node)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    return not isinstance(pid, int) or process_start_time(pid) is None or \
        process_start_time(pid) != owner.get("pid_start")


def read_mlflow_run(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / MLFLOW_RUN_FILE)


def write_mlflow_run(run_dir: Path, run_id: str, experiment_id: str, uri: str) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / MLFLOW_RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id,
                                                   "tracking_uri": redact(uri), "owner": this_process(),
                                                   "ended": None})


def mark_mlflow_run_ended(run_dir: Path, status: str, closed: bool) -> None:
    """`closed`: the store took the status; if not, the next start on this folder sets it."""
    record = read_mlflow_run(run_dir)
    if record is not None:
        record["ended"] = {"status": status, "closed": closed}
        write_json(Path(run_dir) / MLFLOW_RUN_FILE, record)

"""Processes and ranks: which process this is, how a multi-process job starts, shares a folder and ends.

One job may be one process, or several under torchrun / the deepspeed launcher / a submitit task array, which
describe each process with torch.distributed's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).
Everything here reads them through `rank()` and `world_size()`, and `is_rank_zero()` is THE rank 0: the process that
writes the run folder's records, the MLflow run and the sweep's parent run.

Light at import (cli uses it before Hydra composes); torch is imported only by the functions that build or tear down
a process group, which run once training starts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("glm_ft")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_multi_process() -> bool:
    return world_size() > 1


def is_rank_zero() -> bool:
    """True for the one process that writes: a lone process (whatever RANK a shell left behind), or rank 0."""
    return not is_multi_process() or rank() == 0


def quiet_replicas() -> None:
    """Every rank loads the same data and model, so their accounts of it are one account: only rank 0 tells it.
    The other ranks keep glm-ft's warnings and errors (as transformers' `log_level_replica` keeps its own), except
    the data's, which are the same on every rank."""
    if is_rank_zero():
        return
    logging.getLogger("glm_ft").setLevel(logging.WARNING)
    logging.getLogger("glm_ft.data").setLevel(logging.ERROR)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


# --- starting: the command line and the run folder of a multi-process job --------------------------------------


def take_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra's parser would reject: move it to the env."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def shared_run_dir(argv: list[str]) -> list[str]:
    """Ranks of one torchrun/deepspeed job must share a run folder; Hydra's ${now:...} may differ between them."""
    if not is_multi_process() or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    job = job if job != "none" else f"{os.environ.get('MASTER_PORT', '0')}-{os.getppid()}"
    return [*argv, f"hydra.run.dir=outputs/${{now:%Y-%m-%d}}/dist-{job}"]


# --- the process group --------------------------------------------------------------------------------------------


def keep_collectives_on_loopback() -> None:
    """gloo and NCCL listen on the interface of the machine's hostname unless told otherwise; a job whose ranks
    are all on this machine (one process, or torchrun/deepspeed on one node) needs nothing beyond loopback."""
    world = os.environ.get("WORLD_SIZE", "1")
    if int(world) <= 1 or os.environ.get("LOCAL_WORLD_SIZE") == world or \
            is_loopback(os.environ.get("MASTER_ADDR", "")):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def setup_single_process_group() -> None:
    """DeepSpeed wants a process group even for one process; without a launcher it tries MPI and fails.

    The group is created here on an in-memory store: the env:// rendezvous would start a TCPStore server, which
    listens on every interface whatever MASTER_ADDR says. The variables stay set for the code that reads them."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    keep_collectives_on_loopback()
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        dist.init_process_group(get_accelerator().communication_backend_name(), store=dist.HashStore(), rank=0,
                                world_size=1)


def broadcast_from_rank_zero(flag: bool) -> bool:
    """Every rank follows rank 0's decision (e.g. a pruned trial stops on all ranks at the same step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def destroy_process_group() -> None:
    """Tear the process group down while the interpreter is alive, on success and on failure alike.

    Left to interpreter shutdown, gloo's worker threads may still hold tensors when they are destroyed, which can
    abort a process whose run succeeded (SIGABRT); see also exit_skipping_native_teardown.
    """
    if "torch.distributed" not in sys.modules:  # nothing was set up: don't import torch to find that out
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_launcher: int | None = None  # the pid of this rank's launcher, once stop_when_orphaned watches it
# The file glm_ft.launch writes the name of the signal that stops it to (SIGINT, SIGTERM), before it signals a rank.
LAUNCH_STOP = "GLM_FT_LAUNCH_STOP"


def launcher_gone() -> bool:
    """This rank's launcher has ended. What then fails (a collective whose peer rank already stopped, "Connection
    closed by peer") is the job being stopped, not a failure of its own."""
    return _launcher is not None and os.getppid() != _launcher


def launcher_stopped_by() -> str | None:
    """The signal that stopped this rank's glm_ft.launch (SIGINT, SIGTERM), once one has: the launcher tells each
    rank in turn, so this rank's own may not have arrived yet when a peer already told has ended."""
    record = os.environ.get(LAUNCH_STOP)
    if not record or not is_multi_process():
        return None
    try:
        return Path(record).read_text(encoding="utf-8").strip() or None
    except OSError:  # not stopped (no record), or the launcher has ended (then launcher_gone says it)
        return None


def stop_when_orphaned(every_s: float = 2.0) -> None:
    """Under torchrun (glm_ft.launch): SIGTERM to this rank once its launcher is gone.

    A launcher killed outright (SIGKILL, the OOM killer) stops nothing: its ranks, which have sessions and process
    groups of their own under a scheduler, trained on for hours, holding the GPUs and writing into the run folder.
    PR_SET_PDEATHSIG would fire when the launcher's spawning *thread* ends, not the launcher; a watch on the parent
    pid does not. SIGTERM is how a rank is stopped anyway: rank 0 ends its MLflow run KILLED.
    """
    global _launcher
    if not is_multi_process() or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import signal
    import threading
    import time

    _launcher = os.getppid()

    def watch() -> None:
        while not launcher_gone():
            time.sleep(every_s)
        log.warning("rank %d: its launcher (pid %d) is gone; stopping", rank(), _launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="glm-ft-launcher-watch", daemon=True).start()


def exit_skipping_native_teardown() -> None:
    """A rank of a multi-process run that finished its work exits here, without interpreter finalization.

    Seen on CPU/gloo under torchrun (about one suite run in four): a rank that had finished, saved and destroyed
    its process group still aborted in native teardown at exit ("terminate called without an active exception",
    SIGABRT), so torchrun reported the successful run as failed. Everything this process owns is already written
    and closed (checkpoints, final weights, the MLflow run); what remains is flushing the log streams.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- placement of sweep jobs ------------------------------------------------------------------------------------

_pinned_gpu: str | None = None
_gpu_lock: Any = None  # the open lock file: held for the worker's lifetime, released by the OS when it exits


def visible_gpus() -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def pin_gpu_for_worker(sweep_dir: Path) -> str | None:
    """One GPU per joblib worker, via CUDA_VISIBLE_DEVICES, chosen by a lock file in the sweep folder.

    A worker keeps its GPU for all the jobs it runs: CUDA reads CUDA_VISIBLE_DEVICES once per process.
    With more workers (hydra.launcher.n_jobs) than GPUs, the extra ones share, round robin by pid.
    """
    global _pinned_gpu, _gpu_lock
    if _pinned_gpu is None:
        gpus = visible_gpus()
        if len(gpus) < 2:
            return None
        lock_dir = sweep_dir / ".gpu_locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        for gpu in gpus:
            handle = open(lock_dir / f"gpu-{gpu.replace('/', '_')}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _pinned_gpu, _gpu_lock = gpu, handle
            break
        else:
            _pinned_gpu = gpus[os.getpid() % len(gpus)]
            log.warning("more joblib workers than GPUs (%s): sharing GPU %s; set hydra.launcher.n_jobs=%d",
                        ",".join(gpus), _pinned_gpu, len(gpus))
    os.environ["CUDA_VISIBLE_DEVICES"] = _pinned_gpu
    return _pinned_gpu


def export_distributed_env() -> None:
    """hydra.launcher.tasks_per_node=N runs the job in N processes: give them torch.distributed's env:// variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun would. Without RANK, whatever of the rest
    is set is left over from the submitting shell: it is replaced (a MASTER_PORT is kept)."""
    if "RANK" in os.environ:
        return
    try:
        import submitit  # only installed with the submitit launcher

        num_tasks = submitit.JobEnvironment().num_tasks
    except Exception as err:  # not inside a submitit job
        log.debug("no submitit job environment: %s", err)
        return
    if num_tasks > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)

"""The life of a job's MLflow run around glm_ft.tracking.tracker.start_run: what the run folder's earlier run becomes
(closed if its process died, continued on resume), and how a run is closed (the sender drained, the run files logged,
what the store would not take kept for later). Objects come in from glm_ft.tracking.tracker; nothing is imported from
it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from glm_ft.errors import ConfigError
from glm_ft.tracking.redact import redact
from glm_ft.tracking.run_record import mark_mlflow_run_ended, process_gone, read_mlflow_run, this_process
from glm_ft.tracking.sender import describe_unsent, resend_unsent, save_unsent

# Why a run ended badly: set at a failure (tracker.start_run) or by a sweep closing a child its death left RUNNING.
ERROR_TAG = "glm_ft.error"

log = logging.getLogger("glm_ft.tracking.tracker")


def previous_run(store, cfg: DictConfig, run_dir: Path,
                  reopen: bool = True) -> tuple[str | None, dict[str, str] | None]:
    """The MLflow run this folder had before: closed if its process died leaving it RUNNING, its unsent points
    sent, and with `resume` set reopened (run id, its params); (None, None) starts a new run."""
    record = read_mlflow_run(run_dir)
    if not record or record.get("tracking_uri") != redact(store.uri) or \
            record.get("experiment_id") != store.experiment_id:
        return None, None
    run_id = str(record.get("run_id"))
    try:
        run = store.client.get_run(run_id)
    except Exception:  # deleted for good, or another store behind the same URI
        return None, None
    if run.info.lifecycle_stage != "active":
        return None, None
    owner = record.get("owner") or {}
    if run.info.status == "RUNNING":
        if owner.get("pid") != this_process()["pid"] and not process_gone(owner):
            raise ConfigError(f"{run_dir}: process {owner.get('pid')} is still running in this run folder (MLflow "
                              f"run {run_id}); wait for it to end or stop it first")
        ended = record.get("ended") or {}
        status = ended.get("status") or "KILLED"
        store.end_run(run_id, status)
        log.warning("MLflow: run %s was left RUNNING by process %s, which is gone; marked %s", run_id,
                    owner.get("pid"), status)
    files: list = []
    try:
        sent, files = resend_unsent(store.client, run_dir, run_id)
        if sent:
            log.info("MLflow: sent %d points of run %s that an earlier process could not send", sent, run_id)
    except Exception as err:
        log.warning("MLflow: could not send the points an earlier process kept for run %s: %s", run_id,
                    redact(str(err)))
    continued = cfg.resume is not None and reopen
    if files and not continued:
        _log_kept_files(store, run_dir, run_id, files, replaced=reopen)
    if not continued:
        return None, None
    store.client.update_run(run_id, status="RUNNING")
    store.client.set_tag(run_id, "glm_ft.resumes", str(int(run.data.tags.get("glm_ft.resumes", "0")) + 1))
    if ERROR_TAG in run.data.tags:  # the earlier end's (a dead sweep's child, a failure): this end sets its own
        store.client.delete_tag(run_id, ERROR_TAG)
    log.info("MLflow: continuing run %s", run_id)
    return run_id, dict(run.data.params)


def _log_kept_files(store, run_dir: Path, run_id: str, files: list, replaced: bool) -> None:
    """The run files an earlier process could not log (the store was down when its run ended), logged with its kept
    points. `replaced`: a new run starts in the folder, and Hydra (.hydra/) and rendering (finetune.yaml) have
    already written its config over those files. A continued run logs the folder's files at its own end."""
    if replaced:
        log.warning("MLflow: the run files of MLflow run %s were not logged (the store was down when it ended) and "
                    "a new run has replaced its config in %s, so they stay unlogged", run_id, run_dir)
        return
    log_files(store.client, run_id, files)
    log.info("MLflow: logged the %d run files of run %s that an earlier process could not log", len(files), run_id)


def log_path(client, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """A file, or a folder (logged under its own name unless artifact_path says otherwise)."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path or path.name)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"log_artifact: no such file or folder: {path}")


def log_files(client, run_id: str, files: list[tuple[Path, str | None]]) -> None:
    for path, artifact_path in files:
        try:
            log_path(client, run_id, path, artifact_path)
        except Exception as err:  # a failing upload must not hide the job's own outcome
            log.warning("MLflow: could not log %s: %s", path, redact(str(err)))


# How long the end of a run waits for the sender to deliver what it holds before keeping it in a file.
FLUSH_TIMEOUT_S = float(os.environ.get("GLM_FT_MLFLOW_FLUSH_TIMEOUT_S", "60"))
# A job told to stop (Ctrl-C, SIGTERM) waits this long at most for a store that is up, and not at all for one that
# is down: a scheduler's SIGKILL follows its SIGTERM within a grace period (30 s by default in Kubernetes and
# SLURM), and what the store did not take must be in the run folder's file by then, not in the dying process.
STOP_FLUSH_S = 5.0
STOP_JOIN_S = 1.0


def close_run(tracker, status: str, stopping: bool = False) -> None:
    """Drain the sender, log the run files, keep what the store did not take, set the status. `stopping`: the job
    was told to stop (Ctrl-C, SIGTERM), which waits on no store that is down."""
    sender, store, run_id = tracker.sender, tracker.store, tracker.run_id
    wait = (0.0 if sender.store_down else STOP_FLUSH_S) if stopping else FLUSH_TIMEOUT_S
    if sender.store_down and wait and sender.pending:
        log.warning("MLflow: waiting up to %.0f s for the tracking store %s to take the last %d points of run %s "
                    "(Ctrl-C stops waiting; they are kept in %s)", wait, store.shown_uri, sender.pending, run_id,
                    tracker.run_dir)
    unsent, delivered = None, False
    try:
        delivered = sender.flush(wait)
        if delivered:
            tracker._log_run_files()  # its tags go through the sender too
        # Only the run files' tags are new since the flush: a store that did not take the rest is not waited on again.
        unsent = sender.close(wait if delivered else 0, STOP_JOIN_S if stopping else None)
    finally:  # also on a Ctrl-C or SIGTERM while waiting: what the store has not taken is kept, never dropped
        if unsent is None:
            unsent = sender.close(0, STOP_JOIN_S)
        if not delivered:  # the run files too, logged by the next start in the folder with the points
            unsent = unsent + unsent_run_files(tracker)
        _keep_unsent(tracker, unsent)
    closed = end_run(store, run_id, status)
    try:
        mark_mlflow_run_ended(tracker.run_dir, status, closed)
    except OSError as err:  # a full disk must not replace the job's own outcome
        log.warning("MLflow: could not record the end of run %s in %s: %s", run_id, tracker.run_dir, err)


def unsent_run_files(tracker) -> list[tuple[str, Any]]:
    from mlflow.entities import RunTag

    tags, files = tracker.run_files()
    return [("tag", RunTag(key, value)) for key, value in tags.items()] + [("file", file) for file in files]


def _keep_unsent(tracker, unsent: list) -> None:
    sender, run_id = tracker.sender, tracker.run_id
    if sender.dropped:
        log.error("MLflow: %d metric points of run %s were lost (the queue overflowed during an outage)",
                  sender.dropped, run_id)
    if not unsent:
        return
    try:
        kept = f"they are kept in {save_unsent(tracker.run_dir, run_id, unsent)} and sent the next time " \
               "glm-ft starts in this run folder"
    except OSError as err:
        kept = f"they are lost (could not be kept in {tracker.run_dir}: {err})"
    log.error("MLflow: the tracking store %s did not take %s of run %s; %s", tracker.store.shown_uri,
              describe_unsent(unsent), run_id, kept)


def end_run(store, run_id: str, status: str) -> bool:
    try:
        store.end_run(run_id, status)
        return True
    except Exception as err:
        log.error("MLflow: could not mark run %s %s in %s: %s", run_id, status, store.shown_uri, redact(str(err)))
        return False

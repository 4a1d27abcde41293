"""The Hydra callback behind `python train.py -m ...`: one MLflow parent run per sweep, and job placement.

conf/config.yaml names it in `hydra.callbacks`. Where each hook runs matters:
- on_multirun_start / on_multirun_end: the process that ran `train.py -m`. The sweep's config is judged first
  (glm_ft/search/precheck.py); then the parent run is created, and its id handed to the jobs twice: in
  `<sweep dir>/mlflow_parent_run_id` (jobs in other processes or on other nodes: joblib, submitit) and in an
  environment variable (in-process and forked jobs).
- on_job_start / on_job_end: the job's own process (the same one for the basic launcher, a worker otherwise).
  Each job writes its outcome to `<sweep dir>/.glm_ft_jobs/<num>.json`, so the parent knows about failures that
  happened in other processes.

Hydra 1.3 calls on_multirun_end only when every job succeeded, so the parent is also closed from an atexit hook:
reaching that hook without on_multirun_end means the sweep failed (or was interrupted).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from glm_ft import dist, stops
from glm_ft.tracking.lifecycle import ERROR_TAG, end_run
from glm_ft.tracking.params import git_commit, split_long_values
from glm_ft.tracking.redact import redact, redact_files, redact_log_records
from glm_ft.tracking.parent import PARENT_ENV, PARENT_FILE, SWEPT_PARAMS_TAG, parse_overrides
from glm_ft.tracking.signals import SIGTERM_GUARD, Terminated, restated
from glm_ft.tracking.store import Store
from glm_ft.tracking.tracker import Tracker
from glm_ft.atomic import write_text_atomic
from glm_ft.errors import GlmFtError, to_stderr
from glm_ft.search.lock import SweepLock, SweepLocked
from glm_ft.search.precheck import check_sweep
from glm_ft.tracking.lifecycle import FLUSH_TIMEOUT_S
from glm_ft.tracking.sender import describe_unsent

log = logging.getLogger(__name__)

JOBS_DIR = ".glm_ft_jobs"
PRUNED = "PRUNED"
STUDY_DIR = "study"  # the Optuna sweeper's summary and plots (hydra_plugins/glm_ft_sweepers)
DEFAULT_METRIC = "eval_rouge-l"


def swept_params(config: DictConfig) -> dict[str, str]:
    """key → what was swept over, merged as the sweepers merge it: a sweeper's search space (hydra.sweeper.params),
    then the command line, which wins: a sweep there (method.r=4,8,16, 'method.r=choice(4,8)') replaces the key's
    space, a plain value (method.lora_alpha=32) takes the key out of it."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    out = {str(k): str(v) for k, v in (OmegaConf.to_container(params) if params is not None else {}).items()}
    for override in parse_overrides(list(config.hydra.overrides.task)):
        out.pop(override.key_or_group, None)
        if override.is_sweep_override():
            out[override.key_or_group] = override.get_value_string()
    return out


def sweep_run_name(config: DictConfig, swept: dict[str, str]) -> str:
    """What was swept, as a user would say it: `lora r=4,8,16`, `lora optuna r,lora_alpha,learning_rate`."""
    method = "" if "method" in swept else (OmegaConf.select(config, "hydra.runtime.choices.method", default=None)
                                            or OmegaConf.select(config, "method.name", default=""))
    short = {key: key.removeprefix("method.").removeprefix("training_args.") for key in swept}
    if "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower():
        what = "optuna " + ",".join(short.values())
    else:
        what = " ".join(f"{short[key]}={value}" for key, value in swept.items())
    return f"{method} {what}".strip() or str(config.hydra.sweep.dir)


def sweep_objective(config: DictConfig) -> tuple[str, str]:
    """(metric, "maximize"|"minimize") the parent ranks its children by."""
    metric = OmegaConf.select(config, "optimized_metric", default=None) or DEFAULT_METRIC
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction):
        direction = direction[0] if len(direction) else None
    direction = str(direction or "maximize").lower()
    return str(metric), "minimize" if "min" in direction else "maximize"


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data))


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self._owner_pid: int | None = None
        self._parent_id: str | None = None
        self._sweep_dir: Path | None = None
        self._metric = DEFAULT_METRIC
        self._direction = "maximize"
        self._reached_end = False
        self._closed = False
        self._store: Store | None = None

    def __getstate__(self) -> dict:
        # joblib and submitit pickle the callbacks into their workers; the MLflow client stays behind.
        return {**self.__dict__, "_store": None}

    # --- the sweep process ---------------------------------------------------------------------------------------

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._owner_pid = os.getpid()
        redact_log_records()  # the launcher logs each job's overrides
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            # Before anything is made (the sweep folder, the parent run, a study): a config every job would refuse
            # fails here once, in the line a single run prints.
            check_sweep(config)
        except GlmFtError as err:
            to_stderr(f"error: {err}")
            sys.exit(1)
        try:
            # Held for the sweep's life (released by the OS at exit): what an earlier sweep of this folder left
            # RUNNING died with it.
            SweepLock(sweep_dir).acquire()
        except SweepLocked as err:
            to_stderr(f"error: {err}")
            sys.exit(1)
        stops.sweeping(sweep_dir)
        if not config.tracking.enabled or config.get("dry_run") or not dist.is_rank_zero():
            return
        try:
            store = Store(config.tracking)
        except GlmFtError as err:
            # Hydra turns a callback's exception into a warning and would start every job anyway.
            to_stderr(f"error: {err}")
            sys.exit(1)
        swept = swept_params(config)
        self._metric, self._direction = sweep_objective(config)
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
        tags = {
            "glm_ft.sweep": "true",
            "glm_ft.sweep_dir": str(sweep_dir),
            SWEPT_PARAMS_TAG: json.dumps(sorted(swept)),
            "glm_ft.sweeper": sweeper.rsplit(".", 1)[-1],
            "glm_ft.launcher": str(OmegaConf.select(config, "hydra.launcher._target_", default="")).rsplit(".", 1)[-1],
            "glm_ft.overrides": " ".join(config.hydra.overrides.task),
            "glm_ft.optimized_metric": self._metric,
            "glm_ft.direction": self._direction,
            "glm_ft.git_commit": git_commit(),
        }
        self._parent_id = reopen_parent(store, sweep_dir) or store.create_run(sweep_run_name(config, swept), tags)
        self._store, self._sweep_dir = store, sweep_dir
        SIGTERM_GUARD.open_runs[self._parent_id] = store
        SIGTERM_GUARD.acquire()
        atexit.register(self._close)
        from mlflow.entities import Param

        params = split_long_values({f"sweep.{k}": v for k, v in swept.items()})
        try:
            store.client.log_batch(self._parent_id, params=[Param(k, v) for k, v in params.items()])
        except Exception as err:  # a continued sweep whose search space was changed: MLflow keeps the first
            log.warning("MLflow: sweep params of %s not updated: %s", self._parent_id, err)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(self._parent_id + "\n", encoding="utf-8")
        os.environ[PARENT_ENV] = self._parent_id
        log.info("MLflow: sweep parent run %s in %s", self._parent_id, store.shown_uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        redact_files(Path(str(config.hydra.sweep.dir)))  # multirun.yaml, if no job started to mask it
        self._reached_end = True
        self._close()

    # --- the job's process ---------------------------------------------------------------------------------------

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_files(Path(str(config.hydra.sweep.dir)))  # the sweeper wrote multirun.yaml after on_multirun_start
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if "joblib" in launcher and self._owner_pid not in (None, os.getpid()):
            dist.pin_gpu_for_worker(Path(str(config.hydra.sweep.dir)))
        if "submitit" in launcher:
            dist.export_distributed_env()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if config.get("dry_run"):
            return
        # Written with or without tracking: a re-run of this sweep folder skips the jobs recorded COMPLETED.
        outcome = {"num": int(config.hydra.job.num), "status": job_return.status.name,
                   "overrides": [redact(o) for o in config.hydra.overrides.task]}
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            outcome["error"] = redact(f"{type(error).__name__}: {error}")
            if type(error).__name__ == "TrialPruned":  # glm_ft.search.study: stopped by the study's pruner
                outcome["status"] = PRUNED
        elif isinstance(job_return._return_value, (int, float)):
            outcome["return_value"] = job_return._return_value
            failure = no_score(sweep_objective(config)[0], job_return._return_value)
            if failure is not None:
                # Failed as the study fails the trial (both sweepers end listing it): the parent's jobs_failed, a
                # re-run (which does not skip it) and its child run's status all say so.
                outcome.update(status=JobStatus.FAILED.name, error=failure)
                fail_child(config, failure)
        _write_json(sweep_dir / JOBS_DIR / f"{outcome['num']}.json", outcome)

    # --- closing the parent --------------------------------------------------------------------------------------

    def _close(self) -> None:
        if self._closed or self._parent_id is None or os.getpid() != self._owner_pid:
            return
        self._closed = True
        parent_id = self._parent_id
        store = self._store
        try:
            outcomes = self._job_outcomes()
            failed = [o for o in outcomes if o["status"] not in (JobStatus.COMPLETED.name, PRUNED)]
            if SIGTERM_GUARD.interrupted or isinstance(_uncaught_exception(), KeyboardInterrupt):
                status = "KILLED"
            elif failed or not self._reached_end:
                status = "FAILED"
            else:
                status = "FINISHED"
            if status != "FINISHED":
                close_abandoned_children(store, parent_id)
            self._summarise(store, parent_id, len(outcomes), len(failed))
            end_run(store, parent_id, status)
            log.info("MLflow: sweep parent run %s %s (%d jobs, %d failed)", parent_id, status, len(outcomes),
                     len(failed))
        except (KeyboardInterrupt, Terminated) as stop:
            # Stopped while it was closed (its summary maybe half sent): KILLED, as a job's run stopped while closing
            # is, where it stayed RUNNING; a re-run of the sweep, whose finished jobs it skips, closes it again.
            end_run(store, parent_id, "KILLED")
            if not self._reached_end:  # at exit, after the sweep's own stop or failure was said
                log.warning("MLflow: sweep parent run %s KILLED: stopped while it was closed", parent_id)
                return
            raise restated(stop, f"while closing the sweep's MLflow parent run; every job is done: "
                                 f"{stops.continue_sweep(self._sweep_dir)}, which runs none of them again and "
                                 "closes it FINISHED") from None
        except Exception as err:
            log.error("MLflow: could not close sweep parent run %s: %s", parent_id, err)
        finally:
            SIGTERM_GUARD.open_runs.pop(parent_id, None)
            SIGTERM_GUARD.release()
            if os.environ.get(PARENT_ENV) == parent_id:
                del os.environ[PARENT_ENV]

    def _job_outcomes(self) -> list[dict]:
        folder = self._sweep_dir / JOBS_DIR
        outcomes = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            with contextlib.suppress(ValueError, OSError):
                outcomes.append(json.loads(path.read_text(encoding="utf-8")))
        return outcomes

    def _summarise(self, store: Store, parent_id: str, jobs: int, failed: int) -> None:
        """The best child by the sweep's metric, the job counts, and Optuna's own summary file."""
        study = self._sweep_dir / STUDY_DIR
        summary = json.loads((study / "summary.json").read_text(encoding="utf-8")) \
            if (study / "summary.json").is_file() else {}
        best = best_child(store, parent_id, self._metric, self._direction, summary.get("best_trial"))
        metrics = {"jobs": jobs, "jobs_failed": failed}
        tags = {}
        if best is not None:
            metrics[f"best_{self._metric}"] = best.data.metrics[self._metric]
            tags = {"glm_ft.best_run_id": best.info.run_id, "glm_ft.best_run_name": best.info.run_name or "",
                    "glm_ft.best_overrides": best.data.tags.get("glm_ft.overrides", "")}
        parent = Tracker(store, parent_id, OmegaConf.create({}), self._sweep_dir)
        parent.log_metrics(metrics)
        if tags:
            parent.set_tags(tags)
        optuna_results = self._sweep_dir / "optimization_results.yaml"
        if optuna_results.is_file():
            parent.log_artifact(optuna_results)
        if summary:
            parent.log_metrics({f"trials_{state.lower()}": n for state, n in summary.get("trials", {}).items()})
            if "best_trial" in summary:
                parent.set_tags({"glm_ft.best_trial": str(summary["best_trial"]),
                                 "glm_ft.best_params": json.dumps(summary["best_params"])})
            for path in sorted(study.iterdir()):
                parent.log_artifact(path, STUDY_DIR)
        # A Tracker sends metrics and tags from its background sender: deliver them before the parent is closed.
        unsent = parent.sender.close(FLUSH_TIMEOUT_S)
        if unsent:
            log.error("MLflow: the summary of sweep parent run %s was not sent: %s", parent_id,
                      describe_unsent(unsent))


def reopen_parent(store: Store, sweep_dir: Path) -> str | None:
    """A re-run of a sweep folder continues its parent run: RUNNING again, and the children the dead sweep left
    RUNNING closed as KILLED (their jobs are resumed from a checkpoint, which reopens the run, or run again)."""
    marker = sweep_dir / PARENT_FILE
    if not marker.is_file():
        return None
    parent_id = marker.read_text(encoding="utf-8").strip()
    try:
        store.client.get_run(parent_id)
    except Exception as err:
        log.warning("MLflow: the earlier parent run %s of %s is not in %s (%s); starting a new one", parent_id,
                    sweep_dir, store.uri, err)
        return None
    for child in child_runs(store.client, store.experiment_id, parent_id):
        settle_child(store, child)
    store.client.update_run(parent_id, status="RUNNING")
    store.client.set_tag(parent_id, "glm_ft.continued", "true")
    log.info("MLflow: continuing sweep parent run %s", parent_id)
    return parent_id


def close_abandoned_children(store: Store, parent_id: str, wait_s: float = 5.0) -> None:
    """A stopped sweep's children still RUNNING whose job process is gone (or dies within `wait_s`): KILLED.
    SIGTERM reaches a joblib worker too, but joblib answers the sweep process's own Terminated by SIGKILLing its
    workers (Parallel._abort), usually before they have closed their runs. Jobs on other hosts are left alone."""
    import socket
    import time

    from glm_ft.tracking.run_record import mark_mlflow_run_ended, read_mlflow_run

    pending = []
    for child in child_runs(store.client, store.experiment_id, parent_id):
        run_dir = child.data.params.get("training_args.output_dir")
        record = read_mlflow_run(Path(run_dir)) if run_dir and child.info.status == "RUNNING" else None
        owner = (record or {}).get("owner") or {}
        if record and record.get("run_id") == child.info.run_id and owner.get("host") == socket.gethostname():
            pending.append((child.info.run_id, Path(run_dir), owner))
    deadline = time.monotonic() + wait_s
    while pending:
        for item in [item for item in pending if _process_ended(item[2])]:
            pending.remove(item)
            run_id, run_dir, _ = item
            if store.client.get_run(run_id).info.status != "RUNNING":
                continue  # it closed its run itself
            store.client.set_tag(run_id, ERROR_TAG, "its sweep stopped while it ran")
            closed = end_run(store, run_id, "KILLED")
            with contextlib.suppress(OSError):
                mark_mlflow_run_ended(run_dir, "KILLED", closed)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)


def _process_ended(owner: dict) -> bool:
    """The recorded process is gone, or a zombie its parent has not reaped yet."""
    from glm_ft.tracking.run_record import process_gone

    if process_gone(owner):
        return True
    try:
        return Path(f"/proc/{owner['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError, KeyError):
        return True


def settle_child(store: Store, child) -> None:
    """A child of the dead sweep, as its own run folder tells it: a job that ended while only the store was down
    (its status and unsent points kept in the folder) gets that status and those points, as a later start in the
    folder would give them (a re-run sweep skips that job, so none comes); one the sweep left RUNNING is KILLED."""
    from glm_ft.tracking.lifecycle import previous_run
    from glm_ft.tracking.run_record import read_mlflow_run

    run_dir = child.data.params.get("training_args.output_dir")
    record = read_mlflow_run(Path(run_dir)) if run_dir else None
    ours = bool(record) and record.get("run_id") == child.info.run_id
    ended = (record.get("ended") or {}).get("status") if ours else None
    if child.info.status == "RUNNING" and not ended:
        store.client.set_tag(child.info.run_id, ERROR_TAG, "its sweep stopped while it ran")
    if ours:
        try:  # closes it with the status its process reached (else KILLED) and sends the points it kept
            previous_run(store, OmegaConf.create({"resume": None}), Path(run_dir), reopen=False)
        except Exception as err:
            log.warning("MLflow: could not settle child run %s from %s: %s", child.info.run_id, run_dir,
                        redact(str(err)))
        child = store.client.get_run(child.info.run_id)
    if child.info.status == "RUNNING":
        end_run(store, child.info.run_id, ended or "KILLED")


def best_child(store: Store, parent_id: str, metric: str, direction: str, trial: int | None = None):
    """The FINISHED child run with the best final value of `metric`, or None when none has it. A killed, failed or
    pruned child's value is from part of its training (and a re-run sweep keeps the killed copy beside the new one).
    A NaN (or infinite) value is no score: max and min keep a NaN met first (every comparison with it is false), so
    the newest child's NaN won both ways; Optuna fails such a trial. In a study, the run of its best `trial`, so the
    parent's best run and best trial agree when trials tie."""
    children = child_runs(store.client, store.experiment_id, parent_id)
    scored = [run for run in children if run.info.status == "FINISHED" and is_score(run.data.metrics.get(metric))]
    of_trial = [run for run in scored if trial is not None and run.data.tags.get("glm_ft.trial") == str(trial)]
    scored = of_trial or scored
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda run: run.data.metrics[metric])


def is_score(value: float | None) -> bool:
    """A final metric a run can be ranked by: present and a finite number."""
    return value is not None and math.isfinite(value)


def no_score(metric: str, value: Any) -> str | None:
    """Why a job's returned objective is no score (NaN, infinite), or None when it is one or the job returned none
    (a grid sweep without optimized_metric and no eval_rouge-l to return). Both sweepers and the job's outcome say
    it in these words."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or is_score(value):
        return None
    return f"no score: {metric} is {value}; its training completed and its checkpoints are kept"


def fail_child(config: DictConfig, failure: str) -> None:
    """The job's own MLflow run, which its training closed FINISHED: FAILED, with `failure` as its glm_ft.error, as
    Optuna's FAIL and the sweep's failed count have it. Its end time and run folder stay as they are."""
    from glm_ft.tracking.run_record import mark_mlflow_run_ended, read_mlflow_run

    run_dir = Path(str(config.hydra.runtime.output_dir))
    record = read_mlflow_run(run_dir)
    if not record or not config.tracking.enabled or not dist.is_rank_zero():
        return
    try:
        store = Store(config.tracking)
        run_id = str(record.get("run_id"))
        if store.client.get_run(run_id).info.status != "FINISHED":
            return  # already FAILED (a re-run of the sweep), or left for the next start to close
        store.client.set_tag(run_id, ERROR_TAG, failure)
        store.client.update_run(run_id, status="FAILED")
        mark_mlflow_run_ended(run_dir, "FAILED", True)
    except Exception as err:
        log.error("MLflow: could not mark the run of %s FAILED (%s): %s", run_dir, failure, redact(str(err)))


def child_runs(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=5000)


def _uncaught_exception() -> BaseException | None:
    # Set by the interpreter when an exception reached the top level, before atexit hooks run.
    return getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)

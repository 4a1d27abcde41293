"""MLflow tracking: one run per train.py job, nested under its sweep's parent run in a multirun.

    with start_run(cfg, run_dir) as tracker:
        tracker.log_metrics({...}, step=...)        # a Trainer's own logs: glm_ft.train.trainer.TrackerCallback

The run gets the whole composed config as params, the Hydra choices, overrides and git commit as tags, and the run
folder's files as artifacts when it ends. It ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C or SIGTERM):
never left RUNNING. Everything goes through `MlflowClient` with explicit run ids rather than MLflow's global
"active run", so a sweep parent and its in-process children never step on each other. mlflow is imported only
inside these functions: `import glm_ft.tracking.tracker` stays light (the sweep callback imports it).

The rooms: store.py (URI, health check, Store), params.py (params and tags), signals.py (signal safety, KILLED),
parent.py (the sweep's parent run), lifecycle.py (an earlier run of the folder, closing), sender.py (background
sending), run_record.py (mlflow_run.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig

from glm_ft import dist, methods
from glm_ft.runs import CURVES_FILE, EVAL_PREDICTIONS, FINAL, PREDICTIONS
from glm_ft.tracking.lifecycle import ERROR_TAG, close_run, end_run, log_files, log_path, previous_run
from glm_ft.tracking.params import MAX_RUN_NAME, fit_tags, flatten_config, metric_name, run_tags, split_long_values
from glm_ft.tracking.parent import child_run_name, hydra_config, parent_for_job
from glm_ft.tracking.redact import redact
from glm_ft.tracking.run_record import read_mlflow_run, write_mlflow_run
from glm_ft.tracking.sender import Sender
from glm_ft.tracking.signals import SIGTERM_GUARD, Terminated, signals_deferred, stop_behind
from glm_ft.tracking.store import Store

log = logging.getLogger(__name__)

# Written by glm_ft.config.render / the training job; logged when present.
RUN_FILES = ("finetune.yaml", "ds_config.json", "ds_config.resolved.json", PREDICTIONS, EVAL_PREDICTIONS,
             CURVES_FILE)
# The trained adapter, prefix or model that glm_ft.train.finetune saves; logged by Tracker.run_files.
MODEL_DIR = FINAL
# The most a checkpoint waits for points on their way to a store that is up (usually milliseconds).
CHECKPOINT_FLUSH_S = 5.0


class Tracker:
    """One MLflow run. Params are logged at once; metrics and tags go through a background `Sender`, so a slow or
    absent store never holds up training (see glm_ft.tracking.sender)."""

    def __init__(self, store: Store, run_id: str, cfg: DictConfig, run_dir: Path):
        self.store = store
        self.client = store.client
        self.run_id = run_id
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.sender = Sender(store.client, run_id, store.uri)
        # (step, value) last logged per metric: the Trainer's own log and the job's summary often report the same
        # evaluation twice, which would show as duplicate points.
        self._last: dict[str, tuple[int, float]] = {}

    def log_params(self, params: Mapping[str, Any], logged: Mapping[str, str] | None = None) -> None:
        """The config as params. `logged`: what a continued run already holds; MLflow refuses to change a param,
        so only new keys are logged and changed values are listed in tag glm_ft.resume_changed_params."""
        from mlflow.entities import Param

        flat = flatten_config(params)
        # what the run used: its folder is the Trainer's output_dir; MLFLOW_TRACKING_URI wins over the key
        flat.update({"training_args.output_dir": str(self.run_dir), "tracking.tracking_uri": self.store.uri})
        flat = {k: redact(v) for k, v in split_long_values(flat).items()}
        if logged is not None:
            changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
            flat = {k: v for k, v in flat.items() if k not in logged}
            if changed:
                self.set_tags({"glm_ft.resume_changed_params": json.dumps(changed, ensure_ascii=False)})
        # MlflowClient.log_batch sends them in batches of MLflow's own size
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric values only (the Trainer's logs also carry strings); step None means 0, as in MLflow."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            name, point = metric_name(str(key)), (int(step or 0), number)
            if self._last.get(name) == point:
                continue
            self._last[name] = point
            batch.append(Metric(name, number, now, point[0]))
        if batch:
            self.sender.submit(metrics=batch)

    def settle(self) -> None:
        """Before a checkpoint counts as complete: wait, briefly, until what was logged so far is in the store, so a
        run killed after the checkpoint and resumed from it lacks none of its points. A store that is down is not
        waited for: its points stay queued, and training goes on."""
        if not self.sender.store_down:
            self.sender.flush(CHECKPOINT_FLUSH_S)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a folder (logged under its own name unless artifact_path says otherwise)."""
        log_path(self.client, self.run_id, Path(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.sender.submit(tags=[RunTag(k, v) for k, v in fit_tags(tags).items()])

    def _logs_model(self) -> bool:
        """The trained adapter/prefix is logged as artifacts under model/; a full SFT checkpoint only as a path tag
        unless tracking.log_full_model=true (gigabytes of weights in the artifact store are rarely what anyone
        wants)."""
        return not (methods.get(self.cfg.method.name).WHOLE_MODEL and not self.cfg.tracking.log_full_model)

    def run_files(self) -> tuple[dict[str, str], list[tuple[Path, str | None]]]:
        """What the end of the run logs from its folder: tags, and (path, artifact path) of the config, predictions,
        curves and the trained model (see _logs_model). Logged by `_log_run_files`, or kept for the next start in the
        folder when the store is down (glm_ft.tracking.lifecycle.close_run)."""
        files = [(self.run_dir / name, None) for name in RUN_FILES] + [(self.run_dir / ".hydra", ".hydra")]
        files = [(path, artifact_path) for path, artifact_path in files if path.exists()]
        model = self.run_dir / MODEL_DIR
        if not model.exists():
            return {}, files
        return {"glm_ft.model_path": str(model.resolve())}, files + ([(model, "model")] if self._logs_model() else [])

    def _log_run_files(self) -> None:
        tags, files = self.run_files()
        self.set_tags(tags)
        log_files(self.client, self.run_id, files)


class NullTracker:
    """What start_run yields with tracking off, or on ranks other than 0: same methods, no effect."""

    run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def settle(self) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass


@contextlib.contextmanager
def start_run(cfg: DictConfig, run_dir: Path, tags: Mapping[str, str] | None = None) -> Iterator[Tracker | NullTracker]:
    """One MLflow run around one training job; see the module docstring. Exceptions propagate unchanged. `tags`
    are set when the run is created, beside glm-ft's own.

    With `resume` set, the run folder's MLflow run (mlflow_run.json) is continued rather than a new one started."""
    if not cfg.tracking.enabled or not dist.is_rank_zero():
        yield NullTracker()
        return
    run_dir = Path(run_dir)
    store = Store(cfg.tracking)
    SIGTERM_GUARD.acquire()  # before the hold below, which puts back the handler it found
    # A Ctrl-C or SIGTERM while the run is made or reopened (MLflow's calls hold them until they return) landed
    # before the run was recorded in mlflow_run.json or could be closed: it stayed RUNNING for good. Held until the
    # run can be ended KILLED.
    holding = contextlib.ExitStack()
    holding.enter_context(signals_deferred())
    try:
        tracker, logged = _open_run(store, cfg, run_dir, tags)
    except BaseException:
        holding.close()
        SIGTERM_GUARD.release()
        raise
    run_id = tracker.run_id
    SIGTERM_GUARD.open_runs[run_id] = store
    status, stopping = "FINISHED", False
    try:
        holding.close()  # a stop held since the run was made lands here
        tracker.log_params(cfg, logged)
        yield tracker
    except (KeyboardInterrupt, Terminated):
        status, stopping = "KILLED", True
        SIGTERM_GUARD.interrupted = True
        raise
    except SystemExit as exit_:
        status = "FINISHED" if exit_.code in (None, 0) else "FAILED"
        raise
    except BaseException as err:
        if stop_behind(err) is not None:  # a library's cleanup failed on the signal, or the launcher is gone
            status, stopping = "KILLED", True
            SIGTERM_GUARD.interrupted = True
            raise
        # An exception may name its own end state: a trial stopped by its study's pruner is KILLED
        # (glm_ft.search.study).
        status = getattr(err, "mlflow_status", "FAILED")
        if status == "FAILED":
            with contextlib.suppress(Exception):
                tracker.set_tags({ERROR_TAG: f"{type(err).__name__}: {err}"})
        raise
    finally:
        try:
            close_run(tracker, status, stopping)
        except (KeyboardInterrupt, Terminated):  # a second Ctrl-C or SIGTERM while closing
            end_run(store, run_id, "KILLED")
            raise
        finally:
            SIGTERM_GUARD.open_runs.pop(run_id, None)
            SIGTERM_GUARD.release()


def _open_run(store: Store, cfg: DictConfig, run_dir: Path,
              tags: Mapping[str, str] | None) -> tuple[Tracker, Mapping[str, str] | None]:
    """The folder's run continued (resume), or a new one; recorded in mlflow_run.json. With the params it holds."""
    hc = hydra_config()
    run_id, logged = previous_run(store, cfg, run_dir)
    if run_id is None:
        parent_id, swept = parent_for_job(store, hc)
        tags = {**run_tags(cfg, run_dir, hc), **(tags or {})}
        name = cfg.tracking.run_name
        if hc is not None and not name:
            name = child_run_name(hc, swept) if parent_id else (str(hc.job.override_dirname) or None)
        if parent_id:
            tags["glm_ft.job_num"] = str(hc.job.num)
        run_id = store.create_run(redact(name)[:MAX_RUN_NAME] if name else None, tags, parent_id)
    write_mlflow_run(run_dir, run_id, store.experiment_id, store.uri)
    return Tracker(store, run_id, cfg, run_dir), logged


def settle_previous_run(cfg: DictConfig, run_dir: Path) -> None:
    """For a job that does not open a run (a complete run resumed): still close a RUNNING run a dead process
    left and send its kept points; a store that can't be reached is only a warning here."""
    if not cfg.tracking.enabled or not dist.is_rank_zero():
        return
    try:
        previous_run(Store(cfg.tracking), cfg, run_dir, reopen=False)
    except Exception as err:
        log.warning("MLflow: could not check this run folder's MLflow run: %s", redact(str(err)))


def closing_interrupted(cfg: DictConfig, run_dir: Path) -> bool:
    """For a complete run: whether the run folder's MLflow run was not closed as its job ended. Still RUNNING with no
    end recorded in mlflow_run.json: the process that had it died while closing it (its run files uploaded, its
    status set). KILLED: a Ctrl-C or SIGTERM stopped it there (the store's KILLED, whatever mlflow_run.json
    recorded), maybe before its run files were logged; left so, the store kept a KILLED run of a complete job."""
    if not cfg.tracking.enabled or not dist.is_rank_zero():
        return False
    record = read_mlflow_run(run_dir)
    if not record:
        return False
    try:
        store = Store(cfg.tracking)
        if record.get("tracking_uri") != redact(store.uri) or record.get("experiment_id") != store.experiment_id:
            return False
        run = store.client.get_run(str(record.get("run_id")))
    except Exception:  # the store can't say: settle_previous_run warns about it
        return False
    if run.info.lifecycle_stage != "active":
        return False
    return run.info.status == "KILLED" or (run.info.status == "RUNNING" and record.get("ended") is None)

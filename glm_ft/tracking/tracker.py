"""MLflow tracking: one run per train.py job, nested under its sweep's parent run in a multirun.

    with start_run(cfg, run_dir) as tracker:
        trainer.add_callback(tracker.trainer_callback())
        tracker.log_metrics({...}, step=...)

The run gets the whole composed config as params, the Hydra choices, overrides and git commit as tags, and the run
folder's files as artifacts when it ends. It ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C or SIGTERM):
never left RUNNING. Everything goes through `MlflowClient` with explicit run ids rather than MLflow's global
"active run", so a sweep parent and its in-process children never step on each other. mlflow is imported only
inside these functions: `import glm_ft.tracking.tracker` stays light.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from glm_ft import methods
from glm_ft.errors import ConfigError
from glm_ft.tracking.redact import redact
from glm_ft.config.schema import PROJECT_ROOT
from glm_ft.tracking.lifecycle import close_run, end_run, previous_run
from glm_ft.tracking.sender import bound_http_calls

log = logging.getLogger(__name__)

PARENT_ENV = "GLM_FT_MLFLOW_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id"
# Written by glm_ft.config.render / the training job; logged when present.
RUN_FILES = ("finetune.yaml", "ds_config.json", "ds_config.resolved.json", "predictions.jsonl",
             "eval_predictions.jsonl")
# The trained adapter, prefix or model that glm_ft.train.finetune saves; logged through Tracker.log_model.
MODEL_DIR = "final"
SWEPT_PARAMS_TAG = "glm_ft.swept_params"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's limits (mlflow.utils.validation); values over them are split, never truncated.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_RUN_NAME = 250
HEALTH_TIMEOUT_S = 5.0
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def import_mlflow():
    """mlflow with its telemetry off unless the user chose otherwise (it must be set before the import)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


# --- where runs go -----------------------------------------------------------------------------------------------


def tracking_uri(tracking_cfg: DictConfig) -> tuple[str, str]:
    """(URI, where it came from): MLFLOW_TRACKING_URI wins over tracking.tracking_uri."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, "MLFLOW_TRACKING_URI"
    return str(tracking_cfg.tracking_uri), "tracking.tracking_uri"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return Path(path) if path.startswith("/") else Path.cwd() / path


def artifact_location(uri: str, tracking_cfg: DictConfig) -> str | None:
    """Where a new experiment keeps its artifacts; None lets the store decide (a server proxies them)."""
    if tracking_cfg.artifact_location:
        return str(tracking_cfg.artifact_location)
    db = _sqlite_path(uri)
    return str(db.parent / "mlartifacts") if db is not None else None


def check_reachable(uri: str, source: str) -> None:
    """Fail in seconds, naming the URI, instead of deep inside MLflow's retries after the model has loaded."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("http", "https"):
        db = _sqlite_path(uri)
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"{source}: cannot create the folder of the MLflow store {uri}: {err}") from None
        return
    parts = urllib.parse.urlsplit(uri)
    # urllib can't take user:password@ in a URL: send it as the basic auth MLflow's client would send.
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    if parts.username is not None:
        import base64

        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # it answered: reachable (a proxy or an auth layer may not serve /health)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"{source}: MLflow tracking server {redact(uri)} is unreachable ({reason}). Start it (mlflow server "
            "--host 127.0.0.1 --port ...), point MLFLOW_TRACKING_URI / tracking.tracking_uri at a running one, "
            "or run without tracking: tracking.enabled=false") from None


@contextlib.contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Several processes opening one fresh SQLite store at once race in MLflow's schema creation ("table
    latest_metrics already exists"): an exclusive lock on a file beside the database serialises opening it (and
    creating the experiment). Other stores need no lock."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_logging_rank() -> bool:
    """In a distributed job only rank 0 writes to MLflow."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the enclosed MLflow call returns, then deliver them.

    Raised inside a SQLite write, KeyboardInterrupt leaves that connection's transaction, and its lock, open while
    the exception (and its traceback) lives; marking the run KILLED then waits on the process's own lock and fails,
    leaving the run RUNNING. Only the main thread receives signals, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in DEFERRED_SIGNALS}
    held = [sig for sig, handler in previous.items() if handler not in (None, signal.SIG_IGN)]
    pending: list[int] = []
    for sig in held:
        signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig in held:
            signal.signal(sig, previous[sig])
        for signum in pending:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL: what the signal would have done
                signal.raise_signal(signum)


class _SignalSafeClient:
    """An MlflowClient whose every call runs with signals deferred (see `signals_deferred`)."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with signals_deferred():
                return attribute(*args, **kwargs)

        return call


class Store:
    """An MLflow client bound to one tracking URI and experiment."""

    def __init__(self, tracking_cfg: DictConfig):
        uri, source = tracking_uri(tracking_cfg)
        check_reachable(uri, source)
        bound_http_calls()
        import_mlflow()
        self.uri = uri
        self.shown_uri = redact(uri)  # for messages
        with _first_use_lock(uri):
            self._open(tracking_cfg)

    def _open(self, tracking_cfg: DictConfig) -> None:
        mlflow = import_mlflow()
        from mlflow.tracking import MlflowClient

        uri = self.uri
        self.client = _SignalSafeClient(MlflowClient(tracking_uri=uri))
        name = str(tracking_cfg.experiment_name)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(name, artifact_location(uri, tracking_cfg))
            except mlflow.exceptions.MlflowException:
                # Another job of the same sweep created it a moment ago.
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                self.experiment_id = experiment.experiment_id
        elif experiment.lifecycle_stage != "active":
            raise ConfigError(f"tracking.experiment_name: experiment '{name}' is deleted in {redact(uri)}; restore it "
                              f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose "
                              "another name")
        else:
            self.experiment_id = experiment.experiment_id

    def create_run(self, name: str | None, tags: Mapping[str, str], parent_id: str | None = None) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        all_tags = resolve_tags(dict(tags))
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, tags=_fit_tags(all_tags), run_name=name or None)
        return run.info.run_id

    def end_run(self, run_id: str, status: str) -> None:
        # MLflow prints the run's URL (the tracking URI, password and all) to stdout when a run ends over HTTP.
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                self.client.set_terminated(run_id, status)
        finally:
            if printed.getvalue():
                sys.stdout.write(redact(printed.getvalue()))


# --- params and tags ---------------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    # YAML spellings, so a param can be pasted back as an override (training_args.bf16=false).
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def flatten_config(cfg: DictConfig | Mapping) -> dict[str, str]:
    """The composed config as dotted keys; lists stay one JSON value, empty dicts stay '{}'."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) \
        if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = _scalar(node)

    walk(container, "")
    return out


def split_long_values(params: Mapping[str, str], limit: int = MAX_PARAM_VALUE) -> dict[str, str]:
    """MLflow truncates params over its limit without a word: split them into key.0, key.1, ... instead."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if len(value) <= limit:
            out[key] = value
            continue
        for i in range(math.ceil(len(value) / limit)):
            out[f"{key}.{i}"] = value[i * limit:(i + 1) * limit]
    return out


def _fit_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in tags.items():
        text = redact(_scalar(value) if not isinstance(value, str) else value)
        out[key] = text if len(text) <= MAX_TAG_VALUE else text[:MAX_TAG_VALUE - 3] + "..."
    return out


def metric_name(key: str) -> str:
    return _BAD_NAME_CHARS.sub("_", key)


def git_commit(repo: Path = PROJECT_ROOT) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def parse_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _choice(choices: Mapping, group: str) -> str:
    value = choices.get(group) if choices is not None else None
    return "none" if value in (None, "null") else str(value)


def run_tags(cfg: DictConfig, run_dir: Path, hc: DictConfig | None) -> dict[str, str]:
    commit = git_commit()
    tags = {"glm_ft.run_dir": str(Path(run_dir).resolve()), "glm_ft.git_commit": commit,
            "mlflow.source.git.commit": commit}
    if hc is not None:
        choices = hc.runtime.choices
        for group in ("method", "deepspeed", "data", "model", "experiment", "hparams_search"):
            tags[f"glm_ft.{group}"] = _choice(choices, group)
        tags["glm_ft.overrides"] = " ".join(hc.overrides.task)
    else:  # called outside Hydra (a test, a notebook): the choices as far as the config itself tells them
        tags["glm_ft.method"] = str(cfg.method.name)
        tags["glm_ft.data"] = str(cfg.data.name)
        tags["glm_ft.model"] = str(cfg.model.name)
        tags["glm_ft.deepspeed"] = "none" if cfg.deepspeed is None else "custom"
        tags["glm_ft.overrides"] = ""
    return tags


# --- SIGTERM → KILLED --------------------------------------------------------------------------------------------


class Terminated(SystemExit):
    """SIGTERM, raised like Ctrl-C so `finally` blocks run and the run ends KILLED; exits with 143."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class _SigtermGuard:
    """Reference-counted SIGTERM handler shared by the sweep parent and the job's run (one process, basic launcher).

    With the default handler in place, SIGTERM raises `Terminated` once (later ones are ignored while unwinding).
    When someone else handles SIGTERM (submitit ignores it on purpose), their handler stays in charge: ours only
    marks the open runs KILLED first, since a SIGKILL usually follows.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.previous: Any = None
        self.terminating = False
        # Set on SIGTERM or Ctrl-C inside a run: the sweep parent then ends KILLED rather than FAILED.
        self.interrupted = False
        self.open_runs: dict[str, Store] = {}

    def acquire(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self.depth == 0:
            self.previous = signal.getsignal(signal.SIGTERM)
            if self.previous is signal.SIG_IGN:
                return
            signal.signal(signal.SIGTERM, self._handle)
        self.depth += 1

    def release(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
            self.terminating = self.interrupted = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        if callable(self.previous):
            for run_id, store in list(self.open_runs.items()):
                with contextlib.suppress(Exception):
                    store.end_run(run_id, "KILLED")
            self.previous(signum, frame)
            return
        if self.terminating:
            return
        self.terminating = True
        raise Terminated()


SIGTERM_GUARD = _SigtermGuard()


# --- the tracker ----------------------------------------------------------------------------------------------


class Tracker:
    """One MLflow run. Params are logged at once; metrics and tags go through a background `Sender`, so a slow or
    absent store never holds up training (see glm_ft.tracking.sender)."""

    def __init__(self, store: Store, run_id: str, cfg: DictConfig, run_dir: Path):
        from glm_ft.tracking.sender import Sender

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

        flat = {k: redact(v) for k, v in split_long_values(flatten_config(params)).items()}
        if logged is not None:
            changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
            flat = {k: v for k, v in flat.items() if k not in logged}
            if changed:
                self.set_tags({"glm_ft.resume_changed_params": json.dumps(changed, ensure_ascii=False)})
        for start in range(0, len(flat), 100):  # MLflow's log_batch takes at most 100 params
            chunk = dict(list(flat.items())[start:start + 100])
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk.items()])

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

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a folder (logged under its own name unless artifact_path says otherwise)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"log_artifact: no such file or folder: {path}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.sender.submit(tags=[RunTag(k, v) for k, v in _fit_tags(tags).items()])

    def log_model(self, path: str | os.PathLike) -> None:
        """The trained adapter/prefix as artifacts under model/; a full SFT checkpoint only as a path tag unless
        tracking.log_full_model=true (gigabytes of weights in the artifact store are rarely what anyone wants)."""
        path = Path(path)
        self.set_tags({"glm_ft.model_path": str(path.resolve())})
        if methods.get(self.cfg.method.name).WHOLE_MODEL and not self.cfg.tracking.log_full_model:
            return
        self.log_artifact(path, "model")

    def trainer_callback(self):
        """A transformers TrainerCallback: every Trainer log (loss, learning_rate, eval_*, runtime, throughput)
        becomes MLflow metrics at step=state.global_step."""
        from transformers import TrainerCallback

        tracker = self

        class MlflowLogCallback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and state.is_world_process_zero:
                    tracker.log_metrics(logs, step=state.global_step)

        return MlflowLogCallback()

    def _log_run_files(self) -> None:
        for path in [self.run_dir / name for name in RUN_FILES] + [self.run_dir / ".hydra", self.run_dir / MODEL_DIR]:
            if not path.exists():
                continue
            try:
                if path.name == MODEL_DIR:
                    self.log_model(path)
                else:
                    self.log_artifact(path, ".hydra" if path.name == ".hydra" else None)
            except Exception as err:  # a failing upload must not hide the job's own outcome
                log.warning("MLflow: could not log %s: %s", path, err)


class NullTracker:
    """What start_run yields with tracking off, or on ranks other than 0: same methods, no effect."""

    run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_model(self, path: str | os.PathLike) -> None:
        pass

    def trainer_callback(self):
        from transformers import TrainerCallback

        return TrainerCallback()


# --- sweep parent lookup -----------------------------------------------------------------------------------------


def find_parent_run_id(hc: DictConfig) -> str | None:
    """The sweep's parent run: the file the sweep callback wrote into the sweep folder (works across processes and
    nodes), else the environment variable it set (in-process and forked launchers)."""
    folders = []
    with contextlib.suppress(Exception):
        folders.append(Path(str(hc.sweep.dir)))
    with contextlib.suppress(Exception):
        folders.append(Path(str(hc.runtime.output_dir)).parent)
    for folder in folders:
        marker = folder / PARENT_FILE
        if marker.is_file():
            return marker.read_text(encoding="utf-8").strip() or None
    return os.environ.get(PARENT_ENV) or None


def child_run_name(hc: DictConfig, swept: list[str]) -> str:
    """The swept overrides of this job ("method.r=4"), else all its overrides, else its job number."""
    parts = []
    with contextlib.suppress(Exception):
        for override in parse_overrides(list(hc.overrides.task)):
            if override.key_or_group in swept:
                parts.append(f"{override.key_or_group}={override.get_value_string()}")
    if parts:
        return ",".join(parts)
    return str(hc.job.override_dirname) or f"job{hc.job.num}"


def _parent_for_job(store: Store, hc: DictConfig | None) -> tuple[str | None, list[str]]:
    from hydra.types import RunMode

    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None, []
    parent_id = find_parent_run_id(hc)
    if not parent_id:
        return None, []
    try:
        parent = store.client.get_run(parent_id)
    except Exception as err:
        log.warning("MLflow: sweep parent run %s not found in %s (%s); logging this job unnested",
                    parent_id, store.shown_uri, redact(str(err)))
        return None, []
    return parent_id, json.loads(parent.data.tags.get(SWEPT_PARAMS_TAG, "[]"))


# --- start_run -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_run(cfg: DictConfig, run_dir: Path) -> Iterator[Tracker | NullTracker]:
    """One MLflow run around one training job; see the module docstring. Exceptions propagate unchanged.

    With `resume` set, the run folder's MLflow run (mlflow_run.json) is continued rather than a new one started."""
    if not cfg.tracking.enabled or not is_logging_rank():
        yield NullTracker()
        return
    from glm_ft.tracking.run_record import write_mlflow_run

    run_dir = Path(run_dir)
    store = Store(cfg.tracking)
    hc = hydra_config()
    run_id, logged = previous_run(store, cfg, run_dir)
    if run_id is None:
        parent_id, swept = _parent_for_job(store, hc)
        tags = run_tags(cfg, run_dir, hc)
        name = cfg.tracking.run_name
        if hc is not None and not name:
            name = child_run_name(hc, swept) if parent_id else (str(hc.job.override_dirname) or None)
        if parent_id:
            tags["glm_ft.job_num"] = str(hc.job.num)
        run_id = store.create_run(redact(name)[:MAX_RUN_NAME] if name else None, tags, parent_id)
    write_mlflow_run(run_dir, run_id, store.experiment_id, store.uri)
    tracker = Tracker(store, run_id, cfg, run_dir)
    SIGTERM_GUARD.open_runs[run_id] = store
    SIGTERM_GUARD.acquire()
    status = "FINISHED"
    try:
        tracker.log_params(cfg, logged)
        yield tracker
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        SIGTERM_GUARD.interrupted = True
        raise
    except SystemExit as exit_:
        status = "FINISHED" if exit_.code in (None, 0) else "FAILED"
        raise
    except BaseException as err:
        # An exception may name its own end state: a trial stopped by its study's pruner is KILLED (glm_ft.search.study).
        status = getattr(err, "mlflow_status", "FAILED")
        if status == "FAILED":
            with contextlib.suppress(Exception):
                tracker.set_tags({"glm_ft.error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        try:
            close_run(tracker, status)
        except (KeyboardInterrupt, Terminated):  # a second Ctrl-C or SIGTERM while closing
            end_run(store, run_id, "KILLED")
            raise
        finally:
            SIGTERM_GUARD.open_runs.pop(run_id, None)
            SIGTERM_GUARD.release()


def settle_previous_run(cfg: DictConfig, run_dir: Path) -> None:
    """For a job that does not open a run (a complete run resumed): still close a RUNNING run a dead process
    left and send its kept points; a store that can't be reached is only a warning here."""
    if not cfg.tracking.enabled or not is_logging_rank():
        return
    try:
        previous_run(Store(cfg.tracking), cfg, run_dir, reopen=False)
    except Exception as err:
        log.warning("MLflow: could not check this run folder's MLflow run: %s", redact(str(err)))

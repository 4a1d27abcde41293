"""Where runs go: the tracking URI, a fail-fast health check, and `Store`, an MLflow client bound to one experiment.

mlflow is imported only when a Store opens: this module is imported by the sweep callback, which Hydra loads on
every `train.py` run, bad ones included.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

from omegaconf import DictConfig

from glm_ft.heap import long_lived
from glm_ft.errors import ConfigError
from glm_ft.tracking.params import fit_tags
from glm_ft.tracking.redact import redact
from glm_ft.tracking.sender import bound_http_calls
from glm_ft.tracking.signals import SignalSafeClient

PARENT_TAG = "mlflow.parentRunId"
HEALTH_TIMEOUT_S = 5.0


def import_mlflow():
    """mlflow with its telemetry off unless the user chose otherwise (it must be set before the import)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def tracking_uri(tracking_cfg: DictConfig) -> tuple[str, str]:
    """(URI, where it came from): MLFLOW_TRACKING_URI wins over tracking.tracking_uri."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, "MLFLOW_TRACKING_URI"
    return str(tracking_cfg.tracking_uri), "tracking.tracking_uri"


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return Path(path) if path.startswith("/") else Path.cwd() / path


def ui_hint(uri: str) -> str:
    """How to browse a store: a server is its own UI; a database or folder needs `mlflow ui` on it, through the
    checkout's `make ui` when glm-ft runs from a checkout (from any folder), else the installed `glm-ft ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    from glm_ft.config.locations import CHECKOUT_ROOT

    if (CHECKOUT_ROOT / "Makefile").is_file():
        make = "make" if Path.cwd().resolve() == CHECKOUT_ROOT else f"make -C {CHECKOUT_ROOT}"
        return f"browse it with `{make} ui UI_STORE={uri}` and open http://127.0.0.1:5000"
    return f"browse it with `MLFLOW_TRACKING_URI={uri} glm-ft ui` and open http://127.0.0.1:5000"


def artifact_location(uri: str, tracking_cfg: DictConfig) -> str | None:
    """Where a new experiment keeps its artifacts; None lets the store decide (a server proxies them)."""
    if tracking_cfg.artifact_location:
        return str(tracking_cfg.artifact_location)
    db = sqlite_path(uri)
    return str(db.parent / "mlartifacts") if db is not None else None


# URI schemes MLflow's client opens as a tracking store (SQLAlchemy dialects may carry a driver: postgresql+psycopg2).
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_uri(uri: str, source: str) -> None:
    """What can be told of a tracking URI without contacting it: a scheme MLflow opens, a folder store (refused by
    MLflow 3 unless allowed), an SQLite path that names a database file."""
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0].lower()
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise ConfigError(f"{source}: '{uri}' is a folder store, which MLflow 3 refuses (maintenance mode); use "
                              "sqlite:////abs/path/mlflow.db (`mlflow migrate-filestore` converts one), or set "
                              "MLFLOW_ALLOW_FILE_STORE=true")
        return
    if scheme not in STORE_SCHEMES:
        raise ConfigError(f"{source}: '{redact(uri)}' is not a tracking URI MLflow opens "
                          "(sqlite:////abs/path/mlflow.db, http://HOST:PORT, postgresql://..., mysql://...)")
    if scheme != "sqlite":
        return
    db = sqlite_path(uri)
    if db is None or not uri[len("sqlite:///"):].strip():
        raise ConfigError(f"{source}: '{uri}' names no database file (sqlite:////abs/path/mlflow.db, or "
                          "sqlite:///relative/mlflow.db)")
    if db.is_dir():
        raise ConfigError(f"{source}: {db} is a folder, not an SQLite database file")
    try:
        with open(db, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return  # MLflow creates it
    except OSError as err:
        raise ConfigError(f"{source}: cannot read the MLflow store {db} ({err.strerror or err})") from None
    if header and header != _SQLITE_HEADER:
        raise ConfigError(f"{source}: {db} is not an SQLite database (another file is in its place)")


def check_reachable(uri: str, source: str) -> None:
    """Fail in seconds, naming the URI, instead of deep inside MLflow's retries after the model has loaded."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("http", "https"):
        db = sqlite_path(uri)
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
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Store:
    """An MLflow client bound to one tracking URI and experiment."""

    def __init__(self, tracking_cfg: DictConfig):
        uri, source = tracking_uri(tracking_cfg)
        check_uri(uri, source)
        check_reachable(uri, source)
        bound_http_calls()
        self.uri = uri
        self.shown_uri = redact(uri)  # for messages
        with long_lived():  # MLflow's modules and client last as long as the job
            import_mlflow()
            with _first_use_lock(uri):
                self._open(tracking_cfg)

    def _open(self, tracking_cfg: DictConfig) -> None:
        mlflow = import_mlflow()
        from mlflow.tracking import MlflowClient

        uri = self.uri
        self.client = SignalSafeClient(MlflowClient(tracking_uri=uri))
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
        run = self.client.create_run(self.experiment_id, tags=fit_tags(all_tags), run_name=name or None)
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

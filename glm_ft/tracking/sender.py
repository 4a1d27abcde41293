"""Metrics and tags of one MLflow run, sent from a background thread so that training never waits on the store.

    sender = Sender(client, run_id, uri)
    sender.submit(metrics=[Metric(...)], tags=[RunTag(...)])   # returns at once, whatever the store does
    unsent = sender.close(timeout_s=60)                         # what could not be sent by then (usually [])
    unsent = sender.close(timeout_s=0, join_s=1)                # a job told to stop: no wait on a call in flight

A killed, frozen (SIGSTOP) or full store only delays the sending: the points wait in memory, in order, and go out
when the store answers again. The outage is reported once when it starts and once when it ends. The queue is
bounded (MAX_PENDING points); past that the oldest metric points are dropped and counted, never silently.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from glm_ft.tracking.redact import redact

log = logging.getLogger("glm_ft")

# MLflow's log_batch limits (mlflow.utils.validation): 1000 metrics, 100 tags, 1000 entities in all.
MAX_BATCH_METRICS = 1000
MAX_BATCH_TAGS = 100
MAX_PENDING = 200_000
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
# Each HTTP call gives up after about timeout × (retries + 1) seconds instead of MLflow's ~4.5 minutes: the sender
# has its own unbounded retry, and the calls made at start and end of a run stay short when the server is gone.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
UNSENT_FILE = "mlflow_unsent.jsonl"


def bound_http_calls() -> None:
    """MLflow reads these on every request; a value the user exported wins."""
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


class Sender:
    """One daemon thread per run; `submit` only appends to a queue under a lock."""

    def __init__(self, client: Any, run_id: str, uri: str):
        self.client = client
        self.run_id = run_id
        self.uri = redact(uri)
        self._queue: deque[tuple[str, Any]] = deque()  # ("metric", Metric) | ("tag", RunTag), in submit order
        self._cond = threading.Condition()
        self._in_flight: list[tuple[str, Any]] = []  # the batch out of the queue, being sent
        self._stopping = False
        self._outage_since: float | None = None
        self.outages = 0
        self.dropped = 0
        self.sent = 0
        # MLflow's SQL store logs each failed write with its traceback, and urllib3 every retry of every call: during
        # an outage the sender's own two lines say it.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-sender-{run_id[:8]}", daemon=True)
        self._thread.start()

    # --- the training side ---------------------------------------------------------------------------------------

    def submit(self, metrics: Iterable[Any] = (), tags: Iterable[Any] = ()) -> None:
        with self._cond:
            self._queue.extend(("metric", m) for m in metrics)
            self._queue.extend(("tag", t) for t in tags)
            while len(self._queue) > MAX_PENDING:
                self._drop_oldest_metric()
            self._cond.notify_all()

    def _drop_oldest_metric(self) -> None:
        for i, (kind, _) in enumerate(self._queue):
            if kind == "metric":
                del self._queue[i]
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow: more than %d points wait for %s; dropping the oldest metric points "
                                "(counted, reported at the end)", MAX_PENDING, self.uri)
                return
        self._queue.popleft()

    @property
    def store_down(self) -> bool:
        return self._outage_since is not None

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._in_flight)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far is sent, at most timeout_s; True when it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()  # wake a sender waiting out its retry pause: the caller wants it now
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def close(self, timeout_s: float, join_s: float | None = None) -> list[tuple[str, Any]]:
        """Flush, stop the thread, and return what is still unsent (empty when the store took everything).

        A call in flight against a frozen server ends by MLflow's own HTTP timeout (bound_http_calls); `join_s`
        waits less for it. Its batch counts as unsent unless the call ended in time: were it sent after all, its
        points come again later with the same timestamps, which the store keeps once."""
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if join_s is None:
            join_s = max(1.0, float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")) * 4)
        self._thread.join(timeout=join_s)
        with self._cond:
            return list(self._in_flight) + list(self._queue)

    # --- the sending thread --------------------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[Any], list[Any]]:
        metrics, tags = [], []
        while self._queue and len(metrics) < MAX_BATCH_METRICS and len(tags) < MAX_BATCH_TAGS:
            kind, item = self._queue[0]
            (metrics if kind == "metric" else tags).append(item)
            self._queue.popleft()
        return metrics, tags

    def _loop(self) -> None:
        pause = RETRY_MIN_S
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                # Stopping with the store down: what is left goes to the caller (a file), not into another try.
                if not self._queue or self._stopping and self.store_down:
                    return
                metrics, tags = self._take_batch()
                self._in_flight = [("metric", m) for m in metrics] + [("tag", t) for t in tags]
            try:
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            except Exception as err:  # anything the store or the network throws: keep the batch, retry later
                with self._cond:
                    self._queue.extendleft(reversed(self._in_flight))
                    self._in_flight = []
                    self._cond.notify_all()
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        self.outages += 1
                        log.warning("MLflow: the tracking store %s is unavailable (%s); training goes on, its "
                                    "metrics are kept and sent when the store is back", self.uri,
                                    redact(_first_line(err)))
                    if self._stopping:
                        return
                    self._cond.wait(pause)
                    pause = min(pause * 2, RETRY_MAX_S)
                continue
            with self._cond:
                self._in_flight = []
                self.sent += len(metrics)
                pause = RETRY_MIN_S
                if self._outage_since is not None:
                    log.warning("MLflow: the tracking store %s is back after %.0f s; sending the metrics it missed",
                                self.uri, time.monotonic() - self._outage_since)
                    self._outage_since = None
                self._cond.notify_all()


def _first_line(err: BaseException) -> str:
    """The root cause in one line ("OperationalError: database or disk is full", "ConnectionRefusedError: ...")
    rather than MLflow's wrapper text."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def save_unsent(run_dir: Path, run_id: str, unsent: list[tuple[str, Any]]) -> Path:
    """Write what could not be sent beside the run, for the next glm-ft start on this folder to send."""
    path = Path(run_dir) / UNSENT_FILE
    with open(path, "a", encoding="utf-8") as out:
        for kind, item in unsent:
            if kind == "file":  # (path, artifact path): a run file not logged; relative, should the folder move
                file, artifact_path = item
                row = {"run_id": run_id, "kind": kind, "path": os.path.relpath(file, run_dir),
                       "artifact_path": artifact_path}
            else:
                row = {"run_id": run_id, "kind": kind, "key": item.key, "value": item.value}
            if kind == "metric":
                row.update(timestamp=item.timestamp, step=item.step)
            out.write(json.dumps(row) + "\n")
    return path


def resend_unsent(client: Any, run_dir: Path, run_id: str) -> tuple[int, list[tuple[Path, str | None]]]:
    """Send a previous process's unsent points of this run (raises if the store refuses); returns how many, and the
    run files it could not log, (path, artifact path), for the caller to log (glm_ft.tracking.lifecycle)."""
    from mlflow.entities import Metric, RunTag

    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        return 0, []
    metrics, tags, files = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("run_id") != run_id:
            continue
        if row["kind"] == "metric":
            metrics.append(Metric(row["key"], row["value"], row["timestamp"], row["step"]))
        elif row["kind"] == "file":
            files.append((Path(run_dir) / row["path"], row["artifact_path"]))
        else:
            tags.append(RunTag(row["key"], row["value"]))
    for start in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH_METRICS])
    for start in range(0, len(tags), MAX_BATCH_TAGS):
        client.log_batch(run_id, tags=tags[start:start + MAX_BATCH_TAGS])
    path.unlink()
    return len(metrics) + len(tags), files


def describe_unsent(unsent: list[tuple[str, Any]]) -> str:
    steps = sorted({item.step for kind, item in unsent if kind == "metric"})
    metrics = sum(kind == "metric" for kind, _ in unsent)
    files = sum(kind == "file" for kind, _ in unsent)
    where = f" (steps {steps[0]}..{steps[-1]})" if steps else ""
    tags = len(unsent) - metrics - files
    return f"{metrics} metric points{where}, {tags} tags and {files} run files" if files else \
        f"{metrics} metric points{where} and {tags} tags"

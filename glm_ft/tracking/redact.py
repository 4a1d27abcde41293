"""Passwords in URIs (`http://user:pass@host`) never leave the process: not in params, tags, run files or logs.

MLflow's client takes basic-auth credentials from the tracking URI (requests reads them off the URL), so the URI
must stay whole where it is used; everywhere it is shown or written, `redact` replaces the password with `***`.
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keep credentials out of the URI altogether.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

MASK = "***"
# scheme://user:password@ — the password is anything up to the last '@' before the host part. Hydra writes a
# sweep's overrides with their colons escaped (`http\://user\:password@host`): that form too.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://[^\s/:@'\"\\]*\\?:)(?P<password>[^\s/@'\"]*)@")


def redact(text: str) -> str:
    return _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)


def secrets_in(text: str) -> list[str]:
    return [m["password"] for m in _USERINFO.finditer(text) if m["password"] and m["password"] != MASK]


def redact_files(folder: Path, names: tuple[str, ...] = ("config.yaml", "hydra.yaml", "overrides.yaml",
                                                            "multirun.yaml")) -> None:
    """Rewrite Hydra's record of a job (written before the job starts) without passwords, in place."""
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        clean = redact(text)
        if clean != text:  # a uniquely named copy renamed over it: a sweep's jobs may rewrite multirun.yaml at once
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(clean)
            os.replace(tmp, path)


def redact_log_records() -> None:
    """Mask passwords in every log record this process makes from now on (Hydra's launcher logs each job's
    overrides). At the records' making, not on handlers: Hydra sets its handlers up anew for the launch and for
    each job."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacting(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when a handler formats the record, as before
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    redacting.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)

"""Passwords in URIs (`http://user:pass@host`) never leave the process: not in params, tags, run files or logs.

MLflow's client takes basic-auth credentials from the tracking URI (requests reads them off the URL), so the URI
must stay whole where it is used; everywhere it is shown or written, `redact` replaces the password with `***`.
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keep credentials out of the URI altogether.
"""

from __future__ import annotations

import re
from pathlib import Path

MASK = "***"
# scheme://user:password@ — the password is anything up to the last '@' before the host part.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@'\"]*:)(?P<password>[^\s/@'\"]*)@")


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
        if clean != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(clean, encoding="utf-8")
            tmp.replace(path)

"""A job inside a sweep: finding its sweep's parent run, and the child run's name (its swept overrides).

The sweep callback (glm_ft.search.sweep) makes the parent run and hands its id to the jobs twice: in PARENT_FILE
in the sweep folder (jobs in other processes or on other nodes) and in PARENT_ENV (in-process and forked jobs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig

from glm_ft.tracking.redact import redact

log = logging.getLogger("glm_ft.tracking.tracker")

PARENT_ENV = "GLM_FT_MLFLOW_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id"
SWEPT_PARAMS_TAG = "glm_ft.swept_params"


def hydra_config() -> DictConfig | None:
    return HydraConfig.get() if HydraConfig.initialized() else None


def parse_overrides(overrides: list[str]) -> list:
    return OverridesParser.create().parse_overrides(list(overrides))


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


def parent_for_job(store, hc: DictConfig | None) -> tuple[str | None, list[str]]:
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

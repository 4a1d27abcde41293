"""What a run records about its job: the config flattened into params, the tags (choices, overrides, git commit),
metric names MLflow accepts. Values are as YAML spells them, so a param pastes back as an override.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from glm_ft.config.schema import PROJECT_ROOT
from glm_ft.tracking.redact import redact

# MLflow 3's limits (mlflow.utils.validation). MLflow truncates a longer param value, keeping only a warning of the
# rest: it is split into key.0, key.1, ... instead, so the whole of it is kept. Tags are cut here because MLflow does
# not on every path: the tags of create_run reach the store unchecked (SQLite keeps 13,000 characters, other
# databases refuse the run).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_RUN_NAME = 250  # what the MLflow UI shows; MLflow itself does not cut run names
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


# Params that differ between every run by design (each run's own folder), not settings a sweep varied.
PER_RUN_PARAMS = ("training_args.output_dir",)

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
    """Values over MLflow's limit split into key.0, key.1, ... (MLflow would cut them)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if len(value) <= limit:
            out[key] = value
            continue
        for i in range(math.ceil(len(value) / limit)):
            out[f"{key}.{i}"] = value[i * limit:(i + 1) * limit]
    return out


def fit_tags(tags: Mapping[str, Any]) -> dict[str, str]:
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

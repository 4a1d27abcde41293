"""The `train.py` entry point: compose → validate → render → (unless dry_run) fine-tune.

Everything up to rendering imports neither torch nor transformers, so a bad config fails in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import glm_ft.schema  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from glm_ft.errors import GlmFtError
from glm_ft.render import render_run_files
from glm_ft.schema import PROJECT_ROOT
from glm_ft.validate import resolve_path, validate

log = logging.getLogger("glm_ft")


def model_hidden_size(model_cfg: DictConfig) -> int | None:
    """hidden_size from the checkpoint's config.json, read as JSON: the "auto" DeepSpeed keys depend on it."""
    config_json = resolve_path(model_cfg.path) / "config.json"
    if config_json.is_file():
        return int(json.loads(config_json.read_text(encoding="utf-8"))["hidden_size"])
    if model_cfg.build_if_missing:
        from glm_ft.chatglm3.tiny import TINY_CONFIG

        return int(TINY_CONFIG["hidden_size"])
    return None


def run(cfg: DictConfig) -> float | None:
    """One job. Returns the metric an Optuna sweep optimises (None for a dry run)."""
    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    paths = render_run_files(cfg, run_dir, model_hidden_size(cfg.model))
    if cfg.dry_run:
        for name, path in paths.items():
            print(f"{name}: {path}")
        print("dry run: config is valid; nothing was loaded or trained")
        return None
    from glm_ft.finetune import finetune

    return finetune(cfg, run_dir, paths)


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except GlmFtError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Re-raise so Hydra marks this job FAILED and the sweep's other jobs still run.
            log.error("%s", err)
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def _take_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra's parser would reject: move it to the env."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def main() -> None:
    sys.argv = _take_launcher_args(sys.argv)
    _hydra_main()

"""Where a run's inputs are: model.path, data.data_dir and its files, resolved once per job.

cli resolves them when it validates the config and hands the result along (validation, the data check, rendering,
the training job), so every stage reads the same folders whatever it does with the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from glm_ft.config.schema import DEMO_MODEL_DIR, TINY_MODEL_DIR

SPLIT_KEYS = {"train": "train_file", "val": "val_file", "test": "test_file"}


def resolve_path(path: str) -> Path:
    """Relative paths in configs are taken from where the user launched, like any CLI argument."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(os.getcwd()) / p


@dataclass(frozen=True)
class InputPaths:
    model_dir: Path
    # model=tiny builds its random model when missing, but only at its own cache location: a misspelt or
    # not-yet-mounted model.path must never turn into a random model trained in its place. (The demo base,
    # model=tiny_demo, is the tiny model trained a little: built the same way, at its own place.)
    builds_tiny_model: bool
    data_dir: Path
    data_files: dict[str, Path | None]  # train / val / test; None where the config names no file


def input_paths(cfg: DictConfig) -> InputPaths:
    model_dir = resolve_path(cfg.model.path)
    data_dir = resolve_path(cfg.data.data_dir)
    return InputPaths(
        model_dir=model_dir,
        builds_tiny_model=bool(cfg.model.build_if_missing)
        and model_dir.resolve() in (TINY_MODEL_DIR.resolve(), DEMO_MODEL_DIR.resolve()),
        data_dir=data_dir,
        data_files={split: (data_dir / cfg.data[key]) if cfg.data[key] else None for split, key in SPLIT_KEYS.items()})

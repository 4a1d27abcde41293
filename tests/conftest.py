"""Shared fixtures: the real Hydra configs composed in-process, and paths to the real ChatGLM3 fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CHATGLM3 = ROOT.parent / "shared" / "chatglm3"
SEED_DOC = ROOT.parent / "shared" / "seed" / "finetune_configs_zh.md"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_chatglm3_dir() -> Path:
    """The published chatglm3-6b config and tokenizer files (test fixtures kept outside the repo)."""
    if not (REAL_CHATGLM3 / "tokenizer.model").is_file():
        pytest.skip(f"real ChatGLM3 fixtures absent: {REAL_CHATGLM3} (shared/chatglm3 beside the repo)")
    return REAL_CHATGLM3


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml exactly as train.py does, with these command-line overrides."""
    import glm_ft.schema  # noqa: F401
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=False)


def run_train(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
              python: str = sys.executable) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([python, str(ROOT / "train.py"), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)

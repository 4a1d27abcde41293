"""The `train.py` entry point: compose → validate → render → (unless dry_run) fine-tune.

Everything up to rendering imports neither torch nor transformers, so a bad config fails in about a second.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

import glm_ft.config.schema  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from glm_ft.errors import ConfigError, GlmFtError
from glm_ft.config.locations import config_dir
from glm_ft.config.preflight import check_command_line
from glm_ft.tracking.redact import redact_files
from glm_ft.config.render import render_run_files
from glm_ft.config.validate import builds_tiny_model, check_data_rows, resolve_path, validate

log = logging.getLogger("glm_ft")


def model_hidden_size(model_cfg: DictConfig) -> int | None:
    """hidden_size from the checkpoint's config.json, read as JSON: the "auto" DeepSpeed keys depend on it."""
    config_json = resolve_path(model_cfg.path) / "config.json"
    if config_json.is_file():
        return int(json.loads(config_json.read_text(encoding="utf-8"))["hidden_size"])
    if builds_tiny_model(model_cfg):
        from glm_ft.chatglm3.tiny import TINY_CONFIG

        return int(TINY_CONFIG["hidden_size"])
    return None


def run(cfg: DictConfig) -> float | None:
    """One job. Returns `optimized_metric` of the final metrics, which an Optuna sweep maximises."""
    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    redact_files(run_dir / ".hydra")  # Hydra wrote the overrides there, a tracking URI's password included
    if cfg.resume == "auto" and not (run_dir / "finetune.yaml").is_file():
        # Every glm-ft run writes finetune.yaml first: without it this folder was just made by Hydra.
        raise ConfigError(f"resume=auto: '{run_dir}' holds no earlier run (no finetune.yaml), so there is nothing "
                          "to resume; pass hydra.run.dir=<the folder of the run to continue>")
    # Data before weights: every row is read and checked here (FILE:LINE errors) before anything heavy loads.
    # Skipped rows are logged when the data is tokenized; a dry run tokenizes nothing, so it logs them here.
    check_data_rows(cfg.data, log_skips=bool(cfg.dry_run))
    paths = render_run_files(cfg, run_dir, model_hidden_size(cfg.model))
    if cfg.dry_run:
        for name, path in paths.items():
            print(f"{name}: {path}")
        print("dry run: config is valid; nothing was loaded or trained")
        return None
    from glm_ft.train.finetune import finetune

    metrics = finetune(cfg, run_dir, paths)
    if cfg.optimized_metric is None:
        return None
    if cfg.optimized_metric not in metrics:
        raise ConfigError(f"optimized_metric: '{cfg.optimized_metric}' was not produced by this run (it has: "
                          f"{', '.join(sorted(metrics)) or 'no metrics; is there a validation split?'})")
    return float(metrics[cfg.optimized_metric])


class JobFailed(CompactHydraException):
    """A sweep job refused its input: Hydra prints the message alone."""


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except GlmFtError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Raise so Hydra marks this job FAILED and the sweep's other jobs still run; as a compact exception
            # Hydra ends the sweep with this one line, not a traceback.
            log.error("%s", err)
            raise JobFailed(f"error: {err}") from None
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        # The MLflow run is already marked KILLED; say where to continue from.
        print(f"interrupted {err}".rstrip(), file=sys.stderr)
        sys.exit(130)


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


def _shared_run_dir(argv: list[str]) -> list[str]:
    """Ranks of one torchrun/deepspeed job must share a run folder; Hydra's ${now:...} may differ between them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    job = job if job != "none" else f"{os.environ.get('MASTER_PORT', '0')}-{os.getppid()}"
    return [*argv, f"hydra.run.dir=outputs/${{now:%Y-%m-%d}}/dist-{job}"]


def main() -> None:
    # A crash in native code (CUDA, NCCL/gloo, a C++ abort) hours into a run should at least say where Python was.
    faulthandler.enable()
    sys.argv = _shared_run_dir(_take_launcher_args(sys.argv))
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    _hydra_main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_skipping_native_teardown()


def _exit_skipping_native_teardown() -> None:
    """A rank of a multi-process run that finished its work exits here, without interpreter finalization.

    Seen on CPU/gloo under torchrun (about one suite run in four): a rank that had finished, saved and destroyed
    its process group still aborted in native teardown at exit ("terminate called without an active exception",
    SIGABRT), so torchrun reported the successful run as failed. Everything this process owns is already written
    and closed (checkpoints, final weights, the MLflow run); what remains is flushing the log streams.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

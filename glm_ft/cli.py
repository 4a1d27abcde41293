"""The `train.py` entry point: compose → validate → render → (unless dry_run) fine-tune.

Everything up to rendering imports neither torch nor transformers, so a bad config fails in about a second.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from glm_ft import dist, stops
import glm_ft.config.schema  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from glm_ft.errors import ConfigError, GlmFtError, to_stderr
from glm_ft.runs import check_resume_world_size, finished_step
from glm_ft.config.locations import config_dir
from glm_ft.config.preflight import check_command_line
from glm_ft.tracking.redact import redact, redact_files, redact_log_records
from glm_ft.tracking.signals import SIGTERM_GUARD, Terminated, restated, stop_behind
from glm_ft.config.ds_config import check_zero_values
from glm_ft.config.render import render_run_files
from glm_ft.config.paths import InputPaths
from glm_ft.config.validate import check_data_rows, validate

log = logging.getLogger("glm_ft")


def model_hidden_size(where: InputPaths) -> int | None:
    """hidden_size from the checkpoint's config.json, read as JSON: the "auto" DeepSpeed keys depend on it."""
    config_json = where.model_dir / "config.json"
    if config_json.is_file():
        return int(json.loads(config_json.read_text(encoding="utf-8"))["hidden_size"])
    if where.builds_tiny_model:
        from glm_ft.chatglm3.tiny import TINY_CONFIG

        return int(TINY_CONFIG["hidden_size"])
    return None


def run(cfg: DictConfig) -> float | None:
    """One job. Returns `optimized_metric` of the final metrics, which an Optuna sweep maximises (in a sweep without
    one, eval_rouge-l, which its parent ranks by)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stops.reached(stops.STARTING)  # a sweep's jobs run in one process: each starts its own account
    dist.quiet_replicas()  # after Hydra's logging setup, which sets every logger's level again for each job
    # Hydra wrote the overrides there, a tracking URI's password included: masked before any check can refuse
    redact_files(run_dir / ".hydra")
    redact_log_records()
    where = validate(cfg)  # the input paths, resolved here once for the whole job
    if cfg.resume == "auto" and not (run_dir / "finetune.yaml").is_file():
        # Every glm-ft run writes finetune.yaml first: without it this folder was just made by Hydra.
        raise ConfigError(f"resume=auto: '{run_dir}' holds no earlier run (no finetune.yaml), so there is nothing "
                          "to resume; pass hydra.run.dir=<the folder of the run to continue>")
    # Data before weights: every row is read and checked here (FILE:LINE errors) before anything heavy loads.
    # Skipped rows are logged when the data is tokenized; a dry run tokenizes nothing, so it logs them here.
    check_data_rows(where, cfg.data, log_skips=bool(cfg.dry_run))
    if cfg.deepspeed is not None:
        finished = cfg.resume == "auto" and finished_step(run_dir, cfg.training_args.max_steps,
                                                          cfg.training_args.num_train_epochs) is not None
        # resume=auto that only reopens final/ loads no ZeRO state; a universal checkpoint takes any process count
        if not finished and not OmegaConf.select(cfg, "deepspeed.checkpoint.load_universal", default=False):
            check_resume_world_size(cfg.resume, run_dir, dist.world_size())
        if not cfg.dry_run:  # it imports deepspeed (and torch), which the run does next anyway; a dry run stays light
            from glm_ft.heap import collector_paused

            with collector_paused():
                check_zero_values(cfg)
    paths = render_run_files(cfg, run_dir, model_hidden_size(where))
    if cfg.dry_run:
        for name, path in paths.items():
            print(f"{name}: {path}")
        print("dry run: config is valid; nothing was loaded or trained")
        return None
    from glm_ft.heap import job_heap, long_lived

    with job_heap():  # the job's long-lived objects frozen out of collections (glm_ft/heap.py)
        with long_lived():
            from glm_ft.train.finetune import finetune

        metrics = finetune(cfg, run_dir, paths, where)
    if cfg.optimized_metric is None:
        from glm_ft.search.sweep import DEFAULT_METRIC

        # A grid sweep without one is still ranked by eval_rouge-l (its parent's best): returned, so that a NaN
        # there fails the job as it fails an Optuna trial (glm_ft.search.sweep.no_score).
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        return float(metrics[DEFAULT_METRIC]) if multirun and DEFAULT_METRIC in metrics else None
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
        to_stderr(f"error: {err}")
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as err:  # Ctrl-C, or SIGTERM (a scheduler's stop, `kill PID`)
        job_stopped(cfg, err)
    except Exception as err:  # a library's cleanup failed on a Ctrl-C or SIGTERM, or the launcher is gone
        stop = stop_behind(err)
        if stop is None:
            raise
        job_stopped(cfg, stop)


def job_stopped(cfg: DictConfig, stop: BaseException) -> None:
    """A job stopped by Ctrl-C or SIGTERM, at any stage: its MLflow run, if one was opened, is already KILLED."""
    hc = HydraConfig.get()
    line = stops.stop_line(cfg, Path(hc.runtime.output_dir))
    if hc.mode == RunMode.MULTIRUN:
        # Raised on, so Hydra launches no further job; main() says it in one line. A rerun of the sweep (not
        # resume=auto in the job's folder) continues it, skipping the jobs that finished.
        where = line.split(" (continue with", 1)[0]  # its hint is for one run
        job = redact(" ".join(hc.overrides.task))
        raise restated(stop, f"{where}: sweep job #{hc.job.num} ({job}); {stops.continue_sweep(hc.sweep.dir)}") \
            from None
    stopped(restated(stop, line))


def stopped(err: KeyboardInterrupt | Terminated) -> None:
    """The one line of a job stopped by Ctrl-C or SIGTERM (glm_ft.stops words it; a stop before any job has no run
    folder yet), and the exit code a shell or scheduler expects of that signal: 130 (128 + SIGINT), 143 (128 +
    SIGTERM). Under torchrun every rank is stopped at the same step: rank 0 says it. A stop with no word of where
    came outside any job: before it, or in a sweep's own work between its jobs (glm_ft.stops.outside_job_line)."""
    if dist.is_rank_zero():
        to_stderr(f"interrupted {str(err) or stops.outside_job_line()}")
    sys.exit(128 + signal.SIGTERM if isinstance(err, Terminated) else 130)


def main() -> None:
    # A crash in native code (CUDA, NCCL/gloo, a C++ abort) hours into a run should at least say where Python was.
    faulthandler.enable()
    # SIGTERM raises Terminated from the first line on, as Ctrl-C raises KeyboardInterrupt: its default action
    # (before the job's MLflow run opened its own handler) ended the process with exit 143 and not a word.
    SIGTERM_GUARD.acquire()
    try:
        _main()
    except (KeyboardInterrupt, Terminated) as err:  # a sweep's (-m) stop, or one outside any job; a job's exits in it
        SIGTERM_GUARD.interrupted = True  # the sweep's parent run ends KILLED (glm_ft.search.sweep, at exit)
        stopped(err)
    finally:
        SIGTERM_GUARD.release()


def _main() -> None:
    sys.argv = dist.shared_run_dir(dist.take_launcher_args(sys.argv))
    dist.stop_when_orphaned()
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        to_stderr(f"error: {err}")
        sys.exit(1)
    _hydra_main()
    if dist.is_multi_process():
        dist.exit_skipping_native_teardown()

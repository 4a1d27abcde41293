"""A sweep's configuration, judged once before any job starts: the config its jobs would run, composed in the
sweep's process and run through glm_ft.config.validate and the data rows' check, as a single run's is.

A refusal that holds whatever the swept values are (a fixed `training_args.learning_rate=-1`, an `optimized_metric`
whose split is null, a malformed row in the training file) would fail every job alike, one after the other, after
the sweep had made its MLflow parent run and its Optuna study (where the failed trials count toward n_trials). Such
a sweep ends at once with the one line a single run prints. "Whatever the swept values are" is judged on two jobs
that differ in every swept key (the sweeper's `checked_jobs`: the grid's first and last job, a search space's two
opposite corners): refused at both with the same message, the refusal does not hang on them. Anything else (a value
only some jobs reach) is left to the jobs it reaches, which fail alone as before.
"""

from __future__ import annotations

from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict, read_write

from glm_ft.errors import ConfigError, GlmFtError


def check_sweep(config: DictConfig) -> None:
    """Raise ConfigError when the sweep's jobs would all be refused with the same message (`config`: the
    multirun's, as Hydra hands it to on_multirun_start)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    jobs = _checked_jobs(config, loader)
    if not jobs:
        return
    first = _refusal(loader, config, jobs[0])
    if first is not None and all(_refusal(loader, config, job) == first for job in jobs[1:]):
        raise ConfigError(first)


def _checked_jobs(config: DictConfig, loader) -> list[list[str]]:
    """The overrides of the jobs to judge, from the sweeper's `checked_jobs` (none for a sweeper without one). The
    sweeper's own settings or search space that it refuses are refused here, before the sweep's MLflow parent run
    exists (Hydra makes the sweeper only after the callbacks' on_multirun_start)."""
    from hydra._internal.utils import _locate

    try:
        checked = getattr(_locate(str(config.hydra.sweeper._target_)), "checked_jobs", None)
    except (ImportError, ValueError):
        return []
    if checked is None:
        return []
    try:
        return checked(config, loader)
    except HydraException as err:  # the sweeper's own settings or search space, refused before anything exists
        raise ConfigError(str(err)) from None


def _refusal(loader, config: DictConfig, overrides: list[str]) -> str | None:
    """glm-ft's message refusing the job of these overrides, or None."""
    from glm_ft.config.validate import check_data_rows, validate

    try:
        job = loader.load_sweep_config(config, list(overrides))
    except HydraException:
        return None  # Hydra's to report for the job, as it does before launching it
    with read_write(job), open_dict(job):
        del job["hydra"]  # the job's config as Hydra hands it to the job
    try:
        where = validate(job)
        # Every row, as each job reads them before its model loads (a file that passed is not read again).
        check_data_rows(where, job.data, log_skips=False)
    except GlmFtError as err:
        return str(err)
    return None

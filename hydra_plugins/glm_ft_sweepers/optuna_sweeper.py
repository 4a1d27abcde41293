"""`hydra/sweeper=optuna`: an Optuna study driving train.py jobs, on current Optuna and stable hydra-core.

Each trial is one job of the configured launcher, launched in batches of `n_jobs`; job N's folder is trial N's.
The study lives in `hydra.sweep.dir` (Optuna's journal file, see glm_ft/search/study.py), so running the same command
with the same `hydra.sweep.dir` continues it: finished trials are kept, a trial that was running when the sweep
died resumes in its job folder from its last complete checkpoint (resume=auto, as the basic sweeper resumes a job)
or, without one, is marked failed and tried again from scratch, and `n_trials` counts every trial of the study. One
sweep process owns a sweep folder at a time (a lock file), which is what makes "running when it died" knowable.
A search with failed trials ends with one line per failed trial and the count (basic_sweeper.SweepFailed).

Optuna is imported only once a sweep starts: Hydra imports this module on every train.py start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from glm_ft.search.lock import SweepLock, SweepLocked
from hydra_plugins.glm_ft_sweepers.basic_sweeper import (RESUME_AUTO, SweepFailed, failure_text, log_crash,
                                                          resumable_job)
from glm_ft.tracking.redact import redact_files

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
STUDY_DIR = "study"


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, pruner: Any, direction: str, study_name: str, storage: Optional[str],
                 n_trials: int, n_jobs: int, seed: Optional[int], params: Optional[dict]) -> None:
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.direction = str(direction).lower()
        refused = settings_refusal(direction, n_trials, n_jobs)
        if refused:
            raise HydraException(refused)
        self.study_name, self.storage_spec = study_name, storage
        self.n_trials, self.n_jobs, self.seed = n_trials, n_jobs, seed
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # --- the search space ------------------------------------------------------------------------------------

    def _space(self, arguments: List[str]) -> tuple[dict, list[str]]:
        return search_space(self.params, arguments, self.hydra_context.config_loader)

    @staticmethod
    def checked_jobs(config: DictConfig, config_loader) -> list[list[str]]:
        """The overrides of two trials at opposite corners of the search space (each parameter's first choice or
        low bound, then its last choice or high bound): glm_ft.search.precheck judges the sweep's config on them
        before the study or any trial exists."""
        from glm_ft.search.study import corner_points, override_value

        from glm_ft.search.study import grid_values

        sweeper = config.hydra.sweeper
        refused = settings_refusal(sweeper.direction, sweeper.n_trials, sweeper.n_jobs)
        if refused:
            raise HydraException(refused)
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        space, fixed = search_space(OmegaConf.to_container(params, resolve=True) if params is not None else {},
                                    list(config.hydra.overrides.task), config_loader)
        if str(OmegaConf.select(sweeper, "sampler._target_", default="")).endswith("GridSampler"):
            for key, dist in space.items():
                try:
                    grid_values(key, dist)
                except ValueError as err:
                    raise HydraException(str(err)) from None
        return [fixed + [f"{k}={override_value(v)}" for k, v in point.items()] for point in corner_points(space)]

    def _sampler(self, space: dict, seed: int | None = None):
        from hydra.utils import instantiate

        from glm_ft.search.study import grid_values

        kwargs = {}
        if seed is not None:
            kwargs["seed"] = seed
        if str(self.sampler_cfg.get("_target_", "")).endswith("GridSampler"):
            try:
                kwargs["search_space"] = {k: grid_values(k, d) for k, d in space.items()}
            except ValueError as err:
                raise HydraException(str(err)) from None
            kwargs["_target_"] = "glm_ft.search.study.AskTellGridSampler"
        return instantiate(self.sampler_cfg, **kwargs)

    # --- the sweep -------------------------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        from glm_ft.search import study as search

        assert self.config is not None and self.launcher is not None
        space, fixed = self._space(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        redact_files(sweep_dir)  # a tracking URI's password
        metric = str(OmegaConf.select(self.config, "optimized_metric", default=None) or "objective")
        sampler = self._sampler(space, self.seed)
        n_trials = self.n_trials
        if isinstance(sampler, optuna.samplers.GridSampler):
            size = 1
            for values in sampler._search_space.values():
                size *= len(values)
            n_trials = min(n_trials, size)

        lock = SweepLock(sweep_dir)
        try:
            lock.acquire()
        except SweepLocked as err:
            raise HydraException(str(err)) from None
        try:
            storage = search.storage_for(self.storage_spec, sweep_dir)
            study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                        pruner=_instantiate(self.pruner_cfg),
                                        direction=self.direction, load_if_exists=True)
            if study.direction.name.lower() != self.direction:
                raise HydraException(f"hydra.sweeper.direction: the study in {sweep_dir} was made to "
                                     f"{study.direction.name.lower()}, not {self.direction}")
            retried, resumed = search.recover_stale_trials(study, lambda t: self._resumable(sweep_dir, t, fixed))
            if study.trials and self.seed is not None:
                # A continued study must not replay its start, which the same seed would: its random stream goes on
                # from the seed and the study's length, so the same stopped study still continues the same way.
                study.sampler = self._sampler(space, self.seed + len(study.trials))
            done = len(search.counted_trials(study))
            if done or retried or resumed:
                log.info("Optuna: continuing study '%s' in %s: %d of %d trials done%s%s", self.study_name, sweep_dir,
                         done, n_trials, f"; trials {retried} were running when it stopped and are retried"
                         if retried else "", f"; trials {[t.number for t in resumed]} were running when it "
                         "stopped and resume from their last complete checkpoint (resume=auto)" if resumed else "")
            else:
                log.info("Optuna: study '%s' in %s, %d trials, sampler %s, pruner %s", self.study_name, sweep_dir,
                         n_trials, type(sampler).__name__, type(study.pruner).__name__)
            env = {search.STUDY_ENV: self.study_name,
                   search.STORAGE_ENV: search.storage_spec_for_job(self.storage_spec, sweep_dir)}
            failures: list[str] = []
            launched = 0
            try:
                pending = resumed  # first, before new trials: they are part of n_trials already
                while pending or n_trials - len(search.counted_trials(study)) > 0:
                    trials, pending = pending[:self.n_jobs], pending[self.n_jobs:]
                    new = n_trials - len(search.counted_trials(study)) - len(trials) - len(pending)
                    trials += [study.ask(space) for _ in range(max(min(self.n_jobs - len(trials), new), 0))]
                    failures += self._run_batch(study, trials, fixed, env, {t.number for t in resumed})
                    launched += len(trials)
            finally:
                summary = _summarise(study, sweep_dir, metric)
        finally:
            lock.release()
        if failures:
            raise SweepFailed(failures, launched, "trials")
        return summary

    def _resumable(self, sweep_dir: Path, trial, fixed: list[str]) -> bool:
        """A trial the dead sweep left running whose job folder (N for trial N) holds a complete checkpoint of
        this very trial: its study and number in the folder's hydra.job.env_set, exactly these overrides."""
        from glm_ft.search import STUDY_ENV, TRIAL_ENV

        folder = sweep_dir / str(trial.number)
        try:
            env_set = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.env_set
            ours = str(env_set.get(STUDY_ENV)) == self.study_name and str(env_set.get(TRIAL_ENV)) == str(trial.number)
        except Exception:  # no record (killed before Hydra wrote it), or an unreadable one: from scratch
            return False
        return ours and resumable_job(folder, _job_overrides(trial, fixed))

    def _run_batch(self, study, trials: list, fixed: list[str], env: dict, resumed: set[int]) -> list[str]:
        import optuna

        from glm_ft.search import study as search
        from glm_ft.search.sweep import no_score, sweep_objective

        batch = []
        for trial in trials:
            env_set = [f"+hydra.job.env_set.{k}={v}" for k, v in {**env, search.TRIAL_ENV: trial.number}.items()]
            # A resumed trial's job continues in its own folder: its checkpoint, its MLflow run (resume=auto).
            batch.append(_job_overrides(trial, fixed) + env_set + ([RESUME_AUTO] if trial.number in resumed else []))
        self.validate_batch_is_legal(batch)
        numbers = [t.number for t in trials]
        # Job N's folder is trial N's: launch together when the numbers run on (they do under the sweep lock).
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            returns = list(self.launcher.launch(batch, initial_job_idx=numbers[0]))
        else:
            returns = [r for n, b in zip(numbers, batch) for r in self.launcher.launch([b], initial_job_idx=n)]
        failures = []
        for trial, ret, overrides in zip(trials, returns, batch):
            # Not ret.return_value: for a failed job it prints "Error executing job" even when it was pruned.
            value, error = ret._return_value, None
            if ret.status != JobStatus.COMPLETED:
                value, error = None, ret._return_value
            if isinstance(error, optuna.TrialPruned):
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log.info("trial %d pruned", trial.number)
                continue
            if error is not None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                swept = " ".join(overrides[len(fixed):len(fixed) + len(trial.params)])
                failures.append(f"trial {trial.number} ({swept}): {failure_text(error)}")
                if not log_crash(f"trial {trial.number} failed", error):
                    log.error("trial %d failed: %s", trial.number, failure_text(error))
                continue
            if value is None or not _finite(value):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                swept = " ".join(overrides[len(fixed):len(fixed) + len(trial.params)])
                failures.append(f"trial {trial.number} ({swept}): "
                                + (no_score(sweep_objective(self.config)[0], value)
                                   or f"returned {value!r}, not a number (optimized_metric?)"))
                continue
            study.tell(trial, float(value))
            log.info("trial %d: %s", trial.number, value)
        return failures


def settings_refusal(direction: Any, n_trials: Any, n_jobs: Any) -> str | None:
    """What is wrong with the sweeper's own settings, or None."""
    if str(direction).lower() not in ("maximize", "minimize"):
        return f"hydra.sweeper.direction: '{direction}' is not maximize or minimize"
    for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
        if not isinstance(value, int) or value < 1:
            return f"hydra.sweeper.{key}: must be at least 1, got {value}"
    return None


def search_space(params: dict, arguments: List[str], config_loader) -> tuple[dict, list[str]]:
    """(key → Optuna distribution, fixed overrides): hydra.sweeper.params, then the command line (which wins)."""
    from glm_ft.search.study import distribution_for

    parser = OverridesParser.create(config_loader=config_loader)
    space, fixed = {}, {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            try:
                space[key] = distribution_for(override)
            except ValueError as err:
                raise HydraException(f"hydra.sweeper.params: {err}") from None
        else:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
    if not space:
        raise HydraException("hydra.sweeper.params: no search space (e.g. method.r: choice(4, 8, 16))")
    return space, list(fixed.values())


def _job_overrides(trial, fixed: list[str]) -> list[str]:
    """A trial's job's overrides (without the hydra.job.env_set ones, which Hydra keeps apart): the fixed ones,
    then the trial's parameters."""
    from glm_ft.search import study as search

    return fixed + [f"{k}={search.override_value(v)}" for k, v in trial.params.items()]


def _instantiate(node: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(node)


def _finite(value: Any) -> bool:
    import math

    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _summarise(study, sweep_dir: Path, metric: str) -> dict:
    """The study's summary and plots (sweep_dir/study/, logged to the MLflow parent by glm_ft.sweep), and
    optimization_results.yaml. Also after a failure or Ctrl-C: what was found so far is worth keeping."""
    from glm_ft.search import study as search

    try:
        summary = search.summarise(study, sweep_dir / STUDY_DIR, metric)
        _write_results(sweep_dir / RESULTS_FILE, study, summary)
        return summary
    except Exception as err:
        log.error("Optuna: could not summarise study '%s': %s: %s", study.study_name, type(err).__name__, err)
        return {}


def _write_results(path: Path, study, summary: dict) -> None:
    """Optuna's summary in the file name hydra-optuna-sweeper used, for users and scripts that read it."""
    out = {"name": study.study_name, "direction": summary["direction"], "trials": summary["trials"]}
    if "best_value" in summary:
        out.update(best_trial=summary["best_trial"], best_value=summary["best_value"],
                   best_params=summary["best_params"])
    OmegaConf.save(OmegaConf.create(out), path)

"""Optuna studies for hyperparameter search: the study's storage beside the sweep, search spaces from Hydra's sweep
syntax, and the training job's side of a trial (reporting eval metrics, being pruned; the Trainer callback that
reports is glm_ft.train.trainer.PruningCallback).

The sweeper (hydra_plugins/glm_ft_sweepers) asks the study for trials and launches one train.py job per trial. It
hands each job its trial through the environment (TRIAL_ENV, STUDY_ENV, STORAGE_ENV, set with Hydra's
hydra.job.env_set, so every launcher passes them on); the job opens the same study in the same storage, reports its
`optimized_metric` at every evaluation, and stops when the study's pruner says so.

The default storage is Optuna's journal file (`<sweep dir>/optuna_journal.log`): an append-only log with a file
lock, so the sweeper and its jobs in other processes (joblib workers, submitit tasks on a shared filesystem) write
to it safely, and a killed sweep leaves a study that can be loaded and continued.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from hydra.core.override_parser.types import IntervalSweep
from hydra.utils import instantiate

from glm_ft.search import STUDY_ENV, TRIAL_ENV

log = logging.getLogger(__name__)

STORAGE_ENV = "GLM_FT_OPTUNA_STORAGE"
JOURNAL_FILE = "optuna_journal.log"
# A trial that was RUNNING when its sweep died: marked FAIL with this system attribute, and not counted.
STALE_ATTR = "glm_ft_stale"
PRUNED_TAG = "glm_ft.pruned"


class TrialPruned(optuna.TrialPruned):
    """Raised by a training job whose trial was pruned. The job's MLflow run ends KILLED (with tag
    `glm_ft.pruned=true`), and the sweeper tells the study the trial was PRUNED."""

    mlflow_status = "KILLED"


def storage_for(spec: str | None, sweep_dir: Path):
    """The study's storage: a journal file (default: beside the sweep), or an RDB URL (`sqlite:///...`)."""
    if spec and "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(spec) if spec else Path(JOURNAL_FILE)
    path = path if path.is_absolute() else Path(sweep_dir) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def storage_spec_for_job(spec: str | None, sweep_dir: Path) -> str:
    """What a job needs to open the same storage: the absolute journal path, or the RDB URL."""
    if spec and "://" in spec:
        return spec
    path = Path(spec) if spec else Path(JOURNAL_FILE)
    return str((path if path.is_absolute() else Path(sweep_dir) / path).resolve())


# --- search spaces -----------------------------------------------------------------------------------------------


def distribution_for(override) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from a parsed Hydra sweep override:
    choice(a, b, c) → categorical; range(lo, hi, step) → int/float with that step (hi exclusive, as in Hydra);
    interval(lo, hi) → uniform float; int(interval(lo, hi)) → int; tag(log, interval(lo, hi)) → log scale."""
    if override.is_choice_sweep():
        return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator()))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{override.get_key_element()}: empty range")
        step = values[1] - values[0] if len(values) > 1 else 1
        if all(isinstance(v, int) for v in values):
            return optuna.distributions.IntDistribution(values[0], values[-1], step=step)
        return optuna.distributions.FloatDistribution(values[0], values[-1], step=step)
    if override.is_interval_sweep():
        value = override.value()
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{override.get_key_element()}: not a search space ({override.input_line}); use choice(...), "
                     "range(...) or interval(...)")


def grid_values(key: str, dist: optuna.distributions.BaseDistribution) -> list:
    """The grid sampler's values for one parameter: only discrete spaces have a grid."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, (optuna.distributions.IntDistribution, optuna.distributions.FloatDistribution)) \
            and dist.step is not None and not dist.log:
        count = int(round((dist.high - dist.low) / dist.step)) + 1
        return [dist.low + i * dist.step for i in range(count)]
    raise ValueError(f"hydra.sweeper.params.{key}: the grid sampler needs choice(...) or range(...), not a "
                     "continuous interval")


def corner_points(space: Mapping[str, optuna.distributions.BaseDistribution]) -> list[dict]:
    """Two points of the space that differ in every parameter with more than one value: each one's first choice
    or low bound, then its last choice or high bound (a check that fails alike at both does not hang on them)."""
    def ends(dist) -> tuple:
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return dist.choices[0], dist.choices[-1]
        return dist.low, dist.high  # Optuna moves a stepped high onto the step

    return [{key: ends(dist)[i] for key, dist in space.items()} for i in (0, 1)]


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for a sweeper that asks and tells: Optuna's stops the study when the grid is used up,
    which only works inside study.optimize (elsewhere it raises); the sweeper caps n_trials to the grid instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def override_value(value: Any) -> str:
    """A sampled value as a Hydra override value (repr keeps a float exact)."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- the study across restarts -----------------------------------------------------------------------------------


def recover_stale_trials(study: optuna.Study, resumable: Callable[[optuna.trial.FrozenTrial], bool]
                         ) -> tuple[list[int], list[optuna.trial.Trial]]:
    """Trials left RUNNING by a sweep that died: (retried, resumed). A `resumable` one (its job folder holds a
    complete checkpoint of it) stays RUNNING, to be run again with resume=auto: the same trial, job folder, MLflow
    run and intermediate values, so its hours of training and the pruner's history of it go on. The others are
    marked FAIL (tagged stale, so they are not counted) and their parameters enqueued to be tried again from scratch.
    Only call this while holding the sweep's lock: then no other process is running a trial of this study."""
    storage = study._storage
    retried, resumed = [], []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.params and resumable(trial):
            resumed.append(optuna.trial.Trial(study, trial._trial_id))
            continue
        storage.set_trial_system_attr(trial._trial_id, STALE_ATTR, True)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"glm_ft_retry_of": trial.number},
                                skip_if_exists=False)
        retried.append(trial.number)
    return retried, resumed


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials `n_trials` counts: finished (complete, pruned, failed), but not the stale ones retried."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=done) if not t.system_attrs.get(STALE_ATTR)]


# --- the training job's side of a trial --------------------------------------------------------------------------


class JobTrial:
    """The trial this training job runs, opened from the environment the sweeper set."""

    def __init__(self, study_name: str, storage_spec: str, number: int, pruner: Any):
        self.study_name, self.number = study_name, number
        storage = storage_for(storage_spec, Path(storage_spec).parent)
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.pruned_at: int | None = None

    @classmethod
    def from_env(cls, pruner: Any) -> "JobTrial | None":
        if TRIAL_ENV not in os.environ:
            return None
        return cls(os.environ[STUDY_ENV], os.environ[STORAGE_ENV], int(os.environ[TRIAL_ENV]), pruner)

    def report(self, value: float, step: int) -> bool:
        """Report the metric at `step`; True when the pruner stops this trial."""
        if not math.isfinite(value):
            value = float("nan")
        if step in self.study._storage.get_trial(self.trial._trial_id).intermediate_values:
            # A trial resumed from a checkpoint evaluates again the steps between it and the kill: the study keeps
            # the value reported then (the same training, so the same value), as Optuna would, without its warning.
            log.info("trial %d: step %d was reported before the trial was resumed; its value stays", self.number, step)
        else:
            self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False

    def pruned_by(self, step: int) -> bool:
        """A trial resumed from its checkpoint at `step`: True (pruned at its last report) when the pruner stops it
        on what it reported up to that step. Its job was stopped there and saved that checkpoint, but the sweep
        was killed before it told the study; trained on, it would run past where the pruner stopped it."""
        reported = self.study._storage.get_trial(self.trial._trial_id).intermediate_values
        if not reported or max(reported) > step or not self.trial.should_prune():
            return False
        self.pruned_at = max(reported)
        log.info("trial %d: pruned at step %d before it was resumed; not trained on", self.number, self.pruned_at)
        return True


def pruner_from_hydra(hydra_cfg) -> Any:
    """The study's pruner, built from the job's own copy of the sweeper config (hydra.sweeper.pruner)."""
    node = hydra_cfg.sweeper.get("pruner") if hydra_cfg is not None else None
    return instantiate(node) if node is not None else optuna.pruners.NopPruner()


def summarise(study: optuna.Study, out_dir: Path, metric: str) -> dict[str, Any]:
    """Write the study's summary (JSON + one CSV row per trial) and Optuna's plots (PNG) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    states: Mapping[str, int] = {}
    for trial in counted_trials(study):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    summary: dict[str, Any] = {"study_name": study.study_name, "direction": study.direction.name.lower(),
                               "metric": metric, "trials": states}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    _plots(study, out_dir, metric, len(complete))
    return summary


def _plots(study: optuna.Study, out_dir: Path, metric: str, n_complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    if n_complete >= 2:  # importances need at least two finished trials
        plots["param_importances"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study, target_name=metric)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(9, 6)
            figure.tight_layout()
            figure.savefig(out_dir / f"{name}.png", dpi=100)
            plt.close(figure)
        except Exception as err:  # a plot Optuna can't draw for this study (e.g. one trial) is left out
            log.warning("study plot %s not drawn: %s", name, err)

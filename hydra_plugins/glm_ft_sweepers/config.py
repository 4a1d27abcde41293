"""The sweepers' config schema, registered in Hydra's ConfigStore when Hydra scans its plugins.

Samplers and pruners are config groups, chosen like any other group:
    python train.py hparams_search=lora_optuna hydra/sweeper/sampler=random hydra/sweeper/pruner=median
Only hydra is imported here: Hydra imports this module on every `train.py` start, sweep or not.
"""


from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import hydra._internal.core_plugins.basic_sweeper  # noqa: F401  (Hydra's "basic" is stored first: ours replaces it)
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "glm_ft"


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    # Random trials before TPE models the space; 5 rather than Optuna's 10, as fine-tuning searches are short.
    n_startup_trials: int = 5
    multivariate: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf:
    # The grid is the search space (every parameter a choice(...) or range(...)); n_trials is capped to its size.
    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConf:
    # Continuous and integer parameters; choice(...) ones fall back to independent random sampling.
    _target_: str = "optuna.samplers.CmaEsSampler"
    n_startup_trials: int = 1


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    # Stop a trial whose metric at an evaluation is worse than the median of earlier trials at that step.
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    # Resources are training steps (the step each evaluation reports at).
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class ThresholdPrunerConf:
    # Stop a trial whose metric leaves [lower, upper] (e.g. a loss that diverged).
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: Optional[float] = None
    upper: Optional[float] = None
    n_warmup_steps: int = 0


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.glm_ft_sweepers.optuna_sweeper.OptunaSweeper"
    # The sampler and pruner are built by the sweeper (the sampler needs the seed and, for a grid, the space).
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"
    study_name: str = "glm_ft"
    # Optuna's journal file (relative to hydra.sweep.dir), or an RDB URL (sqlite:///...).
    storage: Optional[str] = None
    # The total number of trials of the study, counting those of earlier runs of the same sweep folder.
    n_trials: int = 20
    # Trials launched together (with a parallel launcher: joblib, submitit).
    n_jobs: int = 1
    # The sampler's seed.
    seed: Optional[int] = None
    # key: search space (choice(...), range(...), interval(...), tag(log, interval(...)), int(interval(...))).
    params: Optional[Dict[str, str]] = None


@dataclass
class ResumableBasicSweeperConf:
    _target_: str = "hydra_plugins.glm_ft_sweepers.basic_sweeper.ResumableBasicSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider=PROVIDER)
# Hydra's default sweeper (`-m method.r=4,8,16`), same keys, plus skipping the jobs a killed run already finished.
_store.store(group="hydra/sweeper", name="basic", node=ResumableBasicSweeperConf, provider=PROVIDER)
for _name, _node in {"tpe": TPESamplerConf, "random": RandomSamplerConf, "grid": GridSamplerConf,
                     "cmaes": CmaEsSamplerConf}.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider=PROVIDER)
for _name, _node in {"none": NopPrunerConf, "median": MedianPrunerConf, "successive_halving":
                     SuccessiveHalvingPrunerConf, "hyperband": HyperbandPrunerConf,
                     "threshold": ThresholdPrunerConf}.items():
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider=PROVIDER)

"""glm-ft's Hydra sweepers, found by Hydra's plugin discovery through the `hydra_plugins` namespace package at the
project root (no `__init__.py` in `hydra_plugins/` itself, so it merges with the installed launchers' plugins).

- `hydra/sweeper=optuna`: Optuna search with a study that survives a kill, pruning and the study in MLflow
  (optuna_sweeper.py; conf/hparams_search/*.yaml use it).
- `hydra/sweeper=basic` (Hydra's default, replaced under the same name and keys): the grid sweeper, skipping the
  jobs already finished in the same sweep folder (basic_sweeper.py).
"""

"""Sweeps and hyperparameter search: the sweep's parent run and job placement, its folder lock, Optuna studies."""

# Set by the Optuna sweeper for each job (glm_ft/search/study.py); here so that a plain training job can tell it is
# not in a study without importing Optuna.
TRIAL_ENV = "GLM_FT_OPTUNA_TRIAL"

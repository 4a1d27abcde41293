"""Sweeps and hyperparameter search: the sweep's parent run and job placement, its folder lock, Optuna studies."""

import os

# Set by the Optuna sweeper for each job (glm_ft/search/study.py); here so that a plain training job can tell it is
# not in a study without importing Optuna.
TRIAL_ENV = "GLM_FT_OPTUNA_TRIAL"
STUDY_ENV = "GLM_FT_OPTUNA_STUDY"


def trial_tags() -> dict[str, str]:
    """The Optuna trial this job runs, as tags for its MLflow run (empty outside a study). From the environment,
    so the run is created with them: a trial killed while its model loads is still found by its number."""
    if TRIAL_ENV not in os.environ:
        return {}
    return {"glm_ft.trial": os.environ[TRIAL_ENV], "glm_ft.study": os.environ.get(STUDY_ENV, "")}

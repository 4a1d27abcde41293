"""Sweeps and hyperparameter search: the sweep's parent run and job placement, its folder lock, Optuna studies."""

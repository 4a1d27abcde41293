"""The Trainer boundary: documented training_args → transformers' Seq2SeqTrainingArguments.

finetune.yaml keeps the documented names (users of the reference demo recognise them); the keys transformers
renamed are translated here and only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import Seq2SeqTrainingArguments

from glm_ft.train.metrics import best_model_metric

# documented / schema name → current transformers name
TRANSLATED_KEYS = {
    "evaluation_strategy": "eval_strategy",
    "group_by_length": "train_sampling_strategy",
    "gradient_checkpointing": "activation_checkpointing",
}
# training_args keys that are no TrainingArguments field: glm-ft's own callbacks take them (EarlyStoppingCallback).
NOT_TRAINER_KEYS = ("early_stopping_patience", "early_stopping_threshold")


def seq2seq_kwargs(cfg: DictConfig, run_dir: Path, ds_path: Path | None, *, has_eval: bool) -> dict[str, Any]:
    args = OmegaConf.to_container(cfg.training_args, resolve=True)
    gen = {k: v for k, v in args.pop("generation_config").items() if v is not None}
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if key in NOT_TRAINER_KEYS:
            continue
        if key == "metric_for_best_model":
            value = best_model_metric(cfg.training_args)
        if key in ("metric_for_best_model", "greater_is_better") and value is None:
            continue  # transformers derives greater_is_better from the metric's name
        if key == "group_by_length":
            kwargs["train_sampling_strategy"] = "group_by_length" if value else "random"
        elif key == "gradient_checkpointing":
            kwargs["activation_checkpointing"] = value
            # Non-reentrant: frozen embeddings (LoRA, prefix) would otherwise cut the gradient path.
            kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False} if value else None
        elif key in ("use_cpu", "disable_tqdm", "save_total_limit", "ddp_find_unused_parameters") and value is None:
            continue
        else:
            kwargs[TRANSLATED_KEYS.get(key, key)] = value
    kwargs["output_dir"] = str(run_dir)
    kwargs["deepspeed"] = str(ds_path) if ds_path is not None else None
    kwargs["seed"] = cfg.seed
    kwargs["data_seed"] = cfg.seed
    # glm-ft logs to MLflow itself (one run per job, nested in sweeps): transformers' callback would log twice.
    kwargs["report_to"] = "none"
    # The Trainer's own filter would replace a NaN loss by the running mean and hide the divergence.
    kwargs["logging_nan_inf_filter"] = False
    # Tokens/s counts real tokens only: padding is work, not throughput.
    kwargs["include_num_input_tokens_seen"] = "non_padding"
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    kwargs["generation_config"] = gen
    return kwargs


def build_training_arguments(cfg: DictConfig, run_dir: Path, ds_path: Path | None, *, has_eval: bool,
                             generation_config: Any):
    """Seq2SeqTrainingArguments for this run; transformers itself checks the values it owns."""
    kwargs = seq2seq_kwargs(cfg, run_dir, ds_path, has_eval=has_eval)
    kwargs["generation_config"] = generation_config
    if not torch.cuda.is_available():
        # The documented configs say use_cpu: false ("use the GPU if there is one"); without one the CPU is the
        # only device, and transformers refuses bf16 on CPU unless use_cpu is set.
        kwargs["use_cpu"] = True
    return Seq2SeqTrainingArguments(**kwargs)

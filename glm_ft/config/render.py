"""Composed config → the documented files: finetune.yaml (the reference demo's schema) and the DeepSpeed JSON.

`ds_config.json` is the chosen deepspeed group as the user wrote it ("auto" kept, as documented);
`ds_config.resolved.json` fills every "auto" exactly as transformers will (HfTrainerDeepSpeedConfig), so the user
can read what DeepSpeed really gets (glm_ft.config.ds_config fills and checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from glm_ft import methods
from glm_ft.atomic import write_text_atomic
from glm_ft.methods.common import changed_or_listed, defaults
from glm_ft.config.ds_config import resolve_deepspeed
from glm_ft.config.schema import GenerationArgs, TrainingArgs

# Keys of the documented training_args, in documented order; others appear only when changed from the default.
DOCUMENTED_TRAINING_KEYS = [
    "output_dir", "max_steps", "learning_rate", "per_device_train_batch_size", "dataloader_num_workers",
    "remove_unused_columns", "save_strategy", "save_steps", "log_level", "logging_strategy", "logging_steps",
    "per_device_eval_batch_size", "evaluation_strategy", "eval_steps", "predict_with_generate", "generation_config",
]
FINETUNE_FILE = "finetune.yaml"
DS_FILE = "ds_config.json"
DS_RESOLVED_FILE = "ds_config.resolved.json"


def finetune_dict(cfg: DictConfig, run_dir: Path, ds_path: Path | None) -> dict[str, Any]:
    """The documented finetune.yaml for this composed config."""
    args = OmegaConf.to_container(cfg.training_args, resolve=True)
    args["output_dir"] = str(run_dir)
    if ds_path is not None:
        args["deepspeed"] = str(ds_path)
    args["generation_config"] = changed_or_listed(args["generation_config"], defaults(GenerationArgs),
                                                   ["max_new_tokens"])
    training_args = changed_or_listed(args, defaults(TrainingArgs), DOCUMENTED_TRAINING_KEYS)
    # Each documented method file names use_cpu except sft; keep what the method group set, drop a bare default.
    if training_args.get("use_cpu") is None:
        training_args.pop("use_cpu", None)

    data = cfg.data
    out: dict[str, Any] = {
        "data_config": {"train_file": data.train_file, "val_file": data.val_file, "test_file": data.test_file,
                        "num_proc": data.num_proc},
        "max_input_length": cfg.max_input_length,
        "max_output_length": cfg.max_output_length,
        "training_args": training_args,
    }
    method = OmegaConf.to_container(cfg.method, resolve=True)
    block = methods.get(method.pop("name")).peft_config(method)
    if block is not None:
        out["peft_config"] = block
    return out


def render_run_files(cfg: DictConfig, run_dir: Path, hidden_size: int | None) -> dict[str, Path]:
    """Write finetune.yaml (and the DeepSpeed JSON pair) into the run folder; return their paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    ds_path = None
    if cfg.deepspeed is not None:
        ds_path = run_dir / DS_FILE
        write_text_atomic(ds_path, json.dumps(OmegaConf.to_container(cfg.deepspeed, resolve=True), indent=2))
        paths["ds_config"] = ds_path
        if hidden_size is not None:
            steps = cfg.training_args.max_steps
            resolved = resolve_deepspeed(cfg, hidden_size, steps)
            paths["ds_config_resolved"] = run_dir / DS_RESOLVED_FILE
            write_text_atomic(paths["ds_config_resolved"], json.dumps(resolved, indent=2))
    import yaml

    finetune = finetune_dict(cfg, run_dir, ds_path)
    paths["finetune"] = run_dir / FINETUNE_FILE
    write_text_atomic(paths["finetune"], yaml.safe_dump(finetune, sort_keys=False, allow_unicode=True))
    return paths

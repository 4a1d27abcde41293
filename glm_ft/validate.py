"""Semantic checks on a composed config: what types alone can't say. Runs before any model weights or data load.

Every error names the config key (and the allowed values or the conflicting key), so a bad sweep fails in a
second instead of after an hour on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from glm_ft.errors import ConfigError
from glm_ft.schema import METHOD_SCHEMAS

STRATEGIES = ("no", "steps", "epoch")
QUICKSTART_HINT = "or try the bundled tiny setup: python train.py experiment=quickstart"


def validate(cfg: DictConfig, *, check_paths: bool = True) -> None:
    """Raise ConfigError on the first problem found, naming the key."""
    _check_unknown_keys(cfg)
    _check_method(cfg.method)
    _check_lengths(cfg)
    _check_training_args(cfg.training_args)
    if cfg.deepspeed is not None:
        from glm_ft.render import check_deepspeed

        check_deepspeed(cfg)
    _check_model(cfg.model)
    if check_paths:
        check_model_path(cfg.model)
        check_data_files(cfg.data)
        _check_resume(cfg.resume)


def _check_unknown_keys(node: Any, prefix: str = "") -> None:
    # `+key=value` opens the struct flag, so keys added that way reach us: every dataclass node is checked here.
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in allowed:
                full = f"{prefix}{key}"
                if prefix == "method." and node.get("name") == "sft":
                    raise ConfigError(f"{full}: method=sft (full fine-tuning) takes no PEFT keys; drop '{full}' "
                                      "or choose method=lora|ptuning_v2")
                raise ConfigError(f"unknown key '{full}' (allowed: {', '.join(allowed)})")
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_unknown_keys(child, f"{prefix}{key}.")


def _check_method(method: DictConfig) -> None:
    name = method.name
    if name not in METHOD_SCHEMAS:
        raise ConfigError(f"method.name: '{name}' is not one of {', '.join(METHOD_SCHEMAS)}")
    expected = METHOD_SCHEMAS[name]()
    for key in ("peft_type", "task_type"):
        if key in method and method[key] != getattr(expected, key):
            raise ConfigError(f"method.{key}: '{method[key]}' does not fit method={name} "
                              f"(expected '{getattr(expected, key)}')")
    if name == "lora":
        if method.r <= 0:
            raise ConfigError(f"method.r: must be > 0, got {method.r}")
        if method.lora_alpha <= 0:
            raise ConfigError(f"method.lora_alpha: must be > 0, got {method.lora_alpha}")
        if not 0 <= method.lora_dropout < 1:
            raise ConfigError(f"method.lora_dropout: must be in [0, 1), got {method.lora_dropout}")
        if len(method.target_modules) == 0:
            raise ConfigError("method.target_modules: must name at least one module (ChatGLM3: query_key_value)")
    if name == "ptuning_v2" and method.num_virtual_tokens <= 0:
        raise ConfigError(f"method.num_virtual_tokens: must be > 0, got {method.num_virtual_tokens}")


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager")


def _check_model(model: DictConfig) -> None:
    if model.torch_dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.torch_dtype: '{model.torch_dtype}' is not one of {', '.join(MODEL_DTYPES)}")
    if model.attn_implementation not in ATTENTION:
        raise ConfigError(f"model.attn_implementation: '{model.attn_implementation}' is not one of "
                          f"{', '.join(ATTENTION)}")


def _check_lengths(cfg: DictConfig) -> None:
    for key in ("max_input_length", "max_output_length"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key}: must be > 0, got {cfg[key]}")
    if cfg.eval_subset is not None and cfg.eval_subset <= 0:
        raise ConfigError(f"eval_subset: must be > 0 or null (all), got {cfg.eval_subset}")


def _check_training_args(args: DictConfig) -> None:
    for key in ("evaluation_strategy", "save_strategy", "logging_strategy"):
        if args[key] not in STRATEGIES:
            raise ConfigError(f"training_args.{key}: '{args[key]}' is not one of {', '.join(STRATEGIES)}")
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps", "eval_steps"]
    for key in positive:
        if args[key] <= 0:
            raise ConfigError(f"training_args.{key}: must be > 0, got {args[key]}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ConfigError(f"training_args.max_steps: must be > 0 (or -1 to use num_train_epochs), got {args.max_steps}")
    if args.learning_rate <= 0:
        raise ConfigError(f"training_args.learning_rate: must be > 0, got {args.learning_rate}")
    if args.dataloader_num_workers < 0:
        raise ConfigError(f"training_args.dataloader_num_workers: must be >= 0, got {args.dataloader_num_workers}")
    if args.generation_config.max_new_tokens <= 0:
        raise ConfigError("training_args.generation_config.max_new_tokens: must be > 0")
    if args.fp16 and args.bf16:
        raise ConfigError("training_args.fp16 and training_args.bf16 are both true: choose one")
    if args.fp16 and not cuda_available():
        raise ConfigError("training_args.fp16=true needs a CUDA GPU and none is available; "
                          "use training_args.bf16=true on CPU or drop fp16")


def cuda_available() -> bool:
    # Only asked when fp16 is requested, so the common path never pays for importing torch.
    import torch

    return torch.cuda.is_available()


def resolve_path(path: str) -> Path:
    """Relative paths in configs are taken from where the user launched, like any CLI argument."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(os.getcwd()) / p


def check_model_path(model: DictConfig) -> None:
    path = resolve_path(model.path)
    if model.build_if_missing:
        return
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ConfigError(
            f"model.path: '{path}' {what}. Point it at a local chatglm3-6b checkpoint folder "
            f"(config.json, tokenizer.model, weights), e.g. model.path=/models/chatglm3-6b, {QUICKSTART_HINT}")


def data_paths(data: DictConfig) -> dict[str, Path | None]:
    base = resolve_path(data.data_dir)
    return {split: (base / data[key]) if data[key] else None
            for split, key in (("train", "train_file"), ("val", "val_file"), ("test", "test_file"))}


def check_data_files(data: DictConfig) -> None:
    base = resolve_path(data.data_dir)
    for split, path in data_paths(data).items():
        if path is not None and not path.is_file():
            key = {"train": "train_file", "val": "val_file", "test": "test_file"}[split]
            where = "data.data_dir does not exist" if not base.exists() else f"no such file (data.{key})"
            raise ConfigError(f"data: '{path}': {where}. Point data.data_dir=... at your data folder "
                              f"(or data.{key}=... at the file), {QUICKSTART_HINT}")
    if data.num_proc <= 0:
        raise ConfigError(f"data.num_proc: must be > 0, got {data.num_proc}")


def _check_resume(resume: str | None) -> None:
    if resume in (None, "auto"):
        return
    if not resolve_path(resume).is_dir():
        raise ConfigError(f"resume: '{resume}' is not a checkpoint folder; use resume=auto with "
                          "hydra.run.dir=<run folder>, or resume=<run folder>/checkpoint-N")

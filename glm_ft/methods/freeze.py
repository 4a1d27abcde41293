"""Freeze tuning: full fine-tuning of the last N layers and/or named modules, everything else frozen (as
LLaMA-Factory's `finetuning_type: freeze` and ms-swift's `--train_type full --freeze_parameters` offer).

    python train.py method=freeze method.num_trainable_layers=2 model.path=/models/chatglm3-6b ...
    python train.py method=freeze method.num_trainable_layers=0 'method.trainable_modules=[transformer.output_layer.*]'
    python train.py method=freeze method.num_trainable_layers=4 'method.trainable_modules=[*.final_layernorm.*]'

Trainable: every weight of the last `num_trainable_layers` of `transformer.encoder.layers`, plus every parameter
whose name matches one of `trainable_modules` (shell-style patterns, `fnmatch`). A checkpoint holds only the
trained tensors, under their model names (`trained_weights.safetensors`, megabytes to a few GB instead of the whole
model); it opens on the base model recorded in the run's glm_ft_run.json, and export writes base + trained tensors
as one full model.

Limits: the whole model is held in one dtype, fp32 ("auto"; the frozen layers are not kept in bf16, so the trained
layers see the precision they were trained in) or bf16 with model.torch_dtype=bfloat16 (pure bf16 training, as sft;
fp16 is refused); DeepSpeed ZeRO-3 is refused (sharded parameters would need gathering to save only the trained
ones).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from glm_ft.errors import CheckpointError, ConfigError
from glm_ft.methods.common import require, zero_stage

NAME = "freeze"
KIND = "freeze"
DESCRIPTION = "freeze-tuned weights"
SUMMARY = "freeze tuning"
FROZEN_BASE = False  # the trained layers are whole base layers: one dtype throughout (fp32 or pure bf16)
WHOLE_MODEL = False  # a checkpoint opens on the base model
EXPORTED = "trained layers in place of the base's"  # what `export` made of it
PEFT_CONFIG_KEYS = None
TRAINED_WEIGHTS = "trained_weights.safetensors"
_LAYERS = "transformer.encoder.layers."


@dataclass
class Schema:
    name: str = "freeze"
    # The last N transformer layers train (all their weights); 0 = none, only trainable_modules.
    num_trainable_layers: int = 2
    # Parameter-name patterns (fnmatch) that train as well, e.g. transformer.output_layer.*
    trainable_modules: List[str] = field(default_factory=list)


def validate(method, cfg) -> None:
    require(method.num_trainable_layers >= 0, "num_trainable_layers",
            f"must be >= 0, got {method.num_trainable_layers}")
    for pattern in method.trainable_modules:
        require(isinstance(pattern, str) and pattern.strip() != "", "trainable_modules",
                f"patterns must be non-empty strings, got {pattern!r}")
    require(method.num_trainable_layers > 0 or len(method.trainable_modules) > 0, "num_trainable_layers",
            "0 with no method.trainable_modules trains nothing; set one of them")
    if zero_stage(cfg) == 3:
        raise ConfigError("deepspeed: method=freeze does not run under ZeRO-3 (sharded parameters); "
                          "choose deepspeed=zero2 or none")


def peft_config(values: dict) -> None:
    return None


def trainable_names(model, method) -> list[str]:
    """Parameter names that train; ConfigError (naming the key) when the selection does not fit the model."""
    layers = model.config.num_layers
    n = method.num_trainable_layers
    if n > layers:
        raise ConfigError(f"method.num_trainable_layers: {n} exceeds the model's {layers} layers")
    prefixes = tuple(f"{_LAYERS}{i}." for i in range(layers - n, layers))
    names = [name for name, _ in model.named_parameters()]
    chosen = {name for name in names if name.startswith(prefixes)}
    for pattern in method.trainable_modules:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ConfigError(f"method.trainable_modules: '{pattern}' matches no parameter of the model "
                              f"(names look like {names[1]})")
        chosen.update(matched)
    return [name for name in names if name in chosen]


def apply(model, method, seed: int):
    chosen = set(trainable_names(model, method))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return model


def save(model, output_dir: str) -> bool:
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, out / TRAINED_WEIGHTS, metadata={"format": "pt"})
    model.config.to_json_file(str(out / "model_config.json"))  # for reading; not config.json: not a whole model
    return True


def load_trained(model, folder: Path):
    """Copy the checkpoint's tensors into `model` (in its dtype), after checking each name and shape."""
    import torch
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    saved = load_file(folder / TRAINED_WEIGHTS)
    for name, tensor in saved.items():
        target = params.get(name)
        if target is None:
            raise CheckpointError(f"{folder / TRAINED_WEIGHTS}: {name} is not a weight of the base model")
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{folder / TRAINED_WEIGHTS}: {name} is {list(tensor.shape)}, the base model's "
                                  f"is {list(target.shape)} (another model shape)")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model


def load_for_resume(model, folder: str) -> bool:
    load_trained(model, Path(folder))
    return True


def create_optimizer(model, args, method):
    return None


def holds_checkpoint(folder: Path) -> bool:
    return (folder / TRAINED_WEIGHTS).is_file()


def recorded_base(folder: Path, read_json) -> str | None:
    return None


def hf_export_refusal(ckpt) -> str | None:
    return None


def load_onto(model, ckpt, merge: bool):
    return load_trained(model, ckpt.path)

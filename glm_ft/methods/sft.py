"""Full fine-tuning: every weight trains (the documented sft.yaml; DeepSpeed ZeRO-3 by default).

    python train.py method=sft model.path=/models/chatglm3-6b data.data_dir=/data/AdvertiseGen
    torchrun --nproc_per_node 8 train.py method=sft deepspeed=zero3 ...

Checkpoints are whole model folders (config.json + model.safetensors), the Trainer's own save; any plain model
folder (the published checkpoint, an export, a reference-demo P-Tuning v2 whole model) opens as this kind.

Limits: fp32 master weights ("auto" dtype) and the optimizer state of every weight: for 6B, DeepSpeed ZeRO-3 on
several GPUs, or model.torch_dtype=bfloat16 (pure bf16, half the memory; fp16 is refused: glm_ft.methods'
check_training_dtype); the checkpoint is logged to MLflow as a path tag unless tracking.log_full_model=true.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

NAME = "sft"
KIND = "full"
DESCRIPTION = "full model"
SUMMARY = "full fine-tuning"
FROZEN_BASE = False  # every weight trains, in the loaded dtype: fp32 ("auto") or pure bf16
WHOLE_MODEL = True  # a checkpoint is a whole model folder (gigabytes: MLflow gets a path tag)
EXPORTED = None  # re-saved as it is
PEFT_CONFIG_KEYS = None
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass
class Schema:
    name: str = "sft"


def validate(method, cfg) -> None:
    return None  # no keys of its own; unknown ones are refused by the key check


def peft_config(values: dict) -> None:
    return None  # full fine-tuning has no peft_config block in finetune.yaml


def apply(model, method, seed: int):
    return model


def save(model, output_dir: str) -> bool:
    return False  # the Trainer's own save_pretrained


def load_for_resume(model, folder: str) -> bool:
    return False


def create_optimizer(model, args, method):
    return None


def holds_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in MODEL_WEIGHTS)


def recorded_base(folder: Path, read_json) -> str | None:
    return None


def hf_export_refusal(ckpt) -> str | None:
    """A whole model with a prefix (a reference-demo P-Tuning v2 checkpoint) has no place in the GLM layout."""
    from glm_ft.methods.ptuning_v2 import HF_EXPORT_REFUSAL

    try:
        has_prefix = bool(json.loads((ckpt.path / "config.json").read_text(encoding="utf-8")).get("pre_seq_len"))
    except (OSError, ValueError):
        has_prefix = False  # the loader reports a bad config.json with its own message
    return HF_EXPORT_REFUSAL if has_prefix else None


def load_onto(model, ckpt, merge: bool):
    return model  # the folder is the model

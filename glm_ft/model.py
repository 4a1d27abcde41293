"""Model config → tokenizer + ChatGLM3 with the chosen method applied (glm_ft/methods/: LoRA, P-Tuning v2, ...).

One loader for training, resume, chat and export, so a checkpoint opens the same way everywhere. Heavy: imported
once training or loading starts (glm_ft.train.finetune, glm_ft.infer.checkpoint.load_checkpoint).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from glm_ft import chatglm3, methods
from glm_ft.chatglm3.tiny import ensure_tiny_model
from glm_ft.errors import CheckpointError
from glm_ft.config.paths import InputPaths, input_paths
from glm_ft.config.schema import DEMO_MODEL_DIR
from glm_ft.train.demo_base import ensure_demo_model

log = logging.getLogger(__name__)


def base_model_dir(where: InputPaths) -> Path:
    """The base model's folder; the tiny model is built there first when it is missing."""
    if not where.builds_tiny_model:
        return where.model_dir
    if where.model_dir.resolve() == DEMO_MODEL_DIR.resolve():
        return ensure_demo_model(where.model_dir)  # the tiny model trained a little (model=tiny_demo)
    return ensure_tiny_model(where.model_dir)


def load_tokenizer(model_dir: Path):
    chatglm3.register()

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({err})") from err


def load_base_model(model_dir: Path, dtype, attn_implementation: str = "sdpa"):
    chatglm3.register()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{model_dir}: cannot load the model ({err})") from err
    except refused_weights_errors() as err:
        raise CheckpointError(f"{model_dir}: {refused_weights_reason(err)}") from None
    return model


def refused_weights_errors() -> tuple[type[BaseException], ...]:
    """What loading a weights file raises when glm-ft refuses it: a pickle weights_only=True rejects, a damaged
    safetensors file."""
    return (pickle.UnpicklingError, SafetensorError)


def refused_weights_reason(err: BaseException) -> str:
    """One line for a refused weights file: torch's weights_only message is a page of advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError):
        # torch names what it blocked ("... unsupported GLOBAL posix.system ...") among paragraphs of advice.
        detail = next((line for line in lines if "global" in line.lower() or "unpickler" in line.lower()),
                      "it holds more than tensors")
        return (f"refused a pickled weights file, loaded with weights_only=True: {detail[:200]}")
    return f"damaged safetensors file ({lines[0] if lines else type(err).__name__})"


def apply_method(model, method: DictConfig, seed: int):
    """Make the method's weights the trainable ones (glm_ft/methods/). Seeded here so LoRA/prefix init is
    reproducible, which resume relies on."""
    set_seed(seed)
    model = methods.get(method.name).apply(model, method, seed)
    if not methods.trainable_in_fp32(method.name):
        return model  # base weights train in the dtype model.torch_dtype chose (methods.check_training_dtype)
    # An adapter or prefix stays fp32 over a bf16/fp16 frozen base: the optimizer needs the precision.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def parameter_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"model.trainable_parameters": trainable, "model.total_parameters": total}


def load_for_training(cfg: DictConfig) -> tuple[Any, Any, Path]:
    """Tokenizer, model with the method applied, and the base model folder."""
    model_dir = base_model_dir(input_paths(cfg))
    tokenizer = load_tokenizer(model_dir)
    return tokenizer, load_model_for_training(cfg, model_dir), model_dir


def load_model_for_training(cfg: DictConfig, model_dir: Path):
    """The base model of `model_dir` with the method applied (the weights: the slow part, minutes for 6B)."""
    args = cfg.training_args
    dtype = methods.torch_dtype(cfg.model.torch_dtype, method=cfg.method.name, bf16=args.bf16, fp16=args.fp16)
    note = methods.training_dtype_note(cfg.model.torch_dtype, cfg.method.name, deepspeed=cfg.deepspeed is not None)
    if note:
        log.info(note)
    model = load_base_model(model_dir, dtype, cfg.model.attn_implementation)
    model.config.use_cache = False  # training; generate() turns the cache on by itself
    return apply_method(model, cfg.method, cfg.seed)

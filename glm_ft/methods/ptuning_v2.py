"""P-Tuning v2 on ChatGLM3's own prefix encoder (the reference demo's method; glm_ft/chatglm3/prefix.py).

    python train.py method=ptuning_v2 method.num_virtual_tokens=128 model.path=/models/chatglm3-6b ...

Checkpoints hold only the prefix (`prefix_encoder.safetensors` + `prefix_config.json`, kilobytes). A model folder
that already carries a prefix (a reference-demo whole-model checkpoint) continues training it.

Limits: `--format hf` export is refused (transformers' GlmForCausalLM has no prefix encoder); the THUDM-layout
export keeps the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glm_ft.errors import CheckpointError, ConfigError
from glm_ft.methods.common import model_shape, changed_or_listed, check_fixed, defaults, require
from glm_ft.runs import PREFIX_WEIGHTS

NAME = "ptuning_v2"
KIND = "ptuning_v2"
DESCRIPTION = "P-Tuning v2 prefix"
SUMMARY = "P-Tuning v2"
FROZEN_BASE = True
# The names glm_ft.chatglm3.prefix writes; not imported from there because that module pulls in torch, and
# finding a checkpoint (and failing on a wrong path) should take no time.
PREFIX_TENSOR = "transformer.prefix_encoder.embedding.weight"
WHOLE_MODEL = False  # a checkpoint opens on the base model
EXPORTED = "prefix saved beside the base weights"  # what `export` made of it
PEFT_CONFIG_KEYS = ["peft_type", "task_type", "num_virtual_tokens"]
HF_EXPORT_REFUSAL = ("P-Tuning v2 cannot be exported with --format hf: transformers' GlmForCausalLM has no prefix "
                     "encoder; export it in the THUDM layout (the default, --format chatglm3) or serve it with "
                     "`python -m glm_ft serve RUN`")


@dataclass
class Schema:
    name: str = "ptuning_v2"
    peft_type: str = "PREFIX_TUNING"
    task_type: str = "CAUSAL_LM"
    num_virtual_tokens: int = 128
    prefix_projection: bool = False


def validate(method, cfg) -> None:
    check_fixed(method, Schema)
    require(method.num_virtual_tokens > 0, "num_virtual_tokens", f"must be > 0, got {method.num_virtual_tokens}")


def peft_config(values: dict) -> dict:
    return changed_or_listed(values, defaults(Schema), PEFT_CONFIG_KEYS)


def apply(model, method, seed: int):
    from glm_ft.chatglm3.prefix import enable_ptuning_v2

    try:
        return enable_ptuning_v2(model, method.num_virtual_tokens, prefix_projection=method.prefix_projection,
                                 seed=seed)
    except ValueError as err:
        raise ConfigError(f"method.num_virtual_tokens={method.num_virtual_tokens}: model.path holds a P-Tuning v2 "
                          f"prefix already ({err}); set method.num_virtual_tokens={model.config.pre_seq_len} "
                          f"method.prefix_projection={str(model.config.prefix_projection).lower()} "
                          "to continue training it") from err


def save(model, output_dir: str) -> bool:
    from glm_ft.chatglm3.prefix import save_prefix

    save_prefix(model, output_dir)
    return True


def load_for_resume(model, folder: str) -> bool:
    from glm_ft.chatglm3.prefix import load_prefix

    load_prefix(model, folder)
    return True


def create_optimizer(model, args, method):
    return None


def holds_checkpoint(folder: Path) -> bool:
    return (folder / PREFIX_WEIGHTS).is_file()


def recorded_base(folder: Path, read_json) -> str | None:
    return None


def hf_export_refusal(ckpt) -> str | None:
    return HF_EXPORT_REFUSAL


def load_onto(model, ckpt, merge: bool):
    from safetensors import safe_open

    from glm_ft.chatglm3.prefix import load_prefix

    cfg = model.config
    kv_size = cfg.num_layers * 2 * cfg.num_key_value_heads * cfg.kv_channels
    with safe_open(ckpt.path / PREFIX_WEIGHTS, framework="pt") as f:
        shape = list(f.get_slice(PREFIX_TENSOR).get_shape()) if PREFIX_TENSOR in f.keys() else None
    if shape is None:
        raise CheckpointError(f"{ckpt.path / PREFIX_WEIGHTS}: holds no {PREFIX_TENSOR}")
    if len(shape) != 2 or shape[1] != kv_size:
        raise CheckpointError(
            f"the P-Tuning v2 prefix {ckpt.path} was trained for another model shape than the base model "
            f"{ckpt.base_model}: its {PREFIX_TENSOR} is {shape}, this model needs [{shape[0]}, {kv_size}] "
            f"(= [num_virtual_tokens, num_layers·2·groups·kv_channels]; {model_shape(cfg)})")
    try:
        return load_prefix(model, ckpt.path)
    except ValueError as err:  # the base model carries a prefix of another size already
        raise CheckpointError(f"{ckpt.path}: cannot attach the prefix to {ckpt.base_model}: {err}") from err

"""Fine-tuning methods, one module each, found here by name (`method.name`, the conf/method/*.yaml file).

A method module holds everything that differs between methods:
- config: `Schema` (the dataclass Hydra composes into), `validate(method, cfg)` (one line naming the key),
  `peft_config(values)` (its block in finetune.yaml, or None), `SUMMARY`;
- model: `apply(model, method, seed)` (what becomes trainable), `FROZEN_BASE` (True: the base weights stay frozen,
  so they may sit in the mixed-precision dtype; False: the method trains base weights; the dtype policy below),
  `create_optimizer(model, args, method)` (None: the Trainer's);
- checkpoints: `save(model, dir)` / `load_for_resume(model, dir)` (False: the Trainer's own), `KIND`,
  `DESCRIPTION`, `holds_checkpoint(folder)`, `WHOLE_MODEL` (a checkpoint is a model folder, else it opens on the
  base), `recorded_base(folder, read_json)`, `load_onto(base_model, ckpt, merge)` (chat, predict, serve, export),
  `hf_export_refusal(ckpt)`, `EXPORTED` (what export made of the trained part, said when it ends).
Nothing outside this package compares a method name. Adding a method: a module here, listed in METHODS, its
conf/method/NAME.yaml and tests/methods/test_NAME.py.

The modules import only light things at top level: glm_ft.config builds its schema and validation from this
registry, and a bad value must be refused before torch, transformers or peft are imported (tests/test_bad_input.py);
torch and peft are imported inside the functions that apply, save and load weights.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from glm_ft.errors import CheckpointError, ConfigError
from glm_ft.methods import freeze, lora, ptuning_v2, sft

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (lora, ptuning_v2, sft, freeze)}
# Checkpoint kind -> method; `holds_checkpoint` is tried in this order, a plain model folder (sft) last.
_BY_KIND: dict[str, ModuleType] = {m.KIND: m for m in (lora, ptuning_v2, freeze, sft)}
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise ConfigError(f"method.name: '{name}' is not one of {', '.join(METHODS)}")
    return METHODS[name]


def by_kind(kind: str) -> ModuleType:
    return _BY_KIND[kind]


def kind_of(folder: Path) -> str | None:
    """The checkpoint kind a folder holds (what its files say), or None."""
    return next((kind for kind, method in _BY_KIND.items() if method.holds_checkpoint(folder)), None)


def torch_dtype(name: str | None, *, method: str | None = None, bf16: bool = False, fp16: bool = False,
                device: str = "cpu"):
    """The one dtype policy. A name wins (`check_training_dtype` refused the names a method cannot train in);
    "auto" (or None) means:
    - training (`method` given): the frozen base of a method with FROZEN_BASE in the mixed-precision dtype the
      Trainer computes in (memory), fp32 for methods that train base weights (AMP / DeepSpeed keep fp32 masters);
    - inference: bf16 (fp16 where the GPU lacks bf16) on a GPU, fp32 on the CPU, where half precision is slow."""
    import torch

    if name in (None, "auto"):
        if method is not None:
            name = ("bfloat16" if bf16 else "float16" if fp16 else "float32") if get(method).FROZEN_BASE \
                else "float32"
        elif device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            name = "float32"
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"dtype {name!r}: expected auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def check_training_dtype(name: str, method: str, *, bf16: bool, fp16: bool, deepspeed: bool) -> None:
    """`model.torch_dtype` against a method that trains base weights, before the model loads (light: no torch).
    Adapters and prefixes are kept fp32 over any base (`trainable_in_fp32`), so only those methods are judged.
    An explicit bfloat16 is trained as asked, as the HF Trainer trains a bf16-loaded model: pure bf16 (no fp32 master
    copy), or under DeepSpeed its bf16 mode (fp32 master copy in the optimizer), which needs training_args.bf16."""
    if get(method).FROZEN_BASE or name not in ("bfloat16", "float16"):
        return  # adapters are fp32 over any base; auto and float32 train fp32 weights; _check_model judges the rest
    if name == "float16":
        raise ConfigError(f"model.torch_dtype: float16 with method={method} trains the weights themselves in fp16, "
                          "with no fp32 master copy (updates round away, gradients overflow); use bfloat16 (pure "
                          "bf16) or auto (fp32 weights; training_args.fp16=true for fp16 mixed precision)")
    if fp16:
        raise ConfigError(f"model.torch_dtype: bfloat16 with training_args.fp16=true: method={method} would train "
                          "bf16 weights under fp16 autocast; use training_args.bf16=true, or model.torch_dtype=auto "
                          "for fp16 mixed precision over fp32 weights")
    if deepspeed and not bf16:
        raise ConfigError("model.torch_dtype: bfloat16 under DeepSpeed needs training_args.bf16=true (its config's "
                          "bf16.enabled follows it: bf16 weights with an fp32 master copy); or use "
                          "model.torch_dtype=auto for fp32 training")


def trainable_in_fp32(method: str) -> bool:
    """Whether the trainable weights are upcast to fp32 over a bf16/fp16 base: a method's own added weights
    (adapter, prefix) are, as PEFT does; base weights a method trains keep the dtype the user chose."""
    return get(method).FROZEN_BASE


def training_dtype_note(name: str, method: str, *, deepspeed: bool) -> str | None:
    """The log line for base weights trained in bf16 (what `check_training_dtype` let through), else None."""
    if get(method).FROZEN_BASE or name != "bfloat16":
        return None
    if deepspeed:
        return (f"model.torch_dtype=bfloat16: method={method} trains bf16 weights under DeepSpeed's bf16 mode "
                "(DeepSpeed keeps the fp32 master copy and optimizer states)")
    return (f"model.torch_dtype=bfloat16: method={method} trains in pure bf16 (weights, gradients and optimizer "
            "states in bf16, no fp32 master copy); model.torch_dtype=auto trains fp32 weights")

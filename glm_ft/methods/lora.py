"""LoRA (PEFT) on ChatGLM3's query_key_value, with the variants PEFT has: DoRA, rsLoRA, PiSSA/OLoRA init, LoRA+.

    python train.py method=lora model.path=/models/chatglm3-6b data.data_dir=/data/AdvertiseGen
    python train.py method=lora method.r=16 method.use_dora=true              # DoRA: magnitude + direction
    python train.py method=lora method.use_rslora=true                        # scaling lora_alpha/sqrt(r)
    python train.py method=lora method.init_lora_weights=pissa                # PiSSA (also olora, pissa_niter_4)
    python train.py method=lora method.loraplus_lr_ratio=16                   # LoRA+: lora_B learns 16x faster

Checkpoints are PEFT adapters (adapter_config.json + adapter_model.safetensors) that PeftModel.from_pretrained
opens on the unchanged base model. PiSSA and OLoRA move the adapter's initial part out of the base weights; each
checkpoint is therefore saved converted to a plain LoRA of rank 2r (PEFT's path_initial_model_for_weight_conversion:
ΔW = AB - A0B0 = [A|A0][B|-B0]), with the initial adapter beside it in `initial_adapter/`. The converted adapter's
first r ranks are the trained ones: resume re-applies the (deterministic, seeded) initialisation to the base and
takes those.

Limits: PiSSA/OLoRA cannot be combined with DoRA (PEFT's conversion has no magnitude vector) nor run under DeepSpeed
ZeRO-3 (the conversion needs the whole adapter at each save); initialisations that
need data or quantisation (eva, corda, loftq) are not offered; LoRA+ builds its own optimizer, so a deepspeed group
whose config defines an `optimizer` is refused with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from glm_ft.errors import CheckpointError, ConfigError
from glm_ft.methods.common import model_shape, changed_or_listed, check_fixed, defaults, require, zero_stage

NAME = "lora"
KIND = "lora"
DESCRIPTION = "LoRA adapter"
SUMMARY = "LoRA"
FROZEN_BASE = True  # only the adapter trains: the base may sit in bf16/fp16
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INITIAL_ADAPTER = "initial_adapter"
# The documented lora.yaml's keys: always in finetune.yaml's peft_config; the others when changed.
WHOLE_MODEL = False  # a checkpoint opens on the base model
EXPORTED = "merged into the base weights"  # what `export` made of it
PEFT_CONFIG_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout"]
# init_lora_weights values offered: PEFT's that need neither data (eva, corda) nor quantisation (loftq).
INITS = (True, False, "gaussian", "pissa", "olora", "orthogonal")
_PISSA_NITER = re.compile(r"pissa_niter_\d+")
# ChatGLM3's modules a LoRA adapter can wrap (its Linear and Embedding layers), by the last part of their names:
# checked before the model loads (tests/methods/test_lora.py holds this against the real model).
MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings", "output_layer")
# These move the adapter's initial value out of the base weights: saved converted to a plain LoRA.
_MUTATES_BASE = ("pissa", "olora")


@dataclass
class Schema:
    name: str = "lora"
    peft_type: str = "LORA"
    task_type: str = "CAUSAL_LM"
    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # The documented YAML leaves this out because ChatGLM3 must use query_key_value; kept overridable.
    target_modules: List[str] = field(default_factory=lambda: ["query_key_value"])
    use_dora: bool = False
    use_rslora: bool = False
    # true (B = 0, a no-op at start), false, gaussian, pissa, pissa_niter_N, olora, orthogonal.
    init_lora_weights: Any = True
    # LoRA+: lora_B's learning rate is this times lora_A's (training_args.learning_rate); null = plain LoRA.
    loraplus_lr_ratio: Optional[float] = None


def validate(method, cfg) -> None:
    check_fixed(method, Schema)
    require(method.r > 0, "r", f"must be > 0, got {method.r}")
    require(method.lora_alpha > 0, "lora_alpha", f"must be > 0, got {method.lora_alpha}")
    require(0 <= method.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {method.lora_dropout}")
    require(len(method.target_modules) > 0, "target_modules",
            "must name at least one module (ChatGLM3: query_key_value)")
    for name in method.target_modules:
        # A dotted name (self_attention.dense) or PEFT's all-linear is matched on the loaded model (apply).
        require(isinstance(name, str) and (name in MODULES or "." in name or name == "all-linear"),
                "target_modules", f"{name!r} is not a ChatGLM3 module LoRA can wrap ({', '.join(MODULES)})")
    for key in ("use_dora", "use_rslora"):
        require(isinstance(method[key], bool), key, f"must be true or false, got {method[key]!r}")
    init = method.init_lora_weights
    require(init in INITS or (isinstance(init, str) and _PISSA_NITER.fullmatch(init)), "init_lora_weights",
            f"{init!r} is not one of true, false, {', '.join(i for i in INITS if isinstance(i, str))}, pissa_niter_N")
    require(not (mutates_base(init) and method.use_dora), "init_lora_weights",
            f"{init} cannot be combined with method.use_dora=true (PEFT converts only plain LoRA back)")
    require(not (mutates_base(init) and zero_stage(cfg) == 3), "init_lora_weights",
            f"{init} is not supported under DeepSpeed ZeRO-3 (the conversion needs the whole adapter on each save)")
    ratio = method.loraplus_lr_ratio
    require(ratio is None or (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0
                              and ratio != float("inf")), "loraplus_lr_ratio", f"must be > 0 or null, got {ratio!r}")
    require(ratio is None or cfg.deepspeed is None or "optimizer" not in cfg.deepspeed, "loraplus_lr_ratio",
            "LoRA+ builds its own optimizer; the deepspeed config defines one (drop it with ~deepspeed, or choose deepspeed=zero2)")


def mutates_base(init: Any) -> bool:
    return isinstance(init, str) and init.startswith(_MUTATES_BASE)


def peft_config(values: dict) -> dict:
    # LoRA+ is an optimizer, not a LoraConfig field: the reference demo's get_peft_config would reject it.
    values = {k: v for k, v in values.items() if k != "loraplus_lr_ratio"}
    return changed_or_listed(values, defaults(Schema), PEFT_CONFIG_KEYS)


def lora_config(method):
    from glm_ft.methods.adapter_config import PortableLoraConfig

    return PortableLoraConfig(task_type="CAUSAL_LM", r=method.r, lora_alpha=method.lora_alpha,
                              lora_dropout=method.lora_dropout, target_modules=list(method.target_modules),
                              use_dora=method.use_dora, use_rslora=method.use_rslora,
                              init_lora_weights=method.init_lora_weights)


def apply(model, method, seed: int):
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from peft.utils.error import NoMatchingPeftModuleError

    try:
        model = get_peft_model(model, lora_config(method))
    except NoMatchingPeftModuleError:
        raise ConfigError(f"method.target_modules: {list(method.target_modules)} match no module of the model "
                          f"(ChatGLM3's: {', '.join(MODULES)})") from None
    if mutates_base(method.init_lora_weights):
        # The initial adapter, needed to convert each checkpoint to a plain LoRA (the base no longer holds it).
        model.glm_ft_initial_adapter = {k: v.detach().to("cpu", copy=True)
                                        for k, v in get_peft_model_state_dict(model).items()}
    return model


def save(model, output_dir: str) -> bool:
    """PiSSA/OLoRA: the adapter converted to a plain LoRA; otherwise the Trainer's own PEFT save (False)."""
    initial = getattr(model, "glm_ft_initial_adapter", None)
    if initial is None:
        return False
    from safetensors.torch import save_file

    out = Path(output_dir)
    (out / INITIAL_ADAPTER).mkdir(parents=True, exist_ok=True)
    save_file(initial, out / INITIAL_ADAPTER / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(out / INITIAL_ADAPTER))
    return True


def load_for_resume(model, folder: str) -> bool:
    """PiSSA/OLoRA: the trained ranks (the first r of the converted adapter) into the re-initialised model."""
    initial = getattr(model, "glm_ft_initial_adapter", None)
    if initial is None:
        return False
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(Path(folder) / ADAPTER_WEIGHTS)
    trained = {}
    for key, start in initial.items():
        r = start.shape[0] if ".lora_A." in key else start.shape[1]
        trained[key] = saved[key][:r] if ".lora_A." in key else saved[key][:, :r]
    result = set_peft_model_state_dict(model, trained)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{folder}: adapter tensors this model lacks: {result.unexpected_keys[:3]}")
    return True


def create_optimizer(model, args, method):
    """LoRA+ (peft.optimizers.create_loraplus_optimizer) with the Trainer's optimizer class and settings; None:
    the Trainer's own optimizer."""
    if method.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    # PEFT gives every group its own weight decay, `loraplus_weight_decay` (default 0.0), which overrides the
    # optimizer's `weight_decay`: without it training_args.weight_decay would be silently dropped.
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate,
                                     loraplus_lr_ratio=float(method.loraplus_lr_ratio),
                                     loraplus_weight_decay=args.weight_decay,
                                     weight_decay=args.weight_decay, **kwargs)


# --- checkpoints -------------------------------------------------------------------------------------------------


def holds_checkpoint(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def recorded_base(folder: Path, read_json) -> str | None:
    """The base model an adapter outside a run names (PEFT's base_model_name_or_path)."""
    return read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path") or None


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_adapter_fits(model, folder: Path, base: Path) -> None:
    """Compare the adapter's tensor shapes and layers with the model before PEFT sees them: PEFT would report a
    mismatch as a long multi-line size error, or silently leave the layers the adapter lacks unadapted."""
    from safetensors import safe_open


    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}")
    modules = dict(model.named_modules())
    cfg = model.config
    what = f"the LoRA adapter {folder} was trained for another model shape than the base model {base}"
    layers = set()
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if match is None:
                continue
            name = match["module"]
            layers.update(int(i) for i in _LAYER.findall(name))
            target = modules.get(name)
            if target is None:
                raise CheckpointError(f"{what}: it adapts {name}, which the base model ({model_shape(cfg)}) lacks")
            shape = list(f.get_slice(key).get_shape())
            r = shape[0] if match["ab"] == "A" else shape[1]
            expected = [r, target.in_features] if match["ab"] == "A" else [target.out_features, r]
            if shape != expected:
                raise CheckpointError(f"{what}: {key} is {shape} in the adapter but {expected} for this model "
                                      f"({model_shape(cfg)})")
    selected = _selected_layers(model, folder, cfg.num_layers)
    if layers and layers != selected:
        # An adapter whose target_modules name some layers only (a dotted name) covers just those: what must match
        # is the layers its own target_modules select on this model, not all of them.
        raise CheckpointError(f"{what}: the adapter covers {len(layers)} layers ({_listed(layers)}), its "
                              f"target_modules select {len(selected)} of the base model's {cfg.num_layers} "
                              f"({_listed(selected)})")


def _selected_layers(model, folder: Path, num_layers: int) -> set[int]:
    """The layers whose modules the adapter's own config (target_modules, layers_to_transform) selects on `model`,
    matched as PEFT matches them when it loads the adapter; all layers when the config cannot be read (PEFT then
    reports it)."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError):
        return set(range(num_layers))
    return {int(i) for name, _ in model.named_modules() if name and check_target_module_exists(config, name)
            for i in _LAYER.findall(name)}


def _listed(layers: set[int]) -> str:
    return ", ".join(map(str, sorted(layers))) or "none"


def load_onto(model, ckpt, merge: bool):
    """The adapter on the base model: a PeftModel, or merged into the base weights (export)."""
    from peft import PeftModel

    check_adapter_fits(model, ckpt.path, ckpt.base_model)
    try:
        model = PeftModel.from_pretrained(model, str(ckpt.path), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{ckpt.path}: cannot load the LoRA adapter onto {ckpt.base_model}: {first_line}") from err
    return model.merge_and_unload() if merge else model


def hf_export_refusal(ckpt) -> str | None:
    return None  # merged into the base weights first

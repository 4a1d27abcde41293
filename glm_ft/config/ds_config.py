"""The DeepSpeed config: its checks and its "auto" values, as transformers and DeepSpeed will take them.

Checked before any weights load: a contradiction with training_args (transformers reports it only inside train(),
and DeepSpeed silently maps some "auto" values to its defaults), a key of the ZeRO section DeepSpeed does not take
(read from DeepSpeed's own source, nothing imported), and the section's values as DeepSpeed's own model judges them
(that one imports deepspeed: the caller runs it where the run would import it next), and an `optimizer` or
`scheduler` section that transformers would run instead of training_args' own. `resolve_deepspeed` fills every
"auto" exactly as transformers' HfTrainerDeepSpeedConfig will (glm_ft.config.render writes the result).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from glm_ft import dist
from glm_ft.config.keys import closest
from glm_ft.errors import ConfigError


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


def _training_fills(args: DictConfig) -> list[tuple[str, Any, str]]:
    """(deepspeed key, value from training_args, training_args key): HfTrainerDeepSpeedConfig's first stage."""
    batch = dist.world_size() * args.per_device_train_batch_size * args.gradient_accumulation_steps
    return [
        ("train_micro_batch_size_per_gpu", args.per_device_train_batch_size,
         "training_args.per_device_train_batch_size"),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps, "training_args.gradient_accumulation_steps"),
        ("train_batch_size", batch, "training_args.per_device_train_batch_size × gradient_accumulation_steps × "
                                    f"world size {dist.world_size()}"),
        ("gradient_clipping", args.max_grad_norm, "training_args.max_grad_norm"),
        ("optimizer.params.lr", args.learning_rate, "training_args.learning_rate"),
        ("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "training_args.adam_beta1/adam_beta2"),
        ("optimizer.params.eps", args.adam_epsilon, "training_args.adam_epsilon"),
        ("optimizer.params.weight_decay", args.weight_decay, "training_args.weight_decay"),
        ("scheduler.params.warmup_max_lr", args.learning_rate, "training_args.learning_rate"),
        ("fp16.enabled", bool(args.fp16), "training_args.fp16"),
        ("bf16.enabled", bool(args.bf16), "training_args.bf16"),
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


# training_args.optim values that are the AdamW a DeepSpeed `optimizer` section of type Adam/AdamW runs.
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def _check_optimizer_and_scheduler(ds: dict, args: DictConfig) -> None:
    """transformers builds the optimizer and the schedule from training_args unless the DeepSpeed config has a
    section of its own (integrations/deepspeed.py, deepspeed_optim_sched), and then ignores training_args' without a
    word: a scheduler section replaces lr_scheduler_type, lr_scheduler_kwargs and the warmup's shape, an optimizer
    section replaces optim. Only what says the same as training_args is let through."""
    if "scheduler" in ds:
        raise ConfigError(f"deepspeed.scheduler: transformers would run it instead of training_args.lr_scheduler_type="
                          f"{args.lr_scheduler_type} (and its lr_scheduler_kwargs and warmup) without a word; glm-ft "
                          "schedules from training_args, which DeepSpeed runs as it is: drop the section "
                          "(~deepspeed.scheduler) and set training_args.lr_scheduler_type (DeepSpeed's WarmupLR is "
                          "constant_with_warmup, WarmupDecayLR is linear)")
    if "optimizer" not in ds:
        return
    section = ds["optimizer"]
    kind = section.get("type") if isinstance(section, dict) else None
    if not isinstance(kind, str):
        raise ConfigError(f"deepspeed.optimizer: {section!r} has no type; remove the section with ~deepspeed.optimizer "
                          "(the Trainer then builds training_args.optim) or set deepspeed.optimizer.type=AdamW")
    if kind.lower() not in ("adam", "adamw"):
        raise ConfigError(f"deepspeed.optimizer.type={kind} would train instead of training_args.optim={args.optim} "
                          "without a word; set deepspeed.optimizer.type=AdamW or remove the section with "
                          "~deepspeed.optimizer (the Trainer then builds training_args.optim)")
    if (section.get("params") or {}).get("adam_w_mode", True) is False:  # DeepSpeed's Adam with L2, not AdamW
        raise ConfigError(f"deepspeed.optimizer.params.adam_w_mode=false makes DeepSpeed's {kind} an Adam with L2 "
                          f"weight decay, not the AdamW of training_args.optim={args.optim}; drop the key, or remove "
                          "the section with ~deepspeed.optimizer")
    if args.optim not in ADAMW_OPTIMS:
        raise ConfigError(f"training_args.optim={args.optim}: the DeepSpeed config's optimizer ({kind}) would train "
                          "instead without a word; remove it with ~deepspeed.optimizer to train with "
                          f"{args.optim}, or set training_args.optim to one of {', '.join(ADAMW_OPTIMS)}")


def check_deepspeed(cfg: DictConfig) -> None:
    """Reject a DeepSpeed config that contradicts training_args or that DeepSpeed would refuse."""
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    _check_optimizer_and_scheduler(ds, cfg.training_args)
    stage = _get(ds, "zero_optimization.stage")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: {stage!r} is not one of 0, 1, 2, 3")
    if _get(ds, "fp16.enabled") is True and _get(ds, "bf16.enabled") is True:
        raise ConfigError("deepspeed.fp16.enabled and deepspeed.bf16.enabled are both true: DeepSpeed allows one")
    for key, value, source in _training_fills(cfg.training_args):
        explicit = _get(ds, key)
        if explicit is None or explicit == "auto":
            continue
        if isinstance(explicit, str):
            raise ConfigError(f"deepspeed.{key}: '{explicit}' must be a number or \"auto\"")
        if not _same(explicit, value):
            raise ConfigError(f"deepspeed.{key}={explicit} contradicts {source}={value}; "
                              f"set deepspeed.{key}=auto or make them equal")
    for key in ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.stage3_param_persistence_threshold", "zero_optimization.allgather_bucket_size"):
        value = _get(ds, key)
        if value is not None and value != "auto" and (isinstance(value, (str, bool)) or value <= 0):
            raise ConfigError(f"deepspeed.{key}: must be a positive number or \"auto\", got {value!r}")


def check_zero_keys(cfg: DictConfig) -> None:
    """Every `zero_optimization` key one DeepSpeed takes (its model forbids others, but says so only inside
    deepspeed.initialize, once the model has loaded): read from DeepSpeed's source, nothing imported."""
    from glm_ft.config.hf_choices import zero_config_keys

    section = _get(OmegaConf.to_container(cfg.deepspeed, resolve=True), "zero_optimization")
    names = list(zero_config_keys())
    for key in section if isinstance(section, dict) else ():
        if key not in names:
            guesses = closest(str(key), names)
            hint = f"did you mean {' or '.join(f'deepspeed.zero_optimization.{g}' for g in guesses)}?" if guesses \
                else "see https://www.deepspeed.ai/docs/config-json/#zero-optimizations-for-fp16-training"
            raise ConfigError(f"deepspeed.zero_optimization.{key}: DeepSpeed has no such ZeRO key ({hint})")


def _no_accelerator_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def check_zero_values(cfg: DictConfig) -> None:
    """`zero_optimization`'s values as DeepSpeed's own model judges them (types, ranges, choices), before the model
    loads rather than inside deepspeed.initialize. Imports deepspeed: called where the run imports it anyway."""
    section = _get(OmegaConf.to_container(cfg.deepspeed, resolve=True), "zero_optimization")
    if not isinstance(section, dict):
        return
    import pydantic

    # Its import says once that it found no GPU ("Setting accelerator to CPU"), which would make a refusal two lines.
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.addFilter(_no_accelerator_notice)
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    finally:
        ds_log.removeFilter(_no_accelerator_notice)
    try:  # "auto" is filled later from the model and training_args (resolve_deepspeed)
        DeepSpeedZeroConfig(**{k: v for k, v in section.items() if v != "auto"})
    except pydantic.ValidationError as err:
        error = err.errors()[0]
        key = ".".join(["deepspeed.zero_optimization", *map(str, error["loc"])])
        raise ConfigError(f"{key}: {error['msg']}, got {error.get('input')!r} (DeepSpeed's check)") from None


def resolve_deepspeed(cfg: DictConfig, hidden_size: int, num_training_steps: int) -> dict[str, Any]:
    """Fill every "auto" as transformers' HfTrainerDeepSpeedConfig does (both stages)."""
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    args = cfg.training_args

    def fill(key: str, value: Any) -> None:
        if _get(ds, key) == "auto":
            _set(ds, key, value)

    for key, value, _ in _training_fills(args):
        fill(key, value)
    fill("scheduler.params.warmup_min_lr", 0)
    fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    if _get(ds, "zero_optimization.stage") == 3:
        fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)
    if num_training_steps > 0:  # max_steps=-1: known only once the data is loaded
        fill("scheduler.params.total_num_steps", num_training_steps)
        warmup = int(args.warmup_steps) if args.warmup_steps >= 1 else math.ceil(args.warmup_steps * num_training_steps)
        fill("scheduler.params.warmup_num_steps", max(1, warmup))
    return ds

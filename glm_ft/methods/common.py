"""Small helpers the method modules share (light: no torch)."""

from __future__ import annotations

import dataclasses
from typing import Any

from glm_ft.errors import ConfigError


def changed_or_listed(values: dict, defaults: dict, listed: list[str]) -> dict:
    """The listed keys always (the documented finetune.yaml ones), the others only when changed from `defaults`."""
    out = {k: values[k] for k in listed if k in values}
    out.update({k: v for k, v in values.items() if k not in out and v != defaults.get(k)})
    return out


def defaults(schema: type) -> dict[str, Any]:
    return dataclasses.asdict(schema())


def require(ok: bool, key: str, message: str) -> None:
    """A one-line refusal naming the key: `method.KEY: MESSAGE`."""
    if not ok:
        raise ConfigError(f"method.{key}: {message}")


def check_fixed(method: Any, schema: type, keys: tuple[str, ...] = ("peft_type", "task_type")) -> None:
    """Keys a method fixes (peft_type, task_type) may be written, but only with the method's own value."""
    expected = schema()
    for key in keys:
        if key in method and method[key] != getattr(expected, key):
            raise ConfigError(f"method.{key}: '{method[key]}' does not fit method={expected.name} "
                              f"(expected '{getattr(expected, key)}')")


def zero_stage(cfg) -> int | None:
    """The ZeRO stage of the chosen deepspeed group, None without DeepSpeed."""
    if cfg.deepspeed is None:
        return None
    return (cfg.deepspeed.get("zero_optimization") or {}).get("stage")


def model_shape(config) -> str:
    return (f"num_layers {config.num_layers}, hidden_size {config.hidden_size}, "
            f"{config.num_key_value_heads} key/value groups of {config.kv_channels}")

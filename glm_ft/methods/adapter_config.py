"""A LoRA config whose `adapter_config.json` older PEFT can read.

PEFT writes every field of its `LoraConfig`, and each release adds some; PEFT 0.10 (what the ChatGLM3 reference demo
pins) rejects the 17 it does not know with a TypeError, although they are all at their defaults. Written here: the
fields that differ from today's defaults plus the ones every PEFT needs to rebuild the adapter. A missing field is
filled with its default by whichever PEFT reads the file, so today's PEFT loads the same adapter.
"""

from __future__ import annotations

from peft import LoraConfig

# Always written, even at their defaults: what identifies the adapter and how to apply it.
REQUIRED = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
            "bias", "inference_mode")


class PortableLoraConfig(LoraConfig):
    """`LoraConfig` that serialises only what differs from the defaults (plus REQUIRED)."""

    def to_dict(self) -> dict:
        full = super().to_dict()
        defaults = LoraConfig().to_dict()
        return {key: value for key, value in full.items()
                if key in REQUIRED or key not in defaults or _comparable(value) != _comparable(defaults[key])}


def _comparable(value):
    # target_modules and friends are sets in memory and lists on disk
    return sorted(value) if isinstance(value, (set, frozenset)) else value

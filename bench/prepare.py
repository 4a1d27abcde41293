"""What the figures share: the models (the project's tiny one, a mid-size one), the glm-ft config, the data.

Both sides of a figure load these same folders, so "same model, data and seed" holds by construction; the workers
record a checksum of the weights they loaded to show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from bench.common import ROOT

# The mid-size ChatGLM3 of issue 8: hidden 512, 4 layers, on the tiny tokenizer's vocabulary.
MID_OVERRIDES = {
    "_name_or_path": "glm-ft/bench-mid-chatglm3",
    "hidden_size": 512,
    "num_layers": 4,
    "ffn_hidden_size": 1536,
    "num_attention_heads": 8,
    "kv_channels": 64,
    "multi_query_group_num": 2,
}
TINY_DIR = ROOT / ".cache" / "tiny-chatglm3"  # where model=tiny builds it (conf/model/tiny.yaml)


def model_config(size: str) -> dict[str, Any]:
    from glm_ft.chatglm3.tiny import TINY_CONFIG

    if size == "tiny":
        return dict(TINY_CONFIG)
    if size == "mid":
        return {**TINY_CONFIG, **MID_OVERRIDES}
    if size == "mid_vocab":  # the memory figure: the real ChatGLM3 vocabulary (the tiny tokenizer's ids fit in it)
        return {**TINY_CONFIG, **MID_OVERRIDES, "padded_vocab_size": 65024}
    raise ValueError(f"unknown model size {size!r} (tiny, mid or mid_vocab)")


def model_dir(size: str, work: Path, seed: int = 0) -> Path:
    """The checkpoint folder of `size`: the project's own tiny model, or a mid-size one built under `work`."""
    if size == "tiny":
        from glm_ft.chatglm3.tiny import ensure_tiny_model

        return ensure_tiny_model(TINY_DIR)
    out = work / f"{size}-chatglm3"
    if not (out / "model.safetensors").is_file():
        from glm_ft.chatglm3.tiny import write_checkpoint

        write_checkpoint(out, model_config(size), seed)
    return out


def glm_ft_config(overrides: Sequence[str]):
    """The composed config exactly as `python train.py OVERRIDES` would see it."""
    import glm_ft.config.schema  # noqa: F401  (registers the schema)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def data_config(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.data, resolve=True)


def weights_checksum(model) -> str:
    """A short fingerprint of a model's starting weights (a PEFT wrapper's own adapter weights included, under
    the base model's names): equal on both sides means the same model."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

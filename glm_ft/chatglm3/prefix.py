"""P-Tuning v2 on the model's own prefix encoder: attach it, freeze the rest, save and load only the prefix.

This is the reference's P-Tuning v2 (`transformer.prefix_encoder.*`, config.pre_seq_len), not PEFT's prefix tuning,
whose weights live in a PEFT wrapper and which transformers 5.24's `generate()` drops for models without a fallback.
The prefix saved here is kilobytes (`prefix_encoder.safetensors` + `prefix_config.json`) instead of the whole
model the reference demo wrote; `load_prefix` also reads the reference's whole-model checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm_ft.errors import CheckpointError
from glm_ft.runs import PREFIX_CONFIG, PREFIX_WEIGHTS

from .modeling import PrefixEncoder

_KEY = "transformer.prefix_encoder."


def attach_prefix(model, num_virtual_tokens: int, prefix_projection: bool = False, seed: int | None = None):
    """Give `model` a prefix encoder of `num_virtual_tokens` (fp32, seeded normal init) unless it has a matching
    one already; other weights are untouched. Returns the model."""
    config, transformer = model.config, model.transformer
    existing = transformer.prefix_encoder
    if existing is not None:
        if config.pre_seq_len == num_virtual_tokens and config.prefix_projection == prefix_projection:
            return model
        raise ValueError(
            f"model already has a prefix of {config.pre_seq_len} tokens (prefix_projection={config.prefix_projection})"
        )
    config.pre_seq_len = num_virtual_tokens
    config.prefix_projection = prefix_projection
    device = transformer.embedding.word_embeddings.weight.device
    # Drawn on the CPU (or meta) and then moved, so a seed gives the same prefix on every device; a given seed
    # uses a private RNG stream, no seed draws from torch's global one.
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device("meta" if device.type == "meta" else "cpu"):
            encoder = PrefixEncoder(config).float()
        encoder.apply(model._init_weights)
    transformer.prefix_encoder = encoder.to(device)
    return model


def enable_ptuning_v2(model, num_virtual_tokens: int, prefix_projection: bool = False, seed: int | None = None):
    """Attach the prefix (see `attach_prefix`) and freeze every other weight. Returns the model;
    `model.num_parameters(only_trainable=True)` is then the prefix size (1,835,008 for chatglm3-6b at 128 tokens)."""
    attach_prefix(model, num_virtual_tokens, prefix_projection, seed)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.transformer.prefix_encoder.parameters():
        param.requires_grad_(True)
    return model


def save_prefix(model, out_dir: str | os.PathLike) -> Path:
    """Write only the prefix weights (full-model tensor names) and its settings into `out_dir`."""
    encoder = model.transformer.prefix_encoder
    if encoder is None:
        raise ValueError("model has no prefix encoder; call enable_ptuning_v2 first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _gathered(encoder):
        tensors = {_KEY + name: t.detach().to("cpu").clone() for name, t in encoder.state_dict().items()}
    save_file(tensors, out_dir / PREFIX_WEIGHTS, metadata={"format": "pt"})
    settings = {"num_virtual_tokens": model.config.pre_seq_len, "prefix_projection": model.config.prefix_projection}
    (out_dir / PREFIX_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_prefix(model, path: str | os.PathLike):
    """Attach a saved prefix to a base model and return the model.

    `path` is a folder written by `save_prefix`, a whole-model checkpoint folder holding
    `transformer.prefix_encoder.*` (model.safetensors, sharded safetensors with an index, or pytorch_model.bin as the
    reference demo saved it), or one .safetensors / .bin file. Only the prefix tensors are read; .bin files are
    read with weights_only=True.
    """
    path = Path(path)
    tensors = _read_prefix_tensors(path)
    weight = tensors.get("embedding.weight")
    cfg = model.config
    kv_size = cfg.num_layers * 2 * cfg.num_key_value_heads * cfg.kv_channels
    if weight is None or weight.dim() != 2 or weight.shape[1] != kv_size:
        shape = None if weight is None else list(weight.shape)
        raise CheckpointError(
            f"{path}: prefix_encoder.embedding.weight must be [num_virtual_tokens, {kv_size}] for this model, "
            f"got {shape}"
        )
    projection = any(name.startswith("trans.") for name in tensors)
    attach_prefix(model, weight.shape[0], projection)
    encoder = model.transformer.prefix_encoder
    with _gathered(encoder, modifier_rank=0):
        reference = encoder.state_dict()
        if set(tensors) != set(reference):
            raise CheckpointError(f"{path}: prefix tensors {sorted(tensors)} do not match {sorted(reference)}")
        encoder.load_state_dict({k: v.to(reference[k].dtype) for k, v in tensors.items()})
    return model


def _gathered(module, modifier_rank: int | None = None):
    """Under DeepSpeed ZeRO-3 each rank holds only a shard of every parameter (an empty tensor outside forward):
    gather the module's parameters for reading, or for writing from `modifier_rank`."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _read_prefix_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Prefix tensors found at `path`, keyed by their name inside the prefix encoder ("embedding.weight", ...)."""
    if path.is_dir():
        candidates = [PREFIX_WEIGHTS, "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"]
        found = next((path / name for name in candidates if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: no {PREFIX_WEIGHTS}, model.safetensors or pytorch_model.bin found")
        path = found
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")

    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted({shard for name, shard in weight_map.items() if "prefix_encoder." in name})
        files = [path.parent / shard for shard in shards]
    else:
        files = [path]

    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if "prefix_encoder." in k})
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # an unsafe pickle is refused here, whatever the exact error class
                raise CheckpointError(f"{file}: cannot be read as plain tensors ({type(err).__name__})") from err
            tensors.update({k: v for k, v in state.items() if "prefix_encoder." in k})
    if not tensors:
        raise CheckpointError(f"{path}: holds no prefix_encoder tensors")
    return {name.split("prefix_encoder.", 1)[1]: tensor for name, tensor in tensors.items()}

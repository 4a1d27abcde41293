"""Sharded safetensors with transformers' index file: what both export formats write.

    files = save_weights(state_dict, out_dir, max_shard_size=2 * 1024**3)
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX = "model.safetensors.index.json"


def shard(state: dict, max_shard_size: int) -> list[dict]:
    """Tensors in model order, packed greedily into shards of at most max_shard_size bytes (a bigger tensor gets
    a shard of its own)."""
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(state: dict, out: Path, max_shard_size: int) -> list[str]:
    from safetensors.torch import save_file

    shards = shard(state, max_shard_size)
    weight_map, total = {}, 0
    files = []
    for i, tensors in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / file, metadata={"format": "pt"})
        files.append(file)
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files

"""What both sides of a figure share: the models (the project's tiny one, a mid-size one), the glm-ft config, the
data. Both load these same folders, and record a checksum of the weights they loaded to show it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import ROOT

# The mid-size ChatGLM3 of issue 8: hidden 512, 4 layers, on the tiny tokenizer's vocabulary.
MID_OVERRIDES = {"_name_or_path": "glm-ft/bench-mid-chatglm3", "hidden_size": 512, "num_layers": 4,
                 "ffn_hidden_size": 1536, "num_attention_heads": 8, "kv_channels": 64, "multi_query_group_num": 2}
TINY_DIR = ROOT / ".cache" / "tiny-chatglm3"  # where model=tiny builds it (conf/model/tiny.yaml)


def model_config(size: str) -> dict[str, Any]:
    from glm_ft.chatglm3.tiny import TINY_CONFIG

    # mid_vocab, the memory figure's: the real ChatGLM3 vocabulary (the tiny tokenizer's ids fit in it)
    sizes = {"tiny": {}, "mid": MID_OVERRIDES, "mid_vocab": {**MID_OVERRIDES, "padded_vocab_size": 65024}}
    return {**TINY_CONFIG, **sizes[size]}


def model_dir(spec: dict[str, Any]) -> dict[str, str]:
    """Worker figure "model": the checkpoint folder of spec["size"], the project's own tiny model or a mid-size one
    built in the work folder."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model, write_checkpoint

    if spec["size"] == "tiny":
        return {"model_dir": str(ensure_tiny_model(TINY_DIR))}
    out = Path(spec["work_dir"]) / f"{spec['size']}-chatglm3"
    write_checkpoint(out, model_config(spec["size"]), seed=0)
    return {"model_dir": str(out)}


def overrides(model: str | Path, data: str | Path, settings: dict[str, Any]) -> list[str]:
    """What every glm-ft side sets: the quickstart on the bench's model, data and lengths, with no checkpoints and
    no evaluation during training."""
    return ["experiment=quickstart", f"model.path={model}", f"data.data_dir={data}", "data.train_file=train.json",
            "data.val_file=null", f"max_input_length={settings['max_input_length']}",
            f"max_output_length={settings['max_output_length']}", "training_args.save_strategy=no",
            "training_args.evaluation_strategy=no"]


def glm_ft_config(spec: dict[str, Any], *extra: str):
    """The composed config exactly as `python train.py OVERRIDES` would see it, for a worker's spec."""
    import glm_ft.config.schema  # noqa: F401  (registers the schema)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides(spec["model_dir"], spec["data_dir"], spec),
                                            f"seed={spec['seed']}", "training_args.disable_tqdm=true",
                                            "tracking.enabled=false", *extra])


def load(cfg, spec: dict[str, Any], baseline: bool):
    """Tokenizer, model and datasets of one side, from the config's seed. The baseline loads the base model as the
    reference demo does (fp32, eager attention); glm-ft through its own `load_for_training`. Every side reads the
    same cached datasets."""
    import torch
    from transformers import set_seed

    from glm_ft.data.dataset import load_datasets
    from glm_ft.model import load_base_model, load_for_training, load_tokenizer
    from omegaconf import OmegaConf

    set_seed(cfg.seed)
    if baseline:
        tokenizer = load_tokenizer(Path(spec["model_dir"]))
        model = load_base_model(Path(spec["model_dir"]), torch.float32, attn_implementation="eager")
    else:
        tokenizer, model, _ = load_for_training(cfg)
    data = load_datasets(OmegaConf.to_container(cfg.data, resolve=True), tokenizer, cfg.max_input_length,
                         cfg.max_output_length, cache_dir=Path(spec["work_dir"]) / "datasets")
    return tokenizer, model, data


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

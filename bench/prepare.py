"""What a worker's sides share: the models (the project's tiny one, a mid-size one), the composed glm-ft config,
loading and glm-ft's Trainer. Both sides load the same folders and record a checksum of the weights they loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import set_seed

import glm_ft.config.schema  # noqa: F401  (registers the schema)
from bench.common import ROOT, overrides
from glm_ft.chatglm3.tiny import TINY_CONFIG, ensure_tiny_model, write_checkpoint
from glm_ft.data.dataset import load_datasets
from glm_ft.model import load_base_model, load_for_training, load_tokenizer

# The mid-size ChatGLM3 of issue 8 (hidden 512, 4 layers) with the real ChatGLM3 vocabulary, as issue 16 measured
# it (the tiny tokenizer's ids fit in it): the mid-size training and memory figures'.
SIZES = {"tiny": {}, "mid_vocab": {"_name_or_path": "glm-ft/bench-mid-chatglm3", "hidden_size": 512, "num_layers": 4,
                                   "ffn_hidden_size": 1536, "num_attention_heads": 8, "kv_channels": 64,
                                   "multi_query_group_num": 2, "padded_vocab_size": 65024}}
TINY_DIR = ROOT / ".cache" / "tiny-chatglm3"  # where model=tiny builds it (conf/model/tiny.yaml)


def model_config(size: str) -> dict[str, Any]:
    return {**TINY_CONFIG, **SIZES[size]}


def model_dir(spec: dict[str, Any]) -> dict[str, str]:
    """Worker figure "model": the project's own tiny model, or a mid-size one built in the work folder."""
    if spec["size"] == "tiny":
        return {"model_dir": str(ensure_tiny_model(TINY_DIR))}
    out = Path(spec["work_dir"]) / f"{spec['size']}-chatglm3"
    write_checkpoint(out, model_config(spec["size"]), seed=0)
    return {"model_dir": str(out)}


def glm_ft_config(spec: dict[str, Any], *extra: str):
    """The composed config exactly as `python train.py OVERRIDES` would see it, for a worker's spec."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides(spec["model_dir"], spec["data_dir"], spec),
                                            f"seed={spec['seed']}", "training_args.disable_tqdm=true",
                                            "tracking.enabled=false", *extra])


def load(cfg, spec: dict[str, Any], baseline: bool):
    """Tokenizer, model and datasets of one side, from the config's seed. The baseline loads the base model as the
    reference demo does (fp32, eager attention); glm-ft through its own `load_for_training`. Every side reads the
    same cached datasets."""
    set_seed(cfg.seed)
    if baseline:
        tokenizer = load_tokenizer(Path(spec["model_dir"]))
        model = load_base_model(Path(spec["model_dir"]), torch.float32, attn_implementation="eager")
    else:
        tokenizer, model, _ = load_for_training(cfg)
    data = load_datasets(OmegaConf.to_container(cfg.data, resolve=True), tokenizer, cfg.max_input_length,
                         cfg.max_output_length, cache_dir=Path(spec["work_dir"]) / "datasets")
    return tokenizer, model, data


# glm-ft's training modules are imported only where a side trains or predicts through glm-ft: the generation
# baseline's process must hold no more than the reference approach needs, as its peak memory is a figure.


def training_arguments(cfg, tokenizer, run_dir: Path, has_eval: bool):
    """glm-ft's Seq2SeqTrainingArguments for this config, with its generation config, as its finetune builds them."""
    from glm_ft.train.finetune import generation_config_for
    from glm_ft.train.trainer_args import build_training_arguments

    gen = generation_config_for(cfg, tokenizer)
    return build_training_arguments(cfg, run_dir, None, has_eval=has_eval, generation_config=gen)


def glm_trainer(cfg, tokenizer, args, **kwargs):
    """glm-ft's Trainer, with its Collator unless `data_collator` is given."""
    from glm_ft.data.collate import Collator
    from glm_ft.train.trainer import GlmTrainer

    kwargs.setdefault("data_collator", Collator(tokenizer.pad_token_id))
    return GlmTrainer(args=args, processing_class=tokenizer, method=cfg.method, gen_config=args.generation_config,
                      **kwargs)


def weights_checksum(model) -> str:
    """A short fingerprint of a model's starting weights (a PEFT wrapper's own adapter weights included, under
    the base model's names): equal on both sides means the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

"""A tiny random ChatGLM3 checkpoint laid out like THUDM/chatglm3-6b, for tests and quick CPU runs.

`ensure_tiny_model(path)` writes config.json in the published layout (auto_map included, so loading it also proves
that the folder's auto_map is never followed), the tiny tokenizer (tokenizer.model + tokenizer_config.json) and
seeded random weights as safetensors. `python -m glm_ft.chatglm3.tiny PATH` does the same from the shell.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from glm_ft.atomic import folder_atomic
from glm_ft.errors import CheckpointError

# THUDM/chatglm3-6b's config.json as published (original field names, auto_map included): the 6B shape for
# benchmarks and meta-device checks, and the template of the tiny model. tests check it against the real file.
CHATGLM3_6B_CONFIG: dict = {
    "_name_or_path": "THUDM/chatglm3-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 8192,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.30.2",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# The published config.json with small sizes. padded_vocab_size is the tiny tokenizer's vocabulary
# (3,000 SentencePiece pieces + 9 special tokens = 3,009) rounded up to a multiple of 64, as 64,798 -> 65,024 for
# the real one; tests check it against the tokenizer.
TINY_CONFIG: dict = {
    **CHATGLM3_6B_CONFIG,
    "_name_or_path": "glm-ft/tiny-chatglm3",
    "ffn_hidden_size": 160,
    "hidden_size": 64,
    "kv_channels": 16,
    "num_attention_heads": 4,
    "num_layers": 2,
    "padded_vocab_size": 3072,
    "seq_length": 1024,
    "torch_dtype": "float32",
}

# What a complete tiny folder holds; the weights may be one file or shards with an index.
_REQUIRED = ("config.json", "tokenizer_config.json", "tokenizer.model")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

# The published tokenizer_config.json points AutoTokenizer at remote code; the tiny one does too, so that tests see
# the same situation as with the real checkpoint.
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}


def is_complete(path: Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in _REQUIRED) and any((path / name).is_file() for name in _WEIGHTS)


def ensure_tiny_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Return `path`, first building the tiny checkpoint there unless it is already complete.

    Built with `glm_ft.atomic.folder_atomic`: a reader never sees half a checkpoint.
    """
    path = Path(path)
    if is_complete(path):
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: exists but is not a complete tiny ChatGLM3 checkpoint; "
                              "remove it or pick another path")

    with folder_atomic(path, done_by_another=is_complete) as staging:
        _build(staging, seed)
    return path


def _build(out: Path, seed: int) -> None:
    write_checkpoint(out, TINY_CONFIG, seed)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["auto_map"] = TOKENIZER_AUTO_MAP
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def write_checkpoint(out: Path, config: dict, seed: int) -> None:
    """A random ChatGLM3 of `config`'s shape with the tiny tokenizer, laid out like the published checkpoint."""
    import torch

    import glm_ft.chatglm3 as chatglm3

    chatglm3.register()
    from .configuration import ChatGLMConfig
    from .modeling import ChatGLMForConditionalGeneration
    from .tokenization import load_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    load_tiny_tokenizer().save_pretrained(out)
    # Weights from a private RNG stream: the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(config))
    model.save_pretrained(out)
    # The published checkpoint has no generation_config.json and keeps its own config.json layout.
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glm_ft.chatglm3.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="folder to create (left alone if it already holds the tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.path, seed=args.seed))


if __name__ == "__main__":
    main()

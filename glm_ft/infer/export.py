"""Export what a run trained as a full checkpoint in the original THUDM/chatglm3-6b layout.

    python -m glm_ft export outputs/2026-11-27/12-00-00 exported/ [--max-shard-size 2GB] [--dtype float16]

- LoRA: the adapter is merged into the base weights (PEFT merge_and_unload);
- freeze tuning: the trained tensors replace the base model's;
- P-Tuning v2: base weights + `transformer.prefix_encoder.embedding.weight`, with `pre_seq_len` and
  `prefix_projection` in config.json, as the reference demo saved it;
- a full model (SFT checkpoint, any model folder): re-saved, resharded, in the chosen dtype.

`--format hf` writes transformers' own GlmForCausalLM layout instead (glm_ft/infer/hf_export.py): loadable by stock
transformers with no remote code.

The folder gets config.json with the published field names and auto_map, the published tensor names as sharded
safetensors with `model.safetensors.index.json`, and tokenizer.model + tokenizer_config.json (published auto_map).
glm-ft loads it with AutoModelForCausalLM, and so does the published remote code. It is written beside OUT_DIR and
renamed into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from glm_ft import methods
from glm_ft.atomic import check_writable, folder_atomic
# The published config.json (with tiny sizes) and tokenizer_config.json's auto_map (remote code never run here).
from glm_ft.chatglm3.tiny import TINY_CONFIG, TOKENIZER_AUTO_MAP
from glm_ft.infer.checkpoint import find_checkpoint, load_checkpoint
from glm_ft.infer.weights import save_weights
from glm_ft.errors import CheckpointError, GlmFtError, to_stderr

DTYPES = methods.DTYPE_NAMES
FORMATS = ("chatglm3", "hf")

# Tensor names of the published checkpoint (its model.safetensors.index.json), plus the P-Tuning v2 prefix.
_ORIGINAL_NAME = re.compile(
    r"transformer\.(embedding\.word_embeddings\.weight|rotary_pos_emb\.inv_freq|output_layer\.weight"
    r"|encoder\.final_layernorm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h"
    r"|mlp\.dense_4h_to_h)\.(weight|bias)"
    r"|prefix_encoder\.(embedding\.weight|trans\.[02]\.(weight|bias)))"
)

# The published tokenizer_config.json lists these four added tokens, all with these flags (transformers 4.40 wrote
# it); the others are known to the tokenizer by its own code. glm-ft's tokenizer applies its own flags on load.
PUBLISHED_ADDED_TOKENS = ("[gMASK]", "sop", "<|user|>", "<|assistant|>")
_PUBLISHED_FLAGS = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": False}
# transformers 5 records how a tokenizer was loaded; the published tokenizer_config.json has none of these.
_TOKENIZER_BOOKKEEPING = ("backend", "is_local", "local_files_only")


def original_config(model_config, dtype_name: str, name_or_path: str) -> dict:
    """config.json with the published keys in the published order (prefix and rope keys only when used)."""
    from transformers import __version__ as transformers_version

    fixed = {"_name_or_path": name_or_path, "model_type": "chatglm", "architectures": ["ChatGLMModel"],
             "auto_map": TINY_CONFIG["auto_map"], "torch_dtype": dtype_name,
             "transformers_version": transformers_version, "use_cache": True}
    config = {key: fixed[key] if key in fixed else getattr(model_config, key) for key in TINY_CONFIG}
    if model_config.pre_seq_len:
        config.update(pre_seq_len=model_config.pre_seq_len, prefix_projection=model_config.prefix_projection)
    if model_config.rope_ratio != 1:
        config["rope_ratio"] = model_config.rope_ratio  # as in chatglm3-6b-32k's config.json
    return config


def original_tokenizer_config(saved: dict, chat_template: str | None, token_ids: dict[str, int]) -> dict:
    config = {k: v for k, v in saved.items() if k not in _TOKENIZER_BOOKKEEPING}
    config["added_tokens_decoder"] = {str(token_ids[token]): {"content": token, **_PUBLISHED_FLAGS}
                                      for token in PUBLISHED_ADDED_TOKENS}
    config["auto_map"] = TOKENIZER_AUTO_MAP
    config["tokenizer_class"] = "ChatGLMTokenizer"
    if chat_template is not None:
        config["chat_template"] = chat_template  # the published file keeps it here, not in chat_template.jinja
    return dict(sorted(config.items()))


def export_state_dict(model, dtype) -> dict:
    """The model's tensors under the published names: every weight in `dtype`, the prefix kept fp32 as the model
    keeps it (`_keep_in_fp32_modules`)."""
    import torch

    state = {}
    for name, tensor in model.state_dict().items():
        if not _ORIGINAL_NAME.fullmatch(name):
            raise CheckpointError(f"tensor {name} has no place in the ChatGLM3 layout; nothing was exported")
        target = torch.float32 if name.startswith("transformer.prefix_encoder.") else dtype
        state[name] = tensor.detach().to("cpu", target)
    return state


def default_dtype(ckpt) -> str:
    """The dtype the weights came in (the published checkpoint: float16), else float32."""
    source = ckpt.base_model or ckpt.path
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    name = config.get("torch_dtype") or config.get("dtype")
    return name if name in DTYPES else "float32"


def export(checkpoint: str | Path, out_dir: str | Path, *, base_model: str | Path | None = None,
           max_shard_size: str | int = "2GB", dtype: str | None = None, fmt: str = "chatglm3") -> Path:
    """Write the checkpoint as a full model folder at `out_dir` (which must not exist or be empty), in the THUDM
    layout (`fmt="chatglm3"`) or transformers' GlmForCausalLM layout (`fmt="hf"`)."""
    from transformers.utils.hub import convert_file_size_to_int

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not empty; export into a new folder")
    check_writable(out, "OUT")
    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError as err:
        raise CheckpointError(f"--max-shard-size {max_shard_size!r}: expected e.g. 2GB, 500MB or a byte count") from err
    if fmt not in FORMATS:
        raise CheckpointError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    ckpt = find_checkpoint(checkpoint, base_model)
    if fmt == "hf":
        from glm_ft.infer.hf_export import check_exportable

        check_exportable(ckpt)
    dtype_name = dtype or default_dtype(ckpt)
    if dtype_name not in DTYPES:
        raise CheckpointError(f"dtype {dtype_name!r}: expected one of {', '.join(DTYPES)}")
    # Merged in the export dtype on the CPU: merging in fp32 first would need twice the memory for the same result
    # up to one rounding.
    loaded = load_checkpoint(ckpt, dtype=dtype_name, device="cpu", merge_lora=True)
    model = loaded.model
    dtype_obj = methods.torch_dtype(dtype_name, device="cpu")

    with folder_atomic(out) as staging:
        if fmt == "hf":
            from glm_ft.infer.hf_export import write_hf_folder

            write_hf_folder(model, loaded.tokenizer, ckpt.tokenizer_dir / "tokenizer.model", staging, dtype_obj,
                            dtype_name, shard_bytes)
        else:
            save_weights(export_state_dict(model, dtype_obj), staging, shard_bytes)
            # The published file names its hub id here; a local path would leak where it was trained.
            config = original_config(model.config, dtype_name, out.name)
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            _save_tokenizer(loaded.tokenizer, staging)
    return out


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
    jinja = out / "chat_template.jinja"
    chat_template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    jinja.unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    token_ids = {token: tokenizer.get_command(token) for token in PUBLISHED_ADDED_TOKENS}
    config = original_tokenizer_config(saved, chat_template or saved.get("chat_template"), token_ids)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_ft export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint",
                        help="run folder, checkpoint folder (LoRA, P-Tuning v2, freeze, SFT) or model folder")
    parser.add_argument("out_dir", help="new folder for the exported model")
    parser.add_argument("--base-model", help="base model folder (default: the one recorded at training time)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the dtype of the weights it starts from")
    parser.add_argument("--format", choices=FORMATS, default="chatglm3", dest="fmt",
                        help="chatglm3: the THUDM/chatglm3-6b layout (default; what llama.cpp and chatglm.cpp "
                             "convert); hf: transformers' GlmForCausalLM, loadable with no remote code")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from glm_ft.infer.checkpoint import quiet_transformers

        ckpt = find_checkpoint(args.checkpoint, args.base_model)
        quiet_transformers()
        out = export(ckpt.path, args.out_dir, base_model=args.base_model, max_shard_size=args.max_shard_size,
                     dtype=args.dtype, fmt=args.fmt)
    except GlmFtError as err:
        to_stderr(f"error: {err}")
        return 1
    made = methods.by_kind(ckpt.kind).EXPORTED
    print(f"exported {ckpt.describe()}{f' ({made})' if made else ''} → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

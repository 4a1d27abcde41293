"""`python -m glm_ft export RUN OUT --format hf`: the fine-tuned model in transformers' own `GlmForCausalLM` layout
(model type `glm`), which computes ChatGLM3 exactly (glm_ft/chatglm3/glm_layout.py), so stock transformers, vLLM or
TGI load it with no remote code and no glm_ft:

- config.json (`GlmConfig`), sharded safetensors with an index, generation_config.json that stops on ChatGLM3's stop
  tokens (eos, `<|user|>`, `<|observation|>`);
- tokenizer.json (the SentencePiece model converted, the nine special tokens at their ids), tokenizer_config.json
  with a chat template that renders ChatGLM3's prompt format (glm_ft/chatglm3/fast_tokenizer.py).

LoRA is merged. P-Tuning v2 is refused: `GlmForCausalLM` has no place for a prefix; the THUDM-layout export keeps it.
Heavy (transformers): export imports it once --format hf is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GlmConfig

from glm_ft import methods
from glm_ft.chatglm3.fast_tokenizer import STOP_TOKENS, save_fast_tokenizer
from glm_ft.chatglm3.glm_layout import glm_config_kwargs, to_glm_state_dict
from glm_ft.errors import CheckpointError
from glm_ft.infer.weights import save_weights


def check_exportable(ckpt) -> None:
    """Refuse, before anything loads, what the GLM layout cannot hold (each method says: `hf_export_refusal`)."""
    refusal = methods.by_kind(ckpt.kind).hf_export_refusal(ckpt)
    if refusal is not None:
        raise CheckpointError(refusal)


def glm_config_dict(model_config, dtype_name: str) -> dict:
    """config.json of the equivalent `GlmForCausalLM`, as transformers writes it (no local paths)."""
    try:
        kwargs = glm_config_kwargs(model_config)
    except ValueError as err:
        raise CheckpointError(f"--format hf: {err}") from err
    config = GlmConfig(**kwargs, architectures=["GlmForCausalLM"], dtype=dtype_name)
    data = config.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults
    data.pop("_name_or_path", None)
    return data


def generation_config_dict(tokenizer) -> dict:
    stops = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
    return {"eos_token_id": stops, "pad_token_id": tokenizer.pad_token_id}


def write_hf_folder(model, tokenizer, sp_model_file: Path, out: Path, dtype, dtype_name: str,
                    shard_bytes: int) -> None:
    """Write the GLM-layout model, tokenizer and configs into the (staging) folder `out`."""
    config = glm_config_dict(model.config, dtype_name)
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in model.state_dict().items()}
    try:
        glm_state = to_glm_state_dict(state, model.config)
    except KeyError as err:
        raise CheckpointError(f"--format hf: {err.args[0]}; nothing was exported") from err
    save_weights(glm_state, out, shard_bytes)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {**generation_config_dict(tokenizer),
                                                 "transformers_version": config["transformers_version"]})
    save_fast_tokenizer(sp_model_file, out, model_max_length=config["max_position_embeddings"])


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""ChatGLM3 in transformers' own `GlmForCausalLM` layout (model type `glm`, the GLM-4-9B-hf architecture).

The two compute the same function once the weights are renamed and the fused query/key/value projection is split:
GLM keeps ChatGLM3's interleaved rotary on the first half of each head, its SwiGLU order (silu of the first half
times the second) and its RMSNorm. This module only renames and reshapes tensors; it holds no maths, so a test can use
transformers' implementation as an independent oracle for `modeling.py`, and an export can write files that stock
transformers loads without any code of ours.
"""

from __future__ import annotations

from .configuration import ChatGLMConfig

# ChatGLM3 name (under `transformer.`) -> GLM name, for the tensors that are only renamed
_RENAMED = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER_RENAMED = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_LAYER_PREFIX = "encoder.layers."


def glm_config_kwargs(config: ChatGLMConfig) -> dict:
    """Keyword arguments for `transformers.GlmConfig` describing the same network as `config`."""
    unsupported = {
        "apply_residual_connection_post_layernorm": config.apply_residual_connection_post_layernorm,
        "add_bias_linear": config.add_bias_linear,
        "pre_seq_len": config.pre_seq_len,
    }
    found = {key: value for key, value in unsupported.items() if value}
    if found or not config.rmsnorm or not config.post_layer_norm or not config.add_qkv_bias:
        raise ValueError(f"this ChatGLM3 variant has no GLM equivalent: {found or 'LayerNorm/no qkv bias'}")
    return {
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.kv_channels,
        "rms_norm_eps": config.layernorm_epsilon,
        "max_position_embeddings": config.seq_length,
        "attention_bias": True,
        "attention_dropout": config.attention_dropout,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0 * config.rope_ratio,
            "partial_rotary_factor": 0.5,
        },
    }


def to_glm_state_dict(state_dict: dict, config: ChatGLMConfig) -> dict:
    """ChatGLM3 tensors (named as in the published checkpoint) -> `GlmForCausalLM` tensors. Views, no copies."""
    q_size = config.num_attention_heads * config.kv_channels
    kv_size = config.num_key_value_heads * config.kv_channels
    out = {}
    for name, tensor in state_dict.items():
        short = name.removeprefix("transformer.")
        if short == "rotary_pos_emb.inv_freq":
            continue  # a buffer recomputed from the config on both sides
        if short in _RENAMED:
            out[_RENAMED[short]] = tensor
            continue
        if not short.startswith(_LAYER_PREFIX):
            raise KeyError(f"no GLM equivalent for tensor {name!r}")
        index, rest = short[len(_LAYER_PREFIX) :].split(".", 1)
        prefix = f"model.layers.{index}."
        if rest in _LAYER_RENAMED:
            out[prefix + _LAYER_RENAMED[rest]] = tensor
        elif rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part
        else:
            raise KeyError(f"no GLM equivalent for tensor {name!r}")
    return out


__all__ = ["glm_config_kwargs", "to_glm_state_dict"]

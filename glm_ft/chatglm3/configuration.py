"""ChatGLM3 configuration with the published checkpoint's field names.

config.json files of THUDM/chatglm3-6b use their own names (num_layers, kv_channels, multi_query_group_num, ...).
transformers' generation and PEFT look for the standard names (num_hidden_layers, num_key_value_heads, head_dim,
vocab_size), and PEFT reads them from `to_dict()`, where an `attribute_map` alias would be invisible. So the standard
names are properties over the original fields, added to `to_dict()` and left out of the saved config.json, which
keeps the original layout.
"""

from transformers import PreTrainedConfig

# standard name -> how it is derived; each is a property below
DERIVED_KEYS = ("num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


class ChatGLMConfig(PreTrainedConfig):
    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    # Defaults are those of the original configuration_chatglm.py.
    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    classifier_dropout: float | None = None
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    rope_ratio: float = 1.0
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    original_rope: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    # Not in the original: std of the normal init of linear/embedding weights (the prefix uses std 1, see modeling)
    initializer_range: float = 0.02

    # -- standard names, derived from the original fields --------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        self.num_layers = value

    @property
    def num_key_value_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:
        self.multi_query_attention = value != self.num_attention_heads
        self.multi_query_group_num = value

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        self.kv_channels = value

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.padded_vocab_size = value

    @property
    def max_position_embeddings(self) -> int:
        return self.seq_length

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int) -> None:
        self.seq_length = value

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.update({key: getattr(self, key) for key in DERIVED_KEYS})
        return output

    def to_diff_dict(self) -> dict:
        # What is saved to config.json: the original layout only.
        output = super().to_diff_dict()
        for key in DERIVED_KEYS:
            output.pop(key, None)
        return output


__all__ = ["ChatGLMConfig"]

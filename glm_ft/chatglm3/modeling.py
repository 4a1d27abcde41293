"""ChatGLM3 as a native transformers model, weight-compatible with THUDM/chatglm3-6b (no remote code).

The maths follows the published modeling_chatglm.py; the plumbing follows transformers' own decoder models:
[batch, seq, hidden] layout, `Cache` objects (the keyword is `cache`, as in transformers >= 5.24), SDPA or eager
attention through `ALL_ATTENTION_FUNCTIONS`, `GradientCheckpointingLayer`, and `_init_weights` through
`transformers.initialization` so that weights missing from a checkpoint (e.g. a new P-Tuning prefix) are initialised
from torch's seeded RNG instead of being left as raw memory.

P-Tuning v2 is part of the model, as in the original: with `config.pre_seq_len` set, `transformer.prefix_encoder`
gives every layer a key and a value prefix, which is concatenated in front of the layer's keys and values on every
forward call (training, plain forward and each `generate` step alike); the cache only ever holds real tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import can_return_tuple

from .configuration import ChatGLMConfig
from .loss import chunked_causal_lm_loss
from .segments import segment_attention_mask, segment_position_ids

# The original draws its prefix from nn.Embedding's default init, N(0, 1), and applies a fixed dropout of 0.1.
PREFIX_INIT_STD = 1.0
PREFIX_DROPOUT = 0.1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * normed).to(hidden_states.dtype)


def make_norm(config: ChatGLMConfig) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """Angles for the rotary embedding, which covers the first half of each head's dims (θ_i = base^(-2i/rot_dim))."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rot_dim = config.kv_channels // 2
        self.base = 10000.0 * config.rope_ratio
        # Kept only because the published checkpoints carry it; the angles are recomputed in fp32 in forward, as the
        # original does, because a checkpoint loaded in fp16/bf16 holds a rounded copy.
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim
        return 1.0 / (self.base**exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.compute_inv_freq(position_ids.device)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first 2*len(θ) dims; x is [batch, heads, seq, head_dim],
    cos/sin are [batch or 1, seq, len(θ)]."""
    rot = cos.shape[-1] * 2
    pairs = x[..., :rot].unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., rot:]), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Matmul-softmax attention with the softmax in fp32; `attention_mask` is boolean (True = attend) or None for
    plain causal attention. Returns ([batch, seq, heads, head_dim], probabilities)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        q_len, kv_len = scores.shape[-2:]
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.num_key_value_groups = self.num_heads // self.num_groups  # read by transformers' sdpa for GQA
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        # One fused projection laid out [all query heads | all key groups | all value groups].
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states, prefix_key, prefix_value, attention_mask, rotary, cache):
        batch, seq, _ = hidden_states.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        query, key, value = self.query_key_value(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        query = query.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = key.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = value.view(batch, seq, -1, self.head_dim).transpose(1, 2)

        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if prefix_key is not None:
            key = torch.cat((prefix_key.to(key.dtype), key), dim=2)
            value = torch.cat((prefix_value.to(value.dtype), value), dim=2)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.dense(output.reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: dense_h_to_4h gives two halves a | b, the activation is silu(a) * b."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.residual_from_norm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    # Tensors that may need gradients (hidden states, a trainable prefix) are positional: reentrant checkpointing only
    # propagates gradients to positional inputs.
    def forward(self, hidden_states, prefix_key=None, prefix_value=None, *, attention_mask, rotary, cache=None):
        normed = self.input_layernorm(hidden_states)
        attn = self.self_attention(normed, prefix_key, prefix_value, attention_mask, rotary, cache)
        residual = normed if self.residual_from_norm else hidden_states
        hidden_states = residual + F.dropout(attn, p=self.hidden_dropout, training=self.training)

        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_from_norm else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = make_norm(config) if config.post_layer_norm else None

    def forward(self, hidden_states, prefix, attention_mask, rotary, cache):
        for i, layer in enumerate(self.layers):
            prefix_key, prefix_value = (prefix[i, 0], prefix[i, 1]) if prefix is not None else (None, None)
            hidden_states = layer(
                hidden_states, prefix_key, prefix_value, attention_mask=attention_mask, rotary=rotary, cache=cache
            )
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class PrefixEmbedding(nn.Embedding):
    """The prefix table; a class of its own so that `_init_weights` gives it the original's N(0, 1) scale."""


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: [pre_seq_len, num_layers * 2 * groups * kv_channels], ordered layer, key/value, group,
    head dim; optionally reparametrised by a 2-layer MLP (prefix_projection)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        kv_size = config.num_layers * 2 * config.num_key_value_heads * config.kv_channels
        self.embedding = PrefixEmbedding(config.pre_seq_len, kv_size)
        self.trans = None
        if config.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )

    def forward(self) -> torch.Tensor:
        prefix = self.embedding.weight  # every virtual token, in order (ZeRO-3 gathers it: checked with 2 ranks)
        return self.trans(prefix) if self.trans is not None else prefix


def default_position_ids(padding_mask, past_len: int, seq_len: int, device) -> torch.Tensor:
    if padding_mask is None:
        return torch.arange(past_len, past_len + seq_len, device=device)[None]
    # Each row's real tokens count from 0, so a left-padded row gets the positions it would have alone.
    positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -seq_len:]


def build_attention_mask(padding_mask, batch: int, seq_len: int, past_len: int, prefix_len: int, device):
    """Boolean [batch, 1, seq, prefix + past + seq] mask (True = may attend), or None for plain causal attention."""
    no_padding = padding_mask is None or bool(padding_mask.all())
    if no_padding and prefix_len == 0 and (past_len == 0 or seq_len == 1):
        return None
    total = past_len + seq_len
    query_pos = torch.arange(past_len, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos).expand(batch, -1, -1)
    if padding_mask is not None:
        # A padding query would otherwise see no key at all and give NaN; letting it see itself keeps it finite.
        mask = (mask & padding_mask.bool()[:, None, :]) | (key_pos == query_pos)
    if prefix_len:
        mask = torch.cat((mask.new_ones(batch, seq_len, prefix_len), mask), dim=-1)
    return mask[:, None]


class ChatGLMPreTrainedModel(PreTrainedModel):
    config: ChatGLMConfig
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    # The trainable prefix stays fp32 when the model is loaded in fp16/bf16, as the reference demo cast it.
    _keep_in_fp32_modules_strict = ["prefix_encoder"]
    # A base checkpoint has no prefix: it is initialised (seeded normal) rather than reported missing.
    _keys_to_ignore_on_load_missing = [r"prefix_encoder\."]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, PrefixEmbedding):
            init.normal_(module.weight, mean=0.0, std=PREFIX_INIT_STD)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The `transformer` of the published checkpoint; it also holds `output_layer`, as the original does."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The prefix as [num_layers, 2 (key, value), batch, groups, pre_seq_len, head_dim]."""
        cfg = self.config
        prefix = self.prefix_encoder().to(dtype)
        prefix = prefix.view(cfg.pre_seq_len, cfg.num_layers, 2, cfg.num_key_value_heads, cfg.kv_channels)
        prefix = prefix.permute(1, 2, 3, 0, 4).unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)
        return self.prefix_dropout(prefix)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        segment_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] != past_len + seq):
            raise ValueError(
                f"attention_mask must be [batch, past + seq] = [{batch}, {past_len + seq}] (without the prefix), "
                f"got {list(attention_mask.shape)}"
            )
        if segment_ids is not None and past_len:
            raise ValueError("segment_ids (packed rows) are for a whole sequence at once, not with a cache")
        if position_ids is None:
            position_ids = (segment_position_ids(segment_ids) if segment_ids is not None
                            else default_position_ids(attention_mask, past_len, seq, device))

        prefix = self.get_prompt(batch, inputs_embeds.dtype) if self.prefix_encoder is not None else None
        prefix_len = self.config.pre_seq_len if prefix is not None else 0
        if segment_ids is not None:
            mask = segment_attention_mask(segment_ids, prefix_len)  # packed rows (glm_ft/data/packing.py)
        else:
            mask = build_attention_mask(attention_mask, batch, seq, past_len, prefix_len, device)
        rotary = self.rotary_pos_emb(position_ids)

        hidden_states = self.encoder(inputs_embeds, prefix, mask, rotary, cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        segment_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # `past_key_values` is the keyword's name before transformers 5.24; PEFT's prefix tuning still puts its
        # prefix there while generate() passes an empty `cache`.
        if past_key_values is not None and (cache is None or cache.get_seq_length() == 0):
            cache = past_key_values
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            segment_ids=segment_ids,
        )
        if labels is not None and self.training:
            # Training needs only the loss: no full-vocabulary logits for the batch (see chunked_causal_lm_loss).
            loss = chunked_causal_lm_loss(outputs.last_hidden_state, self.transformer.output_layer, labels,
                                          kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.transformer.output_layer(hidden_states)

        loss = None
        if labels is not None:
            # Upcasts the logits to fp32, shifts, ignores -100; honours the Trainer's num_items_in_batch.
            loss = self.loss_function(logits, labels, vocab_size=self.config.padded_vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMPreTrainedModel"]

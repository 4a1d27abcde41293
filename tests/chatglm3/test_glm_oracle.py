"""glm-ft's ChatGLM3 held against an independent implementation: transformers' own `GlmForCausalLM` on the same
weights (renamed and split by `glm_layout`, which holds no maths). Logits, loss, greedy ids, left padding and the KV
cache must agree; every other model test compares glm-ft with itself or with hand-written expectations."""

from __future__ import annotations

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_ft.chatglm3.configuration import ChatGLMConfig
from glm_ft.chatglm3.glm_layout import glm_config_kwargs, to_glm_state_dict
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
from glm_ft.chatglm3.tiny import TINY_CONFIG

ATOL = 1e-5  # fp32: the fused and the split projections sum in different orders


def pair(**overrides) -> tuple[ChatGLMForConditionalGeneration, GlmForCausalLM]:
    torch.manual_seed(0)
    config = ChatGLMConfig.from_dict({**TINY_CONFIG, **overrides})
    ours = ChatGLMForConditionalGeneration(config).eval()
    # Random norms and biases too, so a swapped or dropped tensor cannot hide behind an init of ones or zeros.
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith(".bias"):
                param.uniform_(0.5, 1.5)
    oracle = GlmForCausalLM(GlmConfig(**glm_config_kwargs(config), attn_implementation="eager")).eval()
    missing, unexpected = oracle.load_state_dict(to_glm_state_dict(ours.state_dict(), config), strict=False)
    assert not unexpected and not missing
    return ours, oracle


@pytest.fixture(scope="module", params=[{}, {"multi_query_group_num": 1, "rope_ratio": 50.0}],
                ids=["gqa2", "mqa-rope50"])
def models(request):
    return pair(**request.param)


def rows(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def left_pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in batch])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
    return ids, mask


def test_every_published_tensor_has_a_glm_home_and_the_oracle_is_not_ours():
    ours, oracle = pair()
    assert type(oracle).__module__.startswith("transformers.models.glm.")
    converted = to_glm_state_dict(ours.state_dict(), ours.config)
    assert set(converted) == set(oracle.state_dict())
    assert sum(t.numel() for t in converted.values()) == sum(p.numel() for p in ours.parameters())


def test_logits_and_loss_equal_the_oracle(models):
    ours, oracle = models
    ids = torch.tensor(rows(ours.config.padded_vocab_size, [12, 12]))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        a, b = ours(input_ids=ids, labels=labels), oracle(input_ids=ids, labels=labels)
    assert a.logits.abs().max() > 0.01  # not a degenerate model
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


def test_left_padded_rows_equal_the_oracle_on_their_real_tokens(models):
    ours, oracle = models
    batch = rows(ours.config.padded_vocab_size, [9, 4, 7])
    ids, mask = left_pad(batch)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits  # glm-ft derives positions from the mask itself
        b = oracle(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)


def test_decoding_with_the_kv_cache_equals_the_oracles_full_forward(models):
    ours, oracle = models
    ids = torch.tensor(rows(ours.config.padded_vocab_size, [10]))
    with torch.no_grad():
        full = oracle(input_ids=ids).logits
        out = ours(input_ids=ids[:, :6], use_cache=True)
        steps = [out.logits]
        for i in range(6, 10):
            out = ours(input_ids=ids[:, i : i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_greedy_generation_gives_the_oracles_ids_with_left_padding(models):
    ours, oracle = models
    ids, mask = left_pad(rows(ours.config.padded_vocab_size, [8, 3, 6], seed=2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
        b = oracle.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert a.shape[1] == ids.shape[1] + 12
    assert torch.equal(a, b)

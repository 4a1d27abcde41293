"""P-Tuning v2 on the model's own prefix encoder: shapes, layout, use in forward and generate, init, freezing,
saving only the prefix and loading it back (also from the reference demo's whole-model checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm_ft.chatglm3.configuration import ChatGLMConfig
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
from glm_ft.chatglm3.prefix import PREFIX_CONFIG, PREFIX_WEIGHTS, enable_ptuning_v2, load_prefix, save_prefix
from glm_ft.chatglm3.tiny import TINY_CONFIG, ensure_tiny_model
from glm_ft.errors import CheckpointError

REAL_CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "chatglm3" / "config.json"
TOKENS = 4


def tiny_config(**overrides) -> ChatGLMConfig:
    return ChatGLMConfig.from_dict({**TINY_CONFIG, **overrides})


def base_model(seed: int = 0) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    return ChatGLMForConditionalGeneration(tiny_config()).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-chatglm3")


@pytest.fixture(scope="module")
def tuned() -> ChatGLMForConditionalGeneration:
    return enable_ptuning_v2(base_model(), TOKENS, seed=1).eval()


def greedy_by_full_forward(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, next_id), dim=1)
    return ids


def test_prefix_size_at_chatglm3_6b_shape_is_that_of_the_reference():
    if not REAL_CONFIG.is_file():
        pytest.skip(f"real ChatGLM3 fixture absent: {REAL_CONFIG}")
    config = ChatGLMConfig.from_dict(json.loads(REAL_CONFIG.read_text()))
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    enable_ptuning_v2(model, 128)
    trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight": [128, 14336]}
    assert model.num_parameters(only_trainable=True) == 1_835_008
    assert model.config.pre_seq_len == 128


def test_prefix_layout_is_layer_then_key_value_then_group_then_head_dim(tuned):
    cfg = tuned.config
    L, G, D = cfg.num_layers, cfg.multi_query_group_num, cfg.kv_channels
    weight = tuned.transformer.prefix_encoder.embedding.weight
    prompt = tuned.transformer.get_prompt(batch_size=3, dtype=torch.float32)  # eval: no dropout
    assert list(prompt.shape) == [L, 2, 3, G, TOKENS, D]
    for layer, kv, group, token, dim in [(0, 0, 0, 0, 0), (1, 0, 1, 2, 5), (1, 1, 0, 3, 15), (0, 1, 1, 1, 7)]:
        column = ((layer * 2 + kv) * G + group) * D + dim
        assert prompt[layer, kv, 2, group, token, dim] == weight[token, column]


def test_generate_uses_the_prefix_like_repeated_full_forwards(tuned):
    base = base_model()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        generated = tuned.generate(ids, max_new_tokens=8, do_sample=False)
        base_generated = base.generate(ids, max_new_tokens=8, do_sample=False)
        assert not torch.allclose(tuned(ids).logits, base(ids).logits, atol=1e-3)
    assert torch.equal(generated, greedy_by_full_forward(tuned, ids, 8))
    assert not torch.equal(generated, base_generated)


def test_prefix_model_keeps_left_padding_invariance(tuned):
    """Prefix keys carry no rotation, so here (unlike without a prefix) a row's positions must really restart at 0
    after its padding; the mask must also open the prefix to every row."""
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ids = torch.tensor([rows[0], [0] * 4 + rows[1]])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    with torch.no_grad():
        batch = tuned(ids, attention_mask=mask).logits
        batch_out = tuned.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        for i, row in enumerate(rows):
            alone = tuned(torch.tensor([row])).logits[0]
            assert torch.allclose(batch[i, -len(row) :], alone, atol=1e-5), i
            alone_out = tuned.generate(torch.tensor([row]), max_new_tokens=5, do_sample=False)
            assert batch_out[i, 7:].tolist() == alone_out[0, len(row) :].tolist(), i


def test_only_the_prefix_trains_and_gets_gradients():
    model = enable_ptuning_v2(base_model(), TOKENS, seed=1).train()
    ids = torch.randint(3, 3000, (2, 9), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("transformer.prefix_encoder."):
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_gradients_survive_gradient_checkpointing(reentrant):
    model = enable_ptuning_v2(base_model(), TOKENS, seed=1).train()
    model.transformer.prefix_dropout.p = 0.0  # same forward twice
    ids = torch.randint(3, 3000, (2, 9), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids).loss.backward()
    plain = model.transformer.prefix_encoder.embedding.weight.grad.clone()
    model.zero_grad()
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model(ids, labels=ids).loss.backward()
    assert torch.allclose(model.transformer.prefix_encoder.embedding.weight.grad, plain, atol=1e-6)


def test_prefix_init_is_seeded_normal_from_config_and_from_a_checkpoint_without_it(tiny_dir):
    from transformers import AutoModelForCausalLM

    def from_config(seed):
        torch.manual_seed(seed)
        return ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=64)).transformer.prefix_encoder.embedding.weight

    def from_checkpoint(seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_pretrained(tiny_dir, pre_seq_len=64)

    a, b, c = from_config(0), from_config(0), from_config(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    loaded, again = from_checkpoint(0), from_checkpoint(0)
    prefix = loaded.transformer.prefix_encoder.embedding.weight
    assert torch.equal(prefix, again.transformer.prefix_encoder.embedding.weight)
    for weight in (a, prefix):
        assert torch.isfinite(weight).all() and 0.9 < weight.std().item() < 1.1 and abs(weight.mean().item()) < 0.05
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for name, tensor in plain.state_dict().items():  # the base weights are the checkpoint's
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_enable_ptuning_v2_is_reproducible_with_a_seed():
    a = enable_ptuning_v2(base_model(), TOKENS, seed=7).transformer.prefix_encoder.embedding.weight
    torch.manual_seed(123)  # a given seed does not depend on, nor disturb, the global RNG
    state = torch.random.get_rng_state()
    b = enable_ptuning_v2(base_model(), TOKENS, seed=7).transformer.prefix_encoder.embedding.weight
    # the global RNG is where building the base model alone leaves it: the seeded prefix drew nothing from it
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    base_model()
    assert torch.equal(after, torch.random.get_rng_state())
    c = enable_ptuning_v2(base_model(), TOKENS, seed=8).transformer.prefix_encoder.embedding.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32


def test_save_prefix_writes_only_the_prefix_and_load_prefix_restores_it(tuned, tmp_path):
    from safetensors import safe_open

    save_prefix(tuned, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PREFIX_WEIGHTS, PREFIX_CONFIG])
    with safe_open(tmp_path / PREFIX_WEIGHTS, framework="pt") as f:
        assert list(f.keys()) == ["transformer.prefix_encoder.embedding.weight"]
    assert (tmp_path / PREFIX_WEIGHTS).stat().st_size < 4 * TOKENS * 256 + 1024  # the prefix, not the model
    assert json.loads((tmp_path / PREFIX_CONFIG).read_text()) == {"num_virtual_tokens": TOKENS,
                                                                   "prefix_projection": False}

    restored = load_prefix(base_model(), tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, tuned(ids).logits)


@pytest.mark.parametrize("form", ["safetensors_folder", "sharded_safetensors", "bin_file", "bin_folder"])
def test_load_prefix_reads_the_reference_whole_model_checkpoints(tuned, tmp_path, form):
    if form == "safetensors_folder":
        tuned.save_pretrained(tmp_path)
        source = tmp_path
    elif form == "sharded_safetensors":
        tuned.save_pretrained(tmp_path, max_shard_size="300KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        source = tmp_path
    else:  # the reference demo's torch.save of the whole state dict
        torch.save(tuned.state_dict(), tmp_path / "pytorch_model.bin")
        source = tmp_path / "pytorch_model.bin" if form == "bin_file" else tmp_path
    restored = load_prefix(base_model(), source)
    assert torch.equal(restored.transformer.prefix_encoder.embedding.weight,
                       tuned.transformer.prefix_encoder.embedding.weight)


def test_load_prefix_rejects_a_prefix_of_another_model_shape(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.prefix_encoder.embedding.weight": torch.zeros(TOKENS, 100)}, tmp_path / PREFIX_WEIGHTS)
    with pytest.raises(CheckpointError, match=r"\[num_virtual_tokens, 128\]"):
        load_prefix(base_model(), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no prefix_encoder.safetensors"):
        load_prefix(base_model(), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        load_prefix(base_model(), tmp_path / "missing")


def test_prefix_projection_adds_a_trainable_mlp_and_round_trips(tmp_path):
    model = enable_ptuning_v2(base_model(), TOKENS, prefix_projection=True, seed=2).eval()
    cfg = model.config
    kv_size = cfg.num_layers * 2 * cfg.multi_query_group_num * cfg.kv_channels
    h = cfg.hidden_size
    assert model.num_parameters(only_trainable=True) == TOKENS * kv_size + (kv_size * h + h) + (h * kv_size + kv_size)
    save_prefix(model, tmp_path)
    restored = load_prefix(base_model(), tmp_path).eval()
    assert restored.config.prefix_projection
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                           greedy_by_full_forward(model, ids, 4))


_ZERO3_SCRIPT = """
import sys, torch, deepspeed
from glm_ft.chatglm3.configuration import ChatGLMConfig
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
from glm_ft.chatglm3.prefix import enable_ptuning_v2, load_prefix, save_prefix
from glm_ft.chatglm3.tiny import TINY_CONFIG

torch.manual_seed(0)
model = enable_ptuning_v2(ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(TINY_CONFIG)), 4, seed=1)
weight = model.transformer.prefix_encoder.embedding.weight
trained = weight.detach().clone()
config = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}
deepspeed.initialize(model=model, model_parameters=[weight], config=config)
assert weight.numel() == 0, "not partitioned: the test would prove nothing"
save_prefix(model, sys.argv[1])
with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
    weight.data.zero_()
load_prefix(model, sys.argv[1])
with deepspeed.zero.GatheredParameters([weight]):
    print("RESTORED", torch.equal(weight, trained))
"""


@pytest.mark.slow
def test_save_and_load_prefix_gather_deepspeed_zero3_shards(tmp_path):
    """ZeRO-3 leaves an empty shard in each parameter outside forward; the prefix must be gathered to be saved and
    to be loaded back (in a subprocess: DeepSpeed's process group must not leak into other tests)."""
    import os
    import socket
    import sys

    from conftest import run_process
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    root = Path(__file__).resolve().parents[2]
    result = run_process([sys.executable, "-c", _ZERO3_SCRIPT, str(tmp_path)], cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESTORED True" in result.stdout
    saved = load_file(tmp_path / PREFIX_WEIGHTS)["transformer.prefix_encoder.embedding.weight"]
    assert list(saved.shape) == [TOKENS, 128] and saved.abs().sum() > 0

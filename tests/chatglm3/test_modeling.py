"""The native ChatGLM3: loading through the Auto classes, published weight layout, maths, cache, padding, generation,
checkpoint formats and gradient checkpointing, all at tiny size."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import glm_ft.chatglm3 as chatglm3
from glm_ft.chatglm3.configuration import ChatGLMConfig
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration, RotaryEmbedding, apply_rotary
from glm_ft.chatglm3.tiny import TINY_CONFIG, ensure_tiny_model
from glm_ft.chatglm3.tokenization import load_tiny_tokenizer

chatglm3.register()  # explicit, as glm_ft.model does before it loads a folder

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "chatglm3"


def real_file(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"real ChatGLM3 fixture absent: {path}")
    return path


def tiny_config(**overrides) -> ChatGLMConfig:
    return ChatGLMConfig.from_dict({**TINY_CONFIG, **overrides})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-chatglm3")


@pytest.fixture(scope="module")
def model() -> ChatGLMForConditionalGeneration:
    torch.manual_seed(0)
    return ChatGLMForConditionalGeneration(tiny_config()).eval()


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --- registration and loading ------------------------------------------------------------------------------------


def test_register_is_idempotent_and_maps_every_auto_class():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from glm_ft.chatglm3.tokenization import ChatGLMTokenizer

    chatglm3.register()
    chatglm3.register()
    assert isinstance(AutoConfig.for_model("chatglm"), ChatGLMConfig)
    for auto in (AutoModel, AutoModelForCausalLM):
        assert auto._model_mapping[ChatGLMConfig] is ChatGLMForConditionalGeneration
    assert TOKENIZER_MAPPING[ChatGLMConfig] is ChatGLMTokenizer


def test_importing_glm_ft_registers_nothing_until_asked():
    """Registration is explicit, where models load: importing glm_ft (and the light tiny module a dry run reads)
    neither imports transformers nor changes its Auto classes; `register()` then maps all of them."""
    import sys

    from conftest import run_process

    code = (
        "import sys, glm_ft, glm_ft.chatglm3, glm_ft.chatglm3.tiny; assert 'transformers' not in sys.modules; "
        "from transformers import AutoConfig, AutoModelForCausalLM as M; "
        "from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING as T; "
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING as C; "
        "assert 'chatglm' not in C; glm_ft.chatglm3.register(); "
        "c = type(AutoConfig.for_model('chatglm')); print(c.__name__, M._model_mapping[c].__name__, T[c].__name__)"
    )
    root = Path(__file__).resolve().parents[2]
    result = run_process([sys.executable, "-c", code], cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ChatGLMConfig", "ChatGLMForConditionalGeneration", "ChatGLMTokenizer"]


@pytest.mark.parametrize("trust", [False, None])
def test_auto_classes_load_the_folder_without_running_its_code(tiny_dir, tmp_path, trust):
    """The folder's config.json carries the published auto_map; a registered model_type must win over it and no
    file of the folder may run (each planted module would leave a marker)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from glm_ft.chatglm3.tokenization import ChatGLMTokenizer

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for item in tiny_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    marker = tmp_path / "remote_code_ran"
    for module in ("configuration_chatglm", "modeling_chatglm", "tokenization_chatglm"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('remote code')\n")
    assert "auto_map" in json.loads((folder / "config.json").read_text())

    kwargs = {} if trust is None else {"trust_remote_code": trust}
    config = AutoConfig.from_pretrained(folder, **kwargs)
    causal = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    base = AutoModel.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    fresh = AutoModelForCausalLM.from_config(config, **kwargs)

    assert type(config) is ChatGLMConfig
    assert type(causal) is type(base) is type(fresh) is ChatGLMForConditionalGeneration
    assert type(tokenizer) is ChatGLMTokenizer
    assert not marker.exists()
    for name, tensor in causal.state_dict().items():
        assert torch.equal(tensor, base.state_dict()[name]), name


# --- configuration -----------------------------------------------------------------------------------------------


def test_config_exposes_standard_names_in_to_dict_and_saves_the_original_layout(tmp_path):
    original = json.loads(real_file("config.json").read_text())
    config = ChatGLMConfig.from_dict(original)
    expected = {"num_hidden_layers": 28, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 65024,
                "max_position_embeddings": 8192}
    as_dict = config.to_dict()
    for key, value in expected.items():
        assert getattr(config, key) == value and as_dict[key] == value, key

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(expected) & set(saved)
    for key, value in original.items():
        if key not in ("torch_dtype", "transformers_version", "_name_or_path", "architectures"):
            assert saved[key] == value, key
    reloaded = ChatGLMConfig.from_pretrained(tmp_path)
    assert {k: v for k, v in reloaded.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in as_dict.items() if k != "_name_or_path"
    }

    aliased = ChatGLMConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert (aliased.num_layers, aliased.multi_query_attention, aliased.multi_query_group_num,
            aliased.kv_channels) == (3, True, 2, 16)


def test_weight_names_and_shapes_are_those_of_the_published_checkpoint():
    index = json.loads(real_file("model.safetensors.index.json").read_text())["weight_map"]
    bin_index = json.loads(real_file("pytorch_model.bin.index.json").read_text())["weight_map"]
    config = ChatGLMConfig.from_dict(json.loads(real_file("config.json").read_text()))
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    state = model.state_dict()
    assert set(state) == set(index) == set(bin_index)

    h, ffn, d = config.hidden_size, config.ffn_hidden_size, config.kv_channels
    qkv = (config.num_attention_heads + 2 * config.multi_query_group_num) * d
    per_layer = {
        "input_layernorm.weight": [h],
        "self_attention.query_key_value.weight": [qkv, h],
        "self_attention.query_key_value.bias": [qkv],
        "self_attention.dense.weight": [h, config.num_attention_heads * d],
        "post_attention_layernorm.weight": [h],
        "mlp.dense_h_to_4h.weight": [2 * ffn, h],
        "mlp.dense_4h_to_h.weight": [h, ffn],
    }
    expected = {
        "transformer.embedding.word_embeddings.weight": [config.padded_vocab_size, h],
        "transformer.rotary_pos_emb.inv_freq": [d // 4],
        "transformer.encoder.final_layernorm.weight": [h],
        "transformer.output_layer.weight": [config.padded_vocab_size, h],
    }
    for layer in range(config.num_layers):
        expected.update({f"transformer.encoder.layers.{layer}.{k}": v for k, v in per_layer.items()})
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert qkv == 4608 and sum(v.numel() for v in state.values()) == 6_243_584_000 + d // 4


# --- maths -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim, rope_ratio", [(4, 1.0), (8, 2.0)])
def test_rotary_rotates_interleaved_pairs_of_the_first_half_by_hand(head_dim, rope_ratio):
    config = ChatGLMConfig(kv_channels=head_dim, num_attention_heads=1, hidden_size=head_dim, rope_ratio=rope_ratio)
    cos, sin = RotaryEmbedding(config)(torch.tensor([[3]]))
    x = torch.arange(1.0, head_dim + 1).view(1, 1, 1, head_dim)  # [batch, heads, seq, dim]
    got = apply_rotary(x, cos, sin).flatten().tolist()

    base, rot = 10000.0 * rope_ratio, head_dim // 2
    expected = x.flatten().tolist()
    for i in range(rot // 2):
        angle = 3 * base ** (-2 * i / rot)
        a, b = expected[2 * i], expected[2 * i + 1]
        expected[2 * i] = a * math.cos(angle) - b * math.sin(angle)
        expected[2 * i + 1] = b * math.cos(angle) + a * math.sin(angle)
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[rot:] == x.flatten().tolist()[rot:]


def reference_logits(state: dict, config: ChatGLMConfig, ids: torch.Tensor) -> torch.Tensor:
    """An independent forward written after the published modeling_chatglm.py: [seq, batch, hidden] layout, rope
    cache of (cos, sin) pairs, key/value groups expanded with unsqueeze(-2), SwiGLU on chunk(2)."""
    L, H, G, D = config.num_layers, config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    sq, b = ids.shape[1], ids.shape[0]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon))

    dim = D // 2
    theta = 1.0 / (10000 * config.rope_ratio) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    idx_theta = torch.outer(torch.arange(sq, dtype=torch.float), theta)
    rope = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)[:, None]  # [sq, 1, dim/2, 2]

    def rotary(x):  # [sq, b, heads, D]
        x, x_pass = x[..., :dim], x[..., dim:]
        xs = x.reshape(sq, b, x.shape[2], dim // 2, 2)
        r = rope.view(sq, 1, 1, dim // 2, 2)
        out = torch.stack([xs[..., 0] * r[..., 0] - xs[..., 1] * r[..., 1],
                           xs[..., 1] * r[..., 0] + xs[..., 0] * r[..., 1]], -1).flatten(3)
        return torch.cat((out, x_pass), dim=-1)

    h = state["transformer.embedding.word_embeddings.weight"][ids].transpose(0, 1)  # [sq, b, hidden]
    for i in range(L):
        p = lambda name: state[f"transformer.encoder.layers.{i}.{name}"]  # noqa: E731
        x = rms(h, p("input_layernorm.weight"))
        qkv = x @ p("self_attention.query_key_value.weight").T + p("self_attention.query_key_value.bias")
        q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
        q, k, v = q.view(sq, b, H, D), k.view(sq, b, G, D), v.view(sq, b, G, D)
        q, k = rotary(q), rotary(k)
        k = k.unsqueeze(-2).expand(-1, -1, -1, H // G, -1).reshape(sq, b, H, D)
        v = v.unsqueeze(-2).expand(-1, -1, -1, H // G, -1).reshape(sq, b, H, D)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        context = context.permute(2, 0, 1, 3).reshape(sq, b, H * D)
        h = h + context @ p("self_attention.dense.weight").T
        x = rms(h, p("post_attention_layernorm.weight"))
        a, g = torch.chunk(x @ p("mlp.dense_h_to_4h.weight").T, 2, dim=-1)
        h = h + (F.silu(a) * g) @ p("mlp.dense_4h_to_h.weight").T
    h = rms(h, state["transformer.encoder.final_layernorm.weight"])
    return (h @ state["transformer.output_layer.weight"].T).transpose(0, 1)


def test_forward_matches_an_independent_reference_of_the_published_architecture():
    torch.manual_seed(5)
    model = ChatGLMForConditionalGeneration(tiny_config(rope_ratio=3.0)).eval()
    with torch.no_grad():  # move every weight off its init (norms 1, biases 0) so that each one matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    ids = torch.randint(3, 3000, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference_logits(model.state_dict(), model.config, ids)
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)
        model.config._attn_implementation = "eager"
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)


def test_loss_is_fp32_shifted_cross_entropy_ignoring_minus_100(model):
    ids = torch.randint(3, 3000, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_kv_cache_gives_the_logits_of_a_full_forward(model):
    from transformers import DynamicCache

    ids = torch.randint(3, 3000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        prefill = model(ids[:, :5], cache=cache, use_cache=True)  # a chunk first, then token by token
        steps = [prefill.logits]
        for i in range(5, ids.shape[1]):
            out = model(ids[:, i : i + 1], cache=prefill.cache, use_cache=True)
            steps.append(out.logits)
    assert prefill.cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_left_padded_rows_equal_the_rows_alone_in_logits_and_greedy_generation(model):
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 3000, (n,), generator=gen).tolist() for n in (9, 4, 6)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        batch_out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, row in enumerate(rows):
        alone = torch.tensor([row])
        with torch.no_grad():
            alone_logits = model(alone).logits
            alone_out = model.generate(alone, max_new_tokens=6, do_sample=False)
        assert torch.allclose(batch_logits[i, -len(row) :], alone_logits[0], atol=1e-5), i
        assert batch_out[i, ids.shape[1] :].tolist() == alone_out[0, len(row) :].tolist(), i


def test_eager_attention_matches_sdpa():
    from transformers import AutoModelForCausalLM

    chatglm3.register()
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(tiny_config()).eval()
    eager = AutoModelForCausalLM.from_config(tiny_config(), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        assert torch.allclose(sdpa(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits, atol=1e-5)
        assert torch.allclose(sdpa(ids).logits, eager(ids).logits, atol=1e-5)


# --- generation --------------------------------------------------------------------------------------------------


def test_generation_stops_at_any_of_several_eos_ids_and_pads_finished_rows(model):
    tokenizer = load_tiny_tokenizer()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    new = free[:, ids.shape[1] :]
    stop = new[0, 2].item()  # becomes an eos: row 0 must end right there
    assert stop not in new[0, :2].tolist()
    eos = [2, tokenizer.get_command("<|user|>"), stop]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    row0 = out[0, ids.shape[1] :].tolist()
    assert row0[:3] == new[0, :3].tolist() and set(row0[3:]) <= {0}
    cut = next((i for i, t in enumerate(new[1].tolist()) if t in eos), len(new[1]) - 1)
    assert out[1, ids.shape[1] :].tolist()[: cut + 1] == new[1, : cut + 1].tolist()


def test_sampling_is_reproducible_and_near_greedy_at_low_temperature(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
        torch.manual_seed(11)
        a = model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.0)
        torch.manual_seed(11)
        b = model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.0)
        cold = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=1e-4, top_k=0)
    assert torch.equal(a, b)
    assert torch.equal(cold, greedy)


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_save_and_load_give_identical_outputs_in_safetensors(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False),
                           model.generate(ids, max_new_tokens=5, do_sample=False))


def test_sharded_safetensors_with_index_load_back_exactly(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path, max_shard_size="300KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def _write_sharded_bin(model, folder: Path) -> None:
    """A checkpoint as the published model ships it: pytorch_model-0000N-of-00002.bin + index, plain tensors."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))


def test_sharded_pytorch_bin_checkpoint_loads(model, tmp_path):
    from transformers import AutoModelForCausalLM

    _write_sharded_bin(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


class _Payload:
    """Unpickling this object would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pytorch_bin_with_a_pickled_object_is_refused(model, tmp_path):
    from transformers import AutoModelForCausalLM

    _write_sharded_bin(model, tmp_path)
    marker = tmp_path / "payload_ran"
    shard = tmp_path / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, shard)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()
    torch.load(shard, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


# --- gradient checkpointing --------------------------------------------------------------------------------------


def _saved_activation_bytes_and_grads(model, ids):
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_gradients_and_saves_less(reentrant):
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(tiny_config(num_layers=4, padded_vocab_size=128)).train()
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(4))

    plain_bytes, plain_grads = _saved_activation_bytes_and_grads(model, ids)
    with pytest.warns(FutureWarning):  # transformers 5.24 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    assert all(layer.gradient_checkpointing for layer in model.transformer.encoder.layers)
    ckpt_bytes, ckpt_grads = _saved_activation_bytes_and_grads(model, ids)

    assert ckpt_bytes < 0.5 * plain_bytes
    for name, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], grad, atol=1e-6), name

"""The tiny checkpoint: published layout, sized to the tiny tokenizer, deterministic, idempotent, atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from glm_ft.chatglm3.tiny import TINY_CONFIG, ensure_tiny_model, main
from glm_ft.errors import CheckpointError

REAL_CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "chatglm3" / "config.json"


def test_vocab_is_the_tiny_tokenizer_rounded_up_to_64():
    from glm_ft.chatglm3.tokenization import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    assert tokenizer.vocab_size == tokenizer.sp_model.get_piece_size() + 9
    assert TINY_CONFIG["padded_vocab_size"] == math.ceil(tokenizer.vocab_size / 64) * 64
    assert tokenizer.get_command("<|observation|>") < TINY_CONFIG["padded_vocab_size"]


def test_embedded_6b_config_is_the_published_one():
    from glm_ft.chatglm3.tiny import CHATGLM3_6B_CONFIG

    if not REAL_CONFIG.is_file():
        pytest.skip(f"real ChatGLM3 fixture absent: {REAL_CONFIG}")
    assert CHATGLM3_6B_CONFIG == json.loads(REAL_CONFIG.read_text())


def test_tiny_config_has_the_published_keys_and_the_asked_sizes():
    if not REAL_CONFIG.is_file():
        pytest.skip(f"real ChatGLM3 fixture absent: {REAL_CONFIG}")
    assert set(TINY_CONFIG) == set(json.loads(REAL_CONFIG.read_text()))
    sizes = {k: TINY_CONFIG[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                                         "multi_query_group_num", "ffn_hidden_size", "seq_length")}
    assert sizes == {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
                     "multi_query_group_num": 2, "ffn_hidden_size": 160, "seq_length": 1024}


def test_ensure_tiny_model_builds_the_published_layout_and_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(tmp_path / "tiny")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model",
                                                      "tokenizer_config.json"]
    assert json.loads((path / "config.json").read_text()) == TINY_CONFIG
    assert "auto_map" in json.loads((path / "tokenizer_config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny"]  # no staging folder left behind

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    prompt += tokenizer.build_single_message("user", "", "你好") + [tokenizer.get_command("<|assistant|>")]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        logits = model(ids).logits
    assert out.shape == (1, len(prompt) + 3) and logits.shape[-1] == TINY_CONFIG["padded_vocab_size"]
    assert out[0, len(prompt)].item() == logits[0, -1].argmax().item()


def test_ensure_tiny_model_is_idempotent_and_deterministic(tmp_path):
    first = ensure_tiny_model(tmp_path / "a", seed=0)
    weights = (first / "model.safetensors").read_bytes()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(first, seed=0) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime

    (tmp_path / "b").mkdir()  # an empty folder is filled
    main([str(tmp_path / "b")])
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == weights
    other = ensure_tiny_model(tmp_path / "c", seed=1)
    assert (other / "model.safetensors").read_bytes() != weights


def test_ensure_tiny_model_refuses_a_folder_holding_something_else(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="busy"):
        ensure_tiny_model(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"

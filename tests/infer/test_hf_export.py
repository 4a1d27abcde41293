"""`python -m glm_ft export RUN OUT --format hf`: stock transformers, in a subprocess that cannot import glm_ft and
with trust_remote_code off, loads the export as GlmForCausalLM and gives glm-ft's token ids for conversations and
glm-ft's greedy outputs; the fast tokenizer matches glm-ft's on the tiny and (where present) the real tokenizer."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_process
from glm_ft.chatglm3.fast_tokenizer import save_fast_tokenizer
from glm_ft.chatglm3.tokenization import ChatGLMTokenizer, tiny_tokenizer_path
from glm_ft.infer.checkpoint import load_checkpoint
from glm_ft.errors import CheckpointError
from glm_ft.infer.export import export, main
from inference_fixtures import (METHODS, REFERENCE_PREFIX_TOKENS, base_dir, reference_ptuning_dir, runs,  # noqa: F401
                                train)

TOOLS = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": {"type": "string"}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "类型#裙*颜色#红色"}],
    [{"role": "system", "content": "You are a helpful assistant.", "tools": TOOLS},
     {"role": "user", "content": "北京天气怎么样？"},
     {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
     {"role": "observation", "content": '{"temperature": 22}'},
     {"role": "assistant", "content": "北京今天 22 度。"},
     {"role": "user", "content": "  two spaces,\ttabs\n\nand isopropyl sops  "}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": "x"},
     {"role": "user", "content": "café 😀 123456"}],
]
MAX_NEW = 16

# Runs with `python -I` (no cwd, no PYTHONPATH, no user site) from an empty folder: glm_ft cannot be imported.
STOCK_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, conversations, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in conversations]
tools_ids = tokenizer.apply_chat_template(conversations[0], tools=json.loads(sys.argv[4]), add_generation_prompt=True,
                                         return_dict=False)
batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True, return_dict=True,
                                      return_tensors="pt")
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=max_new, do_sample=False)
new = out[:, batch["input_ids"].shape[1]:].tolist()
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "dtype": str(model.dtype),
                  "ids": ids, "tools_ids": tools_ids,
                  "generated": new, "glm_ft_imported": any(m.startswith("glm_ft") for m in sys.modules)}))
"""


def stock_transformers(folder: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    result = run_process(
        [sys.executable, "-I", "-c", STOCK_SCRIPT, str(folder), json.dumps(CONVERSATIONS), str(MAX_NEW),
         json.dumps(TOOLS)], cwd=empty, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def glm_ft_greedy(loaded, conversations) -> list[list[int]]:
    """glm-ft's own generation, one conversation at a time (no padding), cut after the first stop token."""
    tokenizer, model = loaded.tokenizer, loaded.model
    stops = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    outputs = []
    for conversation in conversations:
        ids, _ = tokenizer.encode_conversation(conversation, add_generation_prompt=True)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        outputs.append(cut(out[0, len(ids):].tolist(), stops))
    return outputs


def cut(ids: list[int], stops: list[int]) -> list[int]:
    end = next((i + 1 for i, tok in enumerate(ids) if tok in stops), len(ids))
    return ids[:end]


@pytest.mark.slow
def test_stock_transformers_loads_the_merged_lora_export_and_matches_glm_ft(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main([str(runs["lora"]), str(out), "--format", "hf", "--max-shard-size", "500KB"]) == 0
    assert "(merged into the base weights)" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names and not any(n.endswith(".py") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    assert "auto_map" not in config and "_name_or_path" not in config
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config and "chat_template" in tokenizer_config

    stock = stock_transformers(out, tmp_path)
    assert stock["class"] == "transformers.models.glm.modeling_glm.GlmForCausalLM"
    assert stock["glm_ft_imported"] is False

    loaded = load_checkpoint(runs["lora"], device="cpu")  # the adapter unmerged, through glm-ft's own loader
    tokenizer = loaded.tokenizer
    assert stock["ids"] == [tokenizer.encode_conversation(c, add_generation_prompt=True)[0] for c in CONVERSATIONS]
    assert stock["tools_ids"] == tokenizer.apply_chat_template(CONVERSATIONS[0], tools=TOOLS,
                                                               add_generation_prompt=True)
    # Stock generation ran as one left-padded batch and stops on ChatGLM3's stop tokens from generation_config.json;
    # after a row stops it is padded, so compare up to and including the first stop token.
    stops = [2, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    ours = glm_ft_greedy(loaded, CONVERSATIONS)
    assert [cut(g, stops) for g in stock["generated"]] == ours
    assert any(len(g) > 3 for g in ours)  # the tiny model really generates something to compare


@pytest.mark.slow
def test_an_sft_trained_in_bf16_exports_and_opens_in_bf16(tmp_path):
    """model.torch_dtype=bfloat16 sft: the export keeps the dtype it was trained in (its default, the weights'),
    and stock transformers opens it as bf16, as the run's config.json says."""
    run = train(tmp_path / "run", *METHODS["sft"], "model.torch_dtype=bfloat16")
    out = export(run, tmp_path / "hf", fmt="hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    stock = stock_transformers(out, tmp_path)
    assert stock["class"] == "transformers.models.glm.modeling_glm.GlmForCausalLM"
    assert stock["dtype"] == "torch.bfloat16" and stock["glm_ft_imported"] is False
    assert any(stock["generated"])


@pytest.mark.slow
def test_ptuning_is_refused_before_loading_with_the_alternative_named(runs, reference_ptuning_dir, tmp_path, capsys):
    for source in (runs["ptuning_v2"], reference_ptuning_dir):
        assert main([str(source), str(tmp_path / "out"), "--format", "hf"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "P-Tuning v2" in err and "--format chatglm3" in err and "python -m glm_ft serve" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="format 'gguf'"):
        export(runs["lora"], tmp_path / "x", fmt="gguf")


def random_conversations(seed: int, count: int) -> list[list[dict]]:
    rnd = random.Random(seed)
    pieces = list("ab cd  ef\n\t12 34你好世界，。!?▁") + ["hello", " world", "isopropyl", "  ", "\n\n", "123456",
                                                        "café", "😀", "<", "|>"]
    text = lambda: "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12)))  # noqa: E731
    conversations = []
    for _ in range(count):
        conversation = []
        for _ in range(rnd.randint(1, 4)):
            role = rnd.choice(["system", "user", "assistant", "observation"])
            message = {"role": role, "content": text()}
            if rnd.random() < 0.2:
                message["metadata"] = rnd.choice(["tool_x", "get weather", " sp"])
            if role == "system" and rnd.random() < 0.3:
                message["tools"] = TOOLS
            conversation.append(message)
        conversations.append(conversation)
    return conversations


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_fast_tokenizer_encodes_conversations_as_glm_ft(which, tmp_path, request):
    from transformers import AutoTokenizer

    model_file = tiny_tokenizer_path() if which == "tiny" else request.getfixturevalue("real_chatglm3_dir") / \
        "tokenizer.model"
    slow = ChatGLMTokenizer(vocab_file=str(model_file))
    save_fast_tokenizer(model_file, tmp_path, model_max_length=8192)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    assert type(fast).__module__.startswith("transformers.") and fast.is_fast
    n = slow.sp_model.get_piece_size()
    assert [fast.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop", "<|user|>", "<|observation|>")] == \
        [n + 1, n + 3, n + 6, n + 8]
    for i, conversation in enumerate(random_conversations(seed=len(which), count=400)):
        generation = i % 2 == 0
        want = slow.encode_conversation(conversation, add_generation_prompt=generation)[0]
        got = fast.apply_chat_template(conversation, add_generation_prompt=generation, return_dict=False)
        assert got == want, conversation
    if which == "real":  # the published example
        assert fast.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                        return_dict=False) == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]


def test_typed_control_tokens_in_message_text(tmp_path):
    """The documented difference: a plain apply_chat_template matches control tokens typed in a message (any HF chat
    template does); sanitize_control_tokens=True keeps them text, as glm-ft does, splitting off the space before."""
    from transformers import AutoTokenizer

    slow = ChatGLMTokenizer(vocab_file=str(tiny_tokenizer_path()))
    save_fast_tokenizer(tiny_tokenizer_path(), tmp_path, model_max_length=8192)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    user = slow.get_command("<|user|>")
    conversation = [{"role": "user", "content": "say<|user|>now"}]
    want = slow.encode_conversation(conversation)[0]
    assert want.count(user) == 1
    assert fast.apply_chat_template(conversation, return_dict=False).count(user) == 2
    assert fast.apply_chat_template(conversation, return_dict=False, sanitize_control_tokens=True) == want
    # isopropyl keeps its letters: "sop" is matched only as a whole word
    assert fast.apply_chat_template([{"role": "user", "content": "isopropyl"}], return_dict=False) == \
        slow.encode_conversation([{"role": "user", "content": "isopropyl"}])[0]

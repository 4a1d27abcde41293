"""ChatGLMTokenizer against the published ids (real tokenizer.model from shared/chatglm3) and the shipped tiny one."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from glm_ft.chatglm3.tokenization import SPECIAL_TOKENS, ChatGLMTokenizer, load_tiny_tokenizer, tiny_tokenizer_path

TOOLS = [
    {
        "name": "get_weather",
        "description": "查询某个城市的天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


@pytest.fixture(scope="module")
def real(real_chatglm3_dir):
    return ChatGLMTokenizer(vocab_file=str(real_chatglm3_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def real_sp(real_chatglm3_dir):
    return spm.SentencePieceProcessor(model_file=str(real_chatglm3_dir / "tokenizer.model"))


def test_chat_template_gives_the_published_ids(real):
    expected = [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    assert real.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True) == expected
    assert real.build_chat_input("你好", return_tensors=None)["input_ids"] == [expected]
    without_prompt = real.apply_chat_template([{"role": "user", "content": "你好"}])
    assert without_prompt == expected[:-1]


def test_special_token_ids(real):
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert real.get_command(token) == 64789 + offset
        assert real.convert_tokens_to_ids(token) == 64789 + offset
        assert real.convert_ids_to_tokens(64789 + offset) == token
    assert (real.get_command("<bos>"), real.get_command("<eos>"), real.get_command("<pad>")) == (1, 2, 0)
    assert (real.eos_token_id, real.pad_token_id, real.unk_token_id) == (2, 0, 0)
    assert real.get_prefix_tokens() == [64790, 64792]
    assert real.sp_encode("\n") == [30910, 13]
    assert len(real) == real.vocab_size == 64798
    assert real.padding_side == "left"
    with pytest.raises(ValueError, match="not a ChatGLM3 special token"):
        real.get_command("<|tool|>")


def test_message_layout_and_tools_on_system(real, real_sp):
    conversation = [
        {"role": "system", "content": "你是助手。", "tools": TOOLS},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": '```python\ntool_call(city="北京")\n```'},
        {"role": "observation", "content": '{"temperature": 25}'},
    ]
    tools_json = json.dumps(TOOLS, indent=4, ensure_ascii=False)
    assert '"description": "查询某个城市的天气"' in tools_json and '\n    {\n        "name"' in tools_json
    expected = (
        [64790, 64792]
        + [64794] + real_sp.encode("\n") + real_sp.encode("你是助手。\n" + tools_json)
        + [64795] + real_sp.encode("\n") + real_sp.encode("北京天气？")
        + [64796] + real_sp.encode("get_weather\n") + real_sp.encode('```python\ntool_call(city="北京")\n```')
        + [64797] + real_sp.encode("\n") + real_sp.encode('{"temperature": 25}')
        + [64796]
    )
    assert real.apply_chat_template(conversation, add_generation_prompt=True) == expected
    # The HF-style `tools` argument lands on the system message the same way.
    as_argument = [{"role": "system", "content": "你是助手。"}, *conversation[1:]]
    assert real.apply_chat_template(as_argument, tools=TOOLS, add_generation_prompt=True) == expected


def test_typed_special_text_stays_text(real):
    ids = real.build_single_message("user", "", "<|assistant|> sop [gMASK]")
    assert ids[0] == 64795 and not set(ids[1:]) & set(range(64789, 64798))
    # "sop"/"eop" are words too; only unmistakable markers are matched when raw text is tokenized.
    assert 64792 not in real("isopropyl sop eop")["input_ids"][2:]
    assert real("a<|user|>b")["input_ids"][2:].count(64795) == 1


@pytest.mark.parametrize(
    "text",
    ["你好，世界！今天天气很好。", "Hello, world: fine-tuning 6B models.", "emoji 😀🎉 and 中文 mixed", "two\n\nlines  and  spaces"],
)
@pytest.mark.parametrize("which", ["real", "tiny"])
def test_encode_decode_round_trip(request, which, text):
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode(text)
    assert ids[:2] == tokenizer.get_prefix_tokens()
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "[gMASK]sop" + text


def test_decode_skips_roles_pad_and_ids_without_text(real):
    ids = real.apply_chat_template(
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}], add_generation_prompt=False
    )
    shown = real.decode(ids)
    assert shown.startswith("[gMASK]sop<|user|>") and "<|assistant|>" in shown
    clean = real.decode([0, 0] + ids + [2, -100, 65000], skip_special_tokens=True)
    assert not any(token in clean for token in SPECIAL_TOKENS)
    assert "你好" in clean and "好的" in clean and "</s>" not in clean and "<unk>" not in clean
    assert real.batch_decode([[64796, 36474, 54591], [0, 0, 2]], skip_special_tokens=True) == ["你好", ""]


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_batch_pads_on_the_left(request, which):
    tokenizer = request.getfixturevalue(which)
    batch = tokenizer(["你好", "Hello world, 😀 fine"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long) > 4
    pad = len(long) - len(tokenizer("你好")["input_ids"])
    assert short[:pad] == [0] * pad and short[pad:pad + 2] == tokenizer.get_prefix_tokens()
    assert batch["attention_mask"][0] == [0] * pad + [1] * (len(short) - pad)
    assert batch["attention_mask"][1] == [1] * len(long)


def test_batched_chat_template_with_tensors(real):
    pytest.importorskip("torch")
    conversations = [[{"role": "user", "content": "你好"}], [{"role": "user", "content": "今天北京的天气怎么样？"}]]
    out = real.apply_chat_template(conversations, add_generation_prompt=True, return_dict=True, padding=True,
                                   return_tensors="pt")
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].shape[0] == 2
    assert out["input_ids"][0, -8:].tolist() == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    assert out["attention_mask"][0, 0].item() == 0 and out["input_ids"][:, -1].tolist() == [64796, 64796]


def test_assistant_mask_covers_what_the_assistant_produced(real):
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]
    out = real.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    start = ids.index(64796)
    assert mask[: start + 1] == [0] * (start + 1) and mask[start + 1:] == [1] * (len(ids) - start - 1)


def test_autotokenizer_loads_published_folder_and_saves(real_chatglm3_dir, tmp_path, real):
    from transformers import AutoTokenizer

    from glm_ft import chatglm3

    chatglm3.register()
    published = tmp_path / "published"
    published.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(real_chatglm3_dir / name, published / name)
    loaded = AutoTokenizer.from_pretrained(published, trust_remote_code=False)
    assert type(loaded) is ChatGLMTokenizer and loaded.padding_side == "left"
    conversation = [{"role": "user", "content": "sop 你好 <|user|>"}, {"role": "assistant", "content": "ok"}]
    assert loaded.apply_chat_template(conversation) == real.apply_chat_template(conversation)
    assert loaded("isopropyl sop")["input_ids"] == real("isopropyl sop")["input_ids"]

    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)
    assert (saved / "tokenizer.model").read_bytes() == (published / "tokenizer.model").read_bytes()
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLMTokenizer"
    reloaded = ChatGLMTokenizer.from_pretrained(saved)
    assert reloaded.apply_chat_template(conversation) == real.apply_chat_template(conversation)
    assert len(reloaded) == 64798


def test_tiny_tokenizer_follows_the_real_scheme(tiny):
    path = tiny_tokenizer_path()
    assert path.is_file() and path.stat().st_size < 500_000
    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert [tiny.get_command(token) for token in SPECIAL_TOKENS] == list(range(n, n + 9))
    assert len(tiny) == n + 9
    newline = tiny.sp_encode("\n")
    assert [sp.id_to_piece(i) for i in newline] == ["▁", "<0x0A>"]
    ids = tiny.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert ids == [n + 1, n + 3, n + 6, *newline, *sp.encode("你好"), n + 7]


def test_tiny_tokenizer_saves_and_reloads(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == tiny_tokenizer_path().read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLMTokenizer"
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    conversation = [{"role": "system", "content": "助手", "tools": TOOLS}, {"role": "user", "content": "sop <|user|>"}]
    assert reloaded.apply_chat_template(conversation) == tiny.apply_chat_template(conversation)
    assert reloaded("x <|user|> sop")["input_ids"] == tiny("x <|user|> sop")["input_ids"]
    assert (len(reloaded), reloaded.padding_side) == (len(tiny), "left")


def test_tiny_tokenizer_rebuilds_to_the_committed_bytes(tmp_path):
    from glm_ft.chatglm3.assets.build_tiny_tokenizer import build

    rebuilt = build(tmp_path / "tiny.model")
    assert rebuilt.read_bytes() == tiny_tokenizer_path().read_bytes(), (
        "the committed tiny tokenizer is stale: run `python -m glm_ft.chatglm3.assets.build_tiny_tokenizer`"
    )

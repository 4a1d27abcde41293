"""The whole-file layout (glm_ft/data/columns.py) gives exactly the samples of row-at-a-time encoding, on rows of
every shape the formats allow, cut anywhere, across chunk boundaries, and through load_datasets' cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from glm_ft.chatglm3.tokenization import ChatGLMTokenizer, load_tiny_tokenizer
from glm_ft.data import columns
from glm_ft.data.dataset import IGNORE_INDEX, build_train_sample, load_datasets, read_conversations

TOOLS = [{"name": "get_weather", "description": "查询天气", "parameters": {"type": "object", "properties": {}}}]
ROWS = [
    {"content": "类型#裙*颜色#红色", "summary": "一条红色的裙子，简约大方。"},  # AdvertiseGen
    {"content": "", "summary": "空的提问"},
    {"conversations": [
        {"role": "system", "content": "你是助手。", "tools": TOOLS},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": '```python\ntool_call(city="北京")\n```'},
        {"role": "observation", "content": '{"temperature": 25}'},
        {"role": "assistant", "content": "北京今天25度。"}]},
    {"conversations": [  # loss flags both ways, an empty reply, a trained observation
        {"role": "user", "content": "hi", "loss": True},
        {"role": "assistant", "content": "", "loss": False},
        {"role": "observation", "content": "tool output", "loss": True},
        {"role": "assistant", "content": "done"}]},
    {"conversations": [{"role": "user", "content": "only the last turn trains " * 8},
                       {"role": "assistant", "content": "first", "loss": False},
                       {"role": "user", "content": "again"},
                       {"role": "assistant", "content": "second answer, a longer one " * 4}]},
    {"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be brief.",  # alpaca
     "history": [["hi", "hello!"]]},
    {"instruction": "类型#裙", "input": "", "output": "一条红裙。"},
    {"content": "类型#裙", "summary": "一条红裙。"},  # the same texts again: encoded once, used twice
    {"conversations": [{"from": "human", "value": "北京天气?"}, {"from": "function_call", "value": json.dumps(
                           {"name": "get_weather", "arguments": {"city": "北京"}}, ensure_ascii=False)},
                       {"from": "observation", "value": "22"}, {"from": "gpt", "value": "22 度"}],  # sharegpt
     "tools": json.dumps(TOOLS), "system": "你是助手"},
]
# (max_input_length, max_output_length): nothing cut; cut inside the replies; cut so early that some rows keep no
# target and are dropped
LIMITS = [(512, 512), (12, 8), (4, 2)]


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_tokenizer()


@pytest.fixture(params=["tiny", "real"])
def tokenizer(request, tiny):
    if request.param == "tiny":
        return tiny
    return ChatGLMTokenizer(vocab_file=str(request.getfixturevalue("real_chatglm3_dir") / "tokenizer.model"))


def reference_samples(conversations, tokenizer, limit):
    """Row at a time, written out from SentencePiece itself: each message is `<|role|>` + metadata + "\\n" + its
    text; token i is a target iff token i-1 is in a message that carries loss; cut to `limit`; a sample without a
    target left is dropped."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.vocab_file))
    samples, truncated = [], 0
    for conversation in conversations:
        ids, in_loss = list(tokenizer.get_prefix_tokens()), [False, False]
        for m in conversation.messages:
            text = m.content + ("\n" + json.dumps(m.tools, indent=4, ensure_ascii=False) if m.tools else "")
            part = [tokenizer.get_command(f"<|{m.role}|>")] + sp.encode(m.metadata + "\n") + sp.encode(text)
            ids += part
            in_loss += [m.loss if m.loss is not None else m.role == "assistant"] * len(part)
        ids.append(tokenizer.eos_token_id)
        labels = [IGNORE_INDEX] + [tok if before else IGNORE_INDEX for tok, before in zip(ids[1:], in_loss)]
        if any(label != IGNORE_INDEX for label in labels[:limit]):
            samples.append((ids[:limit], labels[:limit]))
            truncated += len(ids) > limit
    return samples, truncated


def _rows_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("max_input_length, max_output_length", LIMITS)
def test_train_table_equals_row_at_a_time(tokenizer, tmp_path, monkeypatch, chunk, max_input_length,
                                          max_output_length):
    if chunk:  # rows laid out and texts encoded 3 at a time: every boundary case in a few rows
        monkeypatch.setattr(columns, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(columns, "CHUNK_TEXTS", chunk)
    conversations = read_conversations(_rows_file(tmp_path / "rows.jsonl"))
    assert len(conversations) == len(ROWS)
    limit = max_input_length + max_output_length + 1
    expected, expected_truncated = reference_samples(conversations, tokenizer, limit)
    for threads in (1, 2):
        table, truncated = columns.train_table(columns.encode_rows(conversations, tokenizer, threads),
                                               max_input_length, max_output_length)
        got = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))
        assert got == expected and truncated == expected_truncated
    # and the per-row definition agrees, sample for sample
    per_row = [build_train_sample(c.messages, tokenizer, max_input_length, max_output_length) for c in conversations]
    assert [(s["input_ids"], s["labels"]) for s in per_row if set(s["labels"]) != {IGNORE_INDEX}] == expected
    if max_input_length == 4:
        assert 0 < len(expected) < len(ROWS)  # the dropping is exercised
    if max_input_length == 12:
        assert expected_truncated > 0


def test_another_tokenizer_class_goes_message_by_message(tiny, tmp_path):
    class Subclass(ChatGLMTokenizer):  # a build_single_message of its own: the bulk SentencePiece call can't stand in
        calls = 0

        def build_single_message(self, role, metadata, message):
            Subclass.calls += 1
            return super().build_single_message(role, metadata, message)

    other = Subclass(vocab_file=str(tiny.vocab_file))
    conversations = read_conversations(_rows_file(tmp_path / "rows.jsonl"))
    table, _ = columns.train_table(columns.encode_rows(conversations, other), 512, 512)
    assert Subclass.calls == sum(len(c.messages) for c in conversations)
    got = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))
    assert got == reference_samples(conversations, tiny, 1025)[0]


def test_load_datasets_saves_the_table_and_counts(tiny, tmp_path, caplog):
    import datasets

    path = _rows_file(tmp_path / "rows.jsonl")
    config = {"data_dir": str(tmp_path), "train_file": path.name, "num_proc": 2}
    bundle = load_datasets(config, tiny, 12, 8, cache_dir=tmp_path / "cache")
    expected, truncated = reference_samples(read_conversations(path), tiny, 21)
    assert list(zip(bundle.train["input_ids"], bundle.train["labels"])) == expected
    assert bundle.stats["data.train.truncated"] == truncated
    assert bundle.stats["data.train.dropped_no_target"] == len(ROWS) - len(expected)
    # the column types datasets gives such lists itself (input_ids is one of the names it stores as int32)
    reference = datasets.Dataset.from_dict({"input_ids": [e[0] for e in expected], "labels": [e[1] for e in expected]})
    assert bundle.train.features == reference.features
    again = load_datasets(config, tiny, 12, 8, cache_dir=tmp_path / "cache")
    assert again.stats["data.train.cached"] == 1 and again.train["labels"] == bundle.train["labels"]

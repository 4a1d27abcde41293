"""Data pipeline: file reading and its errors, the sample layout (ids and labels), eval samples, cached datasets."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from glm_ft.chatglm3.tokenization import ChatGLMTokenizer, load_tiny_tokenizer, tiny_tokenizer_path
from glm_ft.data.dataset import (
    IGNORE_INDEX,
    Message,
    build_eval_samples,
    build_train_sample,
    load_datasets,
    read_conversations,
    read_rows,
)
from glm_ft.errors import DataError

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
TOOLS = [{"name": "get_weather", "description": "查询天气", "parameters": {"type": "object", "properties": {}}}]
MULTI_TURN = [
    {"role": "system", "content": "你是助手。", "tools": TOOLS},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": '```python\ntool_call(city="北京")\n```'},
    {"role": "observation", "content": '{"temperature": 25}'},
    {"role": "assistant", "content": "北京今天25度。"},
]


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def real(real_chatglm3_dir):
    return ChatGLMTokenizer(vocab_file=str(real_chatglm3_dir / "tokenizer.model"))


@pytest.fixture(params=["tiny", "real"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _sp(tokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer.vocab_file))


def _expected(tokenizer, messages):
    """The layout written out per message: a message that carries loss trains the tokens after its own role token
    and the first token after it."""
    sp = _sp(tokenizer)
    cmd = tokenizer.get_command
    ids, labels, previous_trained = [cmd("[gMASK]"), cmd("sop")], [IGNORE_INDEX, IGNORE_INDEX], False
    for message in messages:
        content = message["content"]
        if message.get("tools"):
            content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        part = [cmd(f"<|{message['role']}|>")] + sp.encode(message.get("metadata", "") + "\n") + sp.encode(content)
        trained = message.get("loss", message["role"] == "assistant")
        labels += [part[0] if previous_trained else IGNORE_INDEX] + [t if trained else IGNORE_INDEX for t in part[1:]]
        ids += part
        previous_trained = trained
    ids.append(2)
    labels.append(2 if previous_trained else IGNORE_INDEX)
    return ids, labels


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


GOOD = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]}


# --- samples ---


def test_train_sample_published_ids(real):
    conversation = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "好的。"},
        {"role": "observation", "content": "ok"},
        {"role": "assistant", "content": "Yes"},
    ]
    sample = build_train_sample(conversation, real, 64, 64)
    assert sample["input_ids"] == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 30910, 13, 30910, 31702,
                                   31155, 64797, 30910, 13, 5942, 64796, 30910, 13, 4291, 2]
    # The assistant's "▁ \n", its content and the next token (<|observation|>, then eos) are targets; the
    # observation's own tokens are not (the reference demo trained them).
    assert sample["labels"] == [-100] * 8 + [30910, 13, 30910, 31702, 31155, 64797] + [-100] * 4 + [30910, 13, 4291, 2]
    assert sample["truncated"] is False


def test_train_sample_multi_turn_with_tools(tokenizer):
    sample = build_train_sample(MULTI_TURN, tokenizer, 512, 512)
    ids, labels = _expected(tokenizer, MULTI_TURN)
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels
    assert len(sample["labels"]) == len(sample["input_ids"]) and not sample["truncated"]


def test_loss_flags_override_the_role_default(tokenizer):
    messages = [
        {"role": "user", "content": "查一下"},
        {"role": "assistant", "content": "调用工具", "loss": False},
        {"role": "observation", "content": "结果是42", "loss": True},
        {"role": "assistant", "content": "答案是42"},
    ]
    sample = build_train_sample(messages, tokenizer, 256, 256)
    assert (sample["input_ids"], sample["labels"]) == _expected(tokenizer, messages)
    observation = tokenizer.get_command("<|observation|>")
    start = sample["input_ids"].index(observation)
    assert sample["labels"][start] == IGNORE_INDEX and sample["labels"][start + 1] != IGNORE_INDEX
    first_reply = sample["input_ids"].index(tokenizer.get_command("<|assistant|>"))
    assert set(sample["labels"][: start]) == {IGNORE_INDEX} and first_reply < start


def test_train_truncation_keeps_the_head(tokenizer):
    messages = [{"role": "user", "content": "写一段文案"}, {"role": "assistant", "content": "舒适百搭的连衣裙。" * 20}]
    full = build_train_sample(messages, tokenizer, 1000, 1000)
    cut = build_train_sample(messages, tokenizer, 8, 8)
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:17] and cut["labels"] == full["labels"][:17]


def test_eval_samples_one_per_assistant_turn(tokenizer):
    samples = build_eval_samples(MULTI_TURN, tokenizer, 1024, 1024)
    ids, _ = _expected(tokenizer, MULTI_TURN)
    assistant = tokenizer.get_command("<|assistant|>")
    turns = [i for i, token in enumerate(ids) if token == assistant]
    assert len(samples) == 2
    observation = ids.index(tokenizer.get_command("<|observation|>"))
    for sample, start, end in zip(samples, turns, [observation, len(ids) - 1]):
        assert sample["input_ids"] == ids[: start + 1]
        assert sample["output_ids"] == ids[start + 1 : end] + [2]
        assert not sample["input_truncated"] and not sample["output_truncated"]


def test_eval_truncation_keeps_prefix_recent_context_and_eos(tokenizer):
    history = []
    for turn in range(6):
        history += [{"role": "user", "content": f"第{turn}个问题：这件衣服怎么样？"},
                    {"role": "assistant", "content": f"第{turn}个回答：很好看，也很舒适。"}]
    full = build_eval_samples(history, tokenizer, 4096, 4096)
    cut = build_eval_samples(history, tokenizer, 16, 4)
    assert len(cut) == len(full) == 6  # no turn is lost to a long context
    last_full, last_cut = full[-1], cut[-1]
    assert last_cut["input_ids"][:2] == tokenizer.get_prefix_tokens()
    assert last_cut["input_ids"][2:] == last_full["input_ids"][-15:]
    assert len(last_cut["input_ids"]) == 17 and last_cut["input_truncated"]
    assert last_cut["output_ids"] == last_full["output_ids"][:3] + [2] and last_cut["output_truncated"]


def test_messages_may_be_message_objects(tiny):
    as_dicts = build_train_sample(MULTI_TURN, tiny, 256, 256)
    objects = [Message(m["role"], m["content"], m.get("metadata", ""), m.get("tools")) for m in MULTI_TURN]
    assert build_train_sample(objects, tiny, 256, 256) == as_dicts


# --- reading files ---


def test_jsonl_and_json_array_read_the_same(tmp_path):
    rows = [GOOD, {"conversations": MULTI_TURN}]
    lines = read_conversations(_write(tmp_path / "a.jsonl", _jsonl(rows)))
    array = read_conversations(_write(tmp_path / "b.json", json.dumps(rows, ensure_ascii=False, indent=2)))
    json_lines = read_conversations(_write(tmp_path / "c.json", _jsonl(rows)))
    assert [c.messages for c in lines] == [c.messages for c in array] == [c.messages for c in json_lines]
    assert lines[1].messages[0].tools == TOOLS and lines[1].messages[2].metadata == "get_weather"
    assert [c.where for c in lines] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2"]
    assert array[1].where == f"{tmp_path / 'b.json'}:{_array_line_of_second_row(rows)}"


def _array_line_of_second_row(rows) -> int:
    text = json.dumps(rows, ensure_ascii=False, indent=2)
    return text[: text.index('{\n    "conversations"', 10)].count("\n") + 1


SYSTEM = "你是广告文案助手，回答要简短。"
# Rows that carry a system prompt (and tools) at row level, in each format, beside the conversation they stand for;
# None where the format has no place for it.
ROW_LEVEL = [
    ({"system": SYSTEM, "conversations": GOOD["conversations"]}, None),
    ({"content": "类型#裙", "summary": "一条裙子。", "system": SYSTEM}, None),
    ({"content": "类型#裙", "summary": "一条裙子。", "tools": TOOLS}, None),
    ({"system": "", "content": "类型#裙", "summary": "一条裙子。"},  # empty: nothing to lose, read as before
     [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条裙子。"}]),
    ({"system": None, "conversations": GOOD["conversations"]}, GOOD["conversations"]),
    ({"instruction": "北京天气?", "output": "晴", "system": SYSTEM, "tools": json.dumps(TOOLS)},  # alpaca
     [{"role": "system", "content": SYSTEM, "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
      {"role": "assistant", "content": "晴"}]),
    ({"conversations": [{"from": "human", "value": "北京天气?"}, {"from": "gpt", "value": "晴"}],  # sharegpt
      "system": SYSTEM, "tools": TOOLS},
     [{"role": "system", "content": SYSTEM, "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
      {"role": "assistant", "content": "晴"}]),
]


def test_a_row_level_system_prompt_or_tools_is_trained_or_refused_never_dropped(tiny, tmp_path):
    for number, (row, native) in enumerate(ROW_LEVEL):
        path = _write(tmp_path / f"rows{number}.jsonl", _jsonl([GOOD, row]))
        if native is None:
            key = "system" if row.get("system") else "tools"
            with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*'{key}'"):
                read_conversations(path)
            continue
        (_, conversation) = read_conversations(path)
        sample = build_train_sample(conversation.messages, tiny, 512, 512)
        assert (sample["input_ids"], sample["labels"]) == _expected(tiny, native), row


def test_advertisegen_rows(tmp_path):
    path = _write(tmp_path / "train.json", _jsonl([{"content": "类型#裙*颜色#红色", "summary": "这条红裙很美。"}]))
    (conversation,) = read_conversations(path)
    assert conversation.messages == (Message("user", "类型#裙*颜色#红色"), Message("assistant", "这条红裙很美。"))


BAD_FILES = [
    ("bad.jsonl", _jsonl([GOOD, GOOD]) + '{"conversations": [}\n', 3, "malformed JSON"),
    ("bad.jsonl", _jsonl([GOOD, {"messages": []}]), 2, "neither 'conversations' nor 'content' and 'summary'"),
    ("bad.jsonl", _jsonl([{"conversations": [{"role": "bot", "content": "x"}]}]), 1, "unknown role 'bot'"),
    ("bad.jsonl", _jsonl([GOOD, {"conversations": [{"role": "user"}, {"role": "assistant", "content": "x"}]}]), 2,
     r"message 1 \(user\) has no content"),
    ("bad.jsonl", _jsonl([{"conversations": [{"role": "user", "content": 3}]}]), 1, "is not a string"),
    ("bad.jsonl", _jsonl([GOOD, GOOD, {"conversations": [{"role": "user", "content": "hi"}]}]), 3,
     "no assistant turn"),
    ("bad.jsonl", _jsonl([{"conversations": [{"role": "user", "content": "x", "tools": []},
                                             {"role": "assistant", "content": "y"}]}]), 1, "only a system message"),
    ("bad.jsonl", " \n\n", 1, "file is empty"),
    ("bad.json", "[\n" + json.dumps(GOOD) + ",\n\n  [1, 2]\n]", 4, "row is a JSON list, not an object"),
    ("bad.json", "[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "]", 4,
     "expected ',' or ']'"),
    ("bad.json", "[\n" + json.dumps(GOOD) + ',\n{"conversations": [\n  {"role": "user",, }]}\n]', 4, "malformed JSON"),
    ("bad.json", "[]", 1, "the array holds no rows"),
    # what json.loads refuses after a row, though the row itself reads
    ("bad.jsonl", _jsonl([GOOD]) + json.dumps(GOOD) + " x\n", 2, r"malformed JSON \(Extra data"),
    ("bad.jsonl", _jsonl([GOOD]) + json.dumps(GOOD) + "\x0b\n", 2, r"malformed JSON \(Extra data"),
    # escapes that are no Unicode character, in any hex case, wherever a string is taken
    ("bad.jsonl", _jsonl([GOOD]) + '{"content": "a", "summary": "b\\uDC00"}\n', 2, "'summary' holds"),
    ("bad.jsonl", '{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "metadata": '
                  '"\\ud83d", "content": "y"}]}\n', 1, r"metadata of message 2 \(assistant\) holds"),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), BAD_FILES)
def test_bad_data_names_file_and_line(tmp_path, name, text, line, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: .*{message}"):
        read_conversations(path)


def test_rows_read_as_json_loads_reads_them(tmp_path):
    # space around a row, CRLF line ends, a surrogate pair escaped as JSON allows (one character, 😀)
    text = "  " + json.dumps(GOOD) + " \t\r\n" + '{"content": "\\ud83d\\ude00", "summary": "\\u597d"}\r\n'
    lines = text.split("\n")
    rows = read_conversations(_write(tmp_path / "forms.jsonl", text))
    assert [c.messages for c in rows] == [
        tuple(Message(**m) for m in json.loads(lines[0])["conversations"]),
        (Message("user", "\U0001f600"), Message("assistant", "好"))]


def test_non_utf8_names_the_line(tmp_path):
    path = _write(tmp_path / "latin1.jsonl", _jsonl([GOOD]).encode() + '{"content": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not UTF-8"):
        read_conversations(path, skip_bad_rows=True)


def test_unsupported_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type \.csv"):
        read_conversations(_write(tmp_path / "rows.csv", "a,b\n"))
    with pytest.raises(DataError, match="file not found"):
        read_conversations(tmp_path / "absent.jsonl")


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    rows = [GOOD, {"conversations": [{"role": "bot", "content": "x"}]}, GOOD,
            {"conversations": [{"role": "user", "content": "no reply"}]}]
    path = _write(tmp_path / "mixed.jsonl", _jsonl(rows))
    with pytest.raises(DataError, match=":2: .*unknown role"):
        read_rows(path)
    with caplog.at_level(logging.WARNING, logger="glm_ft.data"):
        report = read_rows(path, skip_bad_rows=True)
    assert report.rows_read == 4 and len(report.conversations) == 2
    assert [entry.split(": ")[0] for entry in report.skipped] == [f"{path}:2", f"{path}:4"]
    assert f"{path}:4" in caplog.text
    # Broken JSON is never skippable, nor is a file with nothing usable.
    with pytest.raises(DataError, match=":3: malformed JSON"):
        read_rows(_write(tmp_path / "broken.jsonl", _jsonl([GOOD, GOOD]) + "{oops\n"), skip_bad_rows=True)
    with pytest.raises(DataError, match="no usable rows"):
        read_rows(_write(tmp_path / "none.jsonl", _jsonl(rows[1:2])), skip_bad_rows=True)


def test_a_check_keeps_no_rows_and_gives_the_same_verdict(tmp_path):
    rows = [GOOD, {"conversations": [{"role": "bot", "content": "x"}]}, GOOD]
    path = _write(tmp_path / "mixed.jsonl", _jsonl(rows))
    kept, checked = (read_rows(path, skip_bad_rows=True, keep=keep) for keep in (True, False))
    assert len(kept.conversations) == 2 and checked.conversations == []
    assert (checked.rows_read, checked.skipped) == (kept.rows_read, kept.skipped) == (3, [f"{path}:2: " + (
        "message 1 has unknown role 'bot' (expected one of system, user, assistant, observation)")])
    for keep in (True, False):
        with pytest.raises(DataError, match=":2: .*unknown role"):
            read_rows(path, keep=keep)
        with pytest.raises(DataError, match="no usable rows"):
            read_rows(_write(tmp_path / "none.jsonl", _jsonl(rows[1:2])), skip_bad_rows=True, keep=keep)


@pytest.fixture
def counted_reads(monkeypatch):
    """Every read_rows call check_rows makes, by path (the real function still runs)."""
    from glm_ft.data import rows as rows_module

    calls, real_read = [], rows_module.read_rows

    def read(path, **kwargs):
        calls.append(Path(path))
        return real_read(path, **kwargs)

    monkeypatch.setattr(rows_module, "read_rows", read)
    return calls


def test_a_checked_file_is_not_read_again_until_its_bytes_change(tmp_path, counted_reads):
    from glm_ft.data.rows import check_rows

    records = tmp_path / "records"
    path = _write(tmp_path / "train.jsonl", _jsonl([GOOD, GOOD]))
    check_rows(path, records=records, log_skips=False)
    check_rows(path, records=records, log_skips=False)
    assert counted_reads == [path] and len(list(records.iterdir())) == 1
    # The same bytes elsewhere are another file: a record names its path (and the suffix decides the verdict)
    with pytest.raises(DataError, match=r"unsupported file type \.csv"):
        check_rows(_write(tmp_path / "train.csv", path.read_bytes()), records=records, log_skips=False)
    check_rows(path, records=records, log_skips=True)  # a dry run shows the skipped rows: it always reads
    assert counted_reads == [path, tmp_path / "train.csv", path]
    # One bad row, same size and same modification time: the record does not cover it, and it fails by FILE:LINE.
    stat = path.stat()
    _write(path, _jsonl([GOOD, {"conversations": [{"role": "bot", "content": "好的"}]}]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*unknown role"):
        check_rows(path, records=records, log_skips=False)
    with pytest.raises(DataError, match=":2: .*unknown role"):  # a failure is never recorded
        check_rows(path, records=records, log_skips=False)
    # skip_bad_rows is part of the verdict: the same bytes pass with it, and are recorded apart
    check_rows(path, records=records, skip_bad_rows=True, log_skips=False)
    check_rows(path, records=records, skip_bad_rows=True, log_skips=False)
    assert len(counted_reads) == 6 and len(list(records.iterdir())) == 2
    with pytest.raises(DataError, match=":2: .*unknown role"):
        check_rows(path, records=records, log_skips=False)


def test_a_record_from_other_reading_code_is_not_trusted(tmp_path, counted_reads, monkeypatch):
    from glm_ft.data import rows as rows_module

    path, records = _write(tmp_path / "train.jsonl", _jsonl([GOOD])), tmp_path / "records"
    rows_module.check_rows(path, records=records, log_skips=False)
    monkeypatch.setattr(rows_module, "reading_code_digest", lambda: "an edited rows.py")
    rows_module.check_rows(path, records=records, log_skips=False)
    assert counted_reads == [path, path]


def test_records_that_cannot_be_written_cost_only_the_next_read(tmp_path, counted_reads):
    from glm_ft.data.rows import check_rows

    path, records = _write(tmp_path / "train.jsonl", _jsonl([GOOD])), _write(tmp_path / "a-file", "")
    check_rows(path, records=records, log_skips=False)
    check_rows(path, records=records, log_skips=False)
    assert counted_reads == [path, path]
    with pytest.raises(DataError, match="file not found"):  # unreadable: read_rows names it
        check_rows(tmp_path / "absent.jsonl", records=tmp_path / "records", log_skips=False)


# --- datasets ---


def _config(data_dir: Path, **files) -> dict:
    return {"data_dir": str(data_dir), "train_file": None, "val_file": None, "test_file": None, "num_proc": 2,
            **files}


def test_bundled_sample_data_loads_cleanly(tiny, tmp_path):
    bundle = load_datasets(
        _config(SAMPLE_DIR, train_file="train.jsonl", val_file="dev.jsonl", test_file="test.jsonl"),
        tiny, 256, 512, cache_dir=tmp_path / "cache", eval_subset=10,
    )
    stats = bundle.stats
    for split in ("train", "val", "test"):
        assert stats[f"data.{split}.rows_skipped"] == 0
        assert stats[f"data.{split}.rows_used"] == stats[f"data.{split}.rows_read"] > 0
    assert stats["data.train.samples"] == stats["data.train.rows_used"] == len(bundle.train)
    assert bundle.train.column_names == ["input_ids", "labels"]
    assert bundle.test.column_names == ["input_ids", "output_ids"]
    assert len(bundle.val) == stats["data.val.samples_selected"] == 10 < stats["data.val.samples"]
    assert len(bundle.test) == stats["data.test.samples"] >= stats["data.test.rows_used"]


def test_split_counts_skips_and_truncations(tiny, tmp_path, caplog):
    long_reply = {"conversations": [{"role": "user", "content": "写文案"},
                                    {"role": "assistant", "content": "很好看的连衣裙。" * 30}]}
    long_prompt = {"conversations": [{"role": "system", "content": "你是文案助手。" * 30},
                                     {"role": "user", "content": "写"}, {"role": "assistant", "content": "好"}]}
    bad = {"conversations": [{"role": "user", "content": "no reply"}]}
    _write(tmp_path / "train.jsonl", _jsonl([GOOD, long_reply, bad, long_prompt]))
    _write(tmp_path / "dev.json", json.dumps([GOOD, long_reply, long_prompt, bad]))
    with caplog.at_level(logging.WARNING, logger="glm_ft.data"):
        bundle = load_datasets(_config(tmp_path, train_file="train.jsonl", val_file="dev.json"), tiny, 16, 16,
                               cache_dir=tmp_path / "cache", skip_bad_rows=True)
    stats = bundle.stats
    assert {key: stats[f"data.train.{key}"] for key in
            ("rows_read", "rows_skipped", "rows_used", "samples", "truncated", "dropped_no_target")} == {
        "rows_read": 4, "rows_skipped": 1, "rows_used": 3, "samples": 2, "truncated": 1, "dropped_no_target": 1}
    assert {key: stats[f"data.val.{key}"] for key in
            ("rows_read", "rows_skipped", "samples", "inputs_truncated", "outputs_truncated")} == {
        "rows_read": 4, "rows_skipped": 1, "samples": 3, "inputs_truncated": 1, "outputs_truncated": 1}
    assert bundle.test is None
    assert max(len(ids) for ids in bundle.train["input_ids"]) == 33
    assert all(len(ids) <= 17 for ids in bundle.val["input_ids"])
    assert all(ids[-1] == 2 and len(ids) <= 16 for ids in bundle.val["output_ids"])
    assert "truncation left them no target" in caplog.text and "skipping row" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glm_ft.data"):
        cached = load_datasets(_config(tmp_path, train_file="train.jsonl", val_file="dev.json"), tiny, 16, 16,
                               cache_dir=tmp_path / "cache", skip_bad_rows=True)
    assert cached.stats["data.train.cached"] == 1 and cached.stats["data.train.truncated"] == 1
    assert "train: 1 of 4 rows skipped" in caplog.text and "train: 1 of 2 samples cut to 33 tokens" in caplog.text


def test_a_training_file_that_truncation_leaves_without_samples_is_one_error(tiny, tmp_path):
    long_prompt = {"conversations": [{"role": "system", "content": "你是文案助手。" * 30},
                                     {"role": "user", "content": "写"}, {"role": "assistant", "content": "好"}]}
    _write(tmp_path / "train.jsonl", _jsonl([long_prompt] * 3))
    for attempt in ("fresh", "cached"):  # the second load finds the (empty) preprocessed split in the cache
        with pytest.raises(DataError, match=re.escape(
                f"{tmp_path / 'train.jsonl'}: no training sample left: truncation to max_input_length + "
                "max_output_length + 1 = 33 tokens left none of its 3 usable rows a target token")):
            load_datasets(_config(tmp_path, train_file="train.jsonl"), tiny, 16, 16, cache_dir=tmp_path / "cache")
    # long enough, the same file trains
    assert len(load_datasets(_config(tmp_path, train_file="train.jsonl"), tiny, 128, 16,
                             cache_dir=tmp_path / "cache").train) == 3


def test_cache_is_reused_and_invalidated(tiny, real_or_none, tmp_path):
    train = _write(tmp_path / "train.jsonl", _jsonl([GOOD, {"conversations": MULTI_TURN}]))
    config = _config(tmp_path, train_file="train.jsonl")
    cache = tmp_path / "cache"

    first = load_datasets(config, tiny, 64, 64, cache_dir=cache)
    arrow = Path(first.train.cache_files[0]["filename"])
    written = os.stat(arrow).st_mtime_ns
    again = load_datasets(config, tiny, 64, 64, cache_dir=cache)
    assert (first.stats["data.train.cached"], again.stats["data.train.cached"]) == (0, 1)
    assert again.train.cache_files == first.train.cache_files and os.stat(arrow).st_mtime_ns == written
    assert again.train["input_ids"] == first.train["input_ids"]
    assert {k: v for k, v in again.stats.items() if not k.endswith("cached")} == {
        k: v for k, v in first.stats.items() if not k.endswith("cached")}

    changed_lengths = load_datasets(config, tiny, 64, 32, cache_dir=cache)
    assert changed_lengths.stats["data.train.cached"] == 0
    assert changed_lengths.train.cache_files != first.train.cache_files

    _write(train, _jsonl([GOOD, GOOD, {"conversations": MULTI_TURN}]))
    changed_file = load_datasets(config, tiny, 64, 64, cache_dir=cache)
    assert changed_file.stats["data.train.cached"] == 0 and len(changed_file.train) == 3

    if real_or_none is not None:
        other_tokenizer = load_datasets(config, real_or_none, 64, 64, cache_dir=cache)
        assert other_tokenizer.stats["data.train.cached"] == 0
        assert other_tokenizer.train["input_ids"][0][:2] == [64790, 64792]


@pytest.fixture
def real_or_none(request):
    try:
        return request.getfixturevalue("real")
    except pytest.skip.Exception:
        return None


def test_unset_splits_are_none_and_missing_files_fail(tiny, tmp_path):
    _write(tmp_path / "train.jsonl", _jsonl([GOOD]))
    bundle = load_datasets(_config(tmp_path, train_file="train.jsonl"), tiny, 32, 32, cache_dir=tmp_path / "c")
    assert bundle.val is None and bundle.test is None and len(bundle.train) == 1
    assert not any(key.startswith(("data.val.", "data.test.")) for key in bundle.stats)
    with pytest.raises(DataError, match=r"dev\.jsonl: file not found \(val_file\)"):
        load_datasets(_config(tmp_path, train_file="train.jsonl", val_file="dev.jsonl"), tiny, 32, 32,
                      cache_dir=tmp_path / "c")


def test_tiny_tokenizer_path_is_the_shipped_asset():
    assert tiny_tokenizer_path().name == "tiny_tokenizer.model" and tiny_tokenizer_path().is_file()


def test_encoding_all_messages_at_once_equals_message_by_message(tiny):
    from glm_ft.chatglm3.tokenization import message_text
    from glm_ft.data.dataset import Conversation, encode_messages

    conversations = [c for name in ("train.jsonl", "dev.jsonl") for c in read_conversations(SAMPLE_DIR / name)]
    multi_turn = tuple(Message(m["role"], m["content"], m.get("metadata", ""), m.get("tools")) for m in MULTI_TURN)
    conversations.append(Conversation(multi_turn, "x:1"))
    expected = [[tiny.build_single_message(m.role, m.metadata, message_text(m.role, m.content, m.tools))
                 for m in c.messages] for c in conversations]
    assert any(m.tools for c in conversations for m in c.messages) and any(m.metadata for m in multi_turn)
    for threads in (1, 2):
        assert encode_messages(conversations, tiny, threads) == expected

"""alpaca and sharegpt rows (.json arrays and .jsonl) are read as the ChatGLM3 conversations they stand for, train
with the same ids and loss mask as those, fail with FILE:LINE, and a real training run reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_train
from glm_ft.chatglm3.tokenization import load_tiny_tokenizer
from glm_ft.data.dataset import IGNORE_INDEX, build_train_sample, read_conversations, read_rows
from glm_ft.errors import DataError

TOOLS = [{"name": "get_weather", "parameters": {"city": "string"}}]

ALPACA = [
    {"instruction": "类型#裙", "input": "", "output": "一条红裙。"},
    {"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be brief.",
     "history": [["hi", "hello!"]]},
]
ALPACA_AS_CHATGLM3 = [
    [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条红裙。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "Translate\n你好"},
     {"role": "assistant", "content": "Hello"}],
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "类型#上衣"}, {"from": "gpt", "value": "白色上衣。"}],
     "system": "你是广告文案助手"},
    {"conversations": [{"from": "human", "value": "北京天气?"}, {"from": "function_call", "value": "get_weather"},
                       {"from": "observation", "value": "22"}, {"from": "gpt", "value": "22 度"}],
     "tools": json.dumps(TOOLS)},
]
SHAREGPT_AS_CHATGLM3 = [
    [{"role": "system", "content": "你是广告文案助手"}, {"role": "user", "content": "类型#上衣"},
     {"role": "assistant", "content": "白色上衣。"}],
    [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
     {"role": "assistant", "content": "get_weather"}, {"role": "observation", "content": "22"},
     {"role": "assistant", "content": "22 度"}],
]


def write(path: Path, rows: list, as_array: bool) -> Path:
    text = json.dumps(rows, ensure_ascii=False, indent=1) if as_array else \
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("rows, native", [(ALPACA, ALPACA_AS_CHATGLM3), (SHAREGPT, SHAREGPT_AS_CHATGLM3)],
                         ids=["alpaca", "sharegpt"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_rows_read_as_the_chatglm3_conversations_they_stand_for(rows, native, suffix, tmp_path):
    converted = read_conversations(write(tmp_path / f"other{suffix}", rows, as_array=suffix == ".json"))
    expected = read_conversations(write(tmp_path / "native.jsonl", [{"conversations": c} for c in native], False))
    assert [c.messages for c in converted] == [c.messages for c in expected]
    tokenizer = load_tiny_tokenizer()
    for conversation, reference in zip(converted, native):
        sample = build_train_sample(conversation.messages, tokenizer, 512, 512)
        # the same ids and targets as the native rows, and only assistant text is trained
        assert sample == build_train_sample(reference, tokenizer, 512, 512)
        # token i is a target iff token i-1 is in an assistant message (its role token or what it produced)
        ids, mask = tokenizer.encode_conversation(reference)
        assistant = tokenizer.get_command("<|assistant|>")
        in_assistant = [bool(produced) or tok == assistant for tok, produced in zip(ids, mask)]
        targets = [i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX]
        assert targets == [j + 1 for j, inside in enumerate(in_assistant) if inside]
        assert all(sample["labels"][i] == sample["input_ids"][i] for i in targets)


@pytest.mark.parametrize("row, message", [
    ({"instruction": 3, "output": "x"}, "alpaca 'instruction' is not a string"),
    ({"instruction": "q", "output": "x", "history": [["only one"]]}, "'history' item 1"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown 'from' 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "message 2 (gpt) has no string 'value'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{oops"},
     "'tools' is a string but not JSON"),
    ({"instruction": "q", "output": "x", "tools": "{oops"}, "alpaca 'tools' is a string but not JSON"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
])
def test_bad_rows_name_file_and_line(row, message, tmp_path):
    good = ALPACA[0]
    path = write(tmp_path / "bad.jsonl", [good, good, row], as_array=False)
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    report = read_rows(path, skip_bad_rows=True)
    assert report.rows_read == 3 and len(report.conversations) == 2 and report.skipped[0].startswith(f"{path}:3: ")


@pytest.mark.slow
def test_a_training_run_reads_alpaca_and_sharegpt_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.json", ALPACA * 4, as_array=True)
    write(data / "dev.jsonl", SHAREGPT, as_array=False)
    run = tmp_path / "run"
    result = run_train(["experiment=quickstart", f"data.data_dir={data}", "data.train_file=train.json",
                        "data.val_file=dev.jsonl", "data.test_file=null", "training_args.max_steps=2",
                        "training_args.eval_steps=2", "training_args.save_steps=2", "tracking.enabled=false",
                        f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "final").is_dir()
    log = (run / "cli.log").read_text()
    assert "train: 8 rows read, 0 skipped, 8 samples" in log
    assert "val: 2 rows read, 0 skipped, 3 samples" in log  # one eval sample per assistant turn

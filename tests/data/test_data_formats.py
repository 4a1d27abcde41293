"""alpaca and sharegpt rows (.json arrays and .jsonl) are read as the ChatGLM3 conversations they stand for, train
with the same ids and loss mask as those (a sharegpt tool call as ChatGLM3's own tool-call turn, which serve reads
back), fail with FILE:LINE, and a real training run reads them."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_train, serving
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
    # LLaMA-Factory's tool call: the call as JSON
    {"conversations": [{"from": "human", "value": "北京天气?"},
                       {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
                       {"from": "observation", "value": "22"}, {"from": "gpt", "value": "22 度"}],
     "tools": json.dumps(TOOLS)},
]
SHAREGPT_AS_CHATGLM3 = [
    [{"role": "system", "content": "你是广告文案助手"}, {"role": "user", "content": "类型#上衣"},
     {"role": "assistant", "content": "白色上衣。"}],
    [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
     # ChatGLM3's own tool-call turn, as its demo writes it
     {"role": "assistant", "metadata": "get_weather", "content": '```python\ntool_call(city="北京")\n```'},
     {"role": "observation", "content": "22"},
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


@pytest.mark.parametrize("value", [
    {"name": "get_weather", "arguments": json.dumps({"city": "北京"})},  # arguments as OpenAI writes them
    [{"name": "get_weather", "arguments": {"city": "北京"}}],  # LLaMA-Factory's list of (here one) calls
])
def test_other_spellings_of_a_call_are_the_same_tool_call_turn(value, tmp_path):
    row = json.loads(json.dumps(SHAREGPT[1]))
    row["conversations"][1]["value"] = json.dumps(value, ensure_ascii=False)
    converted = read_conversations(write(tmp_path / "other.jsonl", [row], False))
    expected = read_conversations(write(tmp_path / "native.jsonl", [{"conversations": SHAREGPT_AS_CHATGLM3[1]}], False))
    assert converted[0].messages == expected[0].messages


ARGUMENTS = [{}, {"city": "北京"}, {"n": 3, "x": -0.5, "big": 10**20, "ok": True, "none": None},
             {"q": 'say "hi"\n```python\nx\n```', "path": "C:\\tmp", "emoji": "🙂", "tab": "a\tb"},
             {"where": {"city": "北京", "floors": [1, 2, {"open": False}]}, "tags": []}]


def test_a_call_in_the_data_trains_the_reply_serve_returns_as_that_call(tmp_path):
    """What a model trained on a sharegpt call learns to say after `<|assistant|>`, decoded as serve decodes a
    reply, is read by serve's parser as the same call."""
    from glm_ft.infer.tool_calls import reply_message

    rows = [{"conversations": [{"from": "human", "value": "q"},
                               {"from": "function_call", "value": json.dumps({"name": "get.weather-v2",
                                                                               "arguments": arguments})},
                               {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}],
             "tools": TOOLS} for arguments in ARGUMENTS]
    tokenizer = load_tiny_tokenizer()
    for conversation, arguments in zip(read_conversations(write(tmp_path / "calls.jsonl", rows, False)), ARGUMENTS):
        messages = [{"role": m.role, "content": m.content, "metadata": m.metadata, "tools": m.tools}
                    for m in conversation.messages]
        prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[:3])[len(prompt):]  # the trained turn, up to <|observation|>
        text = tokenizer.decode(turn, skip_special_tokens=True).strip()
        message, finish = reply_message(text, "stop", tools_offered=True)
        assert finish == "tool_calls", text
        function = message["tool_calls"][0]["function"]
        assert function["name"] == "get.weather-v2" and json.loads(function["arguments"]) == arguments


@pytest.mark.parametrize("row, message", [
    ({"instruction": 3, "output": "x"}, "alpaca 'instruction' is not a string"),
    ({"instruction": "q", "output": "x", "history": [["only one"]]}, "'history' item 1"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown 'from' 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "message 2 (gpt) has no string 'value'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{oops"},
     "'tools' is a string but not JSON"),
    ({"instruction": "q", "output": "x", "tools": "{oops"}, "alpaca 'tools' is a string but not JSON"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    *[({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}]}, message)
      for value, message in [
          ("get_weather", "message 2 (function_call) is not JSON"),
          ('{"arguments": {}}', "message 2 (function_call) has no string 'name'"),
          ('{"name": 7, "arguments": {}}', "has no string 'name'"),
          ('"get_weather"', "has no string 'name'"),
          ('{"name": "f"}', "'arguments' is not a JSON object (or one in a string)"),
          ('{"name": "f", "arguments": [1]}', "'arguments' is not a JSON object"),
          ('{"name": "f", "arguments": "{oops"}', "'arguments' is not a JSON object"),
          ('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]', "holds 2 calls; ChatGLM3 makes one"),
          ('{"name": "get weather", "arguments": {}}', "tool name 'get weather' is not a name"),
          ('{"name": "f", "arguments": {"first-name": "x"}}', "argument name 'first-name' cannot be written"),
          ('{"name": "f", "arguments": {"class": 1}}', "argument name 'class' cannot be written"),
          ('{"name": "f", "arguments": {"x": 1e400}}', "NaN or Infinity"),
          ("[" * 100_000, "message 2 (function_call): JSON nested too deeply"),
      ]],
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


@pytest.mark.slow
def test_a_model_trained_on_sharegpt_calls_makes_calls_serve_returns_as_tool_calls(tmp_path):
    """Tiny model, full SFT, 300 steps (~30 s here) on sharegpt rows whose calls are LLaMA-Factory's JSON; served,
    a question with the tool offered is answered with an OpenAI `tool_calls` message naming the asked city."""
    tools = [{"name": "get_weather", "description": "查询城市天气", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    cities = ["北京", "上海", "广州", "深圳"]

    def row(city: str) -> dict:
        call = json.dumps({"name": "get_weather", "arguments": {"city": city}}, ensure_ascii=False)
        return {"conversations": [{"from": "human", "value": f"{city}今天天气怎么样？"},
                                  {"from": "function_call", "value": call},
                                  {"from": "observation", "value": json.dumps({"temp": 20})},
                                  {"from": "gpt", "value": f"{city}今天20度。"}],
                "system": "你是助手", "tools": tools}

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    write(data / "train.jsonl", [row(city) for city in cities * 16], as_array=False)
    result = run_train(["experiment=quickstart", f"data.data_dir={data}", "data.train_file=train.jsonl",
                        "data.val_file=null", "data.test_file=null", "training_args.max_steps=300",
                        "training_args.save_steps=300", "tracking.enabled=false", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    port = free_port()
    cmd = [sys.executable, "-m", "glm_ft.infer.serve", str(run), "--port", str(port)]
    with serving(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", cwd=ROOT):
        for city in ("北京", "广州"):
            body = {"messages": [{"role": "system", "content": "你是助手"},
                                 {"role": "user", "content": f"{city}今天天气怎么样？"}],
                    "tools": [{"type": "function", "function": tools[0]}], "max_tokens": 64}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request) as response:
                choice = json.loads(response.read())["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            function = choice["message"]["tool_calls"][0]["function"]
            assert function["name"] == "get_weather" and json.loads(function["arguments"]) == {"city": city}
            # tool_choice "none": the model must not call a tool, so the tools are not offered; it answers in text
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps({**body, "tool_choice": "none"}).encode(),
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request) as response:
                choice = json.loads(response.read())["choices"][0]
            assert choice["finish_reason"] != "tool_calls" and "tool_calls" not in choice["message"], choice
            assert isinstance(choice["message"]["content"], str)

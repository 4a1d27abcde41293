"""OpenAI tool calls in `serve`: an assistant message's `tool_calls` become ChatGLM3's tool-call turn exactly as the
shipped data writes it, and a reply in that form comes back as `tool_calls` (read with ast, never evaluated)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from glm_ft.infer.serve import BadRequest, conversation
from glm_ft.infer.tool_calls import call_turn, parse_call, reply_message

SAMPLE = ROOT / "data" / "sample" / "test.jsonl"


def sample_tool_conversation() -> list[dict]:
    """The sample data's conversation with a tool call (system + tools, user, call, observation, answer)."""
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["conversations"]
        if any(m.get("metadata") for m in messages):
            return messages
    raise AssertionError("no tool call in the sample data")


def test_an_openai_tool_loop_is_the_conversation_chatglm3_was_trained_on():
    data = sample_tool_conversation()
    system, user, call, observation, answer = data
    arguments = parse_call(f"{call['metadata']}\n{call['content']}")["function"]["arguments"]
    request = {"tools": [{"type": "function", "function": tool} for tool in system["tools"]], "messages": [
        {"role": "system", "content": system["content"]},
        {"role": "user", "content": user["content"]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": call["metadata"], "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": observation["content"]},
        {"role": "assistant", "content": answer["content"]}]}
    assert conversation(request) == data


@pytest.mark.parametrize("arguments", [{"item": "白色牛仔裤", "size": "L"}, {},
                                       {"n": 3, "x": 0.5, "ok": True, "none": None, "tags": ["a", "b"],
                                        "where": {"city": "北京", "floor": 2, "open": False}}])
def test_a_call_written_as_chatglm3_writes_it_reads_back_the_same(arguments):
    turn = call_turn([{"function": {"name": "get_stock", "arguments": json.dumps(arguments)}}], "m")
    assert turn["metadata"] == "get_stock" and turn["content"].startswith("```python\ntool_call(")
    read = parse_call(f"{turn['metadata']}\n{turn['content']}")
    assert read["type"] == "function" and read["id"].startswith("call_")
    assert read["function"]["name"] == "get_stock" and json.loads(read["function"]["arguments"]) == arguments


@pytest.mark.parametrize("reply", ["白色牛仔裤L码还有8件库存。", "get_stock\n```python\nprint(1)\n```",
                                   "get_stock\n```python\ntool_call(item=__import__('os').getcwd())\n```",
                                   "get_stock\n```python\ntool_call('positional')\n```",
                                   "get_stock\n```python\ntool_call(item=\n```"])
def test_other_replies_are_not_calls_and_nothing_is_evaluated(reply):
    assert parse_call(reply) is None


@pytest.mark.parametrize("tool_calls, expect", [
    ([{"function": {"name": "a", "arguments": "{}"}}] * 2, "one tool call per assistant turn"),
    ([{"function": {"name": "a", "arguments": "[1]"}}], "arguments: expected a JSON object"),
    ([{"function": {"arguments": "{}"}}], "function.name: expected a string")])
def test_tool_calls_chatglm3_cannot_take_are_a_bad_request(tool_calls, expect):
    request = {"messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": None, "tool_calls": tool_calls}]}
    with pytest.raises(BadRequest, match=expect):
        conversation(request)


def test_a_finished_call_with_tools_offered_is_returned_as_tool_calls():
    call = sample_tool_conversation()[2]
    text = f"{call['metadata']}\n{call['content']}"
    message, finish = reply_message(text, "stop", tools_offered=True)
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_stock",
                                                    "arguments": '{"item": "白色牛仔裤", "size": "L"}'}
    # no tools offered, or cut at max_tokens: the text as it came
    assert reply_message(text, "stop", tools_offered=False) == ({"role": "assistant", "content": text}, "stop")
    assert reply_message(text, "length", tools_offered=True) == ({"role": "assistant", "content": text}, "length")
    answer = "白色牛仔裤L码还有8件库存。"
    assert reply_message(answer, "stop", True) == ({"role": "assistant", "content": answer}, "stop")

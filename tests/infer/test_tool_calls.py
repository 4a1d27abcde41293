"""OpenAI tool calls in `serve`: an assistant message's `tool_calls` become ChatGLM3's tool-call turn exactly as the
shipped data writes it, and a reply in that form comes back as `tool_calls` (read with ast, never evaluated)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from glm_ft.infer.openai_request import BadRequest, conversation
from glm_ft.infer.tool_calls import StreamedReply, call_turn, parse_call, reply_message

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
                                   "get_stock\n```python\ntool_call(item=\n```",
                                   "get_stock\n```python\ntool_call(item={[1]: 2})\n```"])  # unhashable key
def test_other_replies_are_not_calls_and_nothing_is_evaluated(reply):
    assert parse_call(reply) is None


@pytest.mark.parametrize("tool_calls, expect", [
    ([{"function": {"name": "a", "arguments": "{}"}}] * 2, "one tool call per assistant turn"),
    ([{"function": {"name": "a", "arguments": "[1]"}}], "arguments: expected a JSON object"),
    ([{"function": {"arguments": "{}"}}], "function.name: expected a string"),
    # what ChatGLM3's call form could not give back: serve's parser would not read the model's own history
    ([{"function": {"name": "get weather", "arguments": "{}"}}], "function: tool name 'get weather' is not a name"),
    ([{"function": {"name": "a", "arguments": '{"first-name": 1}'}}], "argument name 'first-name' cannot be written"),
    ([{"function": {"name": "a", "arguments": '{"x": NaN}'}}], "NaN or Infinity")])
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


def streamed(pieces, finish_reason: str, tools_offered: bool) -> tuple[dict, str, int]:
    """The message a client assembles from the stream's deltas (OpenAI's rules), its finish_reason, and how many
    deltas were sent before the reply ended."""
    reply, deltas = StreamedReply(tools_offered), []
    for piece in pieces:
        deltas += reply.feed(piece)
    early = len(deltas)
    rest, finish = reply.finish(finish_reason)
    message: dict = {"role": "assistant", "content": None}
    for delta in deltas + rest:
        if "content" in delta:
            message["content"] = (message["content"] or "") + delta["content"]
        for call in delta.get("tool_calls", []):
            message.setdefault("tool_calls", []).append(call)
    return message, finish, early


def without_ids(message: dict) -> dict:
    calls = [{k: v for k, v in c.items() if k not in ("id", "index")} for c in message.get("tool_calls", [])]
    return {**message, **({"tool_calls": calls} if calls else {})}


CALL = sample_tool_conversation()[2]
REPLIES = [f"{CALL['metadata']}\n{CALL['content']}",  # a call
           "\n白色牛仔裤L码还有8件库存。",  # an answer: empty metadata line first
           "get_stock\n```python\ntool_call(item=\n",  # a name, but no call: its text
           "无换行的回答", "\n\n  两行\n回答", ""]


@pytest.mark.parametrize("text", REPLIES)
@pytest.mark.parametrize("tools_offered", [True, False])
def test_a_streamed_reply_adds_up_to_the_unstreamed_one_wherever_the_pieces_split(text, tools_offered):
    expected, expected_finish = reply_message(text.strip(), "stop", tools_offered)
    for cut in range(len(text) + 1):
        message, finish, _ = streamed([text[:cut], text[cut:]], "stop", tools_offered)
        if message["content"] is None and "tool_calls" not in message:
            message["content"] = ""  # nothing was said: unstreamed, that is an empty content
        assert (without_ids(message), finish) == (without_ids(expected), expected_finish), cut
        assert all(c["index"] == i for i, c in enumerate(message.get("tool_calls", [])))


def test_with_tools_offered_an_answer_still_streams_and_a_call_comes_whole_with_the_real_streamer(tmp_path):
    """Pieces as serve gets them: glm-ft's tokenizer (the tiny one: ChatGLM3's code and special tokens, a small
    SentencePiece model) through transformers' TextIteratorStreamer."""
    import torch
    from transformers import TextIteratorStreamer

    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.model import load_tokenizer

    tokenizer = load_tokenizer(ensure_tiny_model(tmp_path / "tiny"))

    def pieces(text: str) -> list[str]:
        streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
        for token in tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return list(streamer)

    call, answer = REPLIES[0], "\n" + "白色牛仔裤L码还有8件库存, 欢迎选购。" * 3
    message, finish, early = streamed(pieces(call), "stop", tools_offered=True)
    assert finish == "tool_calls" and early == 0
    assert without_ids(message) == without_ids(reply_message(call, "stop", True)[0])
    message, finish, early = streamed(pieces(answer), "stop", tools_offered=True)
    assert finish == "stop" and message["content"] == answer.strip() and early > 0


def test_a_call_as_the_model_generates_it_is_read_as_a_call(tmp_path):
    """The tokens after `<|assistant|>` of the sample's call turn, decoded as serve decodes a reply: the content is
    encoded on its own, so it decodes with SentencePiece's leading space ("get_stock\\n ```python\\n...")."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.model import load_tokenizer

    tokenizer = load_tokenizer(ensure_tiny_model(tmp_path / "tiny"))
    data = sample_tool_conversation()
    prompt = tokenizer.apply_chat_template(data[:2], add_generation_prompt=True)
    turn = tokenizer.apply_chat_template(data[:3])[len(prompt):]
    text = tokenizer.decode(turn, skip_special_tokens=True).strip()
    message, finish = reply_message(text, "stop", tools_offered=True)
    assert finish == "tool_calls", text
    assert message["tool_calls"][0]["function"] == {"name": "get_stock",
                                                    "arguments": '{"item": "白色牛仔裤", "size": "L"}'}

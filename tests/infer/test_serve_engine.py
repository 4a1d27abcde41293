"""serve's Engine in the process: a request's sampling numbers as JSON writes them (`"temperature": 2` is an int,
and must sample as 2.0 does), and a stream whose client went away."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("temperature", [2, 0.5])
def test_an_integer_temperature_samples_like_the_float(temperature, tmp_path):
    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.serve import Engine

    loaded = load_checkpoint(ensure_tiny_model(tmp_path / "tiny"), dtype="float32", device="cpu")
    engine = Engine(SimpleNamespace(tokenizer=loaded.tokenizer, model=loaded.model), "tiny", 4)
    messages = [{"role": "user", "content": "类型#裙"}]
    ids, gen = engine.prepare({"messages": messages, "temperature": temperature, "top_p": 1})
    assert isinstance(gen.temperature, float) and isinstance(gen.top_p, float)
    as_float = engine.prepare({"messages": messages, "temperature": float(temperature), "top_p": 1.0})[1]
    assert engine.generate(ids, gen, seed=1) == engine.generate(ids, as_float, seed=1)


def test_a_stream_closed_by_its_client_stops_generating(tmp_path):
    """A client that goes away mid-stream (starlette closes the response's generator) frees the model at the next
    token instead of holding the one generation slot until max_tokens."""
    import asyncio
    import time

    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.serve import Engine, _stream
    from glm_ft.infer.tool_calls import StreamedReply

    loaded = load_checkpoint(ensure_tiny_model(tmp_path / "tiny"), dtype="float32", device="cpu")
    engine = Engine(SimpleNamespace(tokenizer=loaded.tokenizer, model=loaded.model), "tiny", 900)
    ids, gen = engine.prepare({"messages": [{"role": "user", "content": "类型#裙"}]})
    gen.eos_token_id = [-1]  # never stops by itself: 900 tokens unless cancelled
    generated = []
    original = engine.generate
    engine.generate = lambda *a, **k: generated.append(original(*a, **k)) or generated[-1]

    async def client():
        events = _stream(engine, ids, gen, None, StreamedReply(False), "id", 0)
        for _ in range(3):
            await events.__anext__()
        await events.aclose()

    asyncio.run(client())
    while not generated:  # the generation thread ends either way: cancelled, or after its 900 tokens
        time.sleep(0.05)
    assert len(generated[0]) < 900
    assert engine.lock.acquire(blocking=False)  # the one generation slot is free


@pytest.mark.parametrize("field, value", [("n", 3), ("n", True), ("stop", ["，"]), ("stop", "。"), ("logprobs", True),
                                          ("top_logprobs", 2)])
def test_openai_fields_serve_does_not_implement_are_refused_by_name(field, value, tmp_path):
    """Ignored, `n: 3` would return one choice and `stop` a reply running past it."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.openai_request import BadRequest
    from glm_ft.infer.serve import Engine

    loaded = load_checkpoint(ensure_tiny_model(tmp_path / "tiny"), dtype="float32", device="cpu")
    engine = Engine(SimpleNamespace(tokenizer=loaded.tokenizer, model=loaded.model), "tiny", 4)
    messages = [{"role": "user", "content": "类型#裙"}]
    with pytest.raises(BadRequest, match=f"^{field}: not supported"):
        engine.prepare({"messages": messages, field: value})
    # what OpenAI's clients send by default is accepted
    engine.prepare({"messages": messages, "n": 1, "stop": None, "logprobs": False, "top_logprobs": None})


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text: expected a string"),  # was a 500 with a traceback
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [5]}, "tools[0]: expected"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools[0]: expected"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "no"}, "stream: expected true or false"),
])
def test_a_malformed_part_tool_or_stream_flag_is_a_bad_request_naming_it(body, message, tmp_path):
    """Each was rendered into the prompt as it came, streamed on a truthy string, or failed with a 500."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.openai_request import BadRequest, stream_usage
    from glm_ft.infer.serve import Engine

    loaded = load_checkpoint(ensure_tiny_model(tmp_path / "tiny"), dtype="float32", device="cpu")
    engine = Engine(SimpleNamespace(tokenizer=loaded.tokenizer, model=loaded.model), "tiny", 4)
    with pytest.raises(BadRequest) as refused:
        engine.prepare(body)
        stream_usage(body)
    assert str(refused.value).startswith(message)
    # the forms that are served: text parts, OpenAI's tools and ChatGLM3's own function list
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    for good in ({"messages": [{"role": "user", "content": parts}]},
                 {"messages": [{"role": "user", "content": "hi"}], "stream": False,
                  "tools": [{"type": "function", "function": {"name": "f"}}, {"name": "g", "parameters": {}}]}):
        engine.prepare(good)
        stream_usage(good)

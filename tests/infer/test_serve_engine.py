"""serve's Engine in the process: a request's sampling numbers as JSON writes them (`"temperature": 2` is an int,
and must sample as 2.0 does), a stream whose client went away, the fields refused by name, a stream's stop strings
held back, and a failure of the server's own answered in OpenAI's error shape."""

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


@pytest.mark.parametrize("field, value", [
    ("n", 3), ("n", True), ("logprobs", True), ("top_logprobs", 2), ("presence_penalty", 0.5),
    ("frequency_penalty", -1), ("presence_penalty", False), ("logit_bias", {"1": 5}),
    ("response_format", {"type": "json_object"}), ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
    ("modalities", ["text", "audio"]), ("reasoning_effort", "low"), ("store", True), ("parallel_tool_calls", "yes"),
    ("top_k", 5), ("repetition_penalty", 1.2)])
def test_openai_fields_serve_does_not_implement_are_refused_by_name(field, value, tmp_path):
    """Ignored, `n: 3` would return one choice, a penalty or `response_format` a reply they did not shape, and a
    field OpenAI does not know (vLLM's top_k) a reply it did not apply to, as OpenAI refuses it."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.openai_request import BadRequest
    from glm_ft.infer.serve import Engine

    loaded = load_checkpoint(ensure_tiny_model(tmp_path / "tiny"), dtype="float32", device="cpu")
    engine = Engine(SimpleNamespace(tokenizer=loaded.tokenizer, model=loaded.model), "tiny", 4)
    messages = [{"role": "user", "content": "类型#裙"}]
    with pytest.raises(BadRequest, match=f"^{field}: (not supported|unrecognized|expected)"):
        engine.prepare({"messages": messages, field: value})
    # what OpenAI's clients send by default, "off", is accepted, and so are fields that change nothing in the reply
    engine.prepare({"messages": messages, "n": 1, "stop": None, "logprobs": False, "top_logprobs": None,
                    "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                    "response_format": {"type": "text"}, "modalities": ["text"], "store": False,
                    "parallel_tool_calls": True, "user": "u", "metadata": {"k": "v"}, "service_tier": "auto"})


def test_a_stream_holds_back_what_may_become_a_stop_string():
    """However the text is split into pieces, what is sent is the text cut before the first stop string
    (after ChatGLM3's leading newline, which the reply leaves out), and a stop string's start is held until it is
    known not to be one."""
    from glm_ft.infer.stop_strings import StopText

    text = "\n ab, abc. ab"
    for stops, expected in ((["abc"], "\n ab, "), (["\n"], text), ([". a", ","], "\n ab"), (["zz"], text),
                            (["b"], "\n a")):
        for size in (1, 2, 3, len(text)):
            cut = StopText(stops)
            sent = [cut.feed(text[i:i + size]) for i in range(0, len(text), size)] + [cut.flush()]
            assert "".join(sent) == expected, (stops, size)
            assert cut.stopped == (expected != text)
    cut = StopText(["abc"])
    assert [cut.feed("x a"), cut.feed("b"), cut.feed("d")] == ["x ", "", "abd"]  # held, then not a stop string


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text: expected a string"),  # was a 500 with a traceback
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [5]}, "tools[0]: expected"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools[0]: expected"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "no"}, "stream: expected true or false"),
    # rendered as an empty message; OpenAI allows no content only on an assistant message that calls a tool
    ({"messages": [{"role": "user"}]}, "messages[0].content: required"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "messages[1].content: required"),
    ({"messages": [{"role": "tool", "content": None}]}, "messages[0].content: required"),
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
                  "tools": [{"type": "function", "function": {"name": "f"}}, {"name": "g", "parameters": {}}]},
                 {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": None,
                                                                   "tool_calls": [{"function": {"name": "f"}}]},
                               {"role": "tool", "content": "1"}]}):
        engine.prepare(good)
        stream_usage(good)


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_error_is_openai_s_json_500_and_its_traceback_is_only_in_the_log(stream, tmp_path, caplog,
                                                                                        capsys):
    """A failure of the server's own was starlette's plain-text "Internal Server Error", which OpenAI's clients
    cannot read as an error; streamed, the error event carried the exception's message but the log had nothing. The
    app is served by uvicorn on loopback, as `serve` runs it; its generation fails as a broken model's would."""
    import http.client
    import json
    import logging
    import threading

    import uvicorn

    from conftest import free_port
    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from glm_ft.infer.checkpoint import load_checkpoint
    from glm_ft.infer.serve import Engine, create_app

    class Broken(Engine):
        def generate(self, *args, **kwargs):
            raise RuntimeError("the model broke at /secret/path")

    loaded = load_checkpoint(ensure_tiny_model(tmp_path / "tiny"), dtype="float32", device="cpu")
    app = create_app(Broken(SimpleNamespace(tokenizer=loaded.tokenizer, model=loaded.model), "tiny", 4))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    with caplog.at_level(logging.ERROR):
        thread.start()
        try:
            while not server.started:
                assert thread.is_alive()
                threading.Event().wait(0.05)
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                         body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream}))
            response = conn.getresponse()
            raw = response.read().decode()
        finally:
            server.should_exit = True
            thread.join()
    if stream:
        assert response.status == 200  # the stream had begun
        error = json.loads(raw.split("\n\n")[1].removeprefix("data: "))
        log = capsys.readouterr().err
    else:
        assert response.status == 500 and response.getheader("content-type") == "application/json"
        error = json.loads(raw)
        log = caplog.text
    assert error == {"error": {"message": "The server had an error while processing your request (its log has the "
                                          "details)", "type": "server_error", "param": None, "code": None}}
    assert "Traceback" in log and "RuntimeError: the model broke at /secret/path" in log

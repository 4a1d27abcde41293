"""An OpenAI chat-completions request, checked and turned into ChatGLM3's messages (glm_ft.infer.serve answers
with it). Every refusal is a `BadRequest` (400) naming the field, or `ModelNotFound` (404) for a model not served."""

from __future__ import annotations

import json
import math

from glm_ft.infer.tool_calls import call_turn

# OpenAI role -> ChatGLM3 role
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation",
         "observation": "observation"}


class BadRequest(ValueError):
    """A request the API answers with 400 and this message."""


class ModelNotFound(LookupError):
    """A request for a model this server does not serve: 404, as OpenAI and vLLM answer it."""


def text_only(body: dict) -> None:
    """JSON's `\\ud800` escapes a lone UTF-16 surrogate, which Python's reader takes and no text holds: the tokenizer
    fails on it (a 500). Refused wherever it is in the request (content, tool names, tool schemas)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        found = err.object[err.start:err.end].encode("unicode_escape").decode()
        raise BadRequest(f"the request holds a lone UTF-16 surrogate ({found}), which is not a character") from None


def requested_model(body: dict, names: list[str]) -> str:
    """The served name a reply reports: the one the request names, or the first when it names none. OpenAI requires
    `model`; vLLM, whose behaviour clients of self-hosted models are written against, takes its absence as the
    served model, and so does glm-ft."""
    model = body.get("model")
    if model is None or model == "":
        return names[0]
    if not isinstance(model, str):
        raise BadRequest("model: expected a string")
    if model not in names:
        raise ModelNotFound(f"The model `{model}` does not exist; served here: {', '.join(names)}")
    return model


def conversation(body: dict) -> list[dict]:
    """OpenAI messages (+ tools) -> ChatGLM3 messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role: expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text has a place in ChatGLM3
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            for j, part in enumerate(content):
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content[{j}].text: expected a string")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected a string")
        if content is None and not (message["role"] == "assistant" and message.get("tool_calls")):
            # OpenAI requires it but for an assistant message that calls a tool: a user turn without one is a
            # client's mistake, not an empty message
            raise BadRequest(f"messages[{i}].content: required (null only on an assistant message with tool_calls)")
        converted = {"role": ROLES[message["role"]], "content": content or ""}
        if message.get("name") and converted["role"] == "assistant":
            converted["metadata"] = str(message["name"])
        if message.get("tool_calls") and converted["role"] == "assistant":
            try:  # the call as ChatGLM3 wrote it in training, not an empty assistant turn
                converted = call_turn(message["tool_calls"], f"messages[{i}]")
            except ValueError as err:
                raise BadRequest(str(err)) from None
        out.append(converted)
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("tools: expected a list")
        functions = [_function(j, tool) for j, tool in enumerate(tools)]
    if tools and tools_offered(body):
        if out[0]["role"] == "system":
            out[0]["tools"] = functions
        else:
            out.insert(0, {"role": "system", "content": "", "tools": functions})
    return out


def tools_offered(body: dict) -> bool:
    """Whether the request's `tools` go into the prompt and a reply in ChatGLM3's call form comes back as
    `tool_calls`. `tool_choice` "none" means the model must answer in text: the tools are not offered, as a ChatGLM3
    prompt without them asks for an answer. "required" and a named function would need decoding constrained to a
    call, which ChatGLM3's generation here cannot guarantee: refused, not served as "auto"."""
    choice = body.get("tool_choice")
    if choice == "none":
        return False
    if choice is not None and choice != "auto":
        if choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function"):
            raise BadRequest(f"tool_choice: {json.dumps(choice, ensure_ascii=False)} is not supported by glm-ft "
                             'serve, which cannot force a tool call (accepted: "auto", "none")')
        raise BadRequest('tool_choice: expected "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}')
    return bool(body.get("tools"))


def _function(j: int, tool) -> dict:
    """One offered tool as ChatGLM3's prompt lists it: OpenAI's {"type": "function", "function": {...}}, or the
    function itself as ChatGLM3's own demos pass it. Anything else was rendered into the prompt as it came."""
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRequest(f'tools[{j}]: expected {{"type": "function", "function": {{"name": ..., ...}}}}')
    return function


def number(key: str, value, default, low: float, high: float | None = None, integer: bool = False):
    """A request's number, or `default`. Python's JSON reader takes NaN and Infinity, which no bound refuses."""
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_type or not math.isfinite(value) or value < low or (high is not None and value > high):
        raise BadRequest(f"{key}: expected {kind} from {low}" + (f" to {high}" if high is not None else ""))
    return value


# OpenAI request fields that would change what comes back and that serve does not implement: refused by name, unless
# they hold the value that means "off" (what clients send by default), rather than ignored (a client asking for three
# choices or a JSON object must not get one free-text reply).
OFF = {"n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
       "frequency_penalty": (None, 0), "logit_bias": (None, {}), "response_format": (None, {"type": "text"}),
       "functions": (None, []), "function_call": (None, "none", "auto"), "audio": (None,),
       "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,),
       "web_search_options": (None,), "store": (None, False)}
# Fields served (or checked where they are used), and those that change nothing in the reply: `user`, `metadata`,
# `safety_identifier`, `prompt_cache_key` and `service_tier` concern OpenAI's accounts and caches; ChatGLM3 makes one
# call per turn, which any `parallel_tool_calls` allows.
KNOWN = {"messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
         "seed", "stop", "tools", "tool_choice", "parallel_tool_calls", "user", "metadata", "safety_identifier",
         "prompt_cache_key", "service_tier", *OFF}


def _is_off(value, off) -> bool:
    if isinstance(off, (int, float)) and not isinstance(off, bool):  # 0 and 0.0, not false
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == off
    return value == off and type(value) is type(off)


def refuse_unsupported(body: dict) -> None:
    for key in body:  # as OpenAI answers a field it does not know, rather than ignore a vLLM extra such as top_k
        if key not in KNOWN:
            raise BadRequest(f"{key}: unrecognized request argument (not an OpenAI chat-completions field "
                             "glm-ft serve knows)")
    for key, accepted in OFF.items():
        if not any(_is_off(body.get(key), ok) for ok in accepted):
            raise BadRequest(f"{key}: not supported by glm-ft serve (accepted: "
                             f"{', '.join('null' if ok is None else json.dumps(ok) for ok in accepted)})")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise BadRequest("parallel_tool_calls: expected true or false")


def stop_strings(body: dict) -> list[str]:
    """`stop`: a string or a list of them; the reply ends before the first that it holds
    (glm_ft/infer/stop_strings.py)."""
    stop = body.get("stop")
    if stop is None or stop == "":
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop: expected a string or a list of non-empty strings")
    return stops


def stream_usage(body: dict) -> bool:
    """Whether a stream ends with OpenAI's usage chunk (`stream_options.include_usage`), the only place a streaming
    client finds its token counts."""
    if not isinstance(body.get("stream", False), bool):  # "stream": "no" would have streamed
        raise BadRequest("stream: expected true or false")
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise BadRequest("stream_options: only allowed with \"stream\": true")
    if not isinstance(options, dict):
        raise BadRequest("stream_options: expected an object")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest("stream_options.include_usage: expected true or false")
    return include

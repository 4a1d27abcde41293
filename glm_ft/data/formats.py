"""The two formats other tools' data comes in, read as ChatGLM3 conversations (detected per row by its keys):

- alpaca: `{"instruction", "input"?, "output", "system"?, "tools"?, "history"?: [[user, assistant], ...]}`; the
  user turn is the instruction, then "\\n" and the input when there is one (as LLaMA-Factory joins them); `system`
  and `tools` (as for sharegpt) make the system message. LLaMA-Factory's alpaca has no tool-call turn (`output` is
  always a reply), so neither has this reader;
- sharegpt: `{"conversations": [{"from": "human|gpt|system|observation|function_call", "value"}], "system"?,
  "tools"?}`; `gpt` is an assistant turn, `observation` (or `tool`) ChatGLM3's observation, row `tools` (a list,
  or that list as a JSON string) go on the system message. A `function_call` value is LLaMA-Factory's JSON call,
  `{"name": ..., "arguments": {...}}` (arguments may be that object as a JSON string; a list holding one call is
  read too), and becomes ChatGLM3's own tool-call turn (metadata = the name, content = `tool_call(...)`), written
  by the code `serve` uses (glm_ft/chatglm3/tool_call.py): trained on the JSON text, a model would call tools in a
  form ChatGLM3's tool-call parser never reads.

`to_chatglm3(row)` returns the row as a ChatGLM3 row (`{"conversations": [{"role", "content", ...}]}`), or the row
unchanged when it is in neither format. Rows that look like one of them but are malformed raise FormatError with
what is wrong; the caller adds FILE:LINE.
"""

from __future__ import annotations

import json
from typing import Any

from glm_ft.chatglm3.tool_call import call_message

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "system": "system", "observation": "observation",
                  "tool": "observation"}


class FormatError(ValueError):
    """A row in the alpaca or sharegpt format that cannot be read."""


def detect(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "instruction" in row and "output" in row and "conversations" not in row:
        return "alpaca"
    items = row.get("conversations")
    if isinstance(items, list) and items and all(isinstance(m, dict) and "from" in m and "role" not in m
                                                 for m in items):
        return "sharegpt"
    return None


def to_chatglm3(row: Any) -> Any:
    kind = detect(row)
    if kind == "alpaca":
        return {"conversations": _alpaca(row)}
    if kind == "sharegpt":
        return {"conversations": _sharegpt(row)}
    return row


def _text(row: dict, key: str, what: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise FormatError(f"{what} '{key}' is not a string")
    return value


def _alpaca(row: dict) -> list[dict]:
    messages = []
    system, tools = _text(row, "system", "alpaca", optional=True), _tools(row.get("tools"), "alpaca")
    if system or tools is not None:
        messages.append({"role": "system", "content": system, **({"tools": tools} if tools is not None else {})})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise FormatError("alpaca 'history' must be a list of [user, assistant] pairs")
    for number, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise FormatError(f"alpaca 'history' item {number} is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(row, "instruction", "alpaca")
    extra = _text(row, "input", "alpaca", optional=True)
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _text(row, "output", "alpaca")})
    return messages


def _sharegpt(row: dict) -> list[dict]:
    messages = []
    for number, item in enumerate(row["conversations"], 1):
        who = item["from"]
        if who not in SHAREGPT_ROLES:
            raise FormatError(f"sharegpt message {number} has unknown 'from' {who!r} (expected one of "
                              f"{', '.join(SHAREGPT_ROLES)})")
        if not isinstance(item.get("value"), str):
            raise FormatError(f"sharegpt message {number} ({who}) has no string 'value'")
        if who == "function_call":
            messages.append(_function_call(item["value"], f"sharegpt message {number} (function_call)"))
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": item["value"]})
    system, tools = _text(row, "system", "sharegpt", optional=True), _tools(row.get("tools"), "sharegpt")
    if system or tools is not None:
        if messages[0]["role"] == "system":
            if system:
                raise FormatError("sharegpt row has both 'system' and a system message")
            head = messages[0]
        else:
            head = {"role": "system", "content": system}
            messages.insert(0, head)
        if tools is not None:
            head["tools"] = tools
    return messages


def _function_call(value: str, what: str) -> dict:
    """LLaMA-Factory's JSON call as ChatGLM3's tool-call turn."""
    layout = '; expected {"name": "...", "arguments": {...}}'
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise FormatError(f"{what} is not JSON ({err.msg}){layout}") from None
    except RecursionError:
        raise FormatError(f"{what}: JSON nested too deeply to read") from None
    if isinstance(call, list):  # LLaMA-Factory's parallel calls
        if len(call) != 1:
            raise FormatError(f"{what} holds {len(call)} calls; ChatGLM3 makes one tool call per assistant turn: "
                              "write each as its own function_call turn, followed by its observation")
        call = call[0]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise FormatError(f"{what} has no string 'name'{layout}")
    arguments = call.get("arguments")
    if isinstance(arguments, str):  # OpenAI's layout: the object as a JSON string
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            pass  # named below
    if not isinstance(arguments, dict):
        raise FormatError(f"{what}: 'arguments' is not a JSON object (or one in a string){layout}")
    try:
        return call_message(call["name"], arguments)
    except ValueError as err:
        raise FormatError(f"{what}: {err}") from None


def _tools(tools: Any, kind: str) -> list | None:
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise FormatError(f"{kind} 'tools' is a string but not JSON ({err.msg})") from None
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list):
        raise FormatError(f"{kind} 'tools' must be a list (or that list as a JSON string)")
    return tools

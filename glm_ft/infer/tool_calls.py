"""OpenAI `tool_calls` <-> ChatGLM3's tool-call turn, for `serve`.

OpenAI sends a call as `tool_calls` on an assistant message (`function.arguments` a JSON string) and the result as
a `tool` message; the reply comes back the same way. ChatGLM3's side, an assistant turn whose metadata is the
function's name and whose content is `tool_call(...)`, is written and read by glm_ft/chatglm3/tool_call.py, the
same code that turns training data's calls into that turn. One call per turn, as ChatGLM3 makes them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from glm_ft.chatglm3.tool_call import call_message, read_call


def call_turn(tool_calls: Any, where: str) -> dict[str, str]:
    """An OpenAI assistant message's `tool_calls` as ChatGLM3's assistant turn. ValueError names what is wrong."""
    if not isinstance(tool_calls, list) or len(tool_calls) != 1:
        raise ValueError(f"{where}.tool_calls: ChatGLM3 makes one tool call per assistant turn; send each call "
                         "as its own assistant message, followed by its tool message")
    function = tool_calls[0].get("function") if isinstance(tool_calls[0], dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.tool_calls[0].function.name: expected a string")
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.tool_calls[0].function.arguments: expected a JSON object in a string")
    try:
        return call_message(name, arguments)
    except ValueError as err:
        raise ValueError(f"{where}.tool_calls[0].function: {err}") from None


def parse_call(text: str) -> dict[str, Any] | None:
    """A reply that is a ChatGLM3 tool call, as an OpenAI `tool_calls` entry; None for any other reply."""
    call = read_call(text)
    if call is None:
        return None
    name, arguments = call
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def reply_message(text: str, finish_reason: str, tools_offered: bool) -> tuple[dict[str, Any], str]:
    """The response's message and finish_reason: a finished reply in ChatGLM3's call form, when the request offered
    tools, as OpenAI's `tool_calls`; any other reply as content."""
    call = parse_call(text) if tools_offered and finish_reason == "stop" else None
    if call is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


class StreamedReply:
    """A streamed reply's text pieces, as they are decoded, as OpenAI stream deltas that add up to what the same
    reply gives unstreamed (`reply_message`: the text stripped).

    ChatGLM3 writes a reply's metadata on its first line: empty for an answer, which therefore starts with "\\n",
    the tool's name for a call. So an answer streams as it comes; when tools were offered, a reply whose first line
    is a name is held to its end, then sent as one `tool_calls` delta if it is a call, or as its text if not.
    """

    def __init__(self, tools_offered: bool):
        self.tools_offered = tools_offered
        self.streaming = not tools_offered  # else undecided until the first line is complete
        self.held = ""
        self.started = False
        self.trailing = ""  # whitespace held back until more text follows: unstreamed text is stripped

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas to send now for the next decoded piece."""
        if not self.streaming:
            self.held += text
            first_line, newline, _ = self.held.partition("\n")
            if not newline or first_line.strip():
                return []  # undecided, or a name: held to the end
            self.streaming, text, self.held = True, self.held, ""
        if not self.started:  # an answer begins with "\n"
            text = text.lstrip()
            self.started = bool(text)
        text = self.trailing + text
        body = text.rstrip()
        self.trailing = text[len(body):]
        return [{"content": body}] if body else []

    def finish(self, finish_reason: str, cut: bool = False) -> tuple[list[dict[str, Any]], str]:
        """The deltas left to send once the reply has ended, and the response's finish_reason. `cut`: the reply
        ended before a stop string, and keeps the whitespace before it, as unstreamed (glm_ft/infer/stop_strings.py)."""
        if self.streaming:
            return ([{"content": self.trailing}] if cut and self.trailing else []), finish_reason
        if not self.held.strip():
            return [], finish_reason
        text = self.held.lstrip() if cut else self.held.strip()
        message, finish_reason = reply_message(text, finish_reason, self.tools_offered)
        if message["content"] is not None:
            return [{"content": message["content"]}], finish_reason
        return [{"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}], finish_reason

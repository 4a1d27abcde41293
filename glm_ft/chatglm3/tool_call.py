"""ChatGLM3's tool-call turn, written and read back: the one definition that training data (a sharegpt
`function_call`, glm_ft/data/formats.py) and `serve` (OpenAI `tool_calls`, glm_ft/infer/tool_calls.py) share.

ChatGLM3 calls a tool as an assistant turn whose metadata is the function's name and whose content is a Python
call, as in its own demo and data (data/sample):

    <|assistant|>get_stock
    ```python
    tool_call(item="白色牛仔裤", size="L")
    ```

followed by an `<|observation|>` turn with the result. One call per turn. A call is read with `ast` (literal values
only), never evaluated. The writer refuses what the reader could not give back (a name or argument name that is
not one, NaN), so a model trained on what it writes makes calls `serve` can return. Standard library only: the data
readers import it before anything heavy.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from typing import Any

_NAME = r"[A-Za-z_][\w.\-]*"
# The content after the metadata line decodes with SentencePiece's leading space ("get_stock\n ```python\n..."):
# ChatGLM3 encodes a message's content on its own, so its first piece carries the "▁" word-start marker.
_CALL = re.compile(rf"\A({_NAME})[ \t]*\n[ \t]*```python\n(tool_call\(.*\))\n```\s*\Z", re.DOTALL)


def _literal(value: Any) -> str:
    """A JSON value as a Python literal: strings in double quotes as in ChatGLM3's data, true/false/null as Python's."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)  # numbers as written; True/False/None; lists and dicts with Python's literals inside


def call_message(name: Any, arguments: Any) -> dict[str, str]:
    """The assistant turn that calls tool `name` with `arguments` (a dict of JSON values). ValueError says what
    ChatGLM3's call form cannot carry."""
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise ValueError(f"tool name {name!r} is not a name ChatGLM3's call form reads back (letters, digits, "
                         "'_', '.', '-'; not starting with a digit)")
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object, found {type(arguments).__name__}")
    for key in arguments:
        if not key.isidentifier() or keyword.iskeyword(key):
            raise ValueError(f"argument name {key!r} cannot be written as tool_call({key}=...): ChatGLM3 writes "
                             "arguments as Python keyword arguments")
    try:
        json.dumps(arguments, allow_nan=False)
    except ValueError:
        raise ValueError("arguments hold NaN or Infinity, which a Python literal cannot write") from None
    call = ", ".join(f"{key}={_literal(value)}" for key, value in arguments.items())
    return {"role": "assistant", "metadata": name, "content": f"```python\ntool_call({call})\n```"}


def read_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """The tool name and arguments of a reply (metadata line, then content) in ChatGLM3's call form; None for any
    other reply."""
    match = _CALL.match(text.strip())
    if match is None:
        return None
    try:
        node = ast.parse(match.group(2), mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except (SyntaxError, ValueError, TypeError):  # TypeError: an unhashable key, {[1]: 2}
        return None
    return match.group(1), arguments

"""Reading conversation files: every row checked, or named by FILE:LINE.

Files are `.jsonl` or `.json` (JSON lines, or one JSON array of rows). A row is either
`{"conversations": [{"role": ..., "content": ..., "metadata"?, "tools"?, "loss"?}, ...]}` with roles system, user,
assistant and observation (`tools` only on a system message: a row-level `system` or `tools` is refused, not
dropped), or an AdvertiseGen row `{"content", "summary"}`, read as one user and one assistant message (alpaca
and sharegpt rows too: glm_ft/data/formats.py). Problems are reported as `DataError("FILE:LINE: what is wrong")`.
Turning conversations into samples is glm_ft/data/dataset.py.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from glm_ft.atomic import write_text_atomic
from glm_ft.chatglm3 import tool_call
from glm_ft.data import formats
from glm_ft.data.formats import FormatError, to_chatglm3
from glm_ft.errors import DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "observation")
_SHOWN_SKIPS = 5  # per file; the rest are only counted
_TOO_DEEP = "JSON nested too deeply to read (a conversation row is a few levels deep)"
_SCAN = json.JSONDecoder().scan_once  # json.loads' own scanner, without the Python wrapping it adds per call
# Text decoded from UTF-8 holds no surrogates; only a JSON escape such as \ud800 can put one in a string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    metadata: str = ""
    tools: Any = None
    loss: bool | None = None

    @property
    def carries_loss(self) -> bool:
        return self.loss if self.loss is not None else self.role == "assistant"


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str  # "FILE:LINE" of the row

    def to_json(self) -> str:
        return json.dumps([asdict(m) for m in self.messages], ensure_ascii=False)


@dataclass
class ReadReport:
    conversations: list[Conversation]
    rows_read: int
    skipped: list[str]  # "FILE:LINE: reason", one per skipped row



class _BadRow(Exception):
    """A row that is valid JSON but can't be used; skippable with skip_bad_rows."""


# --- reading files ---


def read_conversations(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> list[Conversation]:
    return read_rows(path, skip_bad_rows=skip_bad_rows).conversations


def read_rows(path: str | os.PathLike, *, skip_bad_rows: bool = False, log_skips: bool = True,
              keep: bool = True) -> ReadReport:
    """Read and check every row of a `.json`/`.jsonl` file. Malformed JSON, a non-UTF-8 or empty file always fail;
    a row that is valid JSON but unusable fails too, unless `skip_bad_rows`, which skips and counts it (and logs
    the first few unless not `log_skips`). Without `keep`, only the verdict and the counts: no conversation is
    kept (`conversations` stays empty), so a check holds no rows and the collector has none to walk."""
    path = Path(path)
    conversations, skipped, rows_read, used = [], [], 0, 0
    text = _file_text(path)
    check_unicode = _SURROGATE_ESCAPE.search(text) is not None
    for line, row in _json_rows(path, text):
        rows_read += 1
        where = f"{path}:{line}"
        try:
            conversation = Conversation(_row_messages(row, check_unicode), where)
        except _BadRow as bad:
            if not skip_bad_rows:
                raise DataError(f"{where}: {bad}") from None
            skipped.append(f"{where}: {bad}")
            if log_skips and len(skipped) <= _SHOWN_SKIPS:
                logger.warning("skipping row %s: %s", where, bad)
            continue
        used += 1
        if keep:
            conversations.append(conversation)
    if log_skips and len(skipped) > _SHOWN_SKIPS:
        logger.warning("%s: skipped %d rows in all (first %d shown)", path, len(skipped), _SHOWN_SKIPS)
    if not used:
        raise DataError(f"{path}: no usable rows ({len(skipped)} of {rows_read} skipped)")
    return ReadReport(conversations, rows_read, skipped)


def check_rows(path: str | os.PathLike, *, skip_bad_rows: bool = False, log_skips: bool = True,
               records: Path | None = None) -> None:
    """`read_rows`' verdict on a file (a DataError, or nothing), remembered in the folder `records`.

    Every job checks its data before its model loads; a rerun, or a sweep's next job, would read the same rows
    again (1.3 s per 100,000 AdvertiseGen-shaped rows in `make bench`, against 0.04 s to hash them). A file whose
    exact bytes passed before, at the same path, with the same skip_bad_rows and this reading code, is not read
    again. A file that fails is never recorded, so it fails again, naming its FILE:LINE. With `log_skips` the file
    is always read: that caller wants the skipped rows shown.
    """
    path, record = Path(path), None
    if records is not None:
        try:
            # the path too: the verdict depends on its suffix, and the record then names one file
            key = "\0".join((str(path.resolve()), file_digest(path), str(bool(skip_bad_rows)), reading_code_digest()))
            record = records / hashlib.sha256(key.encode()).hexdigest()[:32]
        except OSError:
            pass  # unreadable: read_rows names the problem
    if record is not None and not log_skips and record.is_file():
        return
    read_rows(path, skip_bad_rows=skip_bad_rows, log_skips=log_skips, keep=False)
    if record is not None:
        try:
            write_text_atomic(record, f"{path}\n")
        except OSError:
            pass  # a cache that can't be written costs the next job this check, nothing more


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: what names a data file's contents in the record of its check and in the key of
    its preprocessed cache (glm_ft/data/dataset.py)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def reading_code_digest() -> str:
    """A digest of the code that reads rows (this module, the row formats, the tool-call writer they use): an edit
    to it makes every earlier check record, and every preprocessed cache (glm_ft/data/dataset.py), stale."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(Path(formats.__file__).read_bytes())
    digest.update(Path(tool_call.__file__).read_bytes())
    return digest.hexdigest()


def _file_text(path: Path) -> str:
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use .json or .jsonl")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:  # EIO from a failing disk, EISDIR, EACCES, ...
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    return text


def _json_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    start = _skip_space(text, 0)
    if start == len(text):
        raise DataError(f"{path}:1: file is empty")
    if text[start] == "[":
        yield from _array_rows(path, text, start)
    else:
        yield from _line_rows(path, text)


def _line_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            try:
                row, end = _SCAN(line, 0)
                if line[end:].strip(" \t\r\n"):  # what json.loads allows after the value
                    raise ValueError
            except (StopIteration, ValueError):  # leading space, or bad JSON: json.loads reads or names it
                row = json.loads(line)
        except RecursionError:
            raise DataError(f"{path}:{number}: {_TOO_DEEP}") from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{number}: malformed JSON ({e.msg}, column {e.colno}); expected one JSON object per line "
                "or one JSON array"
            ) from None
        yield number, row


def _array_rows(path: Path, text: str, start: int) -> Iterator[tuple[int, Any]]:
    # Elements are decoded one at a time so that each row can be named by the line it starts on.
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = _skip_space(text, start + 1)
    if text.startswith("]", pos):
        raise DataError(f"{path}:{lines.at(pos)}: the array holds no rows")
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except RecursionError:
            raise DataError(f"{path}:{lines.at(pos)}: {_TOO_DEEP}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        yield lines.at(pos), row
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            if _skip_space(text, pos + 1) != len(text):
                raise DataError(f"{path}:{lines.at(pos)}: malformed JSON (text after the closing ']')")
            return
        else:
            raise DataError(f"{path}:{lines.at(pos)}: malformed JSON (expected ',' or ']' between rows)")


class _LineCounter:
    """Line number of increasing offsets into a text, counting each newline once."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _row_messages(row: Any, check_unicode: bool = True) -> tuple[Message, ...]:
    try:
        row = to_chatglm3(row)  # alpaca and sharegpt rows (glm_ft/data/formats.py)
    except FormatError as err:
        raise _BadRow(str(err)) from None
    if not isinstance(row, dict):
        raise _BadRow(f"row is a JSON {type(row).__name__}, not an object")
    if "conversations" in row:
        if "tools" in row:
            raise _BadRow("'tools' belongs on the system message, not on the row")
        if _carries(row, "system"):
            raise _BadRow("'system' belongs in a system message (the first of 'conversations'), not on the row")
        items = row["conversations"]
        if not isinstance(items, list) or not items:
            raise _BadRow("'conversations' must be a non-empty list of messages")
        messages = tuple(_message(item, number, check_unicode) for number, item in enumerate(items, 1))
    elif "content" in row and "summary" in row:
        for key in ("system", "tools"):
            if _carries(row, key):
                raise _BadRow(f"an AdvertiseGen row (content, summary) has no '{key}'; write the row as "
                              "'conversations' with a system message")
        for key in ("content", "summary"):
            if not isinstance(row[key], str):
                raise _BadRow(f"'{key}' is not a string")
            if check_unicode:
                _check_unicode(row[key], f"'{key}'")
        messages = (Message("user", row["content"]), Message("assistant", row["summary"]))
    else:
        raise _BadRow("row has neither 'conversations' nor 'content' and 'summary' (nor alpaca's 'instruction' and "
                      "'output')")
    if not any(m.role == "assistant" and m.carries_loss for m in messages):
        raise _BadRow("conversation has no assistant turn to learn from")
    return messages


def _carries(row: dict, key: str) -> bool:
    """A row-level key the format has no place for, holding something: read on, the row would train without its
    system prompt or tools. An empty one (`"system": ""`, as exporters write) loses nothing."""
    return row.get(key) not in (None, "", [])


def _message(item: Any, number: int, check_unicode: bool = True) -> Message:
    if not isinstance(item, dict):
        raise _BadRow(f"message {number} is not a JSON object")
    role = item.get("role")
    if role not in ROLES:
        found = "has no role" if role is None else f"has unknown role {role!r}"
        raise _BadRow(f"message {number} {found} (expected one of {', '.join(ROLES)})")
    if "content" not in item:
        raise _BadRow(f"message {number} ({role}) has no content")
    if not isinstance(item["content"], str):
        raise _BadRow(f"content of message {number} ({role}) is not a string")
    metadata = item.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        raise _BadRow(f"metadata of message {number} ({role}) is not a string")
    tools = item.get("tools")
    if tools is not None and role != "system":
        raise _BadRow(f"message {number} ({role}) has tools; only a system message may carry them")
    if tools is not None:
        _check_tools(tools, number)
    loss = item.get("loss")
    if loss is not None and not isinstance(loss, bool):
        raise _BadRow(f"'loss' of message {number} ({role}) must be true or false")
    if check_unicode:
        _check_unicode(item["content"], f"content of message {number} ({role})")
    if metadata and check_unicode:
        _check_unicode(metadata, f"metadata of message {number} ({role})")
    return Message(role, item["content"], metadata or "", tools, loss)


def _check_unicode(text: str, what: str) -> None:
    # JSON allows escapes such as \ud800 that are no Unicode character; the tokenizer would fail on them mid-run.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _BadRow(f"{what} holds {text[err.start]!r} at character {err.start}, an unpaired surrogate "
                      "escape that is not valid Unicode") from None


def _check_tools(tools: Any, number: int) -> None:
    """`tools` is rendered as JSON into the system prompt: a list of tool descriptions (objects)."""
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        found = type(tools).__name__ if not isinstance(tools, list) else \
            next(type(t).__name__ for t in tools if not isinstance(t, dict))
        raise _BadRow(f"tools of message {number} must be a list of objects (tool descriptions), found a {found}")
    try:
        rendered = json.dumps(tools, indent=4, ensure_ascii=False)
    except RecursionError:
        raise _BadRow(f"tools of message {number}: nested too deeply to render") from None
    _check_unicode(rendered, f"tools of message {number}")

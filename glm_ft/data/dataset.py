"""Training data: conversation files → checked conversations → training and evaluation samples.

Files are `.jsonl` or `.json` (JSON lines, or one JSON array of rows). A row is either
`{"conversations": [{"role": ..., "content": ..., "metadata"?, "tools"?, "loss"?}, ...]}` with roles system, user,
assistant and observation (`tools` only on a system message), or an AdvertiseGen row `{"content", "summary"}`,
read as one user and one assistant message. Problems are reported as `DataError("FILE:LINE: what is wrong")`.

Which tokens are trained: token i is a target iff token i-1 belongs to a message that carries loss. By default only
assistant messages carry loss; `"loss": true/false` on a message overrides that. (The reference demo also trained
on observation messages, against its own README; here a tool's output is never a target unless asked for.)

Nothing is dropped silently: skipped rows, truncated samples and samples left without targets are counted in
`DataBundle.stats` and logged.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from glm_ft.atomic import folder_atomic
from glm_ft.data import formats as data_formats
from glm_ft.data.formats import FormatError, to_chatglm3
from glm_ft.errors import DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "observation")
IGNORE_INDEX = -100
_SHOWN_SKIPS = 5  # per file; the rest are only counted
_ROWS_PER_PROCESS = 1000  # below this, starting worker processes costs more than it saves
_TOO_DEEP = "JSON nested too deeply to read (a conversation row is a few levels deep)"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    metadata: str = ""
    tools: Any = None
    loss: bool | None = None

    @property
    def carries_loss(self) -> bool:
        return self.loss if self.loss is not None else self.role == "assistant"


@dataclass(frozen=True)
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


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset with input_ids, labels; None when no file is configured
    val: Any  # datasets.Dataset with input_ids, output_ids; None when no file is configured
    test: Any
    stats: dict[str, int]


class _BadRow(Exception):
    """A row that is valid JSON but can't be used; skippable with skip_bad_rows."""


# --- reading files ---


def read_conversations(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> list[Conversation]:
    return read_rows(path, skip_bad_rows=skip_bad_rows).conversations


def read_rows(path: str | os.PathLike, *, skip_bad_rows: bool = False, log_skips: bool = True) -> ReadReport:
    """Read and check every row of a `.json`/`.jsonl` file. Malformed JSON, a non-UTF-8 or empty file always fail;
    a row that is valid JSON but unusable fails too, unless `skip_bad_rows`, which skips and counts it (and logs
    the first few unless not `log_skips`)."""
    path = Path(path)
    conversations, skipped, rows_read = [], [], 0
    for line, row in _json_rows(path):
        rows_read += 1
        where = f"{path}:{line}"
        try:
            conversations.append(Conversation(_row_messages(row), where))
        except _BadRow as bad:
            if not skip_bad_rows:
                raise DataError(f"{where}: {bad}") from None
            skipped.append(f"{where}: {bad}")
            if log_skips and len(skipped) <= _SHOWN_SKIPS:
                logger.warning("skipping row %s: %s", where, bad)
    if log_skips and len(skipped) > _SHOWN_SKIPS:
        logger.warning("%s: skipped %d rows in all (first %d shown)", path, len(skipped), _SHOWN_SKIPS)
    if not conversations:
        raise DataError(f"{path}: no usable rows ({len(skipped)} of {rows_read} skipped)")
    return ReadReport(conversations, rows_read, skipped)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
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


def _row_messages(row: Any) -> tuple[Message, ...]:
    try:
        row = to_chatglm3(row)  # alpaca and sharegpt rows (glm_ft/data/formats.py)
    except FormatError as err:
        raise _BadRow(str(err)) from None
    if not isinstance(row, dict):
        raise _BadRow(f"row is a JSON {type(row).__name__}, not an object")
    if "conversations" in row:
        if "tools" in row:
            raise _BadRow("'tools' belongs on the system message, not on the row")
        items = row["conversations"]
        if not isinstance(items, list) or not items:
            raise _BadRow("'conversations' must be a non-empty list of messages")
        messages = tuple(_message(item, number) for number, item in enumerate(items, 1))
    elif "content" in row and "summary" in row:
        for key in ("content", "summary"):
            if not isinstance(row[key], str):
                raise _BadRow(f"'{key}' is not a string")
            _check_unicode(row[key], f"'{key}'")
        messages = (Message("user", row["content"]), Message("assistant", row["summary"]))
    else:
        raise _BadRow("row has neither 'conversations' nor 'content' and 'summary' (nor alpaca's 'instruction' and "
                      "'output')")
    if not any(m.role == "assistant" and m.carries_loss for m in messages):
        raise _BadRow("conversation has no assistant turn to learn from")
    return messages


def _message(item: Any, number: int) -> Message:
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
    _check_unicode(item["content"], f"content of message {number} ({role})")
    if metadata:
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


# --- samples ---


def build_train_sample(
    messages: Sequence[Message | Mapping[str, Any]], tokenizer, max_input_length: int, max_output_length: int
) -> dict[str, Any]:
    """`[gMASK] sop` + every message + eos, cut (head kept) to max_input_length + max_output_length + 1 tokens.

    Returns input_ids, labels (IGNORE_INDEX where not a target) and `truncated`. A truncated sample keeps no eos:
    teaching the model to stop where the data was merely cut would be wrong.
    """
    ids = list(tokenizer.get_prefix_tokens())
    in_loss_message = [False] * len(ids)
    for message in map(_as_message, messages):
        part = _message_ids(tokenizer, message)
        ids += part
        in_loss_message += [message.carries_loss] * len(part)
    ids.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX] + [tok if prev else IGNORE_INDEX for tok, prev in zip(ids[1:], in_loss_message)]
    limit = max_input_length + max_output_length + 1
    return {"input_ids": ids[:limit], "labels": labels[:limit], "truncated": len(ids) > limit}


def build_eval_samples(
    messages: Sequence[Message | Mapping[str, Any]], tokenizer, max_input_length: int, max_output_length: int
) -> list[dict[str, Any]]:
    """One sample per assistant turn that carries loss: input = context so far + `<|assistant|>`, output = the
    turn's tokens after `<|assistant|>` + eos.

    A context over max_input_length tokens keeps `[gMASK] sop` and its most recent tokens (the reference dropped
    the sample); an output over max_output_length is cut and still ends with eos. `input_truncated` and
    `output_truncated` say which happened.
    """
    if max_input_length < 3 or max_output_length < 1:
        raise ValueError("max_input_length must be at least 3 and max_output_length at least 1")
    prefix = list(tokenizer.get_prefix_tokens())
    budget = max_input_length - len(prefix)
    context: list[int] = []
    samples = []
    for message in map(_as_message, messages):
        part = _message_ids(tokenizer, message)
        if message.role == "assistant" and message.carries_loss:
            reply = part[1:]
            samples.append(
                {
                    "input_ids": prefix + context[-budget:] + part[:1],
                    "output_ids": reply[: max_output_length - 1] + [tokenizer.eos_token_id],
                    "input_truncated": len(context) > budget,
                    "output_truncated": len(reply) > max_output_length - 1,
                }
            )
        context += part
    return samples


def _as_message(message: Message | Mapping[str, Any]) -> Message:
    if isinstance(message, Message):
        return message
    return Message(
        message["role"], message["content"], message.get("metadata") or "", message.get("tools"), message.get("loss")
    )


def _message_ids(tokenizer, message: Message) -> list[int]:
    from glm_ft.chatglm3.tokenization import message_text

    text = message_text(message.role, message.content, message.tools)
    return tokenizer.build_single_message(message.role, message.metadata, text)


def _train_batch(batch, tokenizer, max_input_length, max_output_length):
    out = {"input_ids": [], "labels": [], "truncated": []}
    for text in batch["conversation"]:
        sample = build_train_sample(json.loads(text), tokenizer, max_input_length, max_output_length)
        # A sample whose targets were all cut off would add nothing but a NaN-prone empty loss.
        if any(label != IGNORE_INDEX for label in sample["labels"]):
            for key in out:
                out[key].append(sample[key])
    return out


def _eval_batch(batch, tokenizer, max_input_length, max_output_length):
    out = {"input_ids": [], "output_ids": [], "input_truncated": [], "output_truncated": []}
    for text in batch["conversation"]:
        for sample in build_eval_samples(json.loads(text), tokenizer, max_input_length, max_output_length):
            for key in out:
                out[key].append(sample[key])
    return out


# --- datasets, cached ---


def load_datasets(
    data_config: Mapping[str, Any],
    tokenizer,
    max_input_length: int,
    max_output_length: int,
    *,
    cache_dir: str | os.PathLike,
    skip_bad_rows: bool = False,
    eval_subset: int | None = None,
) -> DataBundle:
    """Train, val and test as `datasets.Dataset` (None for a split whose file is not configured).

    `data_config` holds data_dir, train_file, val_file, test_file and num_proc. A configured file that does not
    exist is an error. Each split is preprocessed once and cached under `cache_dir`, keyed by the file's contents,
    the tokenizer, the lengths, skip_bad_rows and this code; any change to one of them rebuilds it. `eval_subset`
    keeps the first N validation samples (the reference evaluated 50 during training).
    """
    data_dir = Path(data_config.get("data_dir") or ".")
    num_proc = int(data_config.get("num_proc") or 1)
    stats: dict[str, int] = {}
    splits: dict[str, Any] = {}
    for split, key, build in (("train", "train_file", _train_batch), ("val", "val_file", _eval_batch),
                              ("test", "test_file", _eval_batch)):
        name = data_config.get(key)
        if not name:
            logger.info("%s not set: no %s split", key, split)
            splits[split] = None
            continue
        path = data_dir / name
        if not path.is_file():
            raise DataError(f"{path}: file not found ({key})")
        splits[split] = _load_split(
            split, path, build, tokenizer, max_input_length, max_output_length,
            Path(cache_dir), skip_bad_rows, num_proc, stats,
        )
    if eval_subset is not None and splits["val"] is not None and len(splits["val"]) > eval_subset:
        splits["val"] = splits["val"].select(range(eval_subset))
        logger.info("val: evaluating the first %d of %d samples", eval_subset, stats["data.val.samples"])
    if splits["val"] is not None:
        stats["data.val.samples_selected"] = len(splits["val"])
    return DataBundle(splits["train"], splits["val"], splits["test"], stats)


def _load_split(split, path, build, tokenizer, max_input_length, max_output_length, cache_dir, skip_bad_rows,
                num_proc, stats):
    import datasets

    key = _cache_key(path, tokenizer, build.__name__, max_input_length, max_output_length, skip_bad_rows)
    target = cache_dir / f"{split}-{key[:24]}"
    stats_file = target / "glm_ft_stats.json"
    if stats_file.is_file():
        logger.info("%s: reusing preprocessed %s from %s", split, path, target)
        counts = json.loads(stats_file.read_text())
        cached = 1
    else:
        counts = _preprocess(path, build, tokenizer, max_input_length, max_output_length, skip_bad_rows, num_proc,
                             target)
        cached = 0
    _log_counts(split, counts, max_input_length, max_output_length)
    stats.update({f"data.{split}.{name}": value for name, value in counts.items()})
    stats[f"data.{split}.cached"] = cached
    return datasets.load_from_disk(str(target))


def _preprocess(path, build, tokenizer, max_input_length, max_output_length, skip_bad_rows, num_proc, target):
    """Tokenize one file into `target` (a saved dataset plus its counts); returns the counts."""
    import datasets

    report = read_rows(path, skip_bad_rows=skip_bad_rows)
    rows = [conversation.to_json() for conversation in report.conversations]
    procs = max(1, min(num_proc, os.cpu_count() or 1, len(rows) // _ROWS_PER_PROCESS))
    dataset = datasets.Dataset.from_dict({"conversation": rows}).map(
        functools.partial(build, tokenizer=tokenizer, max_input_length=max_input_length,
                          max_output_length=max_output_length),
        batched=True,
        remove_columns=["conversation"],
        num_proc=procs if procs > 1 else None,
        new_fingerprint=target.name[-24:],
        desc=f"Tokenizing {path.name}",
    )
    counts = {"rows_read": report.rows_read, "rows_skipped": len(report.skipped), "rows_used": len(rows),
              "samples": len(dataset)}
    if build is _train_batch:
        flags = {"truncated": "truncated"}
        counts["dropped_no_target"] = len(rows) - len(dataset)
    else:
        flags = {"input_truncated": "inputs_truncated", "output_truncated": "outputs_truncated"}
    for column, name in flags.items():
        counts[name] = sum(dataset[column])
    _save_atomically(dataset.remove_columns(list(flags)), counts, target)
    return counts


def _log_counts(split: str, counts: dict[str, int], max_input_length: int, max_output_length: int) -> None:
    logger.info("%s: %d rows read, %d skipped, %d samples", split, counts["rows_read"], counts["rows_skipped"],
                counts["samples"])
    notes = {
        "rows_skipped": ("rows", "rows skipped as unusable (see the reasons logged when the file was first read)"),
        "truncated": ("samples", f"samples cut to {max_input_length + max_output_length + 1} tokens"),
        "dropped_no_target": ("rows_used", "samples dropped: truncation left them no target token"),
        "inputs_truncated": ("samples", f"prompts cut to [gMASK] sop + their last {max_input_length - 2} tokens"),
        "outputs_truncated": ("samples", f"references cut to {max_output_length} tokens"),
    }
    for name, (total, what) in notes.items():
        if counts.get(name):
            of = counts["rows_read"] if total == "rows" else counts[total]
            logger.warning("%s: %d of %d %s", split, counts[name], of, what)


def _save_atomically(dataset, counts: dict[str, int], target: Path) -> None:
    # Several ranks may preprocess at once: each writes its own folder and the first rename wins.
    with folder_atomic(target, done_by_another=lambda t: (t / "glm_ft_stats.json").is_file()) as scratch:
        dataset.save_to_disk(str(scratch))
        (scratch / "glm_ft_stats.json").write_text(json.dumps(counts, indent=1))


def _cache_key(path: Path, tokenizer, kind: str, max_input_length: int, max_output_length: int,
               skip_bad_rows: bool) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    parts = [digest.hexdigest(), tokenizer_fingerprint(tokenizer), kind, str(max_input_length),
             str(max_output_length), str(skip_bad_rows), _code_fingerprint(type(tokenizer))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: the SentencePiece model (or the vocabulary) and the special-token ids."""
    digest = hashlib.sha256()
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None:
        digest.update(sp_model.serialized_model_proto())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {"prefix": list(tokenizer.get_prefix_tokens()), "eos": tokenizer.eos_token_id,
                "roles": [tokenizer.get_command(f"<|{role}|>") for role in ROLES]}
    digest.update(json.dumps(specials).encode())
    return digest.hexdigest()


@functools.cache
def _code_fingerprint(tokenizer_class: type) -> str:
    # Any edit to the code that lays out samples invalidates the cache, so a stale cache can't outlive a fix.
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(Path(data_formats.__file__).read_bytes())
    source = inspect.getsourcefile(tokenizer_class)
    if source:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()

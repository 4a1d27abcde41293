"""Training data: checked conversations (glm_ft/data/rows.py) → training and evaluation samples → cached datasets.

Which tokens are trained: token i is a target iff token i-1 belongs to a message that carries loss. By default only
assistant messages carry loss; `"loss": true/false` on a message overrides that. (The reference demo also trained
on observation messages, against its own README; here a tool's output is never a target unless asked for.)

Nothing is dropped silently: skipped rows, truncated samples and samples left without targets are counted in
`DataBundle.stats` and logged.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_ft.atomic import folder_atomic
from glm_ft.data import columns as data_columns
from glm_ft.data import rows as reading
from glm_ft.errors import DataError
from glm_ft.heap import collector_paused
from glm_ft.data.columns import IGNORE_INDEX, encode_pool, encode_rows, message_ids, train_table
from glm_ft.data.rows import ROLES, Conversation, Message, ReadReport, read_conversations, read_rows

# The reading side is re-exported: callers know it as glm_ft.data.
__all__ = ["IGNORE_INDEX", "ROLES", "Conversation", "DataBundle", "Message", "ReadReport", "build_eval_samples",
           "build_train_sample", "load_datasets", "read_conversations", "read_rows", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset with input_ids, labels; None when no file is configured
    val: Any  # datasets.Dataset with input_ids, output_ids; None when no file is configured
    test: Any
    stats: dict[str, int]
    # sha256 of each split's file, as the cache key hashed it: a checkpoint records the training file's, so a resume
    # on other rows is told (glm_ft.runs.changed_data_inputs) without hashing the file again
    digests: dict[str, str] = field(default_factory=dict)


# --- samples ---


def build_train_sample(
    messages: Sequence[Message | Mapping[str, Any]], tokenizer, max_input_length: int, max_output_length: int,
    parts: Sequence[list[int]] | None = None,
) -> dict[str, Any]:
    """`[gMASK] sop` + every message + eos, cut (head kept) to max_input_length + max_output_length + 1 tokens.

    Returns input_ids, labels (IGNORE_INDEX where not a target) and `truncated`. A truncated sample keeps no eos:
    teaching the model to stop where the data was merely cut would be wrong. `parts`: each message's ids, when
    already encoded (`encode_messages`).
    """
    ids = list(tokenizer.get_prefix_tokens())
    loss_spans = []  # [start, end) of each message that carries loss
    messages = list(map(_as_message, messages))
    for message, part in zip(messages, parts or [message_ids(tokenizer, m) for m in messages]):
        if message.carries_loss:
            loss_spans.append((len(ids), len(ids) + len(part)))
        ids += part
    ids.append(tokenizer.eos_token_id)
    # token i is a target iff token i-1 is in a loss message: each span shifted by one (slices: the fast path)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in loss_spans:
        labels[start + 1:end + 1] = ids[start + 1:end + 1]
    limit = max_input_length + max_output_length + 1
    return {"input_ids": ids[:limit], "labels": labels[:limit], "truncated": len(ids) > limit}


def build_eval_samples(
    messages: Sequence[Message | Mapping[str, Any]], tokenizer, max_input_length: int, max_output_length: int,
    parts: Sequence[list[int]] | None = None,
) -> list[dict[str, Any]]:
    """One sample per assistant turn that carries loss: input = context so far + `<|assistant|>`, output = the
    turn's tokens after `<|assistant|>` + eos.

    A context over max_input_length tokens keeps `[gMASK] sop` and its most recent tokens (the reference dropped
    the sample); an output over max_output_length is cut and still ends with eos. `input_truncated` and
    `output_truncated` say which happened. `parts` as for build_train_sample.
    """
    if max_input_length < 3 or max_output_length < 1:
        raise ValueError("max_input_length must be at least 3 and max_output_length at least 1")
    prefix = list(tokenizer.get_prefix_tokens())
    budget = max_input_length - len(prefix)
    context: list[int] = []
    samples = []
    messages = list(map(_as_message, messages))
    for message, part in zip(messages, parts or [message_ids(tokenizer, m) for m in messages]):
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


def encode_messages(conversations: Sequence[Conversation], tokenizer, threads: int = 1) -> list[list[list[int]]]:
    """Every message's ids (as `build_single_message` gives them), per conversation, encoded together
    (`columns.encode_pool`: large SentencePiece calls on `threads` threads, no worker processes)."""
    flat = encode_pool([m for c in conversations for m in c.messages], tokenizer, threads).messages()
    out, at = [], 0
    for conversation in conversations:
        out.append(flat[at:at + len(conversation.messages)])
        at += len(conversation.messages)
    return out


def _eval_columns(conversations, parts, tokenizer, max_input_length, max_output_length):
    out = {"input_ids": [], "output_ids": [], "input_truncated": [], "output_truncated": []}
    for conversation, message_parts in zip(conversations, parts):
        for sample in build_eval_samples(conversation.messages, tokenizer, max_input_length, max_output_length,
                                         message_parts):
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
    digests: dict[str, str] = {}
    splits: dict[str, Any] = {}
    for split, key, kind in (("train", "train_file", "train"), ("val", "val_file", "eval"),
                             ("test", "test_file", "eval")):
        name = data_config.get(key)
        if not name:
            logger.info("%s not set: no %s split", key, split)
            splits[split] = None
            continue
        path = data_dir / name
        if not path.is_file():
            raise DataError(f"{path}: file not found ({key})")
        splits[split] = _load_split(
            split, path, kind, tokenizer, max_input_length, max_output_length,
            Path(cache_dir), skip_bad_rows, num_proc, stats, digests,
        )
    if eval_subset is not None and splits["val"] is not None and len(splits["val"]) > eval_subset:
        splits["val"] = splits["val"].select(range(eval_subset))
        logger.info("val: evaluating the first %d of %d samples", eval_subset, stats["data.val.samples"])
    if splits["val"] is not None:
        stats["data.val.samples_selected"] = len(splits["val"])
    return DataBundle(splits["train"], splits["val"], splits["test"], stats, digests)


def _load_split(split, path, kind, tokenizer, max_input_length, max_output_length, cache_dir, skip_bad_rows,
                num_proc, stats, digests):
    import datasets

    digests[split] = reading.file_digest(path)
    key = _cache_key(digests[split], tokenizer, kind, max_input_length, max_output_length, skip_bad_rows)
    target = cache_dir / f"{split}-{key[:24]}"
    stats_file = target / "glm_ft_stats.json"
    if stats_file.is_file():
        logger.info("%s: reusing preprocessed %s from %s", split, path, target)
        counts = json.loads(stats_file.read_text())
        cached = 1
    else:
        counts = _preprocess(path, kind, tokenizer, max_input_length, max_output_length, skip_bad_rows, num_proc,
                             target)
        cached = 0
    _log_counts(split, counts, max_input_length, max_output_length)
    if kind == "train" and counts["samples"] == 0:
        raise DataError(f"{path}: no training sample left: truncation to max_input_length + max_output_length + 1 = "
                        f"{max_input_length + max_output_length + 1} tokens left none of its {counts['rows_used']} "
                        "usable rows a target token; raise max_input_length or max_output_length")
    stats.update({f"data.{split}.{name}": value for name, value in counts.items()})
    stats[f"data.{split}.cached"] = cached
    return datasets.load_from_disk(str(target))


def _preprocess(path, kind, tokenizer, max_input_length, max_output_length, skip_bad_rows, num_proc, target):
    """Tokenize one file into `target` (a saved dataset plus its counts); returns the counts."""
    import datasets

    # One pass in this process: the rows are read and checked once, encoded together (SentencePiece's own threads
    # are cheaper than worker processes, which would each re-read or unpickle every row), and laid out as samples.
    # The collector is paused: the pass allocates millions of objects that all live to its end, and each of its
    # full collections would walk every row read so far, for nothing.
    with collector_paused():
        report = read_rows(path, skip_bad_rows=skip_bad_rows)
        rows = report.conversations
        threads = max(1, min(num_proc, os.cpu_count() or 1))
        counts = {"rows_read": report.rows_read, "rows_skipped": len(report.skipped), "rows_used": len(rows)}
        if kind == "train":
            encoded = encode_rows(rows, tokenizer, threads)
            del report, rows  # their ids are all in `encoded`: no need to hold both while the columns are built
            table, truncated = train_table(encoded, max_input_length, max_output_length)
            del encoded
            # the cache key names the content: hashing the whole table again for a fingerprint would be waste
            dataset = datasets.Dataset(table, fingerprint=target.name)
            counts.update(samples=len(dataset), dropped_no_target=counts["rows_used"] - len(dataset),
                          truncated=truncated)
        else:
            columns = _eval_columns(rows, encode_messages(rows, tokenizer, threads), tokenizer, max_input_length,
                                    max_output_length)
            dataset = datasets.Dataset.from_dict(columns)
            counts.update(samples=len(dataset), inputs_truncated=sum(columns["input_truncated"]),
                          outputs_truncated=sum(columns["output_truncated"]))
            dataset = dataset.remove_columns(["input_truncated", "output_truncated"])
            del report, rows
        _save_atomically(dataset, counts, target)
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


def _cache_key(file_digest: str, tokenizer, kind: str, max_input_length: int, max_output_length: int,
               skip_bad_rows: bool) -> str:
    parts = [file_digest, tokenizer_fingerprint(tokenizer), kind, str(max_input_length),
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
    digest.update(reading.reading_code_digest().encode())
    digest.update(Path(data_columns.__file__).read_bytes())
    source = inspect.getsourcefile(tokenizer_class)
    if source:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()

"""Training samples for a whole file at once: token ids in flat numpy buffers, Arrow list columns built from them.

The samples are exactly `build_train_sample`'s (glm_ft/data/dataset.py), row by row; tests/data/test_columns.py
holds the two equal on rows of every shape the formats allow. What differs is where the per-token work happens:
SentencePiece encodes the message texts in a few large calls, its ids are copied once into a numpy buffer, and the
samples are laid out by index arithmetic over all rows together (no Python list per sample, no list of lists for
Arrow to convert). SentencePiece's Python lists live one chunk of texts at a time, and the samples are laid out
a chunk of rows at a time, so memory holds the rows, their ids as int32 and the finished columns, little more.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from glm_ft.data.rows import Conversation

IGNORE_INDEX = -100
# rows laid out, texts encoded together: big enough to amortise each call, small enough for memory
CHUNK_ROWS = 8192
CHUNK_TEXTS = 16384


def encode_flat(messages: Sequence, tokenizer, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every message's ids (as `build_single_message` gives them), concatenated, and each message's length.

    ChatGLM3's own tokenizer encodes every distinct text once (datasets repeat texts: AdvertiseGen's keyword
    prompts, system prompts), CHUNK_TEXTS texts to a SentencePiece call on `threads` threads, and puts each
    message's `<|role|>` + metadata head in front by one gather (few distinct heads); any other tokenizer goes
    message by message."""
    from glm_ft.chatglm3.tokenization import ChatGLMTokenizer, message_text

    if not (isinstance(tokenizer, ChatGLMTokenizer)
            and type(tokenizer).build_single_message is ChatGLMTokenizer.build_single_message):
        from glm_ft.data.dataset import _message_ids

        return _flatten([_message_ids(tokenizer, m) for m in messages])
    texts, text_of, heads, head_of = {}, [], {}, []
    for m in messages:
        text_of.append(texts.setdefault(message_text(m.role, m.content, m.tools), len(texts)))
        head_of.append(heads.setdefault((m.role, m.metadata), len(heads)))
    texts = list(texts)
    encoded = [_flatten(tokenizer.sp_model.encode(texts[at:at + CHUNK_TEXTS], num_threads=threads))
               for at in range(0, len(texts), CHUNK_TEXTS)]
    text_values = np.concatenate([values for values, _ in encoded] or [np.empty(0, np.int32)])
    text_lengths = np.concatenate([lengths for _, lengths in encoded] or [np.empty(0, np.int64)])
    head_values, head_lengths = _flatten([tokenizer.build_single_message(role, metadata, "")
                                          for role, metadata in heads])
    text_of, head_of = np.asarray(text_of, dtype=np.int64), np.asarray(head_of, dtype=np.int64)
    # source = heads then texts; segments alternate: message i's head, message i's text
    starts = np.empty(2 * len(messages), dtype=np.int64)
    lengths = np.empty(2 * len(messages), dtype=np.int64)
    starts[0::2] = _starts(head_lengths)[head_of]
    lengths[0::2] = head_lengths[head_of]
    starts[1::2] = len(head_values) + _starts(text_lengths)[text_of]
    lengths[1::2] = text_lengths[text_of]
    values = _gather(np.concatenate([head_values, text_values]), starts, lengths)
    return values, lengths[0::2] + lengths[1::2]


def train_table(conversations: Sequence[Conversation], tokenizer, threads: int, max_input_length: int,
                max_output_length: int) -> tuple[pa.Table, int]:
    """input_ids and labels of every conversation's training sample as an Arrow table, leaving out samples whose
    targets were all cut off (they would add nothing but a NaN-prone empty loss), and how many kept ones were
    truncated."""
    prefix = np.asarray(tokenizer.get_prefix_tokens(), dtype=np.int64)
    eos = int(tokenizer.eos_token_id)
    messages = [m for conversation in conversations for m in conversation.messages]
    values, lengths = encode_flat(messages, tokenizer, threads)
    loss = np.fromiter((m.carries_loss for m in messages), dtype=bool, count=len(messages))
    counts = np.fromiter(map(len, (c.messages for c in conversations)), dtype=np.int64, count=len(conversations))
    del messages
    # where each row's messages, and each message's ids, begin (one past the end appended)
    first_message = np.concatenate([_starts(counts), [len(lengths)]])
    first_value = np.concatenate([_starts(lengths), [len(values)]])
    batches, truncated = [], 0
    for at in range(0, len(conversations), CHUNK_ROWS):
        end = min(at + CHUNK_ROWS, len(conversations))
        m0, m1 = first_message[at], first_message[end]
        ids, labels, sample_lengths, cut = _lay_out(
            values[first_value[m0]:first_value[m1]], lengths[m0:m1], loss[m0:m1], counts[at:end], prefix, eos,
            max_input_length + max_output_length + 1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(sample_lengths)]), type=pa.int32())
        # input_ids as int32, as `datasets` itself stores a column of that name; labels as the int64 it infers
        batches.append(pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32))),
             pa.ListArray.from_arrays(offsets, pa.array(labels))], names=["input_ids", "labels"]))
        truncated += cut
    return pa.Table.from_batches(batches), truncated


def _lay_out(values, lengths, loss, counts, prefix, eos, limit):
    """`[gMASK] sop` + every message + eos per conversation, cut to `limit` tokens; token i is a target iff token
    i-1 belongs to a message that carries loss. Returns the kept samples' ids, labels and lengths (flat) and how
    many kept samples were cut."""
    rows, n_messages = len(counts), len(lengths)
    # each conversation is a run of segments: prefix, its messages, eos; all point into one source buffer
    source = np.concatenate([values, prefix, [eos]])  # int64, as the labels
    first_segment = _starts(counts + 2)
    first_message = _starts(counts)
    message_segment = np.arange(n_messages) + np.repeat(first_segment + 1 - first_message, counts)
    eos_segment = first_segment + counts + 1
    starts = np.empty(n_messages + 2 * rows, dtype=np.int64)
    seg_lengths = np.empty_like(starts)
    seg_loss = np.zeros(len(starts), dtype=bool)
    starts[first_segment], seg_lengths[first_segment] = len(values), len(prefix)
    starts[eos_segment], seg_lengths[eos_segment] = len(values) + len(prefix), 1
    starts[message_segment], seg_lengths[message_segment] = _starts(lengths), lengths
    seg_loss[message_segment] = loss
    ids = _gather(source, starts, seg_lengths)
    target = np.zeros(len(ids), dtype=bool)
    target[1:] = np.repeat(seg_loss, seg_lengths)[:-1]  # a row's first token follows the eos before it: never one
    full = np.add.reduceat(seg_lengths, first_segment)
    row_start = _starts(full)
    keep = (np.arange(len(ids)) - np.repeat(row_start, full)) < limit
    has_target = np.add.reduceat(target & keep, row_start, dtype=np.int64) > 0
    keep &= np.repeat(has_target, full)
    sample_lengths = np.minimum(full, limit)[has_target]
    labels = np.where(target, ids, IGNORE_INDEX)
    return ids[keep], labels[keep], sample_lengths, int(np.count_nonzero(full[has_target] > limit))


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return values, lengths


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _gather(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """source[starts[0]:starts[0] + lengths[0]] + source[starts[1]:...] + ..., as one array."""
    return source[np.arange(int(lengths.sum())) + np.repeat(starts - _starts(lengths), lengths)]

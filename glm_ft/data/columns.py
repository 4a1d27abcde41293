"""Training samples for a whole file at once: token ids in flat numpy buffers, Arrow list columns built from them.

The samples are exactly `build_train_sample`'s (glm_ft/data/dataset.py), row by row; tests/data/test_columns.py
holds the two equal on rows of every shape the formats allow. What differs is where the per-token work happens:
SentencePiece encodes the message texts in a few large calls, its ids are copied once into a numpy buffer, and the
samples are laid out by index arithmetic over all rows together (no Python list per sample, no list of lists for
Arrow to convert). Each distinct piece of ids (a text, a role head) is held once, as int32; SentencePiece's Python
lists live one chunk of texts at a time and samples are laid out a chunk of rows at a time, so memory holds the
rows, the pieces and the finished columns, little more.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from glm_ft.data.rows import Conversation

IGNORE_INDEX = -100
# rows laid out, texts encoded together: big enough to amortise each call, small enough for memory
CHUNK_ROWS = 8192
CHUNK_TEXTS = 16384
PREFIX, EOS = 0, 1  # the pool's first two pieces


@dataclass
class Pool:
    """Distinct pieces of ids, each stored once: `[gMASK] sop`, eos, each `<|role|>` + metadata head, each text.
    Message i is piece head_of[i] followed by piece text_of[i]."""

    values: np.ndarray  # int32, every piece's ids one after another
    starts: np.ndarray  # per piece
    lengths: np.ndarray
    head_of: np.ndarray  # per message
    text_of: np.ndarray

    def messages(self) -> list[list[int]]:
        pieces = [self.values[s:s + n].tolist() for s, n in zip(self.starts.tolist(), self.lengths.tolist())]
        return [pieces[h] + pieces[t] for h, t in zip(self.head_of.tolist(), self.text_of.tolist())]


def message_ids(tokenizer, message) -> list[int]:
    """One message's ids as the tokenizer's own `build_single_message` gives them (the row-at-a-time way)."""
    from glm_ft.chatglm3.tokenization import message_text

    text = message_text(message.role, message.content, message.tools)
    return tokenizer.build_single_message(message.role, message.metadata, text)


def encode_pool(messages: Sequence, tokenizer, threads: int = 1) -> Pool:
    """Every message's ids (as `build_single_message` gives them), as a Pool.

    ChatGLM3's own tokenizer encodes every distinct text once (datasets repeat texts: AdvertiseGen's keyword
    prompts, system prompts), CHUNK_TEXTS texts to a SentencePiece call on `threads` threads; the heads are few.
    Any other tokenizer goes message by message, each message a piece of its own after an empty head."""
    from glm_ft.chatglm3.tokenization import ChatGLMTokenizer, message_text

    pieces = [list(tokenizer.get_prefix_tokens()), [tokenizer.eos_token_id]]
    if not (isinstance(tokenizer, ChatGLMTokenizer)
            and type(tokenizer).build_single_message is ChatGLMTokenizer.build_single_message):
        pieces.append([])
        values, lengths = _flatten(pieces + [message_ids(tokenizer, m) for m in messages])
        return Pool(values, _starts(lengths), lengths, np.full(len(messages), len(pieces) - 1, dtype=np.int64),
                    np.arange(len(pieces), len(pieces) + len(messages), dtype=np.int64))
    heads, head_of, texts, text_of = {}, [], {}, []
    for m in messages:
        head_of.append(heads.setdefault((m.role, m.metadata), len(pieces) + len(heads)))
        text_of.append(texts.setdefault(message_text(m.role, m.content, m.tools), len(texts)))
    pieces += [tokenizer.build_single_message(role, metadata, "") for role, metadata in heads]
    texts = list(texts)
    # As bytes: handed a str, the binding leaves a UTF-8 copy cached inside it for as long as the row lives.
    parts = [_flatten(pieces)] + [
        _flatten(tokenizer.sp_model.encode([text.encode() for text in texts[at:at + CHUNK_TEXTS]],
                                           num_threads=threads))
        for at in range(0, len(texts), CHUNK_TEXTS)]
    values = np.concatenate([values for values, _ in parts])
    lengths = np.concatenate([lengths for _, lengths in parts])
    return Pool(values, _starts(lengths), lengths, np.asarray(head_of, dtype=np.int64),
                len(pieces) + np.asarray(text_of, dtype=np.int64))


@dataclass
class EncodedRows:
    """What the training samples are made of, without the rows themselves (which can then be let go)."""

    pool: Pool
    loss: np.ndarray  # per message: does it carry loss
    counts: np.ndarray  # per row: how many messages


def encode_rows(conversations: Sequence[Conversation], tokenizer, threads: int = 1) -> EncodedRows:
    messages = [m for conversation in conversations for m in conversation.messages]
    return EncodedRows(
        encode_pool(messages, tokenizer, threads),
        np.fromiter((m.carries_loss for m in messages), dtype=bool, count=len(messages)),
        np.fromiter(map(len, (c.messages for c in conversations)), dtype=np.int64, count=len(conversations)))


def train_table(rows: EncodedRows, max_input_length: int, max_output_length: int) -> tuple[pa.Table, int]:
    """input_ids and labels of every row's training sample as an Arrow table, leaving out samples whose targets
    were all cut off (they would add nothing but a NaN-prone empty loss), and how many kept ones were truncated."""
    pool, counts = rows.pool, rows.counts
    first_message = np.concatenate([_starts(counts), [len(rows.loss)]])  # one past the end appended
    batches, truncated = [], 0
    for at in range(0, len(counts), CHUNK_ROWS):
        end = min(at + CHUNK_ROWS, len(counts))
        chunk = slice(first_message[at], first_message[end])
        ids, labels, sample_lengths, cut = _lay_out(pool, pool.head_of[chunk], pool.text_of[chunk],
                                                    rows.loss[chunk], counts[at:end],
                                                    max_input_length + max_output_length + 1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(sample_lengths)]), type=pa.int32())
        # input_ids as int32, as `datasets` itself stores a column of that name; labels as the int64 it infers
        batches.append(pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(ids)), pa.ListArray.from_arrays(offsets, pa.array(labels))],
            names=["input_ids", "labels"]))
        truncated += cut
    return pa.Table.from_batches(batches), truncated


def _lay_out(pool, head_of, text_of, loss, counts, limit):
    """`[gMASK] sop` + every message + eos per conversation, cut to `limit` tokens; token i is a target iff token
    i-1 belongs to a message that carries loss. Returns the kept samples' ids (int32), labels (int64) and lengths
    (flat), and how many kept samples were cut."""
    # each conversation is a run of pieces: prefix, then head and text of each message, then eos
    first_segment = _starts(2 * counts + 2)
    head_segment = 2 * np.arange(len(head_of)) + np.repeat(first_segment + 1 - 2 * _starts(counts), counts)
    piece = np.empty(len(head_of) * 2 + 2 * len(counts), dtype=np.int64)
    piece[first_segment] = PREFIX
    piece[first_segment + 2 * counts + 1] = EOS
    piece[head_segment], piece[head_segment + 1] = head_of, text_of
    seg_loss = np.zeros(len(piece), dtype=bool)
    seg_loss[head_segment] = seg_loss[head_segment + 1] = loss
    seg_lengths = pool.lengths[piece]
    ids = _gather(pool.values, pool.starts[piece], seg_lengths)
    target = np.zeros(len(ids), dtype=bool)
    target[1:] = np.repeat(seg_loss, seg_lengths)[:-1]  # a row's first token follows the eos before it: never one
    full = np.add.reduceat(seg_lengths, first_segment)
    row_start = _starts(full)
    keep = (np.arange(len(ids)) - np.repeat(row_start, full)) < limit
    has_target = np.add.reduceat(target & keep, row_start, dtype=np.int64) > 0
    keep &= np.repeat(has_target, full)
    sample_lengths = np.minimum(full, limit)[has_target]
    labels = np.where(target, ids.astype(np.int64), IGNORE_INDEX)
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

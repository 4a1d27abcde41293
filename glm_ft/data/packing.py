"""Packing (`data.packing=true`): several training samples per row, up to `data.pack_max_length` tokens.

An unpacked batch pads every row to its longest sample, and that padding costs as much compute as real tokens.
Packed rows are nearly full. Each sample still trains exactly as if it were alone: the model gets `segment_ids`
(glm_ft/chatglm3/segments.py: positions restart per sample, attention is block-diagonal, the P-Tuning v2 prefix
stays visible to every sample), and the first token of a sample is never a target, so no sample is predicted from
the end of the one before it. A step then holds more samples, so an epoch has fewer steps.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from glm_ft.data.dataset import IGNORE_INDEX
from glm_ft.data.collate import Collator, _right_pad

LENGTHS = "lengths"  # the column of a packed row: its samples' lengths, in order


def pack_max_length(data_config, max_input_length: int, max_output_length: int) -> int:
    """The row budget: `data.pack_max_length`, or by default the longest sample a row could hold anyway."""
    return data_config.get("pack_max_length") or max_input_length + max_output_length + 1


def plan_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices per row, best-fit decreasing: each sample, longest first, goes to the row it fills most
    tightly. Deterministic; the Trainer's sampler shuffles the rows."""
    if any(n > budget for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens is longer than the packing budget {budget}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([index])
            bisect.insort(free, (budget - n, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (room - n, row))
    return rows


def pack_dataset(dataset, budget: int):
    """A `datasets.Dataset` of packed rows (input_ids, labels, lengths) from one of samples (input_ids, labels)."""
    import datasets

    ids, labels = dataset["input_ids"], dataset["labels"]
    out: dict[str, list] = {"input_ids": [], "labels": [], LENGTHS: []}
    for row in plan_rows([len(x) for x in ids], budget):
        row_ids, row_labels = [], []
        for index in row:
            row_ids += ids[index]
            # The first token of a sample is a prompt token anyway; masking it makes the boundary explicit.
            row_labels += [IGNORE_INDEX] + list(labels[index][1:])
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out[LENGTHS].append([len(ids[index]) for index in row])
    return datasets.Dataset.from_dict(out)


def packing_stats(samples: int, packed, budget: int) -> dict[str, float]:
    """The run's tags for its packing; `budget` is the row length used (the param shows null for the default)."""
    rows = len(packed)
    tokens = sum(sum(n) for n in packed[LENGTHS])
    return {"data.train.packed_rows": rows, "data.train.samples_per_packed_row": samples / max(rows, 1),
            "data.train.packed_tokens": tokens, "data.train.pack_max_length": budget}


@dataclass
class PackedCollator(Collator):
    """Packed training rows → right-padded input_ids, labels, attention_mask and segment_ids; anything else
    (the evaluation rows) goes through the plain `Collator`."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if LENGTHS not in features[0]:
            return super().__call__(features)
        import torch

        segments = [[s for s, n in enumerate(f[LENGTHS], 1) for _ in range(n)] for f in features]
        return {
            "input_ids": torch.tensor(_right_pad([f["input_ids"] for f in features], self.pad_token_id)),
            "attention_mask": torch.tensor(_right_pad([[1] * len(f["input_ids"]) for f in features], 0)),
            "labels": torch.tensor(_right_pad([f["labels"] for f in features], IGNORE_INDEX)),
            "segment_ids": torch.tensor(_right_pad(segments, 0)),
        }

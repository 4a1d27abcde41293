"""Batches of samples as the model takes them: prompts padded on the left (ChatGLM3's side).

Used by training, evaluation, packing and inference alike, so it sits with the data, below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from glm_ft.data.columns import IGNORE_INDEX

# Each evaluation row's position in its dataset (train/evaluation.py `Indexed`): order and uniqueness are restored
# from it after batching and gathering.
SAMPLE_INDEX = "sample_index"


def _left_pad(rows: Sequence[Sequence[int]], value: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [[value] * (width - len(r)) + list(r) for r in rows]


def _right_pad(rows: Sequence[Sequence[int]], value: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [list(r) + [value] * (width - len(r)) for r in rows]


@dataclass
class Collator:
    """Pads prompts on the left (ChatGLM3's side) with their attention mask.

    Training rows carry `labels` aligned with `input_ids` (left-padded with -100, so padding never carries loss);
    evaluation rows carry the reference `output_ids`, which become right-padded labels for the metrics, and, through
    `Indexed`, their position in the dataset (`SAMPLE_INDEX`).
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [f["input_ids"] for f in features]
        if "labels" in features[0]:
            labels = _left_pad([f["labels"] for f in features], IGNORE_INDEX)
        else:
            labels = _right_pad([f["output_ids"] for f in features], IGNORE_INDEX)
        batch = {
            "input_ids": torch.tensor(_left_pad(ids, self.pad_token_id)),
            "attention_mask": torch.tensor(_left_pad([[1] * len(r) for r in ids], 0)),
            "labels": torch.tensor(labels),
        }
        if SAMPLE_INDEX in features[0]:
            batch[SAMPLE_INDEX] = torch.tensor([f[SAMPLE_INDEX] for f in features])
        return batch

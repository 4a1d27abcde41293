"""Evaluation with generation: batching, decoding, metrics and predictions.jsonl.

The same pieces serve evaluation during training, the final test prediction and batch inference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

IGNORE_INDEX = -100


def stop_token_ids(tokenizer) -> list[int]:
    """ChatGLM3 ends a reply with eos, or hands the turn back with <|user|> or <|observation|>."""
    return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]


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
    evaluation rows carry the reference `output_ids`, which become right-padded labels for the metrics.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [f["input_ids"] for f in features]
        if "labels" in features[0]:
            labels = _left_pad([f["labels"] for f in features], IGNORE_INDEX)
        else:
            labels = _right_pad([f["output_ids"] for f in features], IGNORE_INDEX)
        return {
            "input_ids": torch.tensor(_left_pad(ids, self.pad_token_id)),
            "attention_mask": torch.tensor(_left_pad([[1] * len(r) for r in ids], 0)),
            "labels": torch.tensor(labels),
        }


def decode_rows(tokenizer, rows, stop_ids: Sequence[int]) -> list[str]:
    """Decode token rows, cutting each at its first stop token and dropping padding / -100."""
    texts = []
    stops = set(stop_ids)
    for row in rows:
        kept = []
        for tok in (int(t) for t in row):
            if tok in stops:
                break
            if tok >= 0 and tok != tokenizer.pad_token_id:
                kept.append(tok)
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


def metrics_fn(tokenizer, stop_ids: Sequence[int]):
    """compute_metrics for the Trainer: generated ids vs reference ids → ROUGE-1/2/L, BLEU-4."""
    from glm_ft.metrics import compute_metrics

    def compute(eval_pred) -> dict[str, float]:
        predictions = decode_rows(tokenizer, eval_pred.predictions, stop_ids)
        references = decode_rows(tokenizer, eval_pred.label_ids, stop_ids)
        return compute_metrics(predictions, references)

    return compute


def write_predictions(path: Path, tokenizer, dataset, predictions, stop_ids, metrics: dict[str, float],
                      metrics_name: str = "test_metrics.json") -> int:
    """predictions.jsonl: one row per test sample (prompt, reference, prediction); the metrics beside it."""
    preds = decode_rows(tokenizer, predictions, stop_ids)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row, pred in zip(dataset, preds):
            f.write(json.dumps({
                "prompt": tokenizer.decode(row["input_ids"], skip_special_tokens=False),
                "reference": decode_rows(tokenizer, [row["output_ids"]], stop_ids)[0],
                "prediction": pred,
            }, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    metrics_path = path.with_name(metrics_name)
    metrics_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(preds)

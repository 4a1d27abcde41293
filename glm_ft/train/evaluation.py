"""Evaluation with generation: batching, decoding, metrics and predictions.jsonl.

The same pieces serve evaluation during training, the final test prediction and batch inference. Samples are
batched by a token budget, longest prompts first (`generation_batches`), not in file order.

Every evaluation sample carries its index through the batches (`Indexed`, `SAMPLE_INDEX`): whatever order the
batches ran in and however the processes padded their shards, `in_sample_order` puts the outputs back in the
dataset's order, each sample once, before anything is scored or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from transformers import GenerationConfig

from glm_ft.atomic import write_text_atomic
from glm_ft.data.collate import SAMPLE_INDEX
from glm_ft.train.metrics import compute_metrics


class Indexed:
    """A map-style dataset whose rows also carry their position (`SAMPLE_INDEX`)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], SAMPLE_INDEX: index}


def in_sample_order(indices, count: int, *arrays):
    """`arrays` (rows aligned with `indices`) reordered to sample 0..count-1, one row each.

    Distributed evaluation pads the last batches with repeats of samples already seen; the first row of each
    sample is kept. A sample with no row at all is an error, not a smaller average.
    """
    indices = np.asarray(indices).reshape(-1)
    first: dict[int, int] = {}
    for row, index in enumerate(indices.tolist()):
        first.setdefault(int(index), row)
    missing = [i for i in range(count) if i not in first]
    if missing or len(first) != count:
        raise RuntimeError(f"evaluation returned {len(first)} distinct samples of {count} "
                           f"(missing: {missing[:10]}); refusing to score or write a partial set")
    rows = np.array([first[i] for i in range(count)], dtype=np.int64)
    return tuple(np.asarray(a)[rows] for a in arrays)


def prompt_lengths(dataset) -> list[int]:
    """The prompt length of every sample (a datasets.Dataset's column, or a list of samples)."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else [s["input_ids"] for s in dataset]
    return [len(ids) for ids in column]


def generation_budget(lengths: Sequence[int], batch_size: int, new_tokens: int, batch_tokens: int | None,
                      beams: int = 1) -> int:
    """Tokens one generation batch may hold (rows x (its longest prompt + new_tokens)): `batch_tokens` shared by the
    `beams` copies of each row, but never less than `batch_size` rows of the longest prompt, the most a batch of
    `batch_size` rows in file order could hold."""
    floor = batch_size * (max(lengths, default=0) + new_tokens)
    return max(floor, (batch_tokens or 0) // max(beams, 1))


def generation_batches(lengths: Sequence[int], budget: int, new_tokens: int, world_size: int = 1) -> list[list[int]]:
    """Sample indices in batches for generation, sized by tokens rather than rows.

    Longest prompts first, so that running out of memory shows in the first batch; a batch padded to its first
    (longest) prompt L takes as many rows r as keep r x (L + new_tokens) within `budget`, at least one. Sorting
    also puts replies of like length together, so fewer steps are spent on rows that stopped.

    With several processes accelerate hands whole batches to the ranks round-robin and gathers at every step, so
    the batches come in groups of `world_size` with equal row counts: each rank runs the same number of generate
    calls (ZeRO-3's synced steps wait for all) with tensors that gather. The last group is topped up with repeats of
    its own rows (no longer than its first), which `in_sample_order` drops again.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        rows = max(1, budget // (lengths[order[start]] + new_tokens))
        group = order[start:start + rows * world_size]
        start += len(group)
        rows = -(-len(group) // world_size)
        group += [group[i % len(group)] for i in range(rows * world_size - len(group))]
        batches += [group[rank * rows:(rank + 1) * rows] for rank in range(world_size)]
    return batches


def plan_generation(dataset, rows: int, gen_config: GenerationConfig, batch_tokens: int | None,
                    world_size: int = 1) -> list[list[int]]:
    """The batches (sample indices) that evaluation, test prediction and `predict` generate `dataset` in: at least
    `rows` rows of the longest prompt, more of shorter ones up to `batch_tokens` (see the two functions above)."""
    new_tokens = gen_config.max_new_tokens or 0
    lengths = prompt_lengths(dataset)
    budget = generation_budget(lengths, rows, new_tokens, batch_tokens, gen_config.num_beams or 1)
    return generation_batches(lengths, budget, new_tokens, world_size)


def stop_token_ids(tokenizer) -> list[int]:
    """ChatGLM3 ends a reply with eos, or hands the turn back with <|user|> or <|observation|>."""
    return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]


def generation_config(tokenizer, **settings: Any) -> GenerationConfig:
    """The one GenerationConfig builder (training's evaluation, chat, predict, serve): `settings` (None means
    transformers' default), stopping where ChatGLM3 ends a turn, padding with the tokenizer's pad id."""
    return GenerationConfig(**{k: v for k, v in settings.items() if v is not None},
                            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)


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
    def compute(eval_pred) -> dict[str, float]:
        predictions = decode_rows(tokenizer, eval_pred.predictions, stop_ids)
        references = decode_rows(tokenizer, eval_pred.label_ids, stop_ids)
        return compute_metrics(predictions, references)

    return compute


def write_predictions(path: Path, tokenizer, dataset, predictions, stop_ids, metrics: dict[str, float],
                      metrics_name: str = "test_metrics.json") -> int:
    """predictions.jsonl: row i is sample i of `dataset` (prompt, reference, prediction i); the metrics beside it."""
    preds = decode_rows(tokenizer, predictions, stop_ids)
    if len(preds) != len(dataset):
        raise RuntimeError(f"{len(preds)} predictions for {len(dataset)} samples; {path} not written")
    rows = (json.dumps({"prompt": tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=False),
                        "reference": decode_rows(tokenizer, [dataset[i]["output_ids"]], stop_ids)[0],
                        "prediction": pred}, ensure_ascii=False) + "\n" for i, pred in enumerate(preds))
    write_text_atomic(path, "".join(rows))
    write_text_atomic(path.with_name(metrics_name), json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return len(preds)

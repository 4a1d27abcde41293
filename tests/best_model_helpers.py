"""Reading what load_best_model_at_end and early stopping left in a run folder, recomputed independently of the code
under test: the evaluations each checkpoint's log holds, the best of them and early stopping's count by
transformers' rules, and the tensors a checkpoint or final/ saved."""

from __future__ import annotations

import json
from pathlib import Path

# What glm-ft's evaluation scores (eval_samples and the timings are not the model's numbers)
EVAL_SCORES = ("eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4")


def eval_history(state_file: Path, metric: str = "eval_rouge-l") -> dict[int, float]:
    history = json.loads(state_file.read_text())["log_history"]
    return {h["step"]: h[metric] for h in history if metric in h}


def eval_scores(state_file: Path, step: int) -> dict[str, float]:
    """The scores the evaluation during training logged at `step`."""
    history = json.loads(state_file.read_text())["log_history"]
    (entry,) = [h for h in history if h["step"] == step and "eval_rouge-l" in h]
    return {key: entry[key] for key in EVAL_SCORES}


def best_step(evals: dict[int, float]) -> int:
    """The first step of the highest value: a tie is no improvement (transformers compares with >)."""
    return min(step for step, value in evals.items() if value == max(evals.values()))


def patience_counts(evals: dict[int, float], threshold: float = 0.0) -> dict[int, int]:
    """EarlyStoppingCallback's count after each evaluation, recomputed from the logged metrics: evaluations in a row
    that do not beat the best so far by more than `threshold` (the best itself moves on any gain)."""
    best, count, counts = None, 0, {}
    for step, value in sorted(evals.items()):
        count = 0 if best is None or (value > best and value - best > threshold) else count + 1
        best = value if best is None or value > best else best
        counts[step] = count
    return counts


def patience_stop(evals: dict[int, float], patience: int, threshold: float = 0.0) -> int | None:
    """The step EarlyStoppingCallback stops at: where its count reaches `patience`."""
    return next((step for step, count in patience_counts(evals, threshold).items() if count >= patience), None)


def tensors(folder: Path) -> dict:
    """What the checkpoint trained: a LoRA adapter, freeze tuning's tensors or a P-Tuning v2 prefix (which the
    Trainer's own best-model loader does not know), or SFT's whole model."""
    from safetensors.torch import load_file

    names = ("adapter_model.safetensors", "trained_weights.safetensors", "prefix_encoder.safetensors",
             "model.safetensors")
    name = next(n for n in names if (folder / n).is_file())
    return load_file(folder / name)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)

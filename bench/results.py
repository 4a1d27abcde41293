"""A run's results from its figures: the table and the ratios it shows (every ratio in glm-ft's favour above 1),
the goals, and the small summaries the figures share (medians of repeats, loss agreement)."""

from __future__ import annotations

import os
import statistics
from typing import Any

from bench.common import (
    SCHEMA, check_goals, compute_ratios, goal_summary, now_iso, package_versions, results_name,
)

# The table, and the ratios it shows: (label, unit, figure, metric, baseline side, glm-ft side, better).
# `better` says which way glm-ft gains: "higher" gives glm-ft / baseline, "lower" baseline / glm-ft (a time or a
# memory peak), so every ratio above 1 is in glm-ft's favour; None shows both values without a ratio.
ROWS: list[tuple[str, str, str, str, str, str, str | None]] = []
for _size in ("tiny", "mid"):
    _f = f"training_{_size}"
    ROWS += [
        (f"training tokens/s, {_size}", "tokens/s", _f, "tokens_per_s", "baseline", "glm_ft", "higher"),
        (f"training tokens/s, {_size}, bf16=true", "tokens/s", _f, "tokens_per_s", "baseline", "glm_ft_bf16",
         "higher"),
        (f"training tokens/s, {_size}, data.packing=true", "tokens/s", _f, "tokens_per_s", "baseline",
         "glm_ft_packed", "higher"),
        (f"training loss over the set (same work), {_size}", "loss", _f, "initial_loss_over_set", "baseline",
         "glm_ft", None),
        (f"peak RSS, training {_size}", "MiB", _f, "peak_rss_mib", "baseline", "glm_ft", "lower"),
    ]
ROWS += [
    ("model FLOP/s / fp32 matmul peak, mid", "fraction", "training_mid", "mfu_float32", "baseline", "glm_ft", None),
    ("peak RSS, LoRA training mid, 65,024 vocab (baseline: full fp32 logits)", "MiB", "memory_mid", "peak_rss_mib",
     "full_logits", "glm_ft", "lower"),
    ("eval generated tokens/s, tiny", "tokens/s", "generation", "generated_tokens_per_s", "baseline", "glm_ft",
     "higher"),
    ("eval ROUGE-L (same outputs)", "score", "generation", "rouge_l", "baseline", "glm_ft", None),
    ("peak RSS, eval generation", "MiB", "generation", "peak_rss_mib", "baseline", "glm_ft", "lower"),
    ("preprocessing rows/s (fresh cache)", "rows/s", "preprocessing", "rows_per_s", "baseline", "glm_ft", "higher"),
    ("peak PSS, preprocessing (with workers)", "MiB", "preprocessing", "peak_tree_pss_mib", "baseline", "glm_ft",
     "lower"),
    ("s to the first training step, tiny LoRA (baseline: reference script)", "s", "first_step", "first_step_s",
     "baseline", "glm_ft", "lower"),
    ("s to the first training step, tiny LoRA, tracking.enabled=false", "s", "first_step", "first_step_s",
     "baseline", "glm_ft_untracked", "lower"),
    ("peak PSS of the process tree, those jobs", "MiB", "first_step", "peak_tree_pss_mib", "baseline", "glm_ft",
     "lower"),
    ("peak PSS of the process tree, those jobs, tracking.enabled=false", "MiB", "first_step", "peak_tree_pss_mib",
     "baseline", "glm_ft_untracked", "lower"),
    ("wall s, train.py experiment=quickstart dry_run=true (baseline: import torch, transformers)", "s", "startup",
     "wall_s", "import_torch_transformers", "dry_run", "lower"),
    ("matmul peak fp32 / bf16 (torch.matmul, squares)", "GFLOP/s", "matmul", "gflops", "float32", "bfloat16", None),
]
RATIO_SOURCES = {f"{fig}.{metric}.{glm}": (fig, metric, glm, base) if better == "higher" else (fig, metric, base, glm)
                 for _, _, fig, metric, base, glm, better in ROWS if better}


def summarize(done: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, Any]:
    """Medians of repeated command runs (and every value), peak memory the highest; failures are counted."""
    ok = [r for r in done if r["returncode"] == 0]
    out: dict[str, Any] = {"failures": len(done) - len(ok),
                           "peak_rss_mib": max((r["peak_rss_mib"] or 0 for r in ok), default=None)}
    for name, key in keys.items():
        values = [r[key] for r in ok if r.get(key) is not None]
        if key.startswith("peak"):
            out[name] = max(values, default=None)
        else:
            out[name] = statistics.median(values) if values else None
            out[f"{name}_each"] = [round(v, 3) for v in values]
    return out


def same_value(values: list[float | None], relative: float) -> bool:
    known = [v for v in values if v is not None]
    return bool(known) and len(known) == len(values) and max(known) - min(known) <= relative * max(known)


def max_rel_diff(base: dict | list | None, other: dict | list | None) -> float | None:
    """Largest relative difference between two sides' losses (per sample, keyed by its tokens, or per step);
    inf if they hold different samples or steps."""
    if not base or not other:
        return None
    if isinstance(base, list):
        base, other = dict(enumerate(base)), dict(enumerate(other))
    if set(base) != set(other):
        return float("inf")
    return max(abs(other[k] - v) / max(abs(v), 1e-12) for k, v in base.items())


def add_mfu(figures: dict[str, Any]) -> None:
    """Model FLOP/s of training as a fraction of the measured matmul peaks (fp32 and bf16)."""
    peaks = figures.get("matmul", {}).get("sides", {})
    for size in ("tiny", "mid"):
        for side in figures.get(f"training_{size}", {}).get("sides", {}).values():
            for dtype in ("float32", "bfloat16"):
                gflops, flops = peaks.get(dtype, {}).get("gflops"), side.get("model_flops_per_s")
                side[f"mfu_{dtype}"] = flops / (gflops * 1e9) if flops and gflops else None


def table(figures: dict[str, Any], ratios: dict[str, Any]) -> list[dict[str, Any]]:
    def get(figure, side, metric):
        return figures.get(figure, {}).get("sides", {}).get(side, {}).get(metric)

    return [{"figure": label, "unit": unit, "baseline": get(fig, base, metric), "glm_ft": get(fig, glm, metric),
             "ratio": ratios.get(f"{fig}.{metric}.{glm}")}
            for label, unit, fig, metric, base, glm, _ in ROWS if fig in figures]


def goal_values(figures: dict[str, Any], ratios: dict[str, Any]) -> dict[str, float | None]:
    return {
        "training_tokens_per_s_ratio": ratios.get("training_mid.tokens_per_s.glm_ft"),
        "eval_generated_tokens_per_s_ratio": ratios.get("generation.generated_tokens_per_s.glm_ft"),
        "preprocessing_rows_per_s_ratio": ratios.get("preprocessing.rows_per_s.glm_ft"),
        "dry_run_wall_s": figures.get("startup", {}).get("sides", {}).get("dry_run", {}).get("wall_s"),
        "mid_training_mfu_fp32": figures.get("training_mid", {}).get("sides", {}).get("glm_ft", {}).get("mfu_float32"),
        "first_step_time_ratio": ratios.get("first_step.first_step_s.glm_ft"),
        "first_step_memory_ratio": ratios.get("first_step.peak_tree_pss_mib.glm_ft"),
    }


def assemble(figures: dict[str, Any], settings: dict[str, Any], machine: dict[str, Any], command: str,
             wall_s: float) -> dict[str, Any]:
    add_mfu(figures)
    ratios = compute_ratios(figures, RATIO_SOURCES)
    goals = check_goals(goal_values(figures, ratios))
    load = os.getloadavg()
    return {
        "schema": SCHEMA, "name": results_name(machine), "created": now_iso(), "command": command,
        "wall_s": round(wall_s, 1), "machine": {**machine, "loadavg_at_end": [round(x, 2) for x in load]},
        "versions": package_versions(), "settings": settings, "figures": figures,
        "ratio_sources": {k: list(v) for k, v in RATIO_SOURCES.items()}, "ratios": ratios, "goals": goals,
        "notes": [goal_summary(name, goal) for name, goal in goals.items()], "table": table(figures, ratios),
    }

"""A run's results document from its figures: the table and the ratios it shows (every ratio in glm-ft's favour
above 1), the goals, the summaries the figures share (rounds, medians of repeats, loss agreement), its checks."""

from __future__ import annotations

import os
import re
import statistics
from typing import Any, Mapping, NamedTuple, Sequence

from bench.common import SCHEMA, now_iso, package_versions, ratio


class Row(NamedTuple):
    """A row of the table and the ratio it shows: "higher" `better` gives glm-ft / baseline, "lower" baseline /
    glm-ft (a time or a memory peak), so that every ratio above 1 is in glm-ft's favour; None gives no ratio."""

    label: str
    unit: str
    figure: str
    metric: str
    better: str | None = "higher"
    base: str = "baseline"
    glm: str = "glm_ft"


ROWS = [row for size, fig in (("tiny", "training_tiny"), ("mid", "training_mid")) for row in (
    Row(f"training tokens/s, {size}", "tokens/s", fig, "tokens_per_s"),
    Row(f"training tokens/s, {size}, bf16=true", "tokens/s", fig, "tokens_per_s", glm="glm_ft_bf16"),
    Row(f"training tokens/s, {size}, data.packing=true", "tokens/s", fig, "tokens_per_s", glm="glm_ft_packed"),
    Row(f"training loss over the set (same work), {size}", "loss", fig, "initial_loss_over_set", None),
    Row(f"peak RSS, training {size}", "MiB", fig, "peak_rss_mib", "lower"),
)] + [
    Row("model FLOP/s / fp32 matmul peak, mid (LoRA)", "fraction", "training_mid", "mfu_float32", None),
    Row("peak RSS, LoRA training mid, 65,024 vocab (baseline: full fp32 logits)", "MiB", "memory_mid", "peak_rss_mib",
        "lower", base="full_logits"),
    Row("eval generated tokens/s, tiny", "tokens/s", "generation", "generated_tokens_per_s"),
    Row("eval ROUGE-L (same outputs)", "score", "generation", "rouge_l", None),
    Row("peak RSS, eval generation", "MiB", "generation", "peak_rss_mib", "lower"),
    Row("preprocessing rows/s (fresh cache)", "rows/s", "preprocessing", "rows_per_s"),
    Row("peak PSS, preprocessing (with workers)", "MiB", "preprocessing", "peak_tree_pss_mib", "lower"),
    Row("s to the first training step, tiny LoRA (baseline: reference script)", "s", "first_step", "first_step_s",
        "lower"),
    Row("s to the first training step, tiny LoRA, tracking.enabled=false", "s", "first_step", "first_step_s",
        "lower", glm="glm_ft_untracked"),
    Row("wall s of those jobs, start to exit (5 steps, no evaluation)", "s", "first_step", "wall_s", "lower"),
    Row("peak PSS of the process tree, those jobs", "MiB", "first_step", "peak_tree_pss_mib", "lower"),
    Row("peak PSS of the process tree, those jobs, tracking.enabled=false", "MiB", "first_step", "peak_tree_pss_mib",
        "lower", glm="glm_ft_untracked"),
    Row("wall s, train.py experiment=quickstart dry_run=true (baseline: import torch, transformers)", "s", "startup",
        "wall_s", "lower", base="import_torch_transformers", glm="dry_run"),
    Row("matmul peak fp32 / bf16 (torch.matmul, squares)", "GFLOP/s", "matmul", "gflops", None, base="float32",
        glm="bfloat16"),
]
# ratio name "figure.metric.glm-ft side" -> (figure, metric, numerator side, denominator side)
RATIO_SOURCES = {f"{r.figure}.{r.metric}.{r.glm}": (r.figure, r.metric, r.glm, r.base) if r.better == "higher"
                 else (r.figure, r.metric, r.base, r.glm) for r in ROWS if r.better}


# Goals of issues 8 and 16 (targets to work towards, never test assertions): name -> (comparison, target, source,
# what). The source is a ratio's name, or (figure, side, metric).
GOALS: dict[str, tuple[str, float, str | tuple[str, str, str], str]] = {
    "training_tokens_per_s_ratio": (">=", 1.5, "training_mid.tokens_per_s.glm_ft",
                                    "training tokens/s, glm-ft / reference data path and loss (mid size, LoRA)"),
    "eval_generated_tokens_per_s_ratio": (">=", 3.0, "generation.generated_tokens_per_s.glm_ft",
                                          "evaluation generated tokens/s, glm-ft / reference approach"),
    "preprocessing_rows_per_s_ratio": (">=", 2.0, "preprocessing.rows_per_s.glm_ft",
                                       "preprocessing rows/s, glm-ft / row-at-a-time encoding"),
    "dry_run_wall_s": ("<", 3.0, ("startup", "dry_run", "wall_s"),
                       "wall time of `python train.py experiment=quickstart dry_run=true`, seconds"),
    "mid_training_mfu_fp32": (">=", 0.40, ("training_mid", "glm_ft", "mfu_float32"),
                              "model FLOP/s of training at mid size / measured fp32 matmul peak"),
    "first_step_time_ratio": (">=", 1.0, "first_step.first_step_s.glm_ft",
                              "time to the first training step, reference script / glm-ft (tiny LoRA)"),
    "first_step_memory_ratio": (">=", 1.0, "first_step.peak_tree_pss_mib.glm_ft",
                                "peak PSS of the process tree, reference script / glm-ft (tiny LoRA)"),
}
REQUIRED_KEYS = ("schema", "name", "created", "command", "machine", "versions", "settings", "figures", "ratios",
                 "goals")


def side_value(figures: Mapping[str, Any], figure: str, side: str, metric: str) -> Any:
    return figures.get(figure, {}).get("sides", {}).get(side, {}).get(metric)


def compute_ratios(figures: Mapping[str, Any], sources: Mapping[str, Sequence[str]]) -> dict[str, float | None]:
    """ratios[name] = figures[figure].sides[numerator][metric] / ...[denominator][metric] for each source."""
    return {name: ratio(side_value(figures, figure, num, metric), side_value(figures, figure, den, metric))
            for name, (figure, metric, num, den) in sources.items()}


def goal_values(figures: Mapping[str, Any], ratios: Mapping[str, Any]) -> dict[str, float | None]:
    return {name: ratios.get(source) if isinstance(source, str) else side_value(figures, *source)
            for name, (_, _, source, _) in GOALS.items()}


def check_goal(value: float | None, op: str, target: float) -> dict[str, Any]:
    """Whether `value op target` holds, and by how much it misses: `gap` is the factor still to gain
    (target / value for >=, value / target for <); 1.0 or less means met."""
    if op not in (">=", "<"):
        raise ValueError(f"unknown comparison {op!r}")
    out: dict[str, Any] = {"value": value, "op": op, "target": target}
    if value is None or value <= 0:
        return {**out, "met": False, "gap": None}
    met = value >= target if op == ">=" else value < target
    return {**out, "met": met, "gap": round(target / value if op == ">=" else value / target, 3)}


def goal_summary(name: str, goal: Mapping[str, Any]) -> str:
    """One line: met, or missed by how much."""
    value, op, target = goal["value"], goal["op"], goal["target"]
    if value is None:
        return f"{name}: not measured"
    if goal["met"]:
        return f"{name}: met ({value:.3g} {op} {target:g})"
    how = "needs {:.2f}x more" if op == ">=" else "{:.2f}x too high"
    return f"{name}: missed ({value:.3g}, goal {op} {target:g}: {how.format(goal['gap'])})"


def combine_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One side's figure from several rounds of the same training steps: over the sum of per-step minima when
    every round trained the same batches (equal `batches_digest`), else the fastest round."""
    ok = [r for r in rounds if "step_s" in r]
    if not ok:
        return {"combined_from": 0}
    per_round = [sum(r["step_tokens"]) / sum(r["step_s"]) for r in ok]
    if len({r["batches_digest"] for r in ok}) == 1:
        seconds = sum(min(steps) for steps in zip(*(r["step_s"] for r in ok)))
        base, how = ok[0], f"per-step minimum over {len(ok)} rounds"
    else:
        base = max(ok, key=lambda r: sum(r["step_tokens"]) / sum(r["step_s"]))
        seconds, how = sum(base["step_s"]), "fastest round (rounds trained different batches)"
    return {
        "combined_from": len(ok),
        "estimator": how,
        "timed_s": seconds,
        "tokens_per_s": sum(base["step_tokens"]) / seconds,
        "model_flops_per_s": sum(base["step_flops"]) / seconds,
        "tokens_per_s_each_round": [round(x, 1) for x in per_round],
    }


def summarize(done: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Medians of repeated command runs, peak memory the highest (and every value of each: a peak's spread over
    the repeats is its noise); failures are counted."""
    ok = [r for r in done if r["returncode"] == 0]
    out: dict[str, Any] = {"failures": len(done) - len(ok),
                           "peak_rss_mib": max((r["peak_rss_mib"] or 0 for r in ok), default=None)}
    for key in keys:
        values = [r[key] for r in ok if r.get(key) is not None]
        if key.startswith("peak"):
            out[key] = max(values, default=None)
        else:
            out[key] = statistics.median(values) if values else None
        out[f"{key}_each"] = [round(v, 3) for v in values]
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
    return [{"figure": r.label, "unit": r.unit, "baseline": side_value(figures, r.figure, r.base, r.metric),
             "glm_ft": side_value(figures, r.figure, r.glm, r.metric),
             "ratio": ratios.get(f"{r.figure}.{r.metric}.{r.glm}")} for r in ROWS if r.figure in figures]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "–" if value is None else str(value)


def format_table(results: Mapping[str, Any]) -> str:
    """The results' table as markdown: figure, baseline, glm-ft, ratio in glm-ft's favour, unit."""
    rows = [(r["figure"], _fmt(r.get("baseline")), _fmt(r.get("glm_ft")), _fmt(r.get("ratio")), r.get("unit", ""))
            for r in results.get("table", [])]
    header = ["| figure | baseline | glm-ft | glm-ft gain | unit |", "|" + "---|" * 5]
    return "\n".join(header + ["| " + " | ".join(row) + " |" for row in rows])


def validate_results(results: Mapping[str, Any]) -> list[str]:
    """Problems with a results document (empty when it is well-formed): missing keys, a side without its peak
    memory, a ratio that does not follow from its figures."""
    problems = [f"missing key '{key}'" for key in REQUIRED_KEYS if key not in results]
    if problems:
        return problems
    if results["schema"] != SCHEMA:
        problems.append(f"schema is {results['schema']!r}, expected {SCHEMA!r}")
    problems += [f"missing machine.{key}" for key in ("cpu_model", "cores", "ram_gib") if key not in results["machine"]]
    problems += [f"figures.{figure}.sides.{side}: missing peak_rss_mib"
                 for figure, value in results["figures"].items() for side, v in value.get("sides", {}).items()
                 if "peak_rss_mib" not in v]
    expected = compute_ratios(results["figures"], results.get("ratio_sources", {}))
    for name, want in expected.items():
        got = results["ratios"].get(name)
        if (want is None) != (got is None) or (want is not None and abs(want - got) > 1e-9 * want):
            problems.append(f"ratios.{name} is {got}, but its figures give {want}")
    return problems


def results_name(machine: Mapping[str, Any]) -> str:
    """A stable file name per machine kind, so a new run replaces the last one: cpu-<model>-<cores>c."""
    model = re.sub(r"[^a-z0-9]+", "-", machine["cpu_model"].lower()).strip("-")
    model = re.sub(r"-?(r|tm|processor|cpu)-", "-", f"-{model}-").strip("-")
    return f"cpu-{model[:40].strip('-')}-{machine['cores']}c"


def assemble(figures: dict[str, Any], settings: dict[str, Any], machine: dict[str, Any], command: str,
             wall_s: float) -> dict[str, Any]:
    add_mfu(figures)
    ratios = compute_ratios(figures, RATIO_SOURCES)
    goals = {name: {**check_goal(value, GOALS[name][0], GOALS[name][1]), "what": GOALS[name][3]}
             for name, value in goal_values(figures, ratios).items()}
    load = os.getloadavg()
    return {
        "schema": SCHEMA, "name": results_name(machine), "created": now_iso(), "command": command,
        "wall_s": round(wall_s, 1), "machine": {**machine, "loadavg_at_end": [round(x, 2) for x in load]},
        "versions": package_versions(), "settings": settings, "figures": figures,
        "ratio_sources": {k: list(v) for k, v in RATIO_SOURCES.items()}, "ratios": ratios, "goals": goals,
        "notes": [goal_summary(name, goal) for name, goal in goals.items()], "table": table(figures, ratios),
    }

"""`training_curves.png`: a run's training loss and evaluation metrics over global steps, from the Trainer's
log history (what trainer_state.json holds), written into the run folder when training ends and logged to its MLflow
run with the other run files.

The series drawn are also stored in the PNG itself (text chunk `glm_ft.series`, JSON), so a reader can hold the
picture against trainer_state.json without trusting the drawing code.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from glm_ft.atomic import write_bytes_atomic
from glm_ft.runs import FINAL, FINAL_LOG, TRAINER_STATE, complete_checkpoints

SERIES_KEY = "glm_ft.series"
# Timings and counts are not curves worth a panel: they are flat or say nothing about learning.
NOT_PLOTTED = ("runtime", "per_second", "flos", "_samples")


def curve_series(log_history: Iterable[Mapping[str, Any]]) -> dict[str, list[list[float]]]:
    """{metric: [[step, value], ...]}: the training `loss` and every numeric `eval_*` metric, in log order."""
    series: dict[str, list[list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if not (key == "loss" or key.startswith("eval_") and not key.endswith(NOT_PLOTTED)):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or step is None:
                continue
            series.setdefault(key, []).append([step, value])
    return series


def figure(series: Mapping[str, list[list[float]]], title: str):
    """Two panels: losses (training loss, eval_loss when there is one) and the other eval metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [k for k in series if k == "loss" or k.endswith("_loss")]
    scores = [k for k in series if k not in losses]
    panels = [(losses, "loss"), (scores, "eval metric")] if scores else [(losses, "loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False, layout="constrained")
    for ax, (keys, ylabel) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*series[key]) if series[key] else ((), ())
            # Markers too: an eval metric often has only a few points.
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("global step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10, wrap=True)
    return fig


def write_training_curves(log_history: Iterable[Mapping[str, Any]], path: Path, title: str) -> dict:
    """Plot and save; returns the series drawn (also stored in the PNG's `glm_ft.series` text chunk)."""
    import matplotlib.pyplot as plt

    series = curve_series(log_history)
    fig = figure(series, title)
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=100, format="png", metadata={SERIES_KEY: json.dumps(series)})
    finally:
        plt.close(fig)
    write_bytes_atomic(Path(path), png.getvalue())
    return series


def read_series(path: Path) -> dict:
    """The series a training_curves.png was drawn from."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[SERIES_KEY])


def run_log_history(trainer_history: list[dict], run_dir: Path, trained: bool) -> list[dict]:
    """The whole training's log history. A job that only redid the final evaluation or prediction (resume=auto
    after final/ was saved) did not train (`trained` False), so its Trainer's history starts empty: final/'s
    training_log.json (else the newest complete checkpoint's trainer_state.json) holds what came before."""
    if trained:
        return list(trainer_history)
    # final/'s (written with it), else the newest checkpoint's (a final/ saved before glm-ft wrote it there)
    found = [p for p in (Path(run_dir) / FINAL / FINAL_LOG,
                         *(c / TRAINER_STATE for c in reversed(complete_checkpoints(Path(run_dir))))) if p.is_file()]
    if not found:
        return list(trainer_history)
    steps = {h.get("step") for h in trainer_history}
    earlier = json.loads(found[0].read_text(encoding="utf-8")).get("log_history", [])
    # An evaluation redone at a step the checkpoint had already evaluated counts once: the redone one.
    return [h for h in earlier if h.get("step") not in steps or "loss" in h] + list(trainer_history)

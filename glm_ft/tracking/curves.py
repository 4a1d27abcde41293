"""`training_curves.png`: a run's training loss and evaluation metrics over global steps, from the Trainer's
log history (what trainer_state.json holds), written into the run folder when training ends and logged to its MLflow
run with the other run files.

The series drawn are also stored in the PNG itself (text chunk `glm_ft.series`, JSON), so a reader can hold the
picture against trainer_state.json without trusting the drawing code.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
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


# matplotlib's default colour cycle (tab10), so that these curves look like `compare`'s plots
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
GRID = (222, 222, 222)
PANEL_SIZE, TITLE_HEIGHT = (550, 380), 34
PLOT_BOX = (70, 10, 536, 322)  # a panel's axes inside it: left, top, right, bottom
MARKERS_BELOW = 30  # points: an eval metric often has only a few, each worth a dot


@dataclass
class Panel:
    """One panel's series, its axes' box on the image (pixels) and the data ranges the box spans."""

    keys: list[str]
    ylabel: str
    box: tuple[int, int, int, int]
    x: tuple[float, float]
    y: tuple[float, float]

    def pixel(self, step: float, value: float) -> tuple[float, float]:
        (left, top, right, bottom), (x0, x1), (y0, y1) = self.box, self.x, self.y
        return left + (step - x0) / (x1 - x0) * (right - left), bottom - (value - y0) / (y1 - y0) * (bottom - top)


def panels(series: Mapping[str, list[list[float]]]) -> list[Panel]:
    """Losses (training loss, eval_loss when there is one), and the other eval metrics when there are any."""
    losses = [k for k in series if k == "loss" or k.endswith("_loss")]
    scores = [k for k in series if k not in losses]
    out = []
    for i, (keys, ylabel) in enumerate([(losses, "loss"), (scores, "eval metric")] if scores else [(losses, "loss")]):
        points = [point for key in keys for point in _finite(series[key])]
        left, top = i * PANEL_SIZE[0], TITLE_HEIGHT
        box = (left + PLOT_BOX[0], top + PLOT_BOX[1], left + PLOT_BOX[2], top + PLOT_BOX[3])
        out.append(Panel(keys, ylabel, box, _span([s for s, _ in points]), _span([v for _, v in points])))
    return out


def _finite(points: Iterable[list[float]]) -> list[list[float]]:
    """The points that can be drawn: a NaN or infinite metric (an eval_loss that overflowed) is a gap, as in
    matplotlib, not a range of NaN that made the whole picture fail."""
    return [point for point in points if _drawable(point)]


def _drawable(point: list[float]) -> bool:
    return all(map(math.isfinite, point))


def _span(values: list[float]) -> tuple[float, float]:
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high == low:
        low, high = low - (abs(low) * 0.05 or 1.0), high + (abs(high) * 0.05 or 1.0)
    margin = (high - low) * 0.05
    return low - margin, high + margin


def ticks(low: float, high: float, about: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) between low and high, about `about` of them."""
    raw = (high - low) / about
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))  # not by float noise
    first = math.ceil(low / step) * step
    digits = 3 - math.floor(math.log10(step))  # multiples of step, less float noise, at any scale
    return [round(first + i * step, digits) for i in range(int((high - first) / step + 1e-9) + 1)]


def draw(series: Mapping[str, list[list[float]]], title: str):
    """The picture, with Pillow alone: the job draws it in the training process, at its end, where matplotlib's
    import would add 20 MiB to the job's peak memory (bench/README.md). Returns the image and its panels."""
    from PIL import Image, ImageDraw

    layout = panels(series)
    image = Image.new("RGB", (PANEL_SIZE[0] * len(layout), TITLE_HEIGHT + PANEL_SIZE[1]), "white")
    pen = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)
    _text(pen, (image.width / 2, TITLE_HEIGHT / 2), _fitted(pen, title, font, image.width - 20), font, "center")
    for panel in layout:
        left, top, right, bottom = panel.box
        for step in ticks(*panel.x):
            x = panel.pixel(step, panel.y[0])[0]
            pen.line([(x, top), (x, bottom)], fill=GRID)
            _text(pen, (x, bottom + 4), f"{step:g}", small, "top")
        for value in ticks(*panel.y):
            y = panel.pixel(panel.x[0], value)[1]
            pen.line([(left, y), (right, y)], fill=GRID)
            _text(pen, (left - 5, y), f"{value:g}", small, "right")
        pen.rectangle(panel.box, outline="black")
        _text(pen, ((left + right) / 2, bottom + 22), "global step", font, "top")
        label = Image.new("RGB", [max(1, math.ceil(v)) for v in pen.textbbox((0, 0), panel.ylabel, font=font)[2:]],
                          "white")
        ImageDraw.Draw(label).text((0, 0), panel.ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (left - 62, int((top + bottom - label.height) / 2)))
        for key, colour in zip(panel.keys, COLOURS * len(panel.keys)):
            points = [panel.pixel(step, value) for step, value in _finite(series[key])]
            for run in _finite_runs(panel, series[key]):
                if len(run) > 1:
                    pen.line(run, fill=colour, width=2, joint="curve")
            if len(points) < MARKERS_BELOW:
                for x, y in points:
                    pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        _legend(pen, panel, series, small)
    return image, layout


def _finite_runs(panel: Panel, points: list[list[float]]) -> list[list[tuple[float, float]]]:
    """A series' stretches between its non-finite points, in pixels: each drawn as one line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if _drawable(point):
            runs[-1].append(panel.pixel(*point))
        elif runs[-1]:
            runs.append([])
    return runs


def _legend(pen, panel: Panel, series: Mapping[str, list[list[float]]], font) -> None:
    """In the corner of the axes that covers the fewest points (matplotlib's "best", by points only)."""
    if not panel.keys:
        return
    rows = [(key, pen.textbbox((0, 0), _shown(key, font), font=font)) for key in panel.keys]
    width, height = 34 + max(box[2] for _, box in rows), 6 + 16 * len(rows)
    left, top, right, bottom = panel.box
    corners = [(right - 8 - width, top + 8), (left + 8, top + 8), (right - 8 - width, bottom - 8 - height),
               (left + 8, bottom - 8 - height)]
    points = [panel.pixel(*point) for key in panel.keys for point in _finite(series[key])]
    x0, y0 = min(corners, key=lambda c: sum(c[0] - 4 <= x <= c[0] + width + 4 and c[1] - 4 <= y <= c[1] + height + 4
                                            for x, y in points))
    pen.rectangle((x0, y0, x0 + width, y0 + height), fill="white", outline=(200, 200, 200))
    for i, ((key, _), colour) in enumerate(zip(rows, COLOURS * len(rows))):
        y = y0 + 11 + 16 * i
        pen.line([(x0 + 6, y), (x0 + 26, y)], fill=colour, width=2)
        _text(pen, (x0 + 30, y), key, font, "left")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font (needs FreeType)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text(pen, xy: tuple[float, float], text: str, font, align: str) -> None:
    """`text` centred on xy ("center"), hanging below it ("top"), ending at it ("right") or starting at it ("left")
    (by its box, which bitmap fonts support where anchors are not)."""
    text = _shown(text, font)
    x0, y0, x1, y1 = pen.textbbox((0, 0), text, font=font)
    width, height = x1 - x0, y1 - y0
    x, y = xy
    dx = {"center": -width / 2, "top": -width / 2, "right": -width, "left": 0}[align]
    dy = 0 if align == "top" else -height / 2
    pen.text((x + dx - x0, y + dy - y0), text, fill="black", font=font)


def _fitted(pen, text: str, font, width: int) -> str:
    while len(text) > 1 and pen.textbbox((0, 0), _shown(text, font), font=font)[2] > width:
        text = text[:-2] + "…"
    return text


def _shown(text: str, font) -> str:
    """`text` as `font` can draw it: Pillow's bitmap font (a Pillow without FreeType) has Latin-1 glyphs only and
    raised UnicodeEncodeError on any other (a run folder's name in Chinese, the title's "…")."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.replace("…", "...").encode("latin-1", "replace").decode("latin-1")


def write_training_curves(log_history: Iterable[Mapping[str, Any]], path: Path, title: str) -> dict:
    """Plot and save; returns the series drawn (also stored in the PNG's `glm_ft.series` text chunk)."""
    from PIL.PngImagePlugin import PngInfo

    series = curve_series(log_history)
    image, _ = draw(series, title)
    info = PngInfo()
    info.add_text(SERIES_KEY, json.dumps(series))
    png = io.BytesIO()
    image.save(png, format="PNG", pnginfo=info)
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

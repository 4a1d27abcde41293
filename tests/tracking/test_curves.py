"""training_curves.png: drawn from the Trainer's log history, in the run folder and in its MLflow run; and the
counts (data, parameters) are tags, not metrics."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_train
from glm_ft.runs import CURVES_FILE
from glm_ft.tracking.curves import COLOURS, curve_series, draw, read_series, ticks


def _from_trainer_state(path) -> dict[str, list[list[float]]]:
    """The expected series, read from trainer_state.json without glm_ft.tracking.curves."""
    history = json.loads(path.read_text())["log_history"]
    loss = [[h["step"], h["loss"]] for h in history if "loss" in h]
    evals = {}
    for h in history:
        for key in ("eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4"):
            if key in h:
                evals.setdefault(key, []).append([h["step"], h[key]])
    return {"loss": loss, **evals}


def test_the_picture_draws_exactly_the_series():
    history = [{"loss": 3.0, "step": 1, "learning_rate": 1e-3}, {"loss": 2.5, "step": 2}, {"loss": 2.75, "step": 3},
               {"eval_rouge-l": 4.0, "eval_runtime": 1.2, "eval_samples": 4, "step": 2},
               {"eval_rouge-l": 9.5, "eval_loss": 2.6, "step": 3},
               {"train_runtime": 9.0, "train_loss": 2.7, "step": 3}]
    series = curve_series(history)
    assert series == {"loss": [[1, 3.0], [2, 2.5], [3, 2.75]], "eval_rouge-l": [[2, 4.0], [3, 9.5]],
                      "eval_loss": [[3, 2.6]]}
    image, layout = draw(series, "a title")
    assert [(p.keys, p.ylabel) for p in layout] == [(["loss", "eval_loss"], "loss"), (["eval_rouge-l"], "eval metric")]
    pixels = _assert_points_drawn(image, layout, series)
    for panel in layout:
        (left, top, right, bottom), (x0, x1), (y0, y1) = panel.box, panel.x, panel.y
        # a point no series has, halfway between two of the loss's: the line, not a dot
        if "loss" in panel.keys:
            assert pixels[round(left + (1.5 - x0) / (x1 - x0) * (right - left)),
                          round(bottom - (3.5 - y0) / (y1 - y0) * (bottom - top))] != COLOURS[0]


def _assert_points_drawn(image, layout, series):
    pixels = image.load()
    for panel in layout:
        (left, top, right, bottom), (x0, x1), (y0, y1) = panel.box, panel.x, panel.y
        for key, colour in zip(panel.keys, COLOURS):
            for step, value in series[key]:
                if not math.isfinite(value):
                    continue
                # Where the point must be, from the axes' box and ranges alone: each lies inside, in its colour.
                x = left + (step - x0) / (x1 - x0) * (right - left)
                y = bottom - (value - y0) / (y1 - y0) * (bottom - top)
                assert left < x < right and top < y < bottom, (key, step)
                assert pixels[round(x), round(y)] == colour, (key, step)
    return pixels


def test_a_nan_or_infinite_metric_is_a_gap_and_the_rest_is_drawn():
    """An eval_loss that overflowed: its NaN or inf took the axes' range with it and the picture was not written."""
    series = {"loss": [[1, 3.0], [2, float("nan")], [3, 2.5], [4, float("inf")], [5, 2.0]],
              "eval_loss": [[2, float("nan")]], "eval_rouge-l": [[2, float("-inf")], [4, 9.5], [5, 12.0]]}
    image, layout = draw(series, "a title")
    assert [(p.x, p.y) for p in layout] == [(pytest.approx((0.8, 5.2)), pytest.approx((1.95, 3.05))),
                                            (pytest.approx((3.95, 5.05)), pytest.approx((9.375, 12.125)))]
    _assert_points_drawn(image, layout, series)


@pytest.mark.parametrize(("low", "high", "expected"), [(0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
                                                       (0.95, 1.05, [0.96, 0.98, 1.0, 1.02, 1.04]),
                                                       (-3.0, 47.0, [0.0, 10.0, 20.0, 30.0, 40.0]),
                                                       (9.5e-15, 2.05e-14, [1e-14, 1.5e-14, 2e-14])])
def test_axis_ticks_are_round_values_inside_the_range(low, high, expected):
    assert ticks(low, high) == expected


def test_pillows_bitmap_font_draws_a_long_title_and_any_characters():
    """A Pillow without FreeType has only its Latin-1 bitmap font: the title's "…" and a run folder named in
    Chinese raised UnicodeEncodeError, and the picture was not written."""
    from PIL import Image, ImageDraw, ImageFont

    from glm_ft.tracking.curves import _fitted, _text

    bitmap, pen = ImageFont.load_default_imagefont(), ImageDraw.Draw(Image.new("RGB", (300, 40), "white"))
    title = _fitted(pen, "lora on chatglm3: 微调 " + "x" * 300, bitmap, 280)
    assert title.endswith("…") and len(title) < 100
    _text(pen, (150, 20), title, bitmap, "center")


@pytest.mark.slow
def test_a_run_writes_its_curves_and_logs_counts_as_tags(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    out = run_train(["experiment=quickstart", "method=lora", "training_args.max_steps=4",
                     "training_args.save_steps=2", "training_args.eval_steps=2", "training_args.logging_steps=1",
                     "eval_subset=4", "training_args.per_device_train_batch_size=4",
                     "training_args.generation_config.max_new_tokens=8", f"hydra.run.dir={run_dir}"],
                    env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-3000:]

    png = run_dir / CURVES_FILE
    expected = _from_trainer_state(run_dir / "checkpoint-4" / "trainer_state.json")
    assert len(expected["loss"]) == 4 and [s for s, _ in expected["eval_rouge-l"]] == [2, 4]
    assert read_series(png) == expected

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])[0]
    assert run.info.status == "FINISHED"
    logged = client.download_artifacts(run.info.run_id, CURVES_FILE, str(tmp_path / "download"))
    assert open(logged, "rb").read() == png.read_bytes()

    # Counts are tags: MLflow's metric columns and charts are curves and throughput only.
    assert not [k for k in run.data.metrics if k.startswith(("data.", "model."))]
    assert run.data.tags["data.train.rows_read"] == "400" and run.data.tags["data.val.samples_selected"] == "4"
    trainable = int(run.data.tags["model.trainable_parameters"])
    assert 0 < trainable < int(run.data.tags["model.total_parameters"])

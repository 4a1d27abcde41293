"""`python -m glm_ft compare` on sweeps recorded in a real MLflow store, shaped as the sweep callback records them."""

from __future__ import annotations

import json
import os

import pytest

from glm_ft.tracking.compare import compare, main
from glm_ft.tracking.parent import PARENT_FILE


def add_sweep(client, experiment_id: str, sweep_dir, start: int, swept: list[str], metric: str, direction: str,
              children: list[tuple[dict, dict, str]]) -> str:
    """A parent run and its children: (params or glm_ft.* tags, final metrics, status) each."""
    sweep_dir.mkdir()
    parent = client.create_run(experiment_id, start_time=start, run_name=str(sweep_dir), tags={
        "glm_ft.sweep": "true", "glm_ft.sweep_dir": str(sweep_dir), "glm_ft.swept_params": json.dumps(swept),
        "glm_ft.optimized_metric": metric, "glm_ft.direction": direction}).info.run_id
    (sweep_dir / PARENT_FILE).write_text(parent + "\n")
    for i, (values, metrics, status) in enumerate(children):
        name = ",".join(f"{k}={v}" for k, v in values.items())
        tags = {"mlflow.parentRunId": parent, **{f"glm_ft.{k}": v for k, v in values.items() if "." not in k}}
        child = client.create_run(experiment_id, start_time=start + i + 1, run_name=name, tags=tags).info.run_id
        for key, value in values.items():
            if "." in key:
                client.log_param(child, key, value)
        for key, value in metrics.items():
            client.log_metric(child, key, value, step=10)
        client.set_terminated(child, status)
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("glm-ft", artifact_location=str(root / "artifacts"))
    lora = add_sweep(client, exp, root / "lora", 1000, ["method.r", "method.lora_alpha"], "eval_rouge-l", "maximize", [
        ({"method.r": 4, "method.lora_alpha": 16}, {"eval_rouge-l": 30.0, "eval_bleu-4": 5.0, "eval_runtime": 9.0,
                                                    "eval_samples": 40, "train_loss": 2.0}, "FINISHED"),
        ({"method.r": 8, "method.lora_alpha": 16}, {"eval_rouge-l": 50.0, "eval_bleu-4": 4.0}, "FINISHED"),
        ({"method.r": 32, "method.lora_alpha": 8}, {}, "FAILED"),
        # killed part-way with a higher score than any finished run: still after them
        ({"method.r": 64, "method.lora_alpha": 8}, {"eval_rouge-l": 90.0}, "KILLED"),
        ({"method.r": 16, "method.lora_alpha": 32}, {"eval_rouge-l": 40.0, "eval_bleu-4": 6.0}, "FINISHED"),
    ])
    methods = add_sweep(client, exp, root / "methods", 2000, ["method"], "eval_loss", "minimize", [
        ({"method": "lora"}, {"eval_loss": 1.5}, "FINISHED"),
        ({"method": "ptuning_v2"}, {"eval_loss": 1.2}, "FINISHED"),
    ])
    tied = add_sweep(client, exp, root / "tied", 500, ["method.r"], "eval_rouge-l", "maximize", [
        ({"method.r": 4}, {"eval_rouge-l": 12.5}, "FINISHED"),
        ({"method.r": 8}, {"eval_rouge-l": 12.5}, "FINISHED"),
    ])
    alone = add_sweep(client, exp, root / "alone", 400, ["method.r"], "eval_rouge-l", "maximize", [
        ({"method.r": 4}, {"eval_rouge-l": 12.5}, "FINISHED"),
        ({"method.r": 8}, {}, "FAILED"),
    ])
    return {"uri": uri, "client": client, "root": root, "lora": lora, "methods": methods, "tied": tied,
            "alone": alone}


def test_table_is_best_first_with_failed_runs_last(store, capsys):
    result = compare(str(store["root"] / "lora"), tracking_uri=store["uri"])
    assert result.parent_id == store["lora"] and result.swept == ["method.r", "method.lora_alpha"]
    assert [r["name"] for r in result.rows] == ["method.r=8,method.lora_alpha=16", "method.r=16,method.lora_alpha=32",
                                               "method.r=4,method.lora_alpha=16", "method.r=64,method.lora_alpha=8",
                                               "method.r=32,method.lora_alpha=8"]
    assert result.columns == ["eval_rouge-l", "eval_bleu-4", "train_loss"]  # timings and sample counts left out

    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["run", "method.r", "method.lora_alpha", "status", "eval_rouge-l", "eval_bleu-4",
                                "train_loss"]
    assert lines[2].split() == ["method.r=8,method.lora_alpha=16", "8", "16", "FINISHED", "50", "4", "-"]
    assert lines[5].split() == ["method.r=64,method.lora_alpha=8", "64", "8", "KILLED", "90", "-", "-"]
    assert lines[6].split() == ["method.r=32,method.lora_alpha=8", "32", "8", "FAILED", "-", "-", "-"]

    png = store["root"] / "lora" / "compare_eval_rouge-l.png"
    assert result.plot == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [a.path for a in store["client"].list_artifacts(store["lora"])]
    assert logged == ["compare_eval_rouge-l.png"]


def test_latest_sweep_by_default_and_its_own_direction(store, capsys):
    assert main(["--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert f"({store['methods']})" in out and "best eval_loss first (minimize)" in out
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["method=ptuning_v2", "method=lora"]  # a swept group: its choice comes from the run's tag
    assert (store["root"] / "methods" / "compare_eval_loss.png").is_file()


def test_by_run_id_with_another_metric_and_output(store, tmp_path, capsys):
    out = tmp_path / "plots" / "bleu.png"
    assert main(["--tracking-uri", store["uri"], "--sweep", store["lora"], "--metric", "eval_bleu-4",
                 "--out", str(out)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:5]]
    assert rows == ["method.r=16,method.lora_alpha=32", "method.r=4,method.lora_alpha=16",
                    "method.r=8,method.lora_alpha=16"]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_another_metric_goes_its_own_way_not_the_sweeps(tmp_path, capsys):
    # A maximize sweep ranked by --metric train_loss: the lowest loss is best. A minimize sweep (eval_loss) ranked
    # by a score: the highest is best. The sweep's direction belonged to its own optimized metric only.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("glm-ft", artifact_location=str(tmp_path / "artifacts"))
    up = add_sweep(client, exp, tmp_path / "up", 1000, ["method.r"], "eval_rouge-l", "maximize", [
        ({"method.r": 2}, {"eval_rouge-l": 31.5, "train_loss": 1.166366}, "FINISHED"),
        ({"method.r": 8}, {"eval_rouge-l": 34.2, "train_loss": 1.166126}, "FINISHED"),
    ])
    down = add_sweep(client, exp, tmp_path / "down", 2000, ["method.r"], "eval_loss", "minimize", [
        ({"method.r": 2}, {"eval_loss": 1.5, "eval_rouge-l": 40.0}, "FINISHED"),
        ({"method.r": 8}, {"eval_loss": 1.2, "eval_rouge-l": 30.0}, "FINISHED"),
    ])
    loss = compare(up, "train_loss", tracking_uri=uri, out=tmp_path / "loss.png")
    assert loss.direction == "minimize" and [r["name"] for r in loss.rows] == ["method.r=8", "method.r=2"]
    # printed with the digits that tell them apart (4 significant digits would show 1.166 twice); others keep 4
    table = capsys.readouterr().out
    assert "1.1661 " in table and "1.1664 " in table and "34.2 " in table and "31.5 " in table
    score = compare(down, "eval_rouge-l", tracking_uri=uri, out=tmp_path / "score.png")
    assert score.direction == "maximize" and [r["name"] for r in score.rows] == ["method.r=2", "method.r=8"]
    assert compare(down, None, tracking_uri=uri, out=tmp_path / "own.png").direction == "minimize"


@pytest.mark.parametrize("args, message", [
    (["--metric", "eval_nope"], "no run of sweep"),
    (["--sweep", "/nowhere/sweep"], "--sweep: no sweep run for '/nowhere/sweep'"),
    (["--experiment", "other"], "no experiment 'other'"),
])
def test_errors_are_short_and_name_the_argument(store, capsys, args, message):
    assert main(["--tracking-uri", store["uri"], *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_store_is_not_created(tmp_path, capsys):
    db = tmp_path / "none.db"
    assert main(["--tracking-uri", f"sqlite:///{db}"]) == 1
    assert "no MLflow store at" in capsys.readouterr().err and not db.exists()


def test_a_sweep_whose_runs_all_tie_says_so(store, capsys):
    assert main(["--tracking-uri", store["uri"], "--sweep", store["tied"]]) == 0
    out = capsys.readouterr().out
    assert "all scored runs tie at eval_rouge-l=12.5: the swept values made no difference here" in out
    assert main(["--tracking-uri", store["uri"], "--sweep", store["lora"]]) == 0
    assert "tie" not in capsys.readouterr().out
    # one scored run beside a failed one ties with nobody
    assert main(["--tracking-uri", store["uri"], "--sweep", store["alone"]]) == 0
    assert "tie" not in capsys.readouterr().out


def test_each_runs_curve_is_its_metric_history_and_the_title_fits(store, tmp_path, capsys):
    from glm_ft.tracking.compare import figure

    client = store["client"]
    exp = client.get_experiment_by_name("glm-ft").experiment_id
    parent = add_sweep(client, exp, store["root"] / "curves", 100, ["method.num_virtual_tokens"], "eval_rouge-l",
                       "maximize", [({"method.num_virtual_tokens": n}, {}, "FINISHED") for n in (4, 8, 16)])
    # A long sweep name: the title must wrap, not run off the figure.
    client.set_tag(parent, "mlflow.runName", "ptuning_v2 " + "num_virtual_tokens=4,8,16 " * 6)
    logged = {}
    for child in sorted(client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'"),
                        key=lambda c: c.info.run_name):
        n = int(child.data.params["method.num_virtual_tokens"])
        logged[child.info.run_id] = [(step, float(n * step % 7 + step)) for step in (2, 4, 6, 8)]
        for step, value in logged[child.info.run_id]:
            client.log_metric(child.info.run_id, "eval_rouge-l", value, step=step)

    result = compare(str(store["root"] / "curves"), tracking_uri=store["uri"], out=tmp_path / "c.png")
    assert result.curves == logged
    for run_id, points in result.curves.items():  # and MLflow's own history of each run agrees
        assert points == [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "eval_rouge-l"),
                                                             key=lambda m: m.step)]
    fig = figure(result)
    fig.canvas.draw()
    names = {r["run_id"]: r["name"] for r in result.rows}
    drawn = {line.get_label(): [tuple(p) for p in line.get_xydata().tolist()] for line in fig.axes[-1].lines}
    assert drawn == {names[run_id]: points for run_id, points in logged.items()}
    title = fig._suptitle.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height
    assert "tie" not in capsys.readouterr().out


def test_a_run_whose_metric_is_nan_ranks_with_the_unscored_ones(tmp_path, capsys):
    """A NaN compares neither less nor more than any number: in the sort key it scrambled the whole table (the worst
    run first), and the digits that tell values apart never told two NaNs apart (all 17 shown for every value)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("glm-ft", artifact_location=str(tmp_path / "artifacts"))
    nan = float("nan")
    runs = [(4, 0.04, "FINISHED"), (8, 0.08, "FINISHED"), (16, nan, "FINISHED"), (2, 0.02, "FINISHED"),
            (64, 0.5, "KILLED"), (32, nan, "FINISHED")]
    add_sweep(client, exp, tmp_path / "nan", 1000, ["method.r"], "eval_rouge-l", "maximize", [
        ({"method.r": r}, {"eval_rouge-l": score, "eval_loss": 1 - score}, status) for r, score, status in runs])

    for metric, order in [("eval_rouge-l", ["method.r=8", "method.r=4", "method.r=2"]),
                          ("eval_loss", ["method.r=8", "method.r=4", "method.r=2"])]:
        result = compare(str(tmp_path / "nan"), metric, tracking_uri=uri, out=tmp_path / f"{metric}.png")
        names = [r["name"] for r in result.rows]
        assert names[:4] == [*order, "method.r=64"] and set(names[4:]) == {"method.r=16", "method.r=32"}
        lines = capsys.readouterr().out.splitlines()
        assert lines[2].split()[:4] == ["method.r=8", "8", "FINISHED", "0.08" if metric == "eval_rouge-l" else "0.92"]
        assert lines[6].split()[2:] == ["FINISHED", "nan", "nan"]

    add_sweep(client, exp, tmp_path / "all_nan", 2000, ["method.r"], "eval_rouge-l", "maximize", [
        ({"method.r": r}, {"eval_rouge-l": nan}, "FINISHED") for r in (4, 8)])
    assert main(["--tracking-uri", uri, "--sweep", str(tmp_path / "all_nan")]) == 1
    assert "has a finite 'eval_rouge-l' (only NaN or infinite values)" in capsys.readouterr().err


def last_logged(client, run_id: str, metric: str) -> dict[int, float]:
    """Each step's value as MLflow's history holds it, the one logged last winning (read without compare)."""
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


def test_a_step_logged_again_is_drawn_once_with_its_last_value(tmp_path, capsys):
    """A resumed run logs the steps between its checkpoint and the kill again: the curve keeps the later value."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from glm_ft.tracking.compare import figure

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("glm-ft", artifact_location=str(tmp_path / "artifacts"))
    add_sweep(client, exp, tmp_path / "resumed", 1000, ["method.r"], "eval_rouge-l", "maximize",
              [({"method.r": r}, {}, "FINISHED") for r in (4, 8)])
    runs = {c.info.run_name: c.info.run_id for c in client.search_runs([exp])}
    # killed after step 6, resumed from step 4: steps 5 and 6 again, later, with other values
    first = [(2, 10.0), (4, 20.0), (6, 25.0), (5, 22.0)]
    again = [(5, 23.0), (6, 30.0), (8, 35.0)]
    for i, (step, value) in enumerate(first + again):
        client.log_batch(runs["method.r=4"], metrics=[Metric("eval_rouge-l", value, 1_000 + i, step)])
    for step in (2, 4):
        client.log_metric(runs["method.r=8"], "eval_rouge-l", float(step), step=step)

    result = compare(str(tmp_path / "resumed"), tracking_uri=uri, out=tmp_path / "c.png")
    assert result.curves[runs["method.r=4"]] == [(2, 10.0), (4, 20.0), (5, 23.0), (6, 30.0), (8, 35.0)]
    for run_id, points in result.curves.items():
        assert points == sorted(last_logged(client, run_id, "eval_rouge-l").items())
        assert points[-1][1] == client.get_run(run_id).data.metrics["eval_rouge-l"]  # the table's value
    drawn = {line.get_label(): [tuple(p) for p in line.get_xydata().tolist()] for line in figure(result).axes[-1].lines}
    assert drawn["method.r=4"] == result.curves[runs["method.r=4"]]


@pytest.mark.slow
def test_a_sweep_job_killed_and_resumed_has_one_point_per_step(tmp_path, capsys):
    """A real kill: the sweep's job is SIGKILLed once steps 3-4 are in MLflow but checkpoint-4 is not yet complete
    (its marker is what a kill mid-save lacks), so the re-run sweep resumes it from checkpoint-2 and logs steps 3 and
    4 again to the same run. compare's curves and the run's training_curves.png hold each step once."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from conftest import ROOT, run_process
    from glm_ft.runs import CURVES_FILE
    from glm_ft.tracking.curves import read_series
    from lifecycle_helpers import STOPPING_TRAIN, background, kill_group, mlflow_run_id, wait_until_stopped

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir, log = tmp_path / "sweep", tmp_path / "sweep.log"
    args = ["-m", "experiment=quickstart", "method=lora", "method.r=4", "training_args.max_steps=6",
            "training_args.save_steps=2", "training_args.eval_steps=2", "training_args.logging_steps=1",
            "eval_subset=2", "training_args.per_device_train_batch_size=2", "data.test_file=null",
            "training_args.generation_config.max_new_tokens=4", f"hydra.sweep.dir={sweep_dir}"]
    env = {"MLFLOW_TRACKING_URI": uri}
    with background([sys.executable, "-c", STOPPING_TRAIN, "checkpoint-4", *args], log, env=env) as proc:
        wait_until_stopped(proc, log, "checkpoint-4")
        kill_group(proc)
        proc.wait()
    job_dir = sweep_dir / "0"
    (job_dir / "checkpoint-4" / "glm_ft_complete").unlink()
    again = run_process([sys.executable, str(ROOT / "train.py"), *args], env={**os.environ, **env})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming #0 from the checkpoints" in again.stdout + again.stderr

    client, run_id = MlflowClient(uri), mlflow_run_id(job_dir)
    for metric in ("loss", "eval_rouge-l"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert steps.count(4) == 2  # what the kill and resume logged: step 4 twice
        result = compare(str(sweep_dir), metric, tracking_uri=uri, out=tmp_path / f"{metric}.png")
        assert result.curves == {run_id: sorted(last_logged(client, run_id, metric).items())}
        assert [s for s, _ in result.curves[run_id]] == sorted(set(steps))
    # The run's own picture is drawn from the Trainer's history: each step once, as trainer_state.json has it.
    history = json.loads((job_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert read_series(job_dir / CURVES_FILE)["loss"] == [[h["step"], h["loss"]] for h in history if "loss" in h]
    assert [s for s, _ in read_series(job_dir / CURVES_FILE)["loss"]] == list(range(1, 7))
    # The job returned the sweep's metric (no optimized_metric: eval_rouge-l), as its outcome records it.
    outcome = json.loads((sweep_dir / ".glm_ft_jobs" / "0.json").read_text())
    assert outcome["status"] == "COMPLETED"
    assert outcome["return_value"] == client.get_run(run_id).data.metrics["eval_rouge-l"]

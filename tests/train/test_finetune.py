"""End to end on the tiny ChatGLM3 and the sample data: the three methods, checkpoints, predictions, resume,
reproducibility, switches and failures. Each run is `python train.py ...` in a subprocess, as a user runs it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from best_model_helpers import (EVAL_SCORES, best_step, eval_history, eval_scores, patience_counts,
                                patience_stop, same_tensors, tensors)
from conftest import ROOT, end_process_group, launcher_env, run_process, run_train
from glm_ft.runs import complete_checkpoints
from lifecycle_helpers import signalled_at

pytestmark = pytest.mark.slow

# Small but complete: training, two evaluations with generation, checkpoints, test prediction.
SMALL = ["experiment=quickstart", "training_args.max_steps=6", "training_args.save_steps=3",
         "training_args.eval_steps=3", "training_args.logging_steps=1", "eval_subset=4",
         "training_args.per_device_train_batch_size=4", "training_args.generation_config.max_new_tokens=8",
         "training_args.learning_rate=1e-3"]
METHODS = {"lora": ["method=lora"], "ptuning_v2": ["method=ptuning_v2", "method.num_virtual_tokens=4"],
           "sft": ["method=sft"]}


@pytest.fixture(scope="module")
def mlflow_env(tmp_path_factory) -> dict[str, str]:
    store = tmp_path_factory.mktemp("mlflow")
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}


def train(args: list[str], run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    out = run_train([*SMALL, *args, f"hydra.run.dir={run_dir}"], env=env)
    return out


def losses(run_dir: Path, checkpoint: str | None = None) -> dict[int, float]:
    state_dir = run_dir / checkpoint if checkpoint else max(run_dir.glob("checkpoint-*"),
                                                            key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((state_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def trained(run_dir: Path, checkpoint: str, first: int = 1) -> dict[int, tuple[float, float]]:
    """Each logged step's loss and grad_norm from `first` on: what a resume must reproduce exactly, not to a
    tolerance (LoRA's dropout, drawn from other RNG states, moved the loss in the 6th digit)."""
    history = json.loads((run_dir / checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in history if "loss" in h and h["step"] >= first}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_env) -> dict[str, Path]:
    """Each method trained twice with the same seed (the second run checks reproducibility)."""
    out = {}
    for name, args in METHODS.items():
        for attempt in ("a", "b"):
            run_dir = tmp_path_factory.mktemp(f"{name}_{attempt}")
            result = train(args, run_dir, mlflow_env)
            assert result.returncode == 0, result.stderr[-3000:]
            out[f"{name}_{attempt}"] = run_dir
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_end_to_end(method, runs):
    run_dir = runs[f"{method}_a"]
    finetune = OmegaConf.load(run_dir / "finetune.yaml")
    assert finetune.training_args.output_dir == str(run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_rouge-l" in h]
    assert [h["step"] for h in evals] == [3, 6]
    assert all(set(h) >= {"eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4"} for h in evals)

    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    test_rows = sum(1 for _ in (ROOT / "data/sample/test.jsonl").open())
    assert len(rows) >= test_rows  # one per assistant turn; multi-turn rows give several
    assert all(set(r) == {"prompt", "reference", "prediction"} and r["reference"] for r in rows)
    assert rows[0]["prompt"].startswith("[gMASK]sop<|user|>")
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(metrics) >= {"test_rouge-1", "test_rouge-2", "test_rouge-l", "test_bleu-4"}


def test_the_run_is_complete_in_mlflow(runs, mlflow_env):
    from mlflow.tracking import MlflowClient

    run_dir = runs["lora_a"]
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.info.status == "FINISHED"
    assert run.data.params["method.r"] == "8" and run.data.tags["glm_ft.method"] == "lora"
    # what the run used, not the config's defaults: its folder, and the store MLFLOW_TRACKING_URI chose
    assert run.data.params["training_args.output_dir"] == str(run_dir)
    assert run.data.params["tracking.tracking_uri"] == mlflow_env["MLFLOW_TRACKING_URI"]
    assert run.data.tags["data.val.samples_selected"] == "4"
    assert run.data.tags["data.train.rows_read"] == "400"
    client = MlflowClient(tracking_uri=mlflow_env["MLFLOW_TRACKING_URI"])
    rouge = client.get_metric_history(run.info.run_id, "eval_rouge-l")
    assert sorted({m.step for m in rouge}) == [3, 6]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    assert "test_rouge-l" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"finetune.yaml", "predictions.jsonl", ".hydra", "model"} <= artifacts


def test_checkpoints_hold_only_what_was_trained(runs):
    lora = runs["lora_a"] / "checkpoint-6"
    assert (lora / "adapter_model.safetensors").is_file() and not (lora / "model.safetensors").exists()
    prefix = runs["ptuning_v2_a"] / "checkpoint-6"
    weights = [p for p in prefix.iterdir() if p.suffix == ".safetensors"]
    assert len(weights) == 1 and weights[0].stat().st_size < 64 * 1024, weights
    assert not (prefix / "model.safetensors").exists()
    sft = runs["sft_a"] / "checkpoint-6"
    assert (sft / "model.safetensors").is_file()
    for run in runs.values():
        saved = sorted(run.glob("checkpoint-*"))
        assert len(saved) == 2
        for ckpt in saved:
            assert (ckpt / "glm_ft_complete").is_file()
            # no pickle that only an unsafe load reads: weights are safetensors, the Trainer's arguments JSON
            assert not list(ckpt.glob("*.bin")), list(ckpt.glob("*.bin"))
        for folder in [*saved, run / "final"]:
            args = json.loads((folder / "training_args.json").read_text())
            assert (args["output_dir"], args["max_steps"], args["learning_rate"]) == (str(run), 6, 1e-3), folder


@pytest.mark.parametrize("method", list(METHODS))
def test_same_seed_same_losses(method, runs):
    a, b = losses(runs[f"{method}_a"]), losses(runs[f"{method}_b"])
    assert len(a) == 6 and a == b
    assert all(math.isfinite(v) for v in a.values())


def test_full_training_learns(runs):
    """SFT on the tiny model: the loss falls over six steps (the quickstart relies on it)."""
    sft = losses(runs["sft_a"])
    assert sft[6] < sft[1]


def test_resume_after_sigkill_reaches_the_same_loss(tmp_path, mlflow_env, runs):
    args = [*METHODS["lora"]]
    run_dir = tmp_path / "killed"
    env = {**os.environ, **mlflow_env}
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, *args, "training_args.save_steps=2",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while not (run_dir / "checkpoint-2" / "glm_ft_complete").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)  # steps 3-6, an evaluation and the test prediction still follow: well over 10 ms
    finally:
        end_process_group(proc)
    assert not (run_dir / "checkpoint-6").exists()

    resumed = train([*args, "training_args.save_steps=2", "resume=auto"], run_dir, mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = losses(runs["lora_a"])
    after = losses(run_dir, "checkpoint-6")
    assert after[6] == pytest.approx(uninterrupted[6], rel=1e-5)
    # save_total_limit=2 (quickstart): checkpoint-2 was rotated out once 4 and 6 were complete.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_resume_in_a_later_epoch_reaches_the_same_losses(tmp_path, mlflow_env):
    """Batches of 64 from 397 training samples: 7 steps an epoch, so checkpoint-9 is two steps into the second
    epoch, whose length-grouped order (group_by_length, the default) must not depend on how the run got there."""
    args = [*METHODS["lora"], "training_args.per_device_train_batch_size=64", "training_args.max_steps=12",
            "training_args.save_steps=9", "training_args.eval_steps=100", "training_args.save_total_limit=null"]
    whole = train(args, tmp_path / "whole", mlflow_env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = train([*args, f"resume={tmp_path / 'whole' / 'checkpoint-9'}"], tmp_path / "resumed", mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = losses(tmp_path / "whole", "checkpoint-12")
    assert len(uninterrupted) == 12 and len(set(uninterrupted.values())) > 1
    assert trained(tmp_path / "resumed", "checkpoint-12", 10) == trained(tmp_path / "whole", "checkpoint-12", 10)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_resume_that_evaluates_at_other_steps_trains_the_same_steps(method, runs, tmp_path, mlflow_env):
    """Resumed at the step the uninterrupted run evaluated and saved at, and evaluating at every step after it (a
    resume's eval_steps are its own): each resumed step's loss and grad_norm are the uninterrupted run's, exactly.
    Evaluation drew from the global RNG (each DataLoader iterator takes its seed there), so the dropout of LoRA and
    of the P-Tuning v2 prefix drew other masks after the first evaluation the other run did not have (sft: no
    dropout in ChatGLM3's config)."""
    result = train([*METHODS[method], f"resume={runs[f'{method}_a'] / 'checkpoint-3'}", "training_args.eval_steps=1",
                    "data.test_file=null"], tmp_path / "resumed", mlflow_env)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_rouge-l" in h] == [3, 4, 5, 6]
    assert trained(tmp_path / "resumed", "checkpoint-6", 4) == trained(runs[f"{method}_a"], "checkpoint-6", 4)


def test_a_finished_run_extended_trains_the_longer_runs_steps(runs, tmp_path, mlflow_env):
    """A 2-step LoRA run (which evaluated at its last step, before saving checkpoint-2) extended by resume=auto to
    6 steps trains steps 3-6 as the 6-step run did, which never evaluated at step 2 (warmup_steps=20: the same rates
    either way). Its dropout masks drew from the RNG the evaluation had moved on: other losses from step 3."""
    run_dir = tmp_path / "run"
    first = train([*METHODS["lora"], "training_args.max_steps=2", "data.test_file=null"], run_dir, mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train([*METHODS["lora"], "data.test_file=null", "resume=auto"], run_dir, mlflow_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoint-2'}" in again.stdout + again.stderr
    assert trained(run_dir, "checkpoint-6") == trained(runs["lora_a"], "checkpoint-6")


def test_two_processes_resumed_in_the_second_epoch_train_that_epoch_s_order(tmp_path, mlflow_env):
    """As above with two processes, packed rows and accumulation: resumed inside epoch 2, accelerate wraps the
    sampler one level deeper (SkipBatchSampler around its shard) and the epoch must still reach it; the resumed
    steps train the uninterrupted run's rows (epoch 1's order before the fix), to its losses and token counts."""
    args = ["experiment=quickstart", "data.packing=true", "training_args.max_steps=-1",
            "training_args.num_train_epochs=2", "training_args.per_device_train_batch_size=8",
            "training_args.gradient_accumulation_steps=2", "training_args.save_steps=3",
            "training_args.logging_steps=1", "training_args.eval_steps=100", "data.val_file=null",
            "data.test_file=null", "training_args.save_total_limit=null"]  # 123 packed rows: 4 steps an epoch, 2 ranks
    env = launcher_env(mlflow_env)

    def launch(name: str, *extra: str) -> dict[int, dict]:
        cmd = [sys.executable, "-m", "glm_ft.launch", "--nproc_per_node", "2", str(ROOT / "train.py"), *args, *extra,
               f"hydra.run.dir={tmp_path / name}"]
        result = run_process(cmd, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        state = json.loads((tmp_path / name / "checkpoint-8" / "trainer_state.json").read_text())
        return {h["step"]: h for h in state["log_history"] if "loss" in h}

    expected = launch("whole")
    got = launch("resumed", f"resume={tmp_path / 'whole' / 'checkpoint-6'}")
    assert expected[6]["epoch"] == pytest.approx(1.5)  # checkpoint-6 is inside the second epoch
    for step in (7, 8):
        assert got[step]["num_input_tokens_seen"] == expected[step]["num_input_tokens_seen"], step
        assert (got[step]["loss"], got[step]["grad_norm"]) == (expected[step]["loss"], expected[step]["grad_norm"])


def test_a_resumed_runs_train_loss_is_the_whole_runs_mean(tmp_path, mlflow_env, runs):
    """The Trainer's train_loss averages the steps of one train() call. A run resumed from checkpoint-3 reports the
    mean of all six step losses, as the uninterrupted run does; with logging_steps=4 the losses of steps 1-3 were not
    yet logged when checkpoint-3 was saved."""
    uninterrupted = losses(runs["lora_a"], "checkpoint-6")  # logged every step
    whole_mean = sum(uninterrupted.values()) / 6
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    args = [*METHODS["lora"], "training_args.logging_steps=4"]
    assert train(args, tmp_path / "first", mlflow_env).returncode == 0
    resumed = train([*args, f"resume={tmp_path / 'first' / 'checkpoint-3'}"], tmp_path / "resumed", mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # from the last step's checkpoint (steps 5-6 not logged there): no step is left to train, and they still count
    at_end = train([*args, f"resume={tmp_path / 'first' / 'checkpoint-6'}"], tmp_path / "at_end", mlflow_env)
    assert at_end.returncode == 0, at_end.stderr[-3000:]
    reported = {r.data.tags["glm_ft.run_dir"]: r.data.metrics["train_loss"]
                for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"]) if "train_loss" in r.data.metrics}
    assert reported[str(runs["lora_a"])] == pytest.approx(whole_mean, rel=1e-5)
    assert reported[str(tmp_path / "resumed")] == pytest.approx(whole_mean, rel=1e-5)
    assert reported[str(tmp_path / "at_end")] == pytest.approx(whole_mean, rel=1e-5)
    # and it trained no step past max_steps: the same final model as the run it resumed
    assert json.loads((tmp_path / "at_end" / "final" / "glm_ft_complete").read_text())["step"] == 6
    assert not list((tmp_path / "at_end").glob("checkpoint-*"))
    weights = sorted(p.name for p in (tmp_path / "first" / "final").glob("*.safetensors"))
    assert weights and all((tmp_path / "at_end" / "final" / w).read_bytes() == (tmp_path / "first" / "final" / w)
                           .read_bytes() for w in weights)
    # the Trainer's own figure, the mean of steps 4-6, is another number
    assert sum(uninterrupted[s] for s in (4, 5, 6)) / 3 != pytest.approx(whole_mean, rel=1e-5)
    # The loss logged at step 4 averages steps 1-4 in both runs (the resumed one restored the three steps its
    # checkpoint had not logged yet; the Trainer alone would log step 4's loss by itself).
    window = sum(uninterrupted[s] for s in (1, 2, 3, 4)) / 4
    assert losses(tmp_path / "first", "checkpoint-6") == pytest.approx({4: window}, rel=1e-5)
    assert losses(tmp_path / "resumed", "checkpoint-6") == pytest.approx({4: window}, rel=1e-5)


def test_two_processes_train_loss_averages_the_unlogged_steps_over_the_ranks(tmp_path, mlflow_env):
    """With two processes, the steps after the last log (here step 5 with logging_steps=2) enter train_loss as the
    mean over the ranks, as a logged loss does, not as rank 0's own share: the same figure as a run that logged
    every step (whose train_loss is the mean of its logged, rank-averaged losses)."""
    args = [*SMALL, "method=sft", "training_args.max_steps=5", "training_args.save_steps=100",
            "training_args.eval_steps=100", "data.test_file=null"]
    env = launcher_env(mlflow_env)
    reported = {}
    for every in (1, 2):
        run_dir = tmp_path / f"every{every}"
        cmd = [sys.executable, "-m", "glm_ft.launch", "--nproc_per_node", "2", str(ROOT / "train.py"), *args,
               f"training_args.logging_steps={every}", f"hydra.run.dir={run_dir}"]
        result = run_process(cmd, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        # Both ranks load the same data and model: their accounts of it appear once, rank 0's.
        out = result.stdout + result.stderr
        for line in ("train: 400 rows read", "method=sft: ", "run folder: "):
            assert out.count(line) == 1, (line, out[-3000:])
        reported[every] = next(r.data.metrics["train_loss"] for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
                               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    each_step = losses(tmp_path / "every1", "checkpoint-5")
    assert sorted(each_step) == [1, 2, 3, 4, 5]
    assert reported[1] == pytest.approx(sum(each_step.values()) / 5, rel=1e-5)
    assert reported[2] == pytest.approx(reported[1], rel=1e-5)


def test_resume_auto_with_more_epochs_trains_on(tmp_path, mlflow_env):
    """max_steps=-1: the length is num_train_epochs. A finished run resumed with more of them is not complete."""
    args = [*METHODS["lora"], "training_args.max_steps=-1", "training_args.per_device_train_batch_size=64",
            "training_args.save_steps=100", "training_args.eval_steps=100", "data.test_file=null"]
    run_dir = tmp_path / "run"
    # ended by max_steps, a fraction of an epoch: one epoch asked for next is more
    first = train([*args[:1], "training_args.max_steps=3", *args[2:]], run_dir, mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    for epochs, step, resumed_from in ((1, 7, 3), (2, 14, 7)):  # 397 samples / 64 = 7 steps an epoch
        again = train([*args, f"training_args.num_train_epochs={epochs}", "resume=auto"], run_dir, mlflow_env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming from {run_dir / f'checkpoint-{resumed_from}'}" in again.stdout + again.stderr
        assert json.loads((run_dir / "final" / "glm_ft_complete").read_text())["step"] == step
    # the same length again: complete, nothing trained
    done = train([*args, "training_args.num_train_epochs=2", "resume=auto"], run_dir, mlflow_env)
    assert done.returncode == 0 and "nothing to train" in done.stdout + done.stderr, done.stderr[-3000:]


def test_a_training_started_in_an_earlier_ones_folder_disowns_its_later_checkpoints(tmp_path, mlflow_env):
    """The same hydra.run.dir again, from scratch: the earlier training's checkpoint-6 and final/ must not count
    as this one's (resume=auto after a kill would have continued the other training, inference opened its model)."""
    args = [*METHODS["lora"], "training_args.eval_steps=100", "data.test_file=null"]
    run_dir = tmp_path / "run"
    first = train(args, run_dir, mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train([*args, "training_args.max_steps=3", "training_args.learning_rate=5e-4"], run_dir, mlflow_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "held checkpoint-3, checkpoint-6, final of another training (past step 0)" in again.stdout + again.stderr
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-3"]
    assert (run_dir / "checkpoint-6").is_dir()  # not deleted: its files were not this run's to remove
    assert json.loads((run_dir / "final" / "glm_ft_complete").read_text())["step"] == 3
    resumed = train([*args, "training_args.max_steps=3", "resume=auto"], run_dir, mlflow_env)
    assert resumed.returncode == 0 and "nothing to train" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]


def test_a_resume_that_extends_a_run_follows_its_own_training_args(tmp_path, mlflow_env):
    """A finished 4-step run extended to 8 steps with another learning rate and denser logging, evaluation and
    checkpoints, as its finetune.yaml and MLflow's glm_ft.resume_changed_params then say. The resumed steps follow
    the 8-step linear schedule from the new rate, starting at the first resumed step (the optimizer state brought
    back the 4-step schedule's last rate, 0, for step 5; the scheduler state the old base rate), and log, evaluate
    and save at the new steps (the checkpoint's trainer_state.json brought back the old ones)."""
    args = ["method=sft", "training_args.warmup_steps=1", "training_args.save_total_limit=null", "data.test_file=null"]
    run_dir = tmp_path / "run"
    first = train([*args, "training_args.max_steps=4", "training_args.save_steps=4", "training_args.eval_steps=4",
                   "training_args.logging_steps=2"], run_dir, mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train([*args, "training_args.max_steps=8", "training_args.learning_rate=5e-4",
                   "training_args.save_steps=2", "training_args.eval_steps=2", "training_args.logging_steps=1",
                   "resume=auto"], run_dir, mlflow_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert OmegaConf.load(run_dir / "finetune.yaml").training_args.learning_rate == 5e-4
    history = json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    rates = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    # the rate step k trains at after the one warmup step: base x (max_steps - (k - 1)) / (max_steps - 1)
    assert {k: rates[k] for k in (2, 4)} == pytest.approx({2: 1e-3, 4: 1e-3 / 3})  # SMALL's 1e-3
    assert {k: rates[k] for k in (5, 6, 7, 8)} == pytest.approx({k: 5e-4 * (9 - k) / 7 for k in (5, 6, 7, 8)})
    assert sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*")) == [4, 6, 8]
    assert [h["step"] for h in history if "eval_rouge-l" in h] == [4, 6, 8]
    assert [h["step"] for h in history if "loss" in h] == [2, 4, 5, 6, 7, 8]


def test_resume_from_named_checkpoint(tmp_path, mlflow_env, runs):
    source = runs["ptuning_v2_a"] / "checkpoint-3"
    result = train([*METHODS["ptuning_v2"], f"resume={source}"], tmp_path / "r", mlflow_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained(tmp_path / "r", "checkpoint-6", 4) == trained(runs["ptuning_v2_a"], "checkpoint-6", 4)
    assert "data order" not in result.stdout + result.stderr
    # another batch size: the resumed steps train other rows than the uninterrupted run's, and the log says so
    other = train([*METHODS["ptuning_v2"], f"resume={source}", "training_args.per_device_train_batch_size=2",
                   "training_args.max_steps=4", "training_args.eval_steps=100", "data.test_file=null"],
                  tmp_path / "b", mlflow_env)
    assert other.returncode == 0, other.stderr[-3000:]
    assert (f"resume: training_args.per_device_train_batch_size 4 -> 2 since {source}: the resumed steps do not "
            "continue its data order (an uninterrupted run would train other batches)") in other.stdout + other.stderr


# A run saved at step 2 on its own copy of the sample training file; the resumes below train step 3 from there.
ORDER = ["method=lora", "training_args.max_steps=2", "training_args.save_steps=2", "training_args.eval_steps=100",
         "data.val_file=null", "data.test_file=null"]
ORDER_WARNING = "since {}: the resumed steps do not continue its data order"


def _train_file(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(rows), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def saved_at_step_2(tmp_path_factory, mlflow_env) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("order")
    rows = (ROOT / "data" / "sample" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    result = train([*ORDER, f"data.data_dir={_train_file(root / 'data', rows)}"], root / "run", mlflow_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "checkpoint-2", rows


def _resume(checkpoint: Path, data_dir: Path, run_dir: Path, env: dict, *extra: str) -> str:
    result = train([*ORDER, "training_args.max_steps=3", f"data.data_dir={data_dir}", f"resume={checkpoint}", *extra],
                   run_dir, env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert f"resuming from {checkpoint}" in out
    return out


@pytest.mark.parametrize("change, said", [
    (["data.packing=true"], "data.packing false -> true"),
    (["max_input_length=32"], "max_input_length 64 -> 32"),
    (["max_output_length=32"], "max_output_length 64 -> 32"),
    (["max_input_length=48", "training_args.per_device_train_batch_size=2"],
     "training_args.per_device_train_batch_size 4 -> 2, max_input_length 64 -> 48"),
    ("reversed rows", "data.train_file {old} -> {new} (other contents)"),
])
def test_a_resume_that_changes_what_each_step_trains_says_so_in_one_line(change, said, saved_at_step_2, tmp_path,
                                                                         mlflow_env):
    """Causes the Trainer's arguments do not hold: the training file's contents (other rows under the same step
    numbers), the lengths every sample is cut to, packing. All named in the one warning line, beside those of the
    training_args.json (per_device_train_batch_size...)."""
    checkpoint, rows = saved_at_step_2
    data_dir, extra = checkpoint.parent.parent / "data", change
    if change == "reversed rows":
        data_dir, extra = _train_file(tmp_path / "other", rows[::-1]), []
        said = said.format(old=checkpoint.parent.parent / "data" / "train.jsonl", new=data_dir / "train.jsonl")
    out = _resume(checkpoint, data_dir, tmp_path / "resumed", mlflow_env, *extra)
    assert f"resume: {said} {ORDER_WARNING.format(checkpoint)}" in out


def test_an_unchanged_resume_warns_nothing_even_from_a_moved_copy_of_the_data(saved_at_step_2, tmp_path,
                                                                              mlflow_env):
    checkpoint, rows = saved_at_step_2
    record = json.loads((checkpoint / "glm_ft_data_order.json").read_text())
    assert record["data.train_sha256"] == hashlib.sha256("".join(rows).encode()).hexdigest()
    assert (record["max_input_length"], record["data.packing"], record["world_size"]) == (64, False, 1)
    out = _resume(checkpoint, _train_file(tmp_path / "moved", rows), tmp_path / "resumed", mlflow_env)
    assert "data order" not in out  # the same bytes elsewhere are the same rows
    assert "precision" not in out


def test_a_checkpoint_saved_before_the_record_resumes_as_before(saved_at_step_2, tmp_path, mlflow_env):
    """No record: what it trained is unknown, so nothing is said of it; the resumed run's own checkpoints record."""
    checkpoint = tmp_path / "old" / "checkpoint-2"
    shutil.copytree(saved_at_step_2[0], checkpoint)
    (checkpoint / "glm_ft_data_order.json").unlink(missing_ok=True)  # as one saved before the record was
    out = _resume(checkpoint, saved_at_step_2[0].parent.parent / "data", tmp_path / "resumed", mlflow_env,
                  "max_input_length=32", "data.packing=true", "training_args.max_steps=4")
    assert "data order" not in out
    record = json.loads((tmp_path / "resumed" / "checkpoint-4" / "glm_ft_data_order.json").read_text())
    assert (record["max_input_length"], record["data.packing"], record["data.pack_max_length"]) == (32, True, 97)


def test_a_resume_with_another_number_of_processes_says_so(saved_at_step_2, tmp_path, mlflow_env):
    """Each rank trains its share of a step's batches: with another number of processes a step trains other rows."""
    data_dir = saved_at_step_2[0].parent.parent / "data"
    env = launcher_env(mlflow_env)
    cmd = [sys.executable, "-m", "glm_ft.launch", "--nproc_per_node", "2", str(ROOT / "train.py"), *SMALL, *ORDER,
           f"data.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'two'}"]
    two = run_process(cmd, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    checkpoint = tmp_path / "two" / "checkpoint-2"
    out = _resume(checkpoint, data_dir, tmp_path / "one", mlflow_env)
    assert f"resume: number of processes 2 -> 1 {ORDER_WARNING.format(checkpoint)}" in out


def weight_dtypes(folder: Path) -> set:
    """The dtypes of a checkpoint's weights (not the rotary buffer, which the model keeps in fp32)."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("inv_freq")}


def adam_state_dtypes(folder: Path) -> set:
    import torch

    state = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    return {v.dtype for s in state.values() for k, v in s.items() if k != "step"}


def test_sft_with_an_explicit_bf16_dtype_trains_and_resumes_in_pure_bf16(tmp_path, mlflow_env):
    """model.torch_dtype=bfloat16 with sft is honoured, as the HF Trainer trains a bf16-loaded model: bf16 weights
    and AdamW states (half of fp32's memory), said in one log line; glm-ft upcast every trainable weight to fp32."""
    import torch

    args = [*METHODS["sft"], "model.torch_dtype=bfloat16", "training_args.max_steps=4", "training_args.save_steps=2",
            "training_args.eval_steps=100", "data.test_file=null"]
    whole = train(args, tmp_path / "whole", mlflow_env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert ("model.torch_dtype=bfloat16: method=sft trains in pure bf16 (weights, gradients and optimizer states in "
            "bf16, no fp32 master copy)") in whole.stdout + whole.stderr
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        assert weight_dtypes(tmp_path / "whole" / folder) == {"BF16"}, folder
        assert json.loads((tmp_path / "whole" / folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert adam_state_dtypes(tmp_path / "whole" / "checkpoint-2") == {torch.bfloat16}
    resumed = train([*args, f"resume={tmp_path / 'whole' / 'checkpoint-2'}"], tmp_path / "resumed", mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained(tmp_path / "resumed", "checkpoint-4", 3) == trained(tmp_path / "whole", "checkpoint-4", 3)
    assert weight_dtypes(tmp_path / "resumed" / "final") == {"BF16"}
    assert adam_state_dtypes(tmp_path / "resumed" / "checkpoint-4") == {torch.bfloat16}


PRECISION_WARNING = ("since {}: the resumed steps compute in another precision than its steps (the weights and "
                     "optimizer states it saved load cast to this run's dtypes; an uninterrupted run would compute "
                     "other losses)")


def test_a_resume_in_another_precision_says_so_in_one_line(tmp_path, mlflow_env):
    """An fp32 sft checkpoint resumed with model.torch_dtype=bfloat16 trains on in pure bf16: the Trainer casts its
    weights and AdamW states to bf16 as they load, without a word (only MLflow's glm_ft.resume_changed_params held
    it). Allowed, as the Trainer allows it (a GPU with bf16, less memory), and said in one line, as a change of data
    order is; a resume in the checkpoint's own precision says nothing (test_resume_from_named_checkpoint)."""
    import torch

    args = [*METHODS["sft"], "training_args.save_steps=2", "training_args.eval_steps=100", "data.val_file=null",
            "data.test_file=null"]
    first = train([*args, "training_args.max_steps=2"], tmp_path / "fp32", mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "fp32" / "checkpoint-2"
    assert (weight_dtypes(checkpoint), adam_state_dtypes(checkpoint)) == ({"F32"}, {torch.float32})
    same = train([*args, "training_args.max_steps=3", f"resume={checkpoint}"], tmp_path / "same", mlflow_env)
    assert same.returncode == 0 and "precision" not in same.stdout + same.stderr, same.stderr[-3000:]
    resumed = train([*args, "training_args.max_steps=4", "model.torch_dtype=bfloat16", f"resume={checkpoint}"],
                    tmp_path / "bf16", mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "precision" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"resume: model.torch_dtype float32 -> bfloat16 {PRECISION_WARNING.format(checkpoint)}"), lines
    # what the line says: the resumed steps trained bf16 weights with bf16 AdamW states
    saved = tmp_path / "bf16" / "checkpoint-4"
    assert (weight_dtypes(saved), adam_state_dtypes(saved)) == ({"BF16"}, {torch.bfloat16})


def test_a_lora_resume_with_bf16_on_says_its_base_computes_in_bf16(saved_at_step_2, tmp_path, mlflow_env):
    """LoRA's model.torch_dtype=auto follows training_args.bf16: switched on at the resume, the frozen base loads in
    bf16 and the steps run under bf16 autocast. Both are named (the adapter and its AdamW states stay fp32)."""
    checkpoint = saved_at_step_2[0]
    out = _resume(checkpoint, checkpoint.parent.parent / "data", tmp_path / "resumed", mlflow_env,
                  "training_args.bf16=true")
    assert (f"resume: training_args.bf16 false -> true, model.torch_dtype float32 -> bfloat16 "
            f"{PRECISION_WARNING.format(checkpoint)}") in out
    assert "data order" not in out


def test_cosine_with_min_lr_takes_its_min_lr_rate_from_lr_scheduler_kwargs(tmp_path, mlflow_env):
    """training_args.lr_scheduler_kwargs reaches transformers' scheduler: every logged rate is the cosine from
    learning_rate down to min_lr_rate x learning_rate after a linear warmup, computed here from its definition."""
    base, warmup, steps, floor = 1e-3, 2, 7, 0.25
    run_dir = tmp_path / "run"
    result = train(["method=lora", "training_args.lr_scheduler_type=cosine_with_min_lr",
                    f"training_args.lr_scheduler_kwargs.min_lr_rate={floor}", f"training_args.warmup_steps={warmup}",
                    f"training_args.max_steps={steps}", "training_args.save_steps=100", "data.val_file=null",
                    "data.test_file=null"], run_dir, mlflow_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert OmegaConf.load(run_dir / "finetune.yaml").training_args.lr_scheduler_kwargs == {"min_lr_rate": floor}

    def rate(k: int) -> float:  # step k trains at the rate the schedule has after k - 1 scheduler steps
        done = k - 1
        if done < warmup:
            return base * done / warmup
        progress = (done - warmup) / (steps - warmup)
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    history = json.loads((run_dir / "final" / "training_log.json").read_text())["log_history"]
    logged = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    assert logged == pytest.approx({k: rate(k) for k in range(1, steps + 1)}, rel=1e-6, abs=1e-12)
    assert min(logged.values()) == 0 and min(v for v in logged.values() if v) > floor * base  # warmup, then the floor


def test_switches(tmp_path, mlflow_env):
    """bf16, gradient checkpointing, accumulation and random order (not length-grouped) together."""
    run_dir = tmp_path / "switches"
    result = train(["method=lora", "training_args.bf16=true", "training_args.gradient_checkpointing=true",
                    "training_args.gradient_accumulation_steps=2", "training_args.group_by_length=false",
                    "training_args.max_steps=2", "training_args.save_steps=2", "training_args.eval_steps=2",
                    "eval_subset=3"], run_dir, mlflow_env)
    assert result.returncode == 0, result.stderr[-3000:]
    finetune = OmegaConf.load(run_dir / "finetune.yaml").training_args
    assert finetune.bf16 and finetune.gradient_checkpointing and finetune.group_by_length is False
    args = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert args["global_step"] == 2
    assert len([h for h in args["log_history"] if "loss" in h]) == 2
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_rouge-l" in h] == [2]


def imported(stderr: str) -> set[str]:
    """The modules `python -X importtime` (PYTHONPROFILEIMPORTTIME) reports loading."""
    return {line.rpartition("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_a_run_without_deepspeed_or_tracking_loads_neither(tmp_path):
    """accelerate would import deepspeed on every Trainer (and deepspeed mlflow) just to check the model's type."""
    result = run_train(["experiment=quickstart", "training_args.max_steps=1", "data.val_file=null",
                        "data.test_file=null", "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"],
                       env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'train_loss'" in result.stdout + result.stderr
    modules = imported(result.stderr)
    assert {"torch", "transformers.trainer", "peft"} <= modules  # the import log is real
    assert not {"deepspeed", "mlflow"} & modules
    assert "optuna" not in modules  # a job outside an Optuna study has no use for it
    # Its curves are drawn with Pillow: matplotlib's import would set the job's peak memory (bench/README.md)
    assert (tmp_path / "run" / "training_curves.png").is_file() and "matplotlib" not in modules


# Records, for every forward of the real model, whether it ran in training or evaluation and under autocast.
PRECISION_PROBE = """
import json, sys, torch
import glm_ft.chatglm3.modeling as modeling
seen, out_file = set(), sys.argv[1]
forward = modeling.ChatGLMForConditionalGeneration.forward
def probe(self, *args, **kwargs):
    seen.add(("train" if self.training else "eval", torch.is_autocast_enabled("cpu")))
    return forward(self, *args, **kwargs)
modeling.ChatGLMForConditionalGeneration.forward = probe
sys.argv = ["train.py", *sys.argv[2:]]
from glm_ft.cli import main
try:
    main()
finally:
    open(out_file, "w").write(json.dumps(sorted(seen)))
"""


@pytest.mark.parametrize("method", ["lora", "ptuning_v2"])
def test_bf16_evaluation_generates_in_the_training_precision(method, tmp_path, mlflow_env):
    """A PEFT model's generate bypasses the autocast accelerate puts on the wrapped forward; glm-ft restores it."""
    script, seen_file = tmp_path / "probe.py", tmp_path / "seen.json"
    script.write_text(PRECISION_PROBE)
    args = [*SMALL, *METHODS[method], "training_args.bf16=true", "training_args.max_steps=1",
            "training_args.eval_steps=1", "training_args.save_steps=1", "eval_subset=2", "data.test_file=null",
            f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_process([sys.executable, str(script), str(seen_file), *args], cwd=ROOT,
                         env={**os.environ, **mlflow_env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(map(tuple, json.loads(seen_file.read_text()))) == [("eval", True), ("train", True)]


def test_nan_loss_stops_naming_the_step(tmp_path, mlflow_env):
    run_dir = tmp_path / "nan"
    result = train(["method=sft", "training_args.learning_rate=1e30", "training_args.max_grad_norm=1e30"],
                   run_dir, mlflow_env)
    assert result.returncode == 1
    assert "loss is nan at step" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.info.status == "FAILED"
    assert "loss is nan" in run.data.tags["glm_ft.error"]


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("glm-ft")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_keeps_the_last_checkpoint_says_so_and_marks_the_run_killed(tmp_path, mlflow_env, signum):
    """Ctrl-C, or SIGTERM as a scheduler (SLURM, Kubernetes) or `kill PID` stops a job: one line naming the step,
    the last complete checkpoint and how to continue (SIGTERM printed nothing), and the signal's exit code."""
    run_dir = tmp_path / "interrupted"
    env = {**os.environ, **mlflow_env}
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, "method=lora", "training_args.max_steps=1000000",
           "training_args.save_steps=2", "training_args.eval_steps=1000000", f"hydra.run.dir={run_dir}"]
    # Its own session: a test that fails before the interrupt must not leave a million-step training behind.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while not list(run_dir.glob("checkpoint-*/glm_ft_complete")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate()
    finally:
        end_process_group(proc)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert stderr.count("interrupted at step") == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert f"(continue with resume=auto hydra.run.dir={run_dir})" in stderr
    complete = sorted((p.parent for p in run_dir.glob("checkpoint-*/glm_ft_complete")),
                      key=lambda p: int(p.name.split("-")[1]))
    assert complete and f"last complete checkpoint: {complete[-1]}" in stderr
    assert all((p / "adapter_model.safetensors").is_file() for p in complete)
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.info.status == "KILLED"


@pytest.mark.parametrize(("stop_at", "signum", "where", "redone"), [
    ("glm_ft.train.trainer:GlmTrainer.evaluate", signal.SIGTERM, "during the final evaluation",
     "the final evaluation and the test prediction"),
    ("glm_ft.train.trainer:GlmTrainer.predict", signal.SIGINT, "during the test prediction", "the test prediction"),
], ids=["final_evaluation_sigterm", "test_prediction_ctrl_c"])
def test_a_stop_after_final_is_saved_says_it_is_kept_and_resume_redoes_only_the_rest(stop_at, signum, where, redone,
                                                                                    tmp_path, mlflow_env):
    """Stopped once final/ is complete, a job printed a bare `interrupted`: now one line saying final/ is kept and
    what resume=auto redoes, which then trains nothing."""
    run_dir = tmp_path / "stopped"
    args = [*SMALL, "method=lora", "training_args.max_steps=2", "training_args.evaluation_strategy=no"]
    code, out = signalled_at(stop_at, signum, args, run_dir, mlflow_env)
    assert code == 128 + signum and "Traceback" not in out, out[-3000:]
    said = [line.rpartition("\r")[2] for line in out.splitlines() if "interrupted" in line]
    assert said == [f"interrupted {where}; the trained model, {run_dir / 'final'} (step 2), is complete (continue "
                    f"with resume=auto hydra.run.dir={run_dir}, which trains nothing and redoes only {redone})"], said
    assert not list(run_dir.rglob("*.tmp"))  # nothing half-written
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.info.status == "KILLED"
    marker = (run_dir / "final" / "glm_ft_complete").stat().st_mtime_ns
    resumed = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "redoing only what is missing" in resumed.stdout + resumed.stderr
    assert (run_dir / "final" / "glm_ft_complete").stat().st_mtime_ns == marker  # final/ as it was: nothing trained
    assert (run_dir / "predictions.jsonl").is_file() and (run_dir / "eval_metrics.json").is_file()
    assert next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
                if r.info.run_id == run.info.run_id).info.status == "FINISHED"


# train.py with a Ctrl-C (a real SIGINT) that lands inside a library's lock, as it did in tqdm's progress bar:
# tqdm's cleanup then raises "RuntimeError: cannot release un-acquired lock" with the KeyboardInterrupt as context.
CTRL_C_INSIDE_A_LOCK = """
import signal, sys, threading
from glm_ft.train.trainer import TrackerCallback

logged = TrackerCallback.on_log

def on_log(self, args, state, control, logs=None, **kwargs):
    logged(self, args, state, control, logs=logs, **kwargs)
    if state.global_step == 5:
        lock = threading.Lock()
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            lock.release()  # not held: RuntimeError, raised while the KeyboardInterrupt unwinds

TrackerCallback.on_log = on_log
sys.argv = ["train.py", *sys.argv[1:]]
from glm_ft.cli import main
main()
"""


def test_ctrl_c_that_a_library_turns_into_its_own_error_is_still_ctrl_c(tmp_path, mlflow_env):
    run_dir = tmp_path / "interrupted"
    cmd = [sys.executable, "-c", CTRL_C_INSIDE_A_LOCK, *SMALL, "method=lora", "training_args.max_steps=100",
           "training_args.save_steps=2", f"hydra.run.dir={run_dir}"]
    result = run_process(cmd, env={**os.environ, **mlflow_env})
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (f"interrupted at step 5; last complete checkpoint: {run_dir / 'checkpoint-4'} (continue with "
            f"resume=auto hydra.run.dir={run_dir})") in result.stderr
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.info.status == "KILLED" and "glm_ft.error" not in run.data.tags


def test_quickstart_learns_the_sample_data(tmp_path, mlflow_env):
    """`make train` as shipped: the tiny model's eval ROUGE-L rises over the run (the sample data is learnable),
    and the run tells the user where its outputs went and how to open MLflow."""
    run_dir = tmp_path / "quickstart"
    result = run_train(["experiment=quickstart", f"hydra.run.dir={run_dir}"], env=mlflow_env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((run_dir / "checkpoint-600" / "trainer_state.json").read_text())
    rouge = [h["eval_rouge-l"] for h in state["log_history"] if "eval_rouge-l" in h]
    assert len(rouge) == 6
    assert rouge[-1] > rouge[0] + 20 and rouge[-1] > 50, rouge
    out = result.stdout + result.stderr
    assert f"run folder: {run_dir}" in out and "make ui" in out


def test_a_training_resumed_from_another_folder_disowns_all_of_its_own_folders_checkpoints(tmp_path, mlflow_env):
    """resume= a checkpoint of another run, into a folder an earlier training used: none of that folder's
    checkpoints is this training's, those before the resumed step included (resume=auto after a kill before this
    training's first save, or inference, took the earlier training's checkpoint-3 for this one's)."""
    args = [*METHODS["lora"], "training_args.eval_steps=100", "data.test_file=null"]
    source, run_dir = tmp_path / "source", tmp_path / "run"
    assert train(args, source, mlflow_env).returncode == 0
    first = train([*args, "training_args.learning_rate=5e-4"], run_dir, mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train([*args, f"resume={source / 'checkpoint-3'}", "training_args.save_steps=100"], run_dir, mlflow_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "held checkpoint-3, checkpoint-6, final of another training" in again.stdout + again.stderr
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-6"]  # this training's, saved at its end


def test_a_resume_takes_the_new_learning_rate_once(tmp_path, mlflow_env):
    """The new learning_rate is this run's base rate whatever the checkpoint: one saved before glm-ft rescaled
    records the learning_rate of a resume in its training_args.json while its scheduler state kept the first
    training's (training_args.json said nothing changed: the old rate stayed). final/ is no checkpoint to resume: it
    holds no optimizer, schedule or trainer state (transformers failed on it with a traceback)."""
    args = ["training_args.warmup_steps=1", "training_args.save_total_limit=null", "data.test_file=null",
            "training_args.eval_steps=100", "training_args.learning_rate=2e-3"]
    run_dir = tmp_path / "run"
    first = train([*args, "training_args.max_steps=4", "training_args.save_steps=4"], run_dir, mlflow_env)
    assert first.returncode == 0, first.stderr[-3000:]

    def rates(folder: Path) -> dict[int, float]:
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["learning_rate"] for h in history if "loss" in h}

    final = run_dir / "final"
    refused = train([*args, "training_args.max_steps=8", f"resume={final}"], tmp_path / "f", mlflow_env)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: '{final}' is a run's final model, not a checkpoint (no optimizer, schedule or trainer "
        "state); use resume=auto hydra.run.dir=<its run folder> (with a larger training_args.max_steps to train "
        "on), or resume=<run folder>/checkpoint-N"), refused.stderr[-3000:]
    assert not (tmp_path / "f" / "finetune.yaml").exists()  # refused before anything was written or loaded

    # checkpoint-4 as glm-ft saved it before it rescaled, after a resume with learning_rate=5e-4: the scheduler
    # state's base rate is the first training's 2e-3, training_args.json says 5e-4
    record = run_dir / "checkpoint-4" / "training_args.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "learning_rate": 5e-4}))
    resumed = train([*args, "training_args.max_steps=8", "training_args.save_steps=8",
                     "training_args.learning_rate=5e-4", f"resume={run_dir / 'checkpoint-4'}"], tmp_path / "c",
                    mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = rates(tmp_path / "c" / "checkpoint-8")
    assert {k: got[k] for k in (5, 6, 7, 8)} == pytest.approx({k: 5e-4 * (9 - k) / 7 for k in (5, 6, 7, 8)})


# --- load_best_model_at_end and early stopping ------------------------------------------------------------------

# An evaluation and a checkpoint every step. LoRA's and freeze tuning's eval_rouge-l on the 4 validation samples goes
# up and down at a learning rate of 2e-2 (the 3rd step's is above the 4th's); LoRA's at 3e-2 rises, then stays put
# for a few evaluations: the best checkpoint is not the last, and a patience of 2 runs out before the end.
BEST = ["experiment=quickstart", "training_args.save_steps=1", "training_args.eval_steps=1",
        "training_args.logging_steps=1", "eval_subset=4", "training_args.per_device_train_batch_size=4",
        "training_args.generation_config.max_new_tokens=8"]


def assert_curve_is_the_trainings(run_dir: Path, evals: dict[int, float]) -> None:
    """training_curves.png draws each evaluation during training at its step, and no point at the last step for an
    earlier checkpoint's model evaluated again at the end."""
    from glm_ft.tracking.curves import read_series

    drawn = read_series(run_dir / "training_curves.png")["eval_rouge-l"]
    assert [step for step, _ in drawn] == sorted(evals)
    assert dict(drawn) == pytest.approx(evals)


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_load_best_model_at_end_makes_final_the_best_evaluated_checkpoint(method, tmp_path, mlflow_env):
    run_dir = tmp_path / "best"
    out = run_train([*BEST, f"method={method}", "training_args.learning_rate=2e-2", "training_args.max_steps=4",
                     "training_args.save_total_limit=1", "training_args.load_best_model_at_end=true",
                     f"hydra.run.dir={run_dir}"], env=mlflow_env)
    assert out.returncode == 0, out.stderr[-3000:]
    evals = eval_history(run_dir / "checkpoint-4" / "trainer_state.json")
    assert sorted(evals) == list(range(1, 5))
    best = best_step(evals)
    final = tensors(run_dir / "final")
    assert same_tensors(final, tensors(run_dir / f"checkpoint-{best}"))
    # On this project's machines the 3rd evaluation beats the 4th; a CPU whose float rounding makes the last the best
    # still checks everything else (final/ is then the last step's model, rightly).
    if best != 4:
        assert evals[4] < evals[best] and not same_tensors(final, tensors(run_dir / "checkpoint-4"))
    # save_total_limit=1: the best and the newest (resume=auto's starting point) stay, as transformers keeps them
    # during training (at its end it deleted the newest, before final/ was saved)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-4"})
    marker = json.loads((run_dir / "final" / "glm_ft_complete").read_text())
    assert marker["step"] == 4 and marker["model_step"] == best
    # the final evaluation, the one a sweep optimises, is final/'s model's: the best checkpoint's score
    progress = json.loads((run_dir / "glm_ft_progress.json").read_text())
    assert progress["metrics"]["eval_rouge-l"] == pytest.approx(evals[best])
    # eval_metrics.json names the step whose model it scored, as final/'s marker does, and its numbers are those the
    # evaluation during training logged at that step (it said step 4, of the 3rd step's numbers)
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    assert evaluated["step"] == marker["model_step"] == best
    scores = eval_scores(run_dir / "checkpoint-4" / "trainer_state.json", best)
    assert {key: evaluated[key] for key in scores} == pytest.approx(scores)
    assert_curve_is_the_trainings(run_dir, evals)
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.data.tags["glm_ft.final_model_step"] == str(best)
    assert run.data.tags["glm_ft.final_model_checkpoint"] == str(run_dir / f"checkpoint-{best}")
    assert run.data.tags["glm_ft.metric_for_best_model"] == "eval_rouge-l"
    assert float(run.data.tags["glm_ft.best_metric"]) == pytest.approx(evals[best])
    assert run.data.metrics["eval_rouge-l"] == pytest.approx(evals[best])  # the run's value: final/'s


def test_early_stopping_stops_where_the_patience_runs_out_and_a_resume_keeps_its_count(tmp_path, mlflow_env):
    from lifecycle_helpers import background, kill_group, train_cmd, wait_until_stopped

    args = [*BEST, "method=lora", "training_args.learning_rate=3e-2", "training_args.max_steps=12",
            "training_args.load_best_model_at_end=true",
            "training_args.early_stopping_patience=2", "data.test_file=null"]
    whole = tmp_path / "whole"
    out = run_train([*args, f"hydra.run.dir={whole}"], env=mlflow_env)
    assert out.returncode == 0, out.stderr[-3000:]
    marker = json.loads((whole / "final" / "glm_ft_complete").read_text())
    evals = eval_history(whole / "final" / "training_log.json")
    stop = patience_stop(evals, 2)
    assert stop is not None and stop < 12 and max(evals) == stop, f"no stop by the patience rule: {evals}"
    assert marker["step"] == stop and marker["stopped_early"] and marker["model_step"] == best_step(evals)
    assert same_tensors(tensors(whole / "final"), tensors(whole / f"checkpoint-{best_step(evals)}"))
    # finished: resume=auto trains nothing more (the marker's step is below max_steps)
    again = run_train([*args, "resume=auto", f"hydra.run.dir={whole}"], env=mlflow_env)
    assert again.returncode == 0 and "is complete" in again.stdout + again.stderr, again.stderr[-3000:]

    # Killed after the checkpoint one evaluation before the stop: the resume counts on from the saved count and
    # keeps the best so far, so it stops at the same step with the same final/.
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    with background(train_cmd(args, killed, stop_after=f"checkpoint-{stop - 1}"), log, env=mlflow_env) as proc:
        wait_until_stopped(proc, log, f"checkpoint-{stop - 1}")
        kill_group(proc)
        proc.wait()
    assert not (killed / "final").exists()
    resumed = run_train([*args, "resume=auto", f"hydra.run.dir={killed}"], env=mlflow_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    marker_resumed = json.loads((killed / "final" / "glm_ft_complete").read_text())
    assert marker_resumed["step"] == stop and marker_resumed["model_step"] == marker["model_step"]
    assert eval_history(killed / "final" / "training_log.json") == pytest.approx(evals)
    assert same_tensors(tensors(killed / "final"), tensors(whole / "final"))


def test_a_redone_final_evaluation_is_of_the_best_checkpoint_final_holds(tmp_path, mlflow_env):
    """Killed once final/ (the best checkpoint's model) was saved: resume=auto redoes the final evaluation of that
    model, not the last step's evaluation taken from the training's log."""
    from lifecycle_helpers import killed_once_final_is_saved

    run_dir = tmp_path / "redo"
    args = [*BEST, "method=lora", "training_args.learning_rate=2e-2", "training_args.max_steps=4",
            "training_args.load_best_model_at_end=true", "data.test_file=null"]
    killed_once_final_is_saved(args, run_dir, mlflow_env)
    assert not (run_dir / "glm_ft_progress.json").is_file() or "evaluated" not in json.loads(
        (run_dir / "glm_ft_progress.json").read_text())
    evals = eval_history(run_dir / "final" / "training_log.json")
    best = best_step(evals)  # the 3rd step's on this project's machines: the check then tells the two apart
    out = run_train([*args, "resume=auto", f"hydra.run.dir={run_dir}"], env=mlflow_env)
    assert out.returncode == 0, out.stderr[-3000:]
    progress = json.loads((run_dir / "glm_ft_progress.json").read_text())
    assert progress["metrics"]["eval_rouge-l"] == pytest.approx(evals[best])
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    assert evaluated["step"] == json.loads((run_dir / "final" / "glm_ft_complete").read_text())["model_step"] == best
    scores = eval_scores(run_dir / "final" / "training_log.json", best)
    assert {key: evaluated[key] for key in scores} == pytest.approx(scores)
    # the redone evaluation took the place of the 4th step's own in the curve
    assert_curve_is_the_trainings(run_dir, evals)


@pytest.mark.parametrize(("method", "removed"), [("lora", "adapter_model.safetensors"), ("freeze", None)],
                         ids=["lora_weights_file", "freeze_folder"])
def test_a_best_checkpoint_deleted_before_it_loads_leaves_final_the_last_steps_model_and_says_so(
        method, removed, tmp_path, mlflow_env):
    """The best checkpoint's weights file (or the whole folder, as a user or a cleanup script deletes it) gone by the
    end of training: transformers warned that it "could not locate the best model" and loaded nothing, yet final/'s
    marker, eval_metrics.json and MLflow named the best step for the last step's model (and freeze tuning's own
    loader failed on the missing folder after the whole training). Now final/ is the last step's model, said so."""
    from lifecycle_helpers import background, train_cmd, wait_until_stopped

    run_dir, log = tmp_path / "best", tmp_path / "best.log"
    args = [*BEST, f"method={method}", "training_args.learning_rate=2e-2", "training_args.max_steps=4",
            "training_args.load_best_model_at_end=true", "data.test_file=null"]
    with background(train_cmd(args, run_dir, stop_after="glm_ft.train.best_model:BestModel._load_best_model"), log,
                    env=mlflow_env) as proc:
        wait_until_stopped(proc, log, "the best model's load")
        evals = eval_history(run_dir / "checkpoint-4" / "trainer_state.json")
        best = best_step(evals)
        # the 3rd step's on this project's machines (see above): final/ then differs from the best checkpoint
        assert best != 4, f"the last evaluation is the best here, nothing tells the two apart: {evals}"
        kept = tensors(run_dir / f"checkpoint-{best}")
        if removed:
            (run_dir / f"checkpoint-{best}" / removed).unlink()
        else:
            shutil.rmtree(run_dir / f"checkpoint-{best}")
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait() == 0, log.read_text()[-3000:]
    final = tensors(run_dir / "final")
    assert same_tensors(final, tensors(run_dir / "checkpoint-4")) and not same_tensors(final, kept)
    marker = json.loads((run_dir / "final" / "glm_ft_complete").read_text())
    assert marker["step"] == marker["model_step"] == 4
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    assert evaluated["step"] == 4
    assert f"the best model, {run_dir / f'checkpoint-{best}'}, is gone or holds no weights" in log.read_text()
    assert {key: evaluated[key] for key in EVAL_SCORES} == pytest.approx(
        eval_scores(run_dir / "checkpoint-4" / "trainer_state.json", 4))
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(run_dir))
    assert run.info.status == "FINISHED" and run.data.tags["glm_ft.final_model_step"] == "4"
    assert "glm_ft.final_model_checkpoint" not in run.data.tags
    assert run.data.metrics["eval_rouge-l"] == pytest.approx(evals[4])


def test_a_resume_from_another_folders_checkpoint_keeps_the_best_of_its_own(tmp_path, mlflow_env):
    """resume=<another run folder>/checkpoint-N: that folder's best checkpoint, which its trainer_state.json names,
    is no candidate for this run's final/ (final/ was loaded from the other folder; with that checkpoint deleted,
    final/'s marker named a step whose weights it did not hold). The best so far and early stopping's count start
    afresh: final/ is the best of this folder's checkpoints."""
    args = [*BEST, "method=lora", "training_args.load_best_model_at_end=true",
            "training_args.early_stopping_patience=5", "data.test_file=null"]
    first, second = tmp_path / "first", tmp_path / "second"
    out = run_train([*args, "training_args.learning_rate=2e-2", "training_args.max_steps=4",
                     f"hydra.run.dir={first}"], env=mlflow_env)
    assert out.returncode == 0, out.stderr[-3000:]
    # A rate that moves no score: every evaluation here stays at or below the first folder's best
    out = run_train([*args, "training_args.learning_rate=1e-9", "training_args.max_steps=6",
                     f"resume={first / 'checkpoint-4'}", f"hydra.run.dir={second}"], env=mlflow_env)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((second / "checkpoint-6" / "trainer_state.json").read_text())
    own = {step: value for step, value in eval_history(second / "checkpoint-6" / "trainer_state.json").items()
           if step > 4}
    best = best_step(own)
    assert state["best_model_checkpoint"] == str(second / f"checkpoint-{best}")
    assert state["best_metric"] == pytest.approx(own[best])
    marker = json.loads((second / "final" / "glm_ft_complete").read_text())
    assert marker["step"] == 6 and marker["model_step"] == best
    assert same_tensors(tensors(second / "final"), tensors(second / f"checkpoint-{best}"))
    counter = state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    assert counter == patience_counts(own)[6]
    evaluated = json.loads((second / "eval_metrics.json").read_text())
    assert evaluated["step"] == best
    assert {key: evaluated[key] for key in EVAL_SCORES} == pytest.approx(
        eval_scores(second / "checkpoint-6" / "trainer_state.json", best))
    run = next(r for r in _mlflow_runs(mlflow_env["MLFLOW_TRACKING_URI"])
               if r.data.tags.get("glm_ft.run_dir") == str(second))
    assert run.data.tags["glm_ft.final_model_checkpoint"] == str(second / f"checkpoint-{best}")
    assert f"the best checkpoint so far, {first / 'checkpoint-'}" in out.stdout + out.stderr  # and said so

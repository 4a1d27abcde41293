"""Real DeepSpeed ZeRO-2/3 on CPU (gloo): one plain process, and two processes under torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, launcher_env, run_process

pytestmark = pytest.mark.slow

ARGS = ["experiment=quickstart", "training_args.max_steps=3", "training_args.save_steps=3",
        "training_args.eval_steps=3", "training_args.logging_steps=1", "eval_subset=2",
        "training_args.per_device_train_batch_size=2", "training_args.generation_config.max_new_tokens=4",
        "data.test_file=null"]


def run(prefix: list[str], stage: int, run_dir: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = launcher_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    cmd = [*prefix, str(ROOT / "train.py"), *ARGS, f"deepspeed=zero{stage}", f"hydra.run.dir={run_dir}", *extra]
    return run_process(cmd, cwd=ROOT, env=env)


def check_run(run_dir: Path, stage: int, world_size: int, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    assert run.info.status == "FINISHED"  # logged by rank 0 only, and closed before any rank exits
    assert run.data.metrics["train_loss"] > 0
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # the rate each step trained at, as logged without DeepSpeed: the quickstart's 2e-3 warming up over 20 steps
    # from 0 (ZeRO-3, whose config brings DeepSpeed's optimizer, logged the next step's)
    rates = [h["learning_rate"] for h in state["log_history"] if "loss" in h]
    assert rates == pytest.approx([2e-3 * k / 20 for k in range(3)])
    assert (run_dir / "checkpoint-3" / "glm_ft_complete").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()  # SFT under ZeRO: full weights gathered on save
    resolved = json.loads((run_dir / "ds_config.resolved.json").read_text())
    assert resolved["zero_optimization"]["stage"] == stage
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    if stage == 2:  # the documented ds_zero_3.json leaves train_batch_size to DeepSpeed
        assert resolved["train_batch_size"] == 2 * world_size
    assert "auto" not in json.dumps(resolved)


@pytest.mark.parametrize("stage", [2, 3])
def test_single_process(stage, tmp_path):
    """A plain `python train.py ... deepspeed=zeroN`: glm-ft sets up the one-process group itself; then resumed
    with more steps and another learning rate."""
    result = run([sys.executable], stage, tmp_path / "run", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(tmp_path / "run", stage, world_size=1, tmp_path=tmp_path)
    # Extended with another learning rate: steps 4-6 follow the new schedule from its first step on (ZeRO-3's
    # config brings DeepSpeed's optimizer, and the schedule, wrapped by accelerate, kept the checkpoint's rates)
    again = run([sys.executable], stage, tmp_path / "run", tmp_path, "training_args.max_steps=6",
                "training_args.save_steps=6", "training_args.learning_rate=1e-3", "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    rates = {h["step"]: h["learning_rate"] for h in state["log_history"] if "loss" in h}
    assert {k: rates[k] for k in (4, 5, 6)} == pytest.approx({k: 1e-3 * (k - 1) / 20 for k in (4, 5, 6)})


def test_a_loraplus_resume_under_zero2_keeps_each_groups_rate(tmp_path):
    """DeepSpeed drops LoRA+'s empty groups (embedding, no-decay) from the optimizer it is given: a resume still
    trains lora_B at this run's ratio of this run's rate (it fell back to training_args.learning_rate for every
    group: lora_B learnt at 1/ratio of its rate after any resume=auto, the ratio unchanged too)."""
    import torch

    lora = ["method=lora", "training_args.max_steps=2", "training_args.save_steps=2"]
    first = run([sys.executable], 2, tmp_path / "run", tmp_path, *lora, "method.loraplus_lr_ratio=16")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run([sys.executable], 2, tmp_path / "run", tmp_path, *lora, "training_args.max_steps=4",
                "method.loraplus_lr_ratio=4", "training_args.learning_rate=5e-4", "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    (states,) = (tmp_path / "run" / "checkpoint-4" / "global_step4").glob("*optim_states.pt")
    groups = torch.load(states, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([5e-4, 5e-4 * 4])  # lora_A, lora_B


@pytest.mark.parametrize("stage, method", [(2, "lora"), (3, "sft"), (3, "ptuning_v2")])
def test_load_best_model_at_end_under_deepspeed_makes_final_the_best_checkpoint(stage, method, tmp_path):
    """The best checkpoint is loaded back through DeepSpeed's engine (LoRA, SFT: the Trainer's loader) or glm-ft's
    own (a P-Tuning v2 prefix, gathered under ZeRO-3): final/ holds exactly its saved weights, and the final
    evaluation's numbers are those that checkpoint's evaluation during training logged. An evaluation and a
    checkpoint every step; at a learning rate of 2e-2 the 3rd step's eval_rouge-l beats the 4th's (LoRA, SFT), and
    P-Tuning v2's four evaluations tie, so the 1st step's checkpoint is the best."""
    from best_model_helpers import EVAL_SCORES, best_step, eval_history, eval_scores, same_tensors, tensors

    run_dir = tmp_path / "run"
    prefix = ["method.num_virtual_tokens=4"] if method == "ptuning_v2" else []
    result = run([sys.executable], stage, run_dir, tmp_path, f"method={method}", *prefix, "training_args.max_steps=4",
                 "training_args.save_steps=1", "training_args.eval_steps=1", "eval_subset=4",
                 "training_args.per_device_train_batch_size=4", "training_args.generation_config.max_new_tokens=8",
                 "training_args.learning_rate=2e-2", "training_args.load_best_model_at_end=true")
    assert result.returncode == 0, result.stderr[-3000:]
    state = run_dir / "final" / "training_log.json"
    evals = eval_history(state)
    assert sorted(evals) == list(range(1, 5))
    best = best_step(evals)
    final = tensors(run_dir / "final")
    assert same_tensors(final, tensors(run_dir / f"checkpoint-{best}"))
    if best != 4:  # on this project's machines: the check tells the best from the last
        assert not same_tensors(final, tensors(run_dir / "checkpoint-4"))
    assert json.loads((run_dir / "final" / "glm_ft_complete").read_text())["model_step"] == best
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    assert evaluated["step"] == best
    assert {key: evaluated[key] for key in EVAL_SCORES} == pytest.approx(eval_scores(state, best))


def test_zero3s_own_adamw_keeps_weight_decay_off_biases_and_norm_weights(tmp_path):
    """ZeRO-3's config brings DeepSpeed's AdamW, which transformers gave one flat parameter list: with
    training_args.weight_decay it decayed the biases and norm weights too (norm weights 1 → 0.5 ± lr in this step),
    unlike the Trainer's AdamW without DeepSpeed or without the section. Each weight after one step, against AdamW's
    first step from the base weights: w0 × (1 - lr × decay) moved by less than lr (Adam's first update is
    lr × g / (|g| + eps)), decay 0 for what transformers' Trainer exempts (biases, norm weights)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import glm_ft.chatglm3 as chatglm3
    from glm_ft.chatglm3.tiny import ensure_tiny_model

    chatglm3.register()

    base_dir = ensure_tiny_model(tmp_path / "tiny")
    lr, decay = 1e-2, 50.0
    result = run([sys.executable], 3, tmp_path / "run", tmp_path, f"model.path={base_dir}", "training_args.max_steps=1",
                 "training_args.save_steps=1", "training_args.eval_steps=1", "training_args.warmup_steps=0",
                 f"training_args.learning_rate={lr}", f"training_args.weight_decay={decay}")
    assert result.returncode == 0, result.stderr[-3000:]
    base = load_file(base_dir / "model.safetensors")
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert trained.keys() == base.keys()
    parameters = {name for name, _ in AutoModelForCausalLM.from_pretrained(base_dir).named_parameters()}
    exempt = {name for name in parameters if name.endswith(".bias") or "layernorm" in name}
    assert any(name.endswith("layernorm.weight") for name in exempt) and any(".bias" in name for name in exempt)
    for name, before in base.items():  # buffers (rotary inv_freq) are not trained
        expected = before * (1.0 if name in exempt or name not in parameters else 1 - lr * decay)
        assert (trained[name] - expected).abs().max() <= lr * (1 + 1e-4), name


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_under_torchrun(stage, tmp_path):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run(prefix, stage, tmp_path / "run", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(tmp_path / "run", stage, world_size=2, tmp_path=tmp_path)
    # ZeRO split the optimizer state between the two: DeepSpeed loads it into two processes only, and said so in a
    # traceback once the model had loaded
    checkpoint = tmp_path / "run" / "checkpoint-3"
    alone = run([sys.executable], stage, tmp_path / "alone", tmp_path, "training_args.max_steps=4",
                f"resume={checkpoint}")
    assert alone.returncode == 1 and "Traceback" not in alone.stderr, alone.stderr[-3000:]
    assert alone.stderr.strip().splitlines()[-1] == (
        f"error: resume: {checkpoint} holds DeepSpeed ZeRO state saved by 2 processes; resume it with 2 (e.g. "
        "python -m glm_ft.launch --nproc_per_node 2 train.py ...), not 1")
    assert not (tmp_path / "alone" / "finetune.yaml").exists()  # refused before anything was written or loaded
    # resume=auto on the finished run loads no ZeRO state: one process may say it is complete
    done = run([sys.executable], stage, tmp_path / "run", tmp_path, "resume=auto")
    assert done.returncode == 0 and "nothing to train" in done.stdout + done.stderr, done.stderr[-3000:]


def test_a_failed_run_still_tears_down_the_process_group(tmp_path, monkeypatch):
    """Left to interpreter shutdown, gloo can abort a finished rank (SIGABRT); finetune destroys the group itself."""
    import mlflow
    import torch.distributed as dist

    import glm_ft.train.finetune as finetune_module
    from conftest import compose

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that what finetune exports is undone after the test
        monkeypatch.delenv(key)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = compose(["experiment=quickstart", "deepspeed=zero2"])

    def train_that_fails(*_args):
        assert dist.is_initialized()  # glm-ft's one-process group, made before training as DeepSpeed needs it
        raise RuntimeError("boom in training")

    monkeypatch.setattr(finetune_module, "_train", train_that_fails)
    with pytest.raises(RuntimeError, match="boom in training"):
        finetune_module.finetune(cfg, tmp_path / "run", {})
    assert not dist.is_initialized()
    runs = mlflow.MlflowClient(uri).search_runs(mlflow.MlflowClient(uri).search_experiments()[0].experiment_id)
    assert [r.info.status for r in runs] == ["FAILED"]


LAUNCH = [sys.executable, "-m", "glm_ft.launch", "--nproc_per_node", "2"]


def test_a_failed_rank_under_glm_ft_launch_is_its_line_and_one_more(tmp_path):
    """torchrun's own report of a failed rank is a 30-line traceback below the rank's error."""
    result = run(LAUNCH, 3, tmp_path / "run", tmp_path, "method=freeze")  # freeze is refused under ZeRO-3
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    # each rank's own: both, or one when torchrun stopped the other (SIGTERM) before it printed
    assert lines.count("error: deepspeed: method=freeze does not run under ZeRO-3 (sharded parameters); choose "
                       "deepspeed=zero2 or none") in (1, 2)
    assert lines[-1].startswith(f"error: {ROOT / 'train.py'}: rank ") and "failed with exit code 1" in lines[-1]


def _process_states() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter), from /proc."""
    states = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            states[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return states


def test_ranks_whose_launcher_was_sigkilled_stop_and_the_run_ends_killed(tmp_path):
    """torchrun starts each rank in a session of its own: with the launcher SIGKILLed (the OOM killer, `kill -9`),
    nothing stopped them and they trained on. Each rank now stops itself once its launcher is gone."""
    import signal

    from lifecycle_helpers import background, wait_for

    env = launcher_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    log = tmp_path / "launch.log"
    cmd = [*LAUNCH, str(ROOT / "train.py"), *ARGS, "training_args.max_steps=100000", "deepspeed=zero2",
           f"hydra.run.dir={tmp_path / 'run'}"]
    ranks: list[int] = []
    try:
        with background(cmd, log, env=env) as proc:
            wait_for(lambda: "'loss'" in log.read_text(errors="replace"), "the first logged loss", proc, log)
            ranks = [pid for pid, (parent, _) in _process_states().items() if parent == proc.pid]
            assert len(ranks) == 2
            proc.kill()  # the launcher alone, not its ranks
            proc.wait()

        def ended() -> bool:
            states = _process_states()
            return all(pid not in states or states[pid][1] == "Z" for pid in ranks)

        wait_for(ended, "both ranks' end after their launcher's")
    finally:
        for pid in ranks:  # still ours (not a pid reused since): its command line is the rank's
            with contextlib.suppress(OSError):
                if b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "its launcher (pid" in text and "is gone; stopping" in text and "Traceback" not in text, text[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (killed,) = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    assert killed.info.status == "KILLED"


def test_sigterm_to_glm_ft_launch_stops_the_ranks_without_a_traceback(tmp_path):
    import signal

    from lifecycle_helpers import background, wait_for

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # (restored by conftest's environment_restored)
    log = tmp_path / "launch.log"
    cmd = [*LAUNCH, str(ROOT / "train.py"), *ARGS, "training_args.max_steps=100000", "deepspeed=zero2",
           f"hydra.run.dir={tmp_path / 'run'}"]
    with background(cmd, log, env=env) as proc:
        wait_for(lambda: "'loss'" in log.read_text(errors="replace"), "the first logged loss", proc, log)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.poll() is not None, "the launcher's end", may_exit=True)
    text = log.read_text(errors="replace")
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "glm_ft.launch: stopped by SIGTERM" in text and "Traceback" not in text, text[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (killed,) = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    assert killed.info.status == "KILLED"


# glm_ft.launch that stops itself (SIGSTOP) right after torchrun has sent the rank FIRST_RANK its SIGTERM, before it
# tells the other: a launcher descheduled under load, whose first rank has ended before the next is told.
PAUSING_LAUNCH = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler
close, first, held, paused = subprocess_handler.SubprocessHandler.close, int(os.environ["FIRST_RANK"]), [], []
def told_in_turn(self, death_sig=None):
    if death_sig != signal.SIGTERM or paused:
        return close(self, death_sig)
    if self.local_rank_id != first:
        return held.append(self)
    close(self, death_sig)
    paused.append(self)
    os.kill(os.getpid(), signal.SIGSTOP)
    for other in held:
        if other.proc.poll() is None:
            close(other, death_sig)
subprocess_handler.SubprocessHandler.close = told_in_turn
from glm_ft.launch import main
sys.exit(main())
"""


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("stop_at", ["GlmTrainer._save_checkpoint", "GlmTrainer.evaluation_loop"])
def test_sigterm_that_reaches_one_rank_long_before_the_other_inside_a_collective_is_the_stop(stop_at, first, tmp_path):
    """SIGTERM to glm_ft.launch while one rank is inside a checkpoint save's (an evaluation's) collective and the
    other, `first`, has not joined it: `first` gets torchrun's SIGTERM and ends, and the other's collective fails
    ("Connection closed by peer") before its own SIGTERM arrives. That failure is the launcher's stop, not an error
    with a traceback; rank 0 (told first or not) says it in its one line and ends the MLflow run KILLED."""
    import signal

    from lifecycle_helpers import STOPPING_TRAIN, background, stopped, wait_for

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "STOP_RANK": str(first),
           "FIRST_RANK": str(first)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # (restored by conftest's environment_restored)
    script = tmp_path / "stopping_train.py"  # torchrun runs a script file
    script.write_text(STOPPING_TRAIN)
    log, run_dir = tmp_path / "launch.log", tmp_path / "run"
    cmd = [sys.executable, "-c", PAUSING_LAUNCH, *LAUNCH[3:], str(script), f"glm_ft.train.trainer:{stop_at}", *ARGS,
           "deepspeed=zero2", f"hydra.run.dir={run_dir}"]
    ranks: list[int] = []
    try:
        with background(cmd, log, env=env) as proc:
            def first_stopped() -> int | None:  # at stop_at, which the other rank goes on into, up to its collective
                states = _process_states()
                ranks[:] = sorted(pid for pid, (parent, _) in states.items() if parent == proc.pid)
                return next((pid for pid in ranks if states[pid][1] == "T"), None)

            told = wait_for(first_stopped, f"rank {first} at {stop_at}", proc, log)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: stopped(proc), f"the launcher's pause once it has told rank {first}", proc, log)
            os.kill(told, signal.SIGCONT)  # it stops; the other, not told yet, waits for it in the collective

            def ended() -> bool:
                states = _process_states()
                return all(states.get(pid, (0, "Z"))[1] == "Z" for pid in ranks)

            wait_for(ended, "both ranks' end")
            proc.send_signal(signal.SIGCONT)
            wait_for(lambda: proc.poll() is not None, "the launcher's end", may_exit=True)
    finally:
        for pid in ranks:  # still ours (not a pid reused since): its command line is the rank's
            with contextlib.suppress(OSError):
                if script.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text and "Connection closed" not in text, text[-3000:]
    # counted in the text: a progress bar's last redraw may share the line that the stop is printed on
    assert text.count(f"interrupted at step 3; last complete checkpoint: none (continue with resume=auto "
                      f"hydra.run.dir={run_dir})\n") == 1, text[-3000:]
    assert text.rstrip().endswith("glm_ft.launch: stopped by SIGTERM"), text[-3000:]
    assert not (run_dir / "checkpoint-3" / "glm_ft_complete").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (killed,) = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    assert killed.info.status == "KILLED"

"""`python train.py ...` as a user runs it: dry runs, Hydra's own flags, and short clear errors."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, run_process, run_train
from glm_ft.config.schema import DATA_CACHE
from lifecycle_helpers import QUICK, signalled_at

HEAVY = ("torch", "transformers", "peft", "deepspeed", "mlflow", "datasets")


@pytest.fixture(scope="module")
def fake_6b(tmp_path_factory) -> dict[str, Path]:
    """A chatglm3-6b-shaped folder (config.json only: a dry run never reads weights) and AdvertiseGen files."""
    root = tmp_path_factory.mktemp("fake6b")
    model = root / "chatglm3-6b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "chatglm", "hidden_size": 4096}))
    data = root / "AdvertiseGen"
    data.mkdir()
    for name in ("train.json", "dev.json"):
        (data / name).write_text('{"content": "类型#裙", "summary": "好看"}\n', encoding="utf-8")
    return {"model": model, "data": data}


def test_dry_run_renders_and_loads_nothing_heavy(tmp_path, fake_6b):
    run_dir = tmp_path / "run"
    code = (
        "import sys; sys.argv = ['train.py', 'method=sft', 'dry_run=true', "
        f"'model.path={fake_6b['model']}', 'data.data_dir={fake_6b['data']}', 'hydra.run.dir={run_dir}'];"
        "from glm_ft.cli import main; main();"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = run_process([sys.executable, "-c", code], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    for name in ("finetune.yaml", "ds_config.json", "ds_config.resolved.json"):
        assert str(run_dir / name) in out.stdout
        assert (run_dir / name).is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    resolved = json.loads((run_dir / "ds_config.resolved.json").read_text())
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    finetune = OmegaConf.load(run_dir / "finetune.yaml")
    assert finetune.training_args.output_dir == str(run_dir)
    # The data files were checked, and recorded so that a later job on the same bytes skips reading them again
    recorded = {r.read_text(encoding="utf-8") for r in (DATA_CACHE / "checked").iterdir()}
    assert f"{fake_6b['data'] / 'train.json'}\n" in recorded


def test_quickstart_dry_run(tmp_path):
    out = run_train(["experiment=quickstart", "dry_run=true", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr
    finetune = OmegaConf.load(tmp_path / "finetune.yaml")
    assert finetune.data_config.train_file == "train.jsonl"
    assert "peft_config" not in finetune and "deepspeed" not in finetune.training_args


def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path):
    out = run_train(["--local_rank=0", "experiment=quickstart", "dry_run=true", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("flag, expect", [("--help", "method: freeze, lora, ptuning_v2, sft"),
                                          ("--cfg=job", "peft_type: LORA")])
def test_hydra_flags_keep_working(flag, expect):
    out = run_train([flag] if flag == "--help" else ["--cfg", "job"])
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout


@pytest.mark.parametrize("args, expect", [
    (["method=qlora"], "ptuning_v2"),
    (["method.r=abc"], "method.r"),
    (["method.rr=4"], "method.rr"),
    (["experiment=quickstart", "method=lora", "method.r=0"], "method.r: must be > 0"),
    (["experiment=quickstart", "method=lora", "method.lora_dropout=1.5"], "method.lora_dropout"),
    # glm-ft's own line (Hydra's was "Key 'r' not in 'SftMethod'" with a hint to append the key with '+').
    (["experiment=quickstart", "method.r=4"], "method.r: method=sft (full fine-tuning) takes no PEFT keys"),
    (["method=ptuning_v2", "method.num_virtual_tokens=-1", "experiment=quickstart"], "method.num_virtual_tokens"),
    (["method=sft", "+method.r=8", "experiment=quickstart"], "method.r"),
    (["max_output_length=0", "experiment=quickstart"], "max_output_length"),
    (["experiment=quickstart", "data.train_file=missing.jsonl"], "missing.jsonl"),
    (["experiment=quickstart", "training_args.fp16=true"], "training_args.fp16"),
    (["model.path=/nonexistent/glm"], "/nonexistent/glm"),
    (["experiment=quickstart", "deepspeed=zero2", "deepspeed.train_micro_batch_size_per_gpu=3"],
     "training_args.per_device_train_batch_size"),
])
def test_errors_are_short_and_name_the_key(args, expect, tmp_path):
    out = run_train([*args, "dry_run=true", f"hydra.run.dir={tmp_path}"])
    assert out.returncode != 0
    assert expect in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 12
    assert not (tmp_path / "finetune.yaml").exists()  # nothing half-written


def test_an_error_is_one_write_so_ranks_sharing_an_unbuffered_stderr_do_not_interleave(monkeypatch):
    """Under PYTHONUNBUFFERED (CI sets it, so do many clusters) print writes the line and its newline apart, and two
    ranks refusing the same config printed "error: Aerror: A" under glm_ft.launch."""
    import io

    from glm_ft.cli import main

    class Writes(io.RawIOBase):
        def __init__(self):
            super().__init__()
            self.seen: list[bytes] = []

        def writable(self):
            return True

        def fileno(self):  # faulthandler.enable, at the start of main
            return 2

        def write(self, data):
            self.seen.append(bytes(data))
            return len(data)

    raw = Writes()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, write_through=True))  # as Python's unbuffered stderr
    monkeypatch.setattr(sys, "argv", ["train.py", "methd=lora"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    assert len(raw.seen) == 1 and raw.seen[0].startswith(b"error: ") and raw.seen[0].endswith(b"\n"), raw.seen


@pytest.mark.slow
@pytest.mark.parametrize(("stop_at", "signum"), [
    ("glm_ft.config.validate:check_data_rows", signal.SIGTERM),  # the data check: no MLflow run yet
    ("glm_ft.config.validate:check_data_rows", signal.SIGINT),
    # inside MLflow's call that makes the run, which holds the signal until it returns: the run stayed RUNNING
    ("mlflow.tracking.client:MlflowClient.create_run", signal.SIGTERM),
    ("glm_ft.model:load_model_for_training", signal.SIGTERM),  # inside the job's MLflow run
], ids=["data_check_sigterm", "data_check_ctrl_c", "run_creation_sigterm", "model_loading_sigterm"])
def test_a_stop_before_training_says_so_in_one_line(stop_at, signum, tmp_path):
    """SIGTERM in a job's first seconds, before its MLflow run opened, ended it by the default action: exit 143 and
    not a word; Ctrl-C there, or either while the model loaded, printed a bare `interrupted`. A run made is KILLED."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    code, out = signalled_at(stop_at, signum, [*QUICK, "training_args.max_steps=2"], run_dir, env)
    assert code == 128 + signum and "Traceback" not in out, out[-3000:]
    said = [line.rpartition("\r")[2] for line in out.splitlines() if "interrupted" in line]
    assert said == ["interrupted before training started; nothing was trained or saved (continue with the same "
                    "command)"], out[-3000:]
    assert not list(run_dir.glob("checkpoint-*")) and not (run_dir / "final").exists()
    assert not list(run_dir.rglob("*.tmp"))  # nothing half-written
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if "check_data_rows" in stop_at:
        assert runs == [] and not (run_dir / "mlflow_run.json").exists()
    else:
        assert [r.info.status for r in runs] == ["KILLED"]
        assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == runs[0].info.run_id


@pytest.mark.slow
def test_a_resumed_job_stopped_before_its_checkpoint_loaded_says_the_step_it_resumes_from(tmp_path):
    """A resumed job stopped as its checkpoint loads (the Trainer's state still a fresh one's) said `interrupted at
    step 0`, and one resumed from another folder's checkpoint also `last complete checkpoint: none (continue with
    resume=auto ...)`, which in that folder starts from scratch. Now: the step of the checkpoint it resumes from,
    and a continuation that resumes from it."""
    from mlflow.tracking import MlflowClient

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first, other = tmp_path / "first", tmp_path / "other"
    trained = run_train([*QUICK, "training_args.max_steps=4", "training_args.save_steps=2",
                         f"hydra.run.dir={first}"], env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    more = [*QUICK, "training_args.max_steps=6", "training_args.save_steps=2"]

    def step_of(checkpoint: Path) -> int:  # the checkpoint's own record, as the Trainer restores it
        return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]

    def stop_line(signum: int, args: list[str], run_dir: Path) -> str:
        code, out = signalled_at("glm_ft.train.trainer:GlmTrainer._load_from_checkpoint", signum, args, run_dir, env)
        assert code == 128 + signum and "Traceback" not in out, out[-3000:]
        (said,) = [line.rpartition("\r")[2] for line in out.splitlines() if "interrupted" in line]
        return said

    checkpoint = first / "checkpoint-2"
    said = stop_line(signal.SIGTERM, [*more, f"resume={checkpoint}"], other)
    assert said == (f"interrupted before training resumed from step {step_of(checkpoint)}; last complete checkpoint: "
                    f"{checkpoint} (continue with resume={checkpoint} hydra.run.dir={other})"), said
    hint = said.rpartition("(continue with ")[2].rstrip(")").split()
    continued = run_train([*more, *hint], env=env)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert f"resuming from {checkpoint}" in continued.stdout + continued.stderr  # not from scratch
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(json.loads((other / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["glm_ft.resumed_from"] == str(checkpoint)
    assert step_of(other / "checkpoint-6") == 6

    checkpoint = first / "checkpoint-4"
    said = stop_line(signal.SIGINT, [*more, "resume=auto"], first)
    assert said == (f"interrupted before training resumed from step {step_of(checkpoint)}; last complete checkpoint: "
                    f"{checkpoint} (continue with resume=auto hydra.run.dir={first})"), said

"""glm_ft.tracking.tracker against a real MLflow SQLite store: what one job's run records, and how it ends."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, run_process

from glm_ft.errors import ConfigError
from glm_ft.config.render import render_run_files
from glm_ft.tracking.parent import PARENT_FILE, SWEPT_PARAMS_TAG
from glm_ft.tracking.signals import Terminated
from glm_ft.tracking.store import Store, ui_hint
from glm_ft.tracking.tracker import NullTracker, start_run


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its schema takes seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def client(store_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(store_uri)


@contextlib.contextmanager
def hydra_job(overrides: list[str], run_dir: Path, job_num: int = 0):
    """The composed task config, with HydraConfig set as Hydra sets it while a job runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import glm_ft.config.schema  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(full):
        full.hydra.runtime.output_dir = str(run_dir)
        full.hydra.job.num = job_num
    HydraConfig.instance().set_config(full)
    task = copy.deepcopy(full)
    with open_dict(task):
        del task["hydra"]
    try:
        yield task
    finally:
        HydraConfig.instance().cfg = None


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_finished_run_records_config_tags_metrics_and_files(tmp_path, client, store_uri):
    run_dir = tmp_path / "run"
    long_name = "t" * 13000 + ".jsonl"
    overrides = ["experiment=quickstart", "method=lora", "deepspeed=zero2", "tracking.experiment_name=finished",
                 f"data.train_file={long_name}"]
    with hydra_job(overrides, run_dir) as cfg:
        render_run_files(cfg, run_dir, 64)
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        (run_dir / "final").mkdir()
        (run_dir / "final" / "adapter_model.safetensors").write_bytes(b"weights")
        extra = tmp_path / "notes.txt"
        extra.write_text("hello")
        with start_run(cfg, run_dir) as tracker:
            tracker.log_metrics({"data.train.rows_read": 400, "note": "not a number"})
            for step, loss in ((1, 2.0), (2, 1.5), (2, 1.5)):
                tracker.log_metrics({"loss": loss, "eval_rouge-l": 30.0 + step}, step=step)
            tracker.log_artifact(extra, "extra")
            tracker.set_tags({"custom": 7})
            (run_dir / "predictions.jsonl").write_text('{"prediction": "好"}\n', encoding="utf-8")

    run = only_run(client, "finished")
    assert run.info.status == "FINISHED"
    # Named after the overrides (tracking.* excluded), cut to what the MLflow UI shows.
    assert run.info.run_name.startswith("data.train_file=ttt") and len(run.info.run_name) == 250
    params = run.data.params
    assert params["method.r"] == "8" and params["method.lora_alpha"] == "32"
    assert params["training_args.learning_rate"] == str(cfg.training_args.learning_rate)
    assert params["method.target_modules"] == '["query_key_value"]'
    assert params["deepspeed.zero_optimization.stage"] == "2"
    assert "data.train_file" not in params
    assert "".join(params[f"data.train_file.{i}"] for i in range(3)) == long_name

    tags = run.data.tags
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags["glm_ft.git_commit"] == (commit.stdout.strip() or "unknown")
    assert (tags["glm_ft.method"], tags["glm_ft.deepspeed"], tags["glm_ft.data"], tags["glm_ft.model"]) == \
        ("lora", "zero2", "sample", "tiny")
    assert tags["glm_ft.experiment"] == "quickstart"
    # Tags have a length limit: the long override is cut (the params above keep it whole).
    assert tags["glm_ft.overrides"].startswith(" ".join(overrides[:4]) + " data.train_file=ttt")
    assert len(tags["glm_ft.overrides"]) == 8000 and tags["glm_ft.overrides"].endswith("...")
    assert tags["glm_ft.run_dir"] == str(run_dir.resolve())
    assert tags["custom"] == "7" and "mlflow.parentRunId" not in tags

    assert run.data.metrics["data.train.rows_read"] == 400 and "note" not in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5)]  # the repeat is not a new point

    assert artifact_paths(client, run.info.run_id) >= {
        "finetune.yaml", "ds_config.json", "ds_config.resolved.json", "predictions.jsonl", ".hydra/config.yaml",
        "model/adapter_model.safetensors", "extra/notes.txt"}
    artifact_uri = run.info.artifact_uri
    assert artifact_uri.startswith(str(Path(store_uri[len("sqlite:///"):]).parent / "mlartifacts"))


def test_exception_fails_the_run_and_propagates_unchanged(tmp_path, client):
    run_dir = tmp_path / "run"
    with hydra_job(["experiment=quickstart", "tracking.experiment_name=failed"], run_dir) as cfg:
        render_run_files(cfg, run_dir, 64)
        err = ValueError("boom at step 3")
        with pytest.raises(ValueError) as caught:
            with start_run(cfg, run_dir):
                raise err
    assert caught.value is err
    run = only_run(client, "failed")
    assert run.info.status == "FAILED"
    assert run.data.tags["glm_ft.error"] == "ValueError: boom at step 3"
    assert "finetune.yaml" in artifact_paths(client, run.info.run_id)  # a failed run keeps its files too


def test_a_failed_run_resumed_to_its_end_keeps_no_error_tag(tmp_path, client):
    """The resume continues the failed run (a full disk, a trial its dead sweep closed): FINISHED, without the tag
    that said why the earlier end failed (an MLflow search for tags.glm_ft.error found finished runs)."""
    run_dir = tmp_path / "run"
    with hydra_job(["experiment=quickstart", "tracking.experiment_name=failed_then_resumed"], run_dir) as cfg:
        render_run_files(cfg, run_dir, 64)
        with pytest.raises(ValueError):
            with start_run(cfg, run_dir):
                raise ValueError("No space left on device")
    assert only_run(client, "failed_then_resumed").data.tags["glm_ft.error"] == "ValueError: No space left on device"
    overrides = ["experiment=quickstart", "tracking.experiment_name=failed_then_resumed", "resume=auto"]
    with hydra_job(overrides, run_dir) as cfg:
        with start_run(cfg, run_dir):
            pass
    run = only_run(client, "failed_then_resumed")
    assert (run.info.status, run.data.tags["glm_ft.resumes"]) == ("FINISHED", "1")
    assert "glm_ft.error" not in run.data.tags


def test_ctrl_c_ends_the_run_killed(tmp_path, client):
    with hydra_job(["experiment=quickstart", "tracking.experiment_name=interrupted"], tmp_path) as cfg:
        with pytest.raises(KeyboardInterrupt):
            with start_run(cfg, tmp_path):
                raise KeyboardInterrupt
    assert only_run(client, "interrupted").info.status == "KILLED"


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_inside_an_mlflow_write_still_ends_the_run_killed(signum, raised, tmp_path, client):
    """Ctrl-C or SIGTERM lands right after an INSERT, inside MLflow's transaction: the write completes, then the
    signal acts and the run ends KILLED."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    fired = []

    def interrupt_after_first_insert(_conn, _cursor, statement, *_args):
        # The metric's own INSERT: a tag or param write of the sender may come first on a loaded machine.
        if not fired and statement.lstrip().upper().startswith("INSERT INTO METRICS"):
            fired.append(statement)
            os.kill(os.getpid(), signum)

    experiment = f"interrupted_write_{signum}"
    with hydra_job(["experiment=quickstart", f"tracking.experiment_name={experiment}"], tmp_path) as cfg:
        with pytest.raises(raised):
            with start_run(cfg, tmp_path) as tracker:
                event.listen(Engine, "after_cursor_execute", interrupt_after_first_insert)
                try:
                    tracker.log_metrics({"loss": 1.5}, step=7)
                    tracker.sender.flush(timeout_s=600)  # the write happens in the sender thread: wait for it
                finally:
                    event.remove(Engine, "after_cursor_execute", interrupt_after_first_insert)
    assert fired
    run = only_run(client, experiment)
    assert run.info.status == "KILLED"
    assert run.data.metrics["loss"] == 1.5  # the write the signal arrived in was completed, not torn


def test_sft_weights_are_a_path_tag_unless_asked_for(tmp_path, client):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"gigabytes")
    for full in ("false", "true"):
        name = f"sft-{full}"
        with hydra_job(["experiment=quickstart", "method=sft", f"tracking.log_full_model={full}",
                        f"tracking.experiment_name={name}"], tmp_path) as cfg:
            with start_run(cfg, tmp_path):
                pass
        run = only_run(client, name)
        assert run.data.tags["glm_ft.model_path"] == str((tmp_path / "final").resolve())
        logged = "model/model.safetensors" in artifact_paths(client, run.info.run_id)
        assert logged == (full == "true")


def test_sigterm_under_someone_elses_handler_marks_killed_and_defers(tmp_path, client):
    """submitit handles SIGTERM itself (it ignores it): the run is marked KILLED at once, the process goes on."""
    received = []

    def theirs(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, theirs)
    try:
        with hydra_job(["experiment=quickstart", "tracking.experiment_name=foreign"], tmp_path) as cfg:
            with start_run(cfg, tmp_path) as tracker:
                os.kill(os.getpid(), signal.SIGTERM)
                assert received == [signal.SIGTERM]
                assert client.get_run(tracker.run_id).info.status == "KILLED"
        # It survived and finished: the final status says so.
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert signal.getsignal(signal.SIGTERM) is theirs  # given back
    finally:
        signal.signal(signal.SIGTERM, previous)


SIGTERM_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import compose
from glm_ft.tracking.tracker import start_run
cfg = compose(["experiment=quickstart", "tracking.experiment_name=sigterm"])
with start_run(cfg, {run_dir!r}) as tracker:
    print(tracker.run_id, flush=True)
    time.sleep(120)
"""


def test_sigterm_ends_the_run_killed_and_exits(tmp_path, client):
    code = SIGTERM_SCRIPT.format(tests=str(ROOT / "tests"), run_dir=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        assert client.get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert client.get_run(run_id).info.status == "KILLED"


def test_child_of_a_sweep_is_nested_and_named_after_its_swept_override(tmp_path, client):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    overrides = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}", "experiment=quickstart", "method=lora",
                 "method.r=4", "tracking.experiment_name=nested"]
    with hydra_job(overrides, sweep_dir / "1", job_num=1) as cfg:
        store = Store(cfg.tracking)
        parent_id = store.create_run("sweep", {SWEPT_PARAMS_TAG: json.dumps(["method.r"])})
        (sweep_dir / PARENT_FILE).write_text(parent_id + "\n")
        with start_run(cfg, sweep_dir / "1") as tracker:
            child_id = tracker.run_id
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.info.run_name == "method.r=4"
    assert child.data.tags["glm_ft.job_num"] == "1"


def test_disabled_or_other_rank_logs_nothing(tmp_path, client, monkeypatch):
    from transformers import TrainerCallback

    from glm_ft.train.trainer import TrackerCallback

    with hydra_job(["experiment=quickstart", "tracking.enabled=false", "tracking.experiment_name=off"],
                   tmp_path) as cfg:
        with start_run(cfg, tmp_path) as tracker:
            assert isinstance(tracker, NullTracker)
            tracker.log_metrics({"loss": 1.0}, step=1)
            tracker.log_artifact(tmp_path / "missing.txt")
            tracker.set_tags({"a": "b"})
            assert isinstance(TrackerCallback(tracker), TrainerCallback)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with hydra_job(["experiment=quickstart", "tracking.experiment_name=rank1"], tmp_path) as cfg:
        with start_run(cfg, tmp_path) as tracker:
            assert isinstance(tracker, NullTracker)
    assert client.get_experiment_by_name("off") is None and client.get_experiment_by_name("rank1") is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_at_once_naming_the_uri(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    with hydra_job(["experiment=quickstart", f"tracking.tracking_uri={uri}"], tmp_path) as cfg:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with pytest.raises(ConfigError, match=f"tracking.tracking_uri: MLflow tracking server {uri} is unreachable"):
            with start_run(cfg, tmp_path):
                pytest.fail("the job body must not run")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri + "/")
        with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: MLflow tracking server"):
            with start_run(cfg, tmp_path):
                pytest.fail("the job body must not run")


def test_trainer_callback_logs_the_trainers_metrics_at_their_steps(tmp_path, client):
    import torch
    from transformers import Trainer, TrainingArguments

    from glm_ft.train.trainer import TrackerCallback

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    data = [{"x": torch.tensor([float(i), 1.0]), "labels": torch.tensor(float(i % 3))} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, logging_steps=1, report_to="none",
                             use_cpu=True, per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True,
                             learning_rate=0.1)
    with hydra_job(["experiment=quickstart", "tracking.experiment_name=trainer"], tmp_path) as cfg:
        with start_run(cfg, tmp_path) as tracker:
            trainer = Trainer(model=Toy(), args=args, train_dataset=data, eval_dataset=data[:4],
                              callbacks=[TrackerCallback(tracker)])
            trainer.train()
            trainer.evaluate()
    run = only_run(client, "trainer")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "learning_rate")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [3]
    assert {"train_runtime", "train_samples_per_second", "eval_runtime"} <= set(run.data.metrics)


def test_import_is_light():
    code = ("import sys, glm_ft.tracking.tracker, glm_ft.search.sweep, glm_ft.tracking.compare; "
            "print([m for m in ('mlflow', 'torch', 'transformers', 'matplotlib') if m in sys.modules])")
    out = run_process([sys.executable, "-c", code], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_ui_hint_is_a_command_that_works_where_the_run_was_started(tmp_path, monkeypatch):
    """From another folder `make ui` finds no Makefile: the hint names the checkout's (make -C), and `make -n`
    shows it would serve that store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(ROOT)
    assert f"`make ui UI_STORE={uri}`" in ui_hint(uri)
    monkeypatch.chdir(tmp_path)
    hint = ui_hint(uri)
    command = hint.split("`")[1]
    assert command == f"make -C {ROOT} ui UI_STORE={uri}"
    dry = run_process([*command.replace("make", "make -n", 1).split()], cwd=tmp_path)
    assert dry.returncode == 0 and f'--backend-store-uri "{uri}"' in dry.stdout, dry.stdout + dry.stderr
    assert ui_hint("http://127.0.0.1:5000") == "open http://127.0.0.1:5000"

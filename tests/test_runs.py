"""The run folder's protocol (glm_ft.runs): which checkpoints count, what resume and inference pick, the stages done.

The folders are laid out as a training leaves them (checkpoint-N/ with or without the marker, final/), through the
same functions training writes them with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glm_ft import runs
from glm_ft.errors import CheckpointError


def _run_folder(tmp_path, complete_steps, half_written_steps=()):
    run = tmp_path / "run"
    for step in (*complete_steps, *half_written_steps):
        ckpt = runs.checkpoint_dir(run, step)
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if step in complete_steps:
            runs.mark_complete(ckpt, step)
    runs.write_run_info(run, {"base_model": "/models/base", "method": {"name": "lora"}})
    return run


def test_complete_checkpoints_are_ordered_by_step_and_skip_half_written_ones(tmp_path):
    # 10 sorts before 2 and 4 as text; checkpoint-12 lacks its marker (a crash while saving it)
    run = _run_folder(tmp_path, complete_steps=(2, 10, 4), half_written_steps=(12,))
    assert [p.name for p in runs.complete_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert runs.last_complete_checkpoint(run) == run / "checkpoint-10"
    assert runs.resume_checkpoint("auto", run) == str(run / "checkpoint-10")
    assert runs.newest_complete(run) == run / "checkpoint-10"
    assert runs.is_run_folder(run) and not runs.is_run_folder(run / "checkpoint-2")
    assert json.loads((run / runs.RUN_INFO).read_text())["base_model"] == "/models/base"


def test_final_wins_once_marked_and_records_its_step(tmp_path):
    run = _run_folder(tmp_path, complete_steps=(2,))
    (run / runs.FINAL).mkdir()
    assert runs.newest_complete(run) == run / "checkpoint-2" and runs.final_step(run) is None  # unmarked final/
    runs.mark_complete(run / runs.FINAL, 8)
    assert runs.newest_complete(run) == run / runs.FINAL and runs.final_step(run) == 8


def test_resume_without_checkpoints_and_with_explicit_paths(tmp_path, caplog):
    run = _run_folder(tmp_path, complete_steps=(), half_written_steps=(2,))
    assert runs.resume_checkpoint(None, run) is None
    assert runs.resume_checkpoint("auto", run) is None and "starting from scratch" in caplog.text
    with pytest.raises(CheckpointError, match="without a complete checkpoint"):
        runs.newest_complete(run)
    # an explicit path: a Trainer checkpoint (trainer_state.json) is taken even without the marker
    assert runs.resume_checkpoint(str(run / "checkpoint-2"), run) == str(run / "checkpoint-2")
    with pytest.raises(CheckpointError, match="not a complete glm-ft checkpoint"):
        runs.resume_checkpoint(str(tmp_path / "elsewhere"), run)


def test_progress_records_stages_until_reset(tmp_path):
    assert runs.read_progress(tmp_path) == {}
    runs.record_progress(tmp_path, evaluated={"eval_loss": 1.5})
    runs.record_progress(tmp_path, complete=True, step=4)
    assert runs.read_progress(tmp_path) == {"evaluated": {"eval_loss": 1.5}, "complete": True, "step": 4}
    (tmp_path / runs.PROGRESS_FILE).write_text("{half")  # unreadable counts as nothing done
    assert runs.read_progress(tmp_path) == {}
    runs.reset_progress(tmp_path)
    assert not (tmp_path / runs.PROGRESS_FILE).exists()


def test_inference_finds_checkpoints_without_importing_training_or_torch(tmp_path):
    """Finding a checkpoint (and failing on a wrong path) takes no heavy import: chat/predict/export fail at once."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer.model").write_bytes(b"")
    run = _run_folder(tmp_path, complete_steps=(2,))
    runs.write_run_info(run, {"base_model": str(base), "method": {"name": "lora"}})
    (run / "checkpoint-2" / "adapter_config.json").write_text("{}")
    code = ("import sys; from glm_ft.infer.checkpoint import find_checkpoint; "
            f"ckpt = find_checkpoint({str(run)!r}); print(ckpt.path.name, ckpt.kind, ckpt.base_model.name); "
            "print(sorted(m for m in sys.modules if m.startswith(('glm_ft.train', 'torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["checkpoint-2 lora base", "[]"]


def test_rotation_keeps_the_newest_complete_checkpoints_and_drops_older_half_written_ones(tmp_path):
    # checkpoint-3 is a save a kill cut short; checkpoint-9 is being saved now (no marker yet); checkpoint-best is
    # a user's folder, not a step
    run = _run_folder(tmp_path, complete_steps=(2, 4, 6, 8), half_written_steps=(3, 9))
    (run / "checkpoint-best").mkdir()
    assert runs.rotate_checkpoints(run, None, keep=[run / "checkpoint-8"]) == []
    # as transformers counts: the kept ones (the newest, the best) are within the limit
    gone = runs.rotate_checkpoints(run, 2, keep=[run / "checkpoint-8", str(run / "checkpoint-2")])  # 2: the best
    assert sorted(p.name for p in gone) == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8", "checkpoint-9",
                                                               "checkpoint-best"]
    runs.rotate_checkpoints(run, 1, keep=[run / "checkpoint-8"])
    assert [p.name for p in runs.complete_checkpoints(run)] == ["checkpoint-8"]


def test_a_resume_is_told_every_data_input_it_changes_that_its_checkpoint_recorded(tmp_path):
    """The record a checkpoint keeps of what its steps trained beyond the Trainer's arguments, against a resume's.
    The world size case here: the end-to-end two-process case is tests/train/test_finetune.py's."""
    ckpt = _run_folder(tmp_path, complete_steps=(2,)) / "checkpoint-2"
    saved = {"data.train_file": "/d/train.jsonl", "data.train_sha256": "aa", "max_input_length": 64,
             "max_output_length": 64, "data.packing": True, "data.pack_max_length": 129, "world_size": 2}
    assert runs.changed_data_inputs(ckpt, saved) == []  # no record (a checkpoint from before): nothing known
    runs.write_json(ckpt / runs.DATA_ORDER_RECORD, saved)
    assert runs.changed_data_inputs(ckpt, saved) == []
    assert runs.changed_data_inputs(ckpt, {**saved, "world_size": 1}) == ["number of processes 2 -> 1"]
    assert runs.changed_data_inputs(ckpt, {**saved, "data.train_file": "/e/train.jsonl"}) == []  # same bytes
    assert runs.changed_data_inputs(ckpt, {**saved, "data.train_sha256": "bb"}) == [
        "data.train_file /d/train.jsonl (other contents)"]  # edited in place
    everything = {"data.train_file": "/e/t.json", "data.train_sha256": "bb", "max_input_length": 32,
                  "max_output_length": 16, "data.packing": True, "data.pack_max_length": 256, "world_size": 4}
    assert runs.changed_data_inputs(ckpt, everything) == [
        "data.train_file /d/train.jsonl -> /e/t.json (other contents)", "max_input_length 64 -> 32",
        "max_output_length 64 -> 16", "data.pack_max_length 129 -> 256", "number of processes 2 -> 4"]
    # unpacked there is no budget to compare: packing itself is the change
    assert runs.changed_data_inputs(ckpt, {**saved, "data.packing": False, "data.pack_max_length": None}) == [
        "data.packing true -> false"]
    # a key a record lacks (an older glm-ft kept fewer) is not compared
    runs.write_json(ckpt / runs.DATA_ORDER_RECORD, {"max_input_length": 64})
    assert runs.changed_data_inputs(ckpt, {**saved, "world_size": 1}) == []


def test_a_resume_is_told_the_dtype_it_changes_apart_from_the_data_order(tmp_path):
    """The record also keeps the dtype the weights loaded in ("auto" resolved): another one is a change of
    precision, not of the rows the steps train; a record without it (an older glm-ft's) is not compared."""
    ckpt = _run_folder(tmp_path, complete_steps=(2,)) / "checkpoint-2"
    saved = {"model.torch_dtype": "float32", "max_input_length": 64, "world_size": 1}
    runs.write_json(ckpt / runs.DATA_ORDER_RECORD, saved)
    now = {**saved, "model.torch_dtype": "bfloat16"}
    assert runs.changed_precision_inputs(ckpt, now) == ["model.torch_dtype float32 -> bfloat16"]
    assert runs.changed_data_inputs(ckpt, now) == []
    assert runs.changed_precision_inputs(ckpt, saved) == []
    runs.write_json(ckpt / runs.DATA_ORDER_RECORD, {"max_input_length": 64})
    assert runs.changed_precision_inputs(ckpt, now) == []

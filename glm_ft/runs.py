"""The run folder's protocol, shared by training (which writes it) and inference (which reads it).

    RUN_DIR/
      glm_ft_run.json          RUN_INFO: base model, method, lengths: what chat/predict/export need to reopen it
      checkpoint-N/            a Trainer checkpoint; counts once COMPLETE_MARKER is in it
        glm_ft_data_order.json DATA_ORDER_RECORD: the data and layout its steps trained (changed_data_inputs) and
                               the dtype its weights loaded in (changed_precision_inputs)
      final/                   the trained model; COMPLETE_MARKER records the step training finished at
      glm_ft_progress.json     PROGRESS_FILE: the stages done (evaluated, predicted, complete), for resume=auto
      predictions.jsonl, eval_predictions.jsonl, eval_metrics.json
      mlflow_run.json          the folder's MLflow run (glm_ft.tracking.run_record)

A checkpoint without its marker is one a crash left half-written: resume and inference never pick it up.
Light: this module imports nothing heavy, so inference can find a checkpoint (and fail on a wrong path) at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from glm_ft.atomic import write_text_atomic
from glm_ft.errors import CheckpointError

log = logging.getLogger("glm_ft")

RUN_INFO = "glm_ft_run.json"
COMPLETE_MARKER = "glm_ft_complete"
FINAL = "final"
PROGRESS_FILE = "glm_ft_progress.json"
PREDICTIONS = "predictions.jsonl"
EVAL_PREDICTIONS = "eval_predictions.jsonl"
CURVES_FILE = "training_curves.png"
# The Trainer's state (log_history among it) in each checkpoint-N/; in final/, as training ended, under another name:
# a trainer_state.json there would make `resume=RUN/final` continue at that step without the optimizer and schedule
# state, which final/ does not hold (it starts a new schedule from final/'s weights).
TRAINER_STATE = "trainer_state.json"
FINAL_LOG = "training_log.json"
EVAL_METRICS = "eval_metrics.json"
# A P-Tuning v2 checkpoint's files (glm_ft.chatglm3.prefix writes them): named here, where finding a checkpoint can
# read them without importing torch.
PREFIX_WEIGHTS = "prefix_encoder.safetensors"
PREFIX_CONFIG = "prefix_config.json"
# What decides which rows a step trains beyond the Trainer's arguments (its training_args.json has those): the
# training file's contents, the lengths samples are cut to, packing, the number of processes sharing the batches;
# and beside them, the dtype the model's weights loaded in (PRECISION_KEYS).
DATA_ORDER_RECORD = "glm_ft_data_order.json"
# The record's keys that say in what precision the steps computed, not which rows they trained.
PRECISION_KEYS = ("model.torch_dtype",)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


def mark_complete(folder: Path, step: int, **facts: Any) -> None:
    write_text_atomic(Path(folder) / COMPLETE_MARKER, json.dumps({"step": step, **facts}) + "\n")


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint-N folders, complete or not, by step."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=_step)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint-N folders, oldest first."""
    return [p for p in _checkpoints(run_dir) if is_complete(p)]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    return (complete_checkpoints(run_dir) or [None])[-1]


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: list[Path | str | None]) -> list[Path]:
    """Delete complete checkpoints beyond the newest `limit` (never those in `keep`: the one just saved, the best),
    and incomplete ones older than the newest complete one (saves a kill cut short). Called once the newest is
    marked complete, so that a kill at any moment leaves one to resume from; transformers' own rotation ran before
    the marker, and with save_total_limit=1 left none."""
    if not limit:
        return []
    kept = {Path(k).resolve() for k in keep if k}
    found = _checkpoints(run_dir)
    complete = [p for p in found if is_complete(p)]
    surplus = max(len(complete) - max(limit, len(kept)), 0)
    doomed = [p for p in complete if p.resolve() not in kept][:surplus]
    if complete:
        doomed += [p for p in found if not is_complete(p) and _step(p) < _step(complete[-1])]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at: its trainer_state.json's, else its name's (0 if neither says)."""
    try:
        return int(json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        name = Path(checkpoint).name
        return _step(Path(checkpoint)) if name.startswith("checkpoint-") and name[11:].isdigit() else 0


def disown_later(run_dir: Path, start_step: int) -> list[Path]:
    """A training starting at `start_step` (0: from scratch) in a folder that holds checkpoints past it, or final/,
    made them another training's: they stop counting as complete (their markers go; their files stay until this
    training saves over them), so that neither resume=auto nor inference takes them for this training's."""
    stale = [p for p in complete_checkpoints(run_dir) if _step(p) > start_step]
    stale += [Path(run_dir) / FINAL] if is_complete(Path(run_dir) / FINAL) else []
    for path in stale:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
    return stale


def newest_complete(run_dir: Path) -> Path:
    """What inference opens in a run folder: final/, or else the newest complete checkpoint."""
    if is_complete(Path(run_dir) / FINAL):
        return Path(run_dir) / FINAL
    found = last_complete_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: run folder without a complete checkpoint (no {FINAL}/ and no "
                              f"checkpoint-N/ with {COMPLETE_MARKER})")
    return found


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint `resume` (None, "auto" or a path) names; None to start from scratch."""
    if resume is None:
        return None
    if resume == "auto":
        found = last_complete_checkpoint(run_dir)
        if found is None:
            log.warning("resume=auto: no complete checkpoint in %s, starting from scratch", run_dir)
            return None
        return str(found)
    path = Path(resume).expanduser().resolve()
    problem = not_resumable(path, resume)
    if problem:
        raise CheckpointError(problem)
    return str(path)


def not_resumable(path: Path, shown: str) -> str | None:
    """Why the folder `path` (given as `shown`) is no checkpoint to resume from; None if it is one."""
    if (path / TRAINER_STATE).is_file():
        return None
    if is_complete(path):  # final/: the model alone, which transformers' resume can't continue
        return (f"resume: '{shown}' is a run's final model, not a checkpoint (no optimizer, schedule or trainer "
                f"state); use resume=auto hydra.run.dir=<its run folder> (with a larger training_args.max_steps to "
                f"train on), or resume=<run folder>/checkpoint-N")
    return f"resume: '{shown}' is not a complete glm-ft checkpoint (no {TRAINER_STATE})"


def zero_world_size(checkpoint: Path) -> int | None:
    """How many processes saved a DeepSpeed ZeRO checkpoint (one optimizer shard each, in the folder its `latest`
    names); None for a checkpoint without ZeRO state."""
    try:
        tag = (Path(checkpoint) / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return len(list((Path(checkpoint) / tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def check_resume_world_size(resume: str | None, run_dir: Path, world_size: int) -> None:
    """ZeRO splits the optimizer state between the processes that saved it, and DeepSpeed loads it only into as many
    (it says so once the model has loaded): refused before, in one line. The caller skips it when resume=auto will
    only reopen final/ (whole weights; `finished_step`)."""
    if resume is None:
        return
    checkpoint = last_complete_checkpoint(run_dir) if resume == "auto" else Path(resume).expanduser().resolve()
    saved = zero_world_size(checkpoint) if checkpoint is not None else None
    if saved is not None and saved != world_size:
        raise CheckpointError(f"resume: {checkpoint} holds DeepSpeed ZeRO state saved by {saved} processes; resume "
                              f"it with {saved} (e.g. python -m glm_ft.launch --nproc_per_node {saved} train.py ...), "
                              f"not {world_size}")


def changed_data_inputs(checkpoint: Path, now: dict[str, Any]) -> list[str]:
    """What a resume with the data inputs `now` changes from those its checkpoint recorded (DATA_ORDER_RECORD), one
    phrase each. A checkpoint without the record (saved before glm-ft kept it) says nothing: nothing is known."""
    saved = read_json(Path(checkpoint) / DATA_ORDER_RECORD) or {}

    def differs(key: str) -> bool:
        return key in saved and key in now and saved[key] != now[key]

    changed = []
    if differs("data.train_sha256"):  # the same bytes at another path are the same rows: only contents count
        old, new = saved.get("data.train_file"), now.get("data.train_file")
        changed.append(f"data.train_file {new} (other contents)" if old == new
                       else f"data.train_file {old} -> {new} (other contents)")
    keys = ["max_input_length", "max_output_length", "data.packing"]
    if saved.get("data.packing") and now.get("data.packing"):
        keys.append("data.pack_max_length")  # the budget the rows were packed to; unpacked, there is none
    changed += [f"{key} {shown_value(saved[key])} -> {shown_value(now[key])}" for key in keys if differs(key)]
    if differs("world_size"):
        changed.append(f"number of processes {saved['world_size']} -> {now['world_size']}")
    return changed


def changed_precision_inputs(checkpoint: Path, now: dict[str, Any]) -> list[str]:
    """The PRECISION_KEYS a resume with `now` changes from its checkpoint's DATA_ORDER_RECORD, one phrase each
    (nothing for a checkpoint saved before the record held them)."""
    saved = read_json(Path(checkpoint) / DATA_ORDER_RECORD) or {}
    return [f"{key} {saved[key]} -> {now[key]}" for key in PRECISION_KEYS
            if key in saved and key in now and saved[key] != now[key]]


def shown_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)  # as a config sets it


def final_record(run_dir: Path) -> dict[str, Any]:
    """final/'s marker: the step it was trained to, and how long the training was set to be; {} without one."""
    try:
        record = json.loads((Path(run_dir) / FINAL / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def finished_step(run_dir: Path, max_steps: int, num_train_epochs: float) -> int | None:
    """The step final/ was trained to, if that is the whole training asked for now: `max_steps` when > 0, else
    `num_train_epochs` (against the epochs final/ records), or where early stopping ended it; None when there is
    more to train (resume=auto trains on from the newest checkpoint) or no final/."""
    step = final_step(run_dir)
    if step is None:
        return None
    if final_record(run_dir).get("stopped_early"):
        return step  # its patience ran out (training_args.early_stopping_patience): training on would not improve
    if max_steps > 0:
        return step if step >= max_steps else None
    trained = final_record(run_dir).get("epoch")
    return step if trained is None or trained + 1e-9 >= num_train_epochs else None


def final_step(run_dir: Path) -> int | None:
    """The step final/ was trained to, from its marker; None without a (readable) one."""
    try:
        step = int(final_record(run_dir).get("step", -1))
    except (TypeError, ValueError):
        return None
    return step if step >= 0 else None


def is_run_folder(path: Path) -> bool:
    return (Path(path) / RUN_INFO).is_file()


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RUN_INFO, info)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A run folder's record, written atomically: a kill leaves the old version or the new, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A run folder's record; None when missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_progress(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / PROGRESS_FILE) or {}


def record_progress(run_dir: Path, **stages: Any) -> None:
    progress = read_progress(run_dir)
    progress.update(stages)
    write_json(Path(run_dir) / PROGRESS_FILE, progress)


def reset_progress(run_dir: Path) -> None:
    """A training that starts (or continues) makes the stages an earlier training of this folder finished stale."""
    (Path(run_dir) / PROGRESS_FILE).unlink(missing_ok=True)

"""data.packing: how rows are planned and laid out, and a real quickstart run that trains on packed rows.
The maths (packed = unpacked losses and gradients) is tests/chatglm3/test_segments.py."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from glm_ft.data.collate import IGNORE_INDEX
from glm_ft.data.packing import LENGTHS, PackedCollator, pack_dataset, plan_rows
from tests.conftest import run_train


def test_plan_rows_places_every_sample_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(500)]
    rows = plan_rows(lengths, 64)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # best fit packs tightly: no two rows could be merged into one
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert loads[0] + loads[1] > 64
    assert len(rows) < len(lengths) / 2


def test_plan_rows_refuses_a_sample_over_the_budget():
    with pytest.raises(ValueError, match="longer than the packing budget 8"):
        plan_rows([3, 9], 8)


def test_packed_rows_concatenate_samples_and_mask_each_first_token():
    import datasets

    samples = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3, 4], [5, 6, 7], [8, 9]],
        "labels": [[IGNORE_INDEX, 2, 3, 4], [5, 6, 7], [8, 9]],  # unusual labels: the first token must still go
    })
    packed = pack_dataset(samples, 6)
    rows = {tuple(r["input_ids"]): r for r in packed}
    assert set(rows) == {(1, 2, 3, 4, 8, 9), (5, 6, 7)}
    assert rows[(1, 2, 3, 4, 8, 9)]["labels"] == [IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 9]
    assert rows[(1, 2, 3, 4, 8, 9)][LENGTHS] == [4, 2]

    batch = PackedCollator(pad_token_id=0)([rows[(1, 2, 3, 4, 8, 9)], rows[(5, 6, 7)]])
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    # evaluation rows (no packing record) keep the plain, left-padded layout
    eval_rows = [{"input_ids": [1, 2], "output_ids": [3]}, {"input_ids": [4], "output_ids": [5]}]
    plain = PackedCollator(pad_token_id=0)(eval_rows)
    assert "segment_ids" not in plain and plain["input_ids"].tolist() == [[1, 2], [0, 4]]


def test_segment_positions_restart_and_attention_stays_inside_a_sample():
    import torch

    from glm_ft.chatglm3.segments import segment_attention_mask, segment_position_ids

    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert segment_position_ids(segments).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = segment_attention_mask(segments, prefix_len=2)[0, 0]
    assert mask[:, :2].all()  # the P-Tuning v2 prefix is seen by every token
    assert mask[4, 2:].tolist() == [False, False, False, True, True, False]
    assert mask[2, 2:].tolist() == [True, True, True, False, False, False]


@pytest.mark.slow
def test_quickstart_trains_on_packed_rows(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(["experiment=quickstart", "data.packing=true", "training_args.max_steps=12",
                     "training_args.logging_steps=1", "training_args.save_steps=12", "training_args.eval_steps=12",
                     "eval_subset=4", "training_args.generation_config.max_new_tokens=8",
                     f"hydra.run.dir={run_dir}"], env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert out.returncode == 0, out.stderr[-3000:]
    samples, rows = map(int, re.search(r"packing: (\d+) training samples in (\d+) rows", out.stderr + out.stdout)
                        .groups())
    assert rows < samples / 2  # quickstart samples are far shorter than the 129-token budget
    state = json.loads((run_dir / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    # the Trainer walked the packed rows: 12 steps of 8 rows are 12 / ceil(rows / 8) epochs
    assert state["epoch"] == pytest.approx(12 / -(-rows // 8))
    assert any("eval_rouge-l" in h for h in state["log_history"])  # evaluation still runs on unpacked rows
    assert Path(run_dir / "final").is_dir()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    tags = run.data.tags
    assert (int(tags["data.train.packed_rows"]), tags["data.train.pack_max_length"]) == (rows, "129")

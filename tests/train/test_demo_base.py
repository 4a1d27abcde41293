"""model=tiny_demo / experiment=demo_sweep: a base worth adapting, built once and reused, so that a CPU sweep's
swept values make a difference."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import run_train
from glm_ft.chatglm3.tiny import TINY_CONFIG
from glm_ft.train.demo_base import DEMO_MODEL_DIR, RECIPE, ensure_demo_model
from glm_ft.config.schema import TINY_MODEL_DIR

pytestmark = pytest.mark.slow

# A sweep at tiny size: few steps, a few evaluation samples, no test predictions.
TINY_SWEEP = ["experiment=demo_sweep", "training_args.max_steps=16", "training_args.save_steps=8",
              "training_args.eval_steps=8", "training_args.logging_steps=4", "eval_subset=8",
              "training_args.generation_config.max_new_tokens=24", "data.test_file=null"]


def _weights(path) -> tuple[int, str]:
    """(mtime in ns, sha256) of a checkpoint's weights: a rebuild changes at least the first."""
    file = path / "model.safetensors"
    return file.stat().st_mtime_ns, hashlib.sha256(file.read_bytes()).hexdigest()


def _sweep(tmp_path, name: str, args: list[str]):
    from mlflow.tracking import MlflowClient

    db, sweep_dir = tmp_path / "mlflow.db", tmp_path / name
    out = run_train(["-m", *TINY_SWEEP, *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path,
                    env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    parent = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert children and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["glm_ft.base_model"] == str(DEMO_MODEL_DIR) for c in children)
    return {c.info.run_name: c.data.metrics for c in children}


@pytest.fixture(scope="module")
def demo_base():
    path = ensure_demo_model()
    return path, _weights(path)


def test_the_base_is_trained_seeded_and_of_the_tiny_shape(demo_base, tmp_path):
    path, (_, digest) = demo_base
    assert json.loads((path / "config.json").read_text()) == TINY_CONFIG
    record = json.loads((path / "demo_base.json").read_text())
    assert record["recipe"] == RECIPE
    # Trained: its weights are not the random tiny model's.
    assert digest != hashlib.sha256((TINY_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
    # Seeded: building it again elsewhere gives the same weights.
    again = ensure_demo_model(tmp_path / "again")
    assert _weights(again)[1] == digest


def test_lora_and_ptuning_sweeps_differ_and_reuse_the_base(demo_base, tmp_path):
    path, before = demo_base
    lora = _sweep(tmp_path, "lora", ["method.r=2,32"])
    prefix = _sweep(tmp_path, "prefix", ["method=ptuning_v2", "method.num_virtual_tokens=2,32"])
    for runs in (lora, prefix):
        assert len(runs) == 2
        # The swept value changed what was learnt: the training loss and the eval scores of the runs differ.
        assert len({m["train_loss"] for m in runs.values()}) == 2, runs
        assert len({(m["eval_rouge-l"], m["eval_bleu-4"]) for m in runs.values()}) == 2, runs
    assert _weights(path) == before  # used by four jobs, built once: the file was never rewritten

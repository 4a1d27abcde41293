"""Every number and file a run reports is true: evaluation and prediction see each sample once, in the data file's
order, and what is logged is the score of what is written.

The runs use the default configuration (the quickstart, `training_args.group_by_length=true`, the quickstart's eval
batch size of 20), where evaluation batches by tokens, longest prompts first; the two-process run batches by
`per_device_eval_batch_size=4` rows of the longest prompt (`eval_batch_tokens=null`), so that its ranks run several
steps of different row counts (4, 7, then 3 or 2 rows each). Every check holds a run's output against
an independent way of getting it: a rescore of its own file, the data file itself, and `glm_ft.infer.predict` on
the same checkpoint (batched differently again).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_process, run_train

SAMPLE = ROOT / "data" / "sample"
# Below the quickstart's max_output_length (64), and short enough to cut most replies of this run: predict must
# take the run's own generation settings, not its lengths.
MAX_NEW_TOKENS = 8
# The quickstart as `make train` runs it, shortened: a high learning rate, so that 150 steps give replies that differ
# from prompt to prompt (a shuffle of identical replies would go unnoticed), and one evaluation, at the last step.
DEFAULT_RUN = ["experiment=quickstart", "training_args.max_steps=150", "training_args.learning_rate=4e-3",
               "training_args.eval_steps=150", "training_args.save_steps=150",
               f"training_args.generation_config.max_new_tokens={MAX_NEW_TOKENS}"]


# --- the pieces, without a model ------------------------------------------------------------------------------


def test_in_sample_order_restores_the_order_and_drops_padded_repeats():
    import numpy as np

    from glm_ft.train.evaluation import in_sample_order

    # Two processes, batches of 2, 5 samples: rank 0 gets 0,1 then 4,0 (padded), rank 1 gets 2,3 then 1,2 (padded);
    # gathered per step, in a shuffled sampler order.
    index = np.array([3, 1, 0, 4, 2, 0, 1, 3])
    rows = np.array([[30, 31], [10, 11], [0, 1], [40, 41], [20, 21], [0, 1], [10, 11], [30, 31]])
    (ordered,) = in_sample_order(index, 5, rows)
    assert ordered.tolist() == [[0, 1], [10, 11], [20, 21], [30, 31], [40, 41]]
    with pytest.raises(RuntimeError, match="4 distinct samples of 5"):
        in_sample_order(np.array([0, 1, 2, 2, 4]), 5, rows[:5])


def test_the_collator_carries_each_sample_index():
    from glm_ft.data.collate import SAMPLE_INDEX, Collator
    from glm_ft.train.evaluation import Indexed

    data = Indexed([{"input_ids": [5, 6, 7], "output_ids": [8]}, {"input_ids": [5], "output_ids": [9, 9]}])
    batch = Collator(pad_token_id=0)([data[1], data[0]])
    assert batch[SAMPLE_INDEX].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[0, 0, 5], [5, 6, 7]]
    assert batch["labels"].tolist() == [[9, 9], [8, -100]]


LENGTHS = [5, 40, 12, 3, 40, 27, 8, 19, 33, 2, 11, 6, 25]


def test_generation_batches_stay_within_the_budget_longest_first():
    from glm_ft.train.evaluation import generation_batches, generation_budget

    new = 10
    budget = generation_budget(LENGTHS, 2, new, batch_tokens=300)
    assert budget == 300  # over the floor of 2 rows of the longest prompt: 2 * (40 + 10) = 100
    batches = generation_batches(LENGTHS, budget, new)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))  # each sample once
    flat = [LENGTHS[i] for b in batches for i in b]
    assert flat == sorted(LENGTHS, reverse=True)
    for batch in batches:
        assert len(batch) * (max(LENGTHS[i] for i in batch) + new) <= budget
    assert len({len(b) for b in batches}) > 1, "shorter prompts should give larger batches"
    # No token budget: at least 2 rows of the longest prompt, and never more tokens than such a batch
    floor = generation_budget(LENGTHS, 2, new, batch_tokens=None)
    assert floor == 100 and all(len(b) >= 2 for b in generation_batches(LENGTHS, floor, new)[:-1])
    # Beam search keeps `beams` copies of each row: the budget is shared by them
    assert generation_budget(LENGTHS, 2, new, batch_tokens=300, beams=2) == 150


@pytest.mark.parametrize("world_size", [2, 3])
def test_generation_batches_under_several_processes_as_accelerate_shards_them(world_size):
    """Each rank gets whole batches round-robin (accelerate's own BatchSamplerShard, as the Trainer prepares the
    loader): every rank runs the same number of generate calls, each step's batches have the same row count (they
    are gathered), and together they hold every sample; repeats only fill the last step."""
    from accelerate.data_loader import BatchSamplerShard

    from glm_ft.train.evaluation import generation_batches

    new, budget = 10, 150
    batches = generation_batches(LENGTHS, budget, new, world_size)
    shards = [list(BatchSamplerShard(batches, num_processes=world_size, process_index=rank))
              for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    steps = list(zip(*shards))
    assert len(steps) > 1
    for step in steps:
        assert len({len(b) for b in step}) == 1, step
        for batch in step:
            assert len(batch) * (max(LENGTHS[i] for i in batch) + new) <= budget
    seen = [i for step in steps for batch in step for i in batch]
    assert sorted(set(seen)) == list(range(len(LENGTHS)))
    first_of_last_step = sum(len(b) for step in steps[:-1] for b in step)
    assert len(set(seen[:first_of_last_step])) == first_of_last_step  # repeats only in the last step


# --- whole runs -----------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assistant_turns(path: Path) -> list[tuple[str, str]]:
    """(the end of its prompt, its reference) for every assistant turn of a sample data file, read as plain JSON."""
    turns, previous = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["conversations"]:
            if message["role"] == "assistant":
                content = message["content"]
                reference = f"{message['metadata']}\n {content}" if message.get("metadata") else content
                turns.append((f"<|{previous['role']}|>\n {previous['content']}<|assistant|>", reference))
            previous = message
    return turns


def predict_with_glm_ft(checkpoint: Path, data_file: Path, out: Path, batch_size: int, *options: str) -> list[dict]:
    """`python -m glm_ft predict` on the run's own checkpoint, batched differently from the run's evaluation:
    `batch_size` rows of the longest prompt, no larger token budget (--batch-tokens 1). No generation settings are
    given unless in `options`: predict must take the run's own."""
    from glm_ft.infer.predict import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(checkpoint), str(data_file), "--out", str(out), "--batch-size", str(batch_size),
                     "--batch-tokens", "1", *options]) == 0
    return read_jsonl(out)


def mlflow_run(uri: str, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("glm-ft")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("glm_ft.run_dir") == str(run_dir)]
    return client, run


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One `python train.py` of the default configuration."""
    work = tmp_path_factory.mktemp("single")
    uri = f"sqlite:///{work}/mlflow.db"
    run_dir = work / "run"
    result = run_train([*DEFAULT_RUN, f"hydra.run.dir={run_dir}"], env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run_dir": run_dir, "uri": uri, "console": result.stdout + result.stderr, "work": work}


@pytest.fixture(scope="module")
def distributed(single, tmp_path_factory) -> dict:
    """The same under `torchrun --nproc_per_node 2` with DeepSpeed ZeRO-3, continuing from the single run's model
    (its replies already differ) with a learning rate too small to change them."""
    work = tmp_path_factory.mktemp("distributed")
    uri = f"sqlite:///{work}/mlflow.db"
    run_dir = work / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *DEFAULT_RUN, "training_args.max_steps=2", "training_args.eval_steps=2",
           "training_args.save_steps=2", "training_args.learning_rate=1e-9", "deepspeed=zero3",
           "training_args.per_device_eval_batch_size=4", "eval_batch_tokens=null",
           f"model.path={single['run_dir'] / 'final'}", "model.build_if_missing=false", f"hydra.run.dir={run_dir}"]
    # Its own session, so that torchrun's workers end with it whatever happens.
    result = run_process(cmd, cwd=ROOT, env=env)
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == 0, stderr[-3000:]
    return {"run_dir": run_dir, "uri": uri, "console": stdout + stderr, "work": work}


RUNS = ["single", "distributed"]


@pytest.fixture(params=RUNS)
def run(request) -> dict:
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_the_replies_tell_the_samples_apart(run):
    """What makes the checks below able to fail: rows paired with the wrong replies must score differently."""
    from glm_ft.train.metrics import compute_metrics

    rows = read_jsonl(run["run_dir"] / "predictions.jsonl")
    replies, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    assert len(set(replies)) >= 5, replies
    assert compute_metrics(replies[1:] + replies[:1], references) != compute_metrics(replies, references)


@pytest.mark.slow
def test_row_i_of_predictions_is_test_sample_i(run):
    rows = read_jsonl(run["run_dir"] / "predictions.jsonl")
    turns = assistant_turns(SAMPLE / "test.jsonl")
    assert len(turns) == 42 and len(rows) == len(turns)  # no padded repeat written, none missing
    for row, (prompt_end, reference) in zip(rows, turns):
        assert row["reference"] == reference
        assert row["prompt"].endswith(prompt_end)


@pytest.mark.slow
def test_rescoring_the_predictions_gives_the_logged_test_metrics(run):
    """predictions.jsonl rescored = test_metrics.json = MLflow = the console line, and the counts are the rows."""
    from glm_ft.train.metrics import METRIC_NAMES, compute_metrics

    rows = read_jsonl(run["run_dir"] / "predictions.jsonl")
    rescored = {f"test_{k}": v for k, v in compute_metrics([r["prediction"] for r in rows],
                                                          [r["reference"] for r in rows]).items()}
    written = json.loads((run["run_dir"] / "test_metrics.json").read_text())
    assert {k: written[k] for k in rescored} == pytest.approx(rescored, rel=1e-9, abs=1e-12)
    assert written["test_samples"] == len(rows)
    _, mlflow = mlflow_run(run["uri"], run["run_dir"])
    assert {k: mlflow.data.metrics[k] for k in rescored} == pytest.approx(rescored, rel=1e-9, abs=1e-12)
    assert mlflow.data.metrics["test_samples"] == len(rows)
    console = re.search(r"test: (\d+) predictions → .*?; (test_rouge-1=.*)", run["console"])
    assert console and int(console.group(1)) == len(rows)
    shown = dict(item.split("=") for item in console.group(2).strip().split(", "))
    assert shown == {f"test_{k}": f"{rescored[f'test_{k}']:.4g}" for k in METRIC_NAMES}


@pytest.mark.slow
def test_predictions_equal_glm_ft_predict_on_the_same_checkpoint(run):
    rows = read_jsonl(run["run_dir"] / "predictions.jsonl")
    predicted = predict_with_glm_ft(run["run_dir"], SAMPLE / "test.jsonl", run["work"] / "predict" / "test.jsonl",
                                    batch_size=5)
    assert [r["prompt"] for r in predicted] == [r["prompt"] for r in rows]
    assert [r["reference"] for r in predicted] == [r["reference"] for r in rows]
    assert [r["prediction"] for r in predicted] == [r["prediction"] for r in rows]
    # What makes this able to fail: the run's generation limit cuts replies that its max_output_length would not.
    longer = predict_with_glm_ft(run["run_dir"], SAMPLE / "test.jsonl", run["work"] / "predict" / "test-64.jsonl",
                                 5, "--max-new-tokens", "64")
    assert [r["prediction"] for r in longer] != [r["prediction"] for r in rows]


@pytest.mark.slow
def test_eval_metrics_are_the_score_of_the_kept_eval_predictions(run):
    """The last evaluation's outputs are kept (eval_predictions.jsonl, also in MLflow); its eval_* metrics, in the
    Trainer's log, MLflow and eval_metrics.json, are their rescore; its rows are the first eval_subset validation
    samples in file order, with what glm_ft.infer.predict generates for them."""
    from glm_ft.train.metrics import compute_metrics

    run_dir = run["run_dir"]
    rows = read_jsonl(run_dir / "eval_predictions.jsonl")
    turns = assistant_turns(SAMPLE / "dev.jsonl")[:40]  # the quickstart's eval_subset
    assert [r["reference"] for r in rows] == [reference for _, reference in turns]
    assert all(r["prompt"].endswith(prompt_end) for r, (prompt_end, _) in zip(rows, turns))
    rescored = {f"eval_{k}": v for k, v in compute_metrics([r["prediction"] for r in rows],
                                                          [r["reference"] for r in rows]).items()}

    step = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    history = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    (logged,) = [h for h in history if "eval_rouge-l" in h]
    assert logged["step"] == step
    assert {k: logged[k] for k in rescored} == pytest.approx(rescored, rel=1e-9, abs=1e-12)
    assert logged["eval_samples"] == len(rows)
    written = json.loads((run_dir / "eval_metrics.json").read_text())
    assert written["step"] == step and written["eval_samples"] == len(rows)
    assert {k: written[k] for k in rescored} == pytest.approx(rescored, rel=1e-9, abs=1e-12)

    client, mlflow = mlflow_run(run["uri"], run_dir)
    for key, value in {**rescored, "eval_samples": len(rows)}.items():
        history = client.get_metric_history(mlflow.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(step, pytest.approx(value, rel=1e-9, abs=1e-12))]
    assert "eval_predictions.jsonl" in {a.path for a in client.list_artifacts(mlflow.info.run_id)}

    predicted = predict_with_glm_ft(run_dir, SAMPLE / "dev.jsonl", run["work"] / "predict" / "dev.jsonl",
                                    batch_size=3)
    assert [r["prediction"] for r in predicted[:len(rows)]] == [r["prediction"] for r in rows]


@pytest.mark.slow
def test_every_metric_point_is_at_a_step_the_trainer_logged(single):
    """MLflow's history of each metric is at the global steps of the Trainer's log history, nothing at step 0:
    the training summary (train_loss, train_runtime, ...) once, at the final step."""
    client, run = mlflow_run(single["uri"], single["run_dir"])
    state = json.loads((single["run_dir"] / "checkpoint-150" / "trainer_state.json").read_text(encoding="utf-8"))
    logged = {(k, h["step"]) for h in state["log_history"] for k in h if k not in ("step", "epoch")}
    final_step = state["global_step"]
    for name in ("loss", "learning_rate", "eval_rouge-l", "eval_bleu-4"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps and all((name, s) in logged for s in steps), (name, steps)
    # The summary comes after the last checkpoint was saved, so its trainer_state.json does not hold it.
    for name in ("train_loss", "train_samples_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [final_step], name
    # train_runtime is also in every logging step's entry (with num_input_tokens_seen)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_runtime")]
    assert steps[-1] == final_step and all(("train_runtime", s) in logged for s in steps[:-1]), steps


def test_the_closing_line_names_the_store_the_run_is_in(single):
    uri = single["uri"]
    assert f"MLflow: experiment 'glm-ft' in {uri}; browse it with `make ui UI_STORE={uri}`" in single["console"]

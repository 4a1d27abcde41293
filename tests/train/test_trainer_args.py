"""The Trainer boundary: documented training_args become the Seq2SeqTrainingArguments transformers expects."""

from __future__ import annotations

import pytest

from conftest import compose
from glm_ft.train.trainer_args import build_training_arguments


def build(tmp_path, overrides, has_eval=True):
    cfg = compose(["experiment=quickstart", *overrides])
    return build_training_arguments(cfg, tmp_path, None, has_eval=has_eval, generation_config=None)


def test_documented_names_are_translated(tmp_path):
    args = build(tmp_path, ["training_args.evaluation_strategy=steps", "training_args.eval_steps=7"])
    assert args.eval_strategy == "steps" and args.eval_steps == 7
    assert args.output_dir == str(tmp_path)
    assert args.report_to == [] or args.report_to in ("none", ["none"])  # glm-ft logs to MLflow itself
    assert args.seed == 42 and args.data_seed == 42


@pytest.mark.parametrize("override, check", [
    ("training_args.bf16=true", lambda a: a.bf16 and a.use_cpu),
    ("training_args.gradient_checkpointing=true",
     lambda a: a.activation_checkpointing and a.activation_checkpointing_kwargs == {"use_reentrant": False}),
    ("training_args.gradient_accumulation_steps=4", lambda a: a.gradient_accumulation_steps == 4),
    ("training_args.group_by_length=true", lambda a: a.train_sampling_strategy == "group_by_length"),
    ("training_args.group_by_length=false", lambda a: a.train_sampling_strategy == "random"),
    ("training_args.save_total_limit=3", lambda a: a.save_total_limit == 3),
    ("training_args.warmup_steps=0.1", lambda a: a.get_warmup_steps(100) == 10),
    ("seed=7", lambda a: a.seed == 7),
])
def test_switches_reach_the_trainer(tmp_path, override, check):
    assert check(build(tmp_path, [override]))


def test_without_validation_data_evaluation_is_off(tmp_path):
    assert build(tmp_path, [], has_eval=False).eval_strategy == "no"


def test_nan_losses_are_not_hidden(tmp_path):
    assert build(tmp_path, []).logging_nan_inf_filter is False


@pytest.mark.parametrize("overrides, metric", [
    (["training_args.load_best_model_at_end=true"], "eval_rouge-l"),
    (["training_args.early_stopping_patience=3"], "eval_rouge-l"),
    (["training_args.load_best_model_at_end=true", "training_args.metric_for_best_model=bleu-4"], "eval_bleu-4"),
])
def test_the_best_model_is_judged_by_a_metric_the_evaluation_reports(tmp_path, overrides, metric):
    """transformers' default metric, the loss, is never computed by glm-ft's evaluation: its first evaluation
    failed with a KeyError. Higher is better, derived from the name as transformers derives it."""
    args = build(tmp_path, ["training_args.save_steps=100", *overrides])
    assert args.metric_for_best_model == metric and args.greater_is_better is True

"""GlmTrainer's generation path on the tiny ChatGLM3 with the real configs: batches sized by tokens, longest prompts
first, and what `predict` returns is, row by row and in the data's order, what `model.generate` writes for that
prompt alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig, TrainerCallback

from conftest import compose
from glm_ft.model import load_for_training
from glm_ft.data.collate import Collator
from glm_ft.runs import complete_checkpoints
from glm_ft.tracking.signals import SIGTERM_GUARD, Terminated
from glm_ft.train.trainer import TRAINING_ARGS_JSON, GlmTrainer, Watchdog
from glm_ft.train.trainer_args import build_training_arguments
from test_stops import Finalizer

LENGTHS = (3, 41, 9, 70, 5, 23, 12, 2, 55, 17, 30, 7)
NEW = 10
ROWS, BUDGET = 2, 400  # at least 2 rows of the longest prompt (2 x (70 + 10) = 160), up to 400 tokens


def _greedy(tokenizer, stops):
    return GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stops)


def _alone(model, prompt, gen):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, ids.shape[1]:].tolist()


def test_predict_batches_by_tokens_and_returns_generate_s_ids_in_data_order(tmp_path):
    cfg = compose(["experiment=quickstart", f"training_args.per_device_eval_batch_size={ROWS}",
                   f"eval_batch_tokens={BUDGET}", f"training_args.generation_config.max_new_tokens={NEW}"])
    tokenizer, model, _ = load_for_training(cfg)
    model.eval()
    generator = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(100, 3000, (n,), generator=generator).tolist(), "output_ids": [5, 6]}
            for n in LENGTHS]
    # Stop ids taken from what some prompts write early, so that rows stop at different steps and leave the batch
    free = [_alone(model, row["input_ids"], _greedy(tokenizer, [tokenizer.eos_token_id])) for row in data[:3]]
    stops = sorted({free[0][1], free[1][4], free[2][6]})
    gen = _greedy(tokenizer, stops)
    args = build_training_arguments(cfg, tmp_path / "run", None, has_eval=False, generation_config=gen)
    trainer = GlmTrainer(model=model, args=args, data_collator=Collator(tokenizer.pad_token_id),
                         processing_class=tokenizer, method=cfg.method, gen_config=gen,
                         eval_batch_tokens=cfg.eval_batch_tokens)

    widths = []
    for batch in trainer.get_test_dataloader(data):
        rows, width = batch["input_ids"].shape
        assert rows * (width + NEW) <= BUDGET
        widths.append((width, rows))
    assert [w for w, _ in widths] == sorted((w for w, _ in widths), reverse=True)  # longest prompts first
    assert len({rows for _, rows in widths}) > 1 and max(rows for _, rows in widths) > ROWS
    assert sum(rows for _, rows in widths) == len(data)

    predictions = trainer.predict(data).predictions
    assert len(predictions) == len(data)
    ended = 0
    for row, sample in zip(predictions.tolist(), data):
        expected = _alone(model, sample["input_ids"], gen)
        got = [t for t in row if t != -100]
        assert got[:len(expected)] == expected
        assert set(got[len(expected):]) <= {tokenizer.pad_token_id}
        ended += len(expected) < NEW
    assert 0 < ended < len(data), "some rows should stop early and some run to max_new_tokens"


def test_an_evaluation_leaves_the_rngs_that_training_draws_from_as_it_found_them(tmp_path):
    """The dropout of the steps after an evaluation draws from the global RNGs: the evaluation, which the DataLoader
    seeds from them and sampling generation draws from, must leave them as they were, or a run that evaluates at
    other steps (a resume with its own eval_steps, a finished run extended) trains other masks after it."""
    import random

    import numpy as np

    cfg = compose(["experiment=quickstart", "training_args.generation_config.max_new_tokens=4"])
    tokenizer, model, _ = load_for_training(cfg)
    gen = GenerationConfig(max_new_tokens=4, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=[tokenizer.eos_token_id])
    args = build_training_arguments(cfg, tmp_path / "run", None, has_eval=True, generation_config=gen)
    data = [{"input_ids": list(range(100, 100 + n)), "output_ids": [5, 6]} for n in (3, 9, 5)]
    trainer = GlmTrainer(model=model, args=args, eval_dataset=data, data_collator=Collator(tokenizer.pad_token_id),
                         processing_class=tokenizer, method=cfg.method, gen_config=gen)
    before = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()
    assert trainer.evaluate()["eval_samples"] == 3
    after = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]


class _CompleteAtSave(TrainerCallback):
    """Placed before Watchdog: the complete checkpoints a kill would leave right after a save, before its marker."""

    def __init__(self, run_dir):
        self.run_dir, self.seen = run_dir, {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = [p.name for p in complete_checkpoints(self.run_dir)]


def _train_saving_every_2_steps(tmp_path, run_dir, max_steps, *overrides, resume=None, callbacks=()):
    cfg = compose(["experiment=quickstart", "training_args.save_steps=2", f"training_args.max_steps={max_steps}",
                   "training_args.per_device_train_batch_size=2", "training_args.logging_steps=1", *overrides])
    tokenizer, model, _ = load_for_training(cfg)
    rows = [{"input_ids": [30 + i, 40 + i, 100 + i, 200 + i, 300 + i], "labels": [-100, -100, -100, 200 + i, 300 + i]}
            for i in range(16)]
    args = build_training_arguments(cfg, run_dir, None, has_eval=False, generation_config=_greedy(tokenizer, [2]))
    probe = _CompleteAtSave(run_dir)
    trainer = GlmTrainer(model=model, args=args, train_dataset=rows, data_collator=Collator(tokenizer.pad_token_id),
                         processing_class=tokenizer, method=cfg.method, gen_config=args.generation_config,
                         callbacks=[probe, Watchdog(), *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return probe.seen


class _BaseRates(TrainerCallback):
    """Each trainable parameter's base learning rate (its group's initial_lr) at the first step trained."""

    def __init__(self):
        self.by_name: dict[str, float] = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.by_name:
            names = {id(p): n for n, p in model.named_parameters()}
            self.by_name = {names[id(p)]: g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}


def test_a_resume_trains_each_loraplus_group_at_this_runs_rate(tmp_path):
    """The checkpoint's schedule brings back its base rates; a resume with another learning_rate and LoRA+ ratio
    trains lora_B at the new ratio of the new rate, and the embedding group at PEFT's absolute rate (1e-6), as a
    fresh run of these arguments would, not at the old rates scaled by the change of learning_rate."""
    lora = ["method=lora", "method.target_modules=[query_key_value,word_embeddings]"]
    _train_saving_every_2_steps(tmp_path, tmp_path / "run", 2, *lora, "method.loraplus_lr_ratio=16",
                                "training_args.learning_rate=1e-3")
    rates = _BaseRates()
    _train_saving_every_2_steps(tmp_path, tmp_path / "run", 4, *lora, "method.loraplus_lr_ratio=4",
                                "training_args.learning_rate=5e-4", resume=str(tmp_path / "run" / "checkpoint-2"),
                                callbacks=[rates])
    trained = {name: rate for name, rate in rates.by_name.items() if ".lora_" in name}
    assert any("lora_embedding_B" in n for n in trained) and any(".lora_B." in n for n in trained), trained
    for name, rate in trained.items():
        expected = 1e-6 if "lora_embedding" in name else 5e-4 * 4 if ".lora_B." in name else 5e-4
        assert rate == pytest.approx(expected), name


def test_save_total_limit_1_leaves_a_complete_checkpoint_at_every_save(tmp_path):
    """transformers deletes the older checkpoints while it saves a new one; with save_total_limit=1 a kill before the
    new one was marked complete left nothing to resume from. The old one now goes once the new one is marked."""
    run_dir = tmp_path / "run"
    seen = _train_saving_every_2_steps(tmp_path, run_dir, 6, "training_args.save_total_limit=1")
    assert seen == {2: [], 4: ["checkpoint-2"], 6: ["checkpoint-4"]}
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-6"]
    assert json.loads((run_dir / "checkpoint-6" / TRAINING_ARGS_JSON).read_text())["save_total_limit"] == 1


def test_a_checkpoint_saved_over_is_incomplete_until_marked_again(tmp_path):
    """Resumed from checkpoint-2 in the same folder, the run saves checkpoint-4 over the earlier run's: until the new
    one is marked, resume and inference must not take the half-overwritten folder for complete."""
    run_dir = tmp_path / "run"
    _train_saving_every_2_steps(tmp_path, run_dir, 4, "training_args.save_total_limit=null")
    seen = _train_saving_every_2_steps(tmp_path, run_dir, 4, "training_args.save_total_limit=null",
                                       resume=str(run_dir / "checkpoint-2"))
    assert seen == {4: ["checkpoint-2"]}
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]


def test_a_resume_whose_optimizer_state_does_not_fit_is_one_error(tmp_path):
    """A checkpoint trained without LoRA+ (2 parameter groups) resumed with it (PEFT builds 4): torch's
    load_state_dict raised a ValueError traceback after the model had loaded; glm-ft names the checkpoint and why."""
    from glm_ft.errors import CheckpointError

    _train_saving_every_2_steps(tmp_path, tmp_path / "run", 2, "method=lora")
    with pytest.raises(CheckpointError, match=r"checkpoint-2's optimizer state does not fit .*loraplus_lr_ratio"):
        _train_saving_every_2_steps(tmp_path, tmp_path / "run", 4, "method=lora", "method.loraplus_lr_ratio=16",
                                    resume=str(tmp_path / "run" / "checkpoint-2"))


class _LoseAStop(TrainerCallback):
    """Placed after Watchdog: at step `step`'s end, a SIGTERM lands inside a `__del__` and Python drops it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            Finalizer(Terminated())


def test_a_stop_dropped_before_a_save_is_raised_once_the_saved_checkpoint_is_marked_complete(tmp_path):
    """A stop Python dropped is raised again at the next save: after that checkpoint, fully written, is marked
    complete, not before, which left it unmarked, so that a resume skipped it and trained its steps again."""
    run_dir = tmp_path / "run"
    SIGTERM_GUARD.acquire()
    try:
        with pytest.raises(Terminated):
            _train_saving_every_2_steps(tmp_path, run_dir, 6, callbacks=[_LoseAStop(2)])
    finally:
        SIGTERM_GUARD.release()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not (run_dir / "checkpoint-4").exists()

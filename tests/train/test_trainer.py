"""GlmTrainer's generation path on the tiny ChatGLM3 with the real configs: batches sized by tokens, longest prompts
first, and what `predict` returns is, row by row and in the data's order, what `model.generate` writes for that
prompt alone."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from conftest import compose
from glm_ft.model import load_for_training
from glm_ft.data.collate import Collator
from glm_ft.train.trainer import GlmTrainer
from glm_ft.train.trainer_args import build_training_arguments

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

"""Packed rows train each sample exactly as an unpacked row does: per-sample losses and the gradients of the summed
loss agree within 1e-5 (fp32), for LoRA, P-Tuning v2 and SFT, with eager and SDPA attention, on the tiny model and
the bundled sample data."""

from __future__ import annotations

import pytest
import torch

from glm_ft.data.dataset import load_datasets
from glm_ft.data.collate import IGNORE_INDEX, Collator
from glm_ft.model import load_for_training
from glm_ft.data.packing import PackedCollator, pack_dataset
from glm_ft.config.validate import resolve_path
from tests.conftest import compose

SAMPLES = 6
BUDGET = 113  # max_input_length 48 + max_output_length 64 + 1: two or more sample-data samples per row


def setup(method: str, tmp_path, attention: str = "eager"):
    cfg = compose(["experiment=quickstart", f"method={method}", "max_input_length=48", "max_output_length=64",
                   "training_args.bf16=false", f"model.attn_implementation={attention}"])
    tokenizer, model, _ = load_for_training(cfg)
    config = {"data_dir": str(resolve_path(cfg.data.data_dir)), "train_file": cfg.data.train_file, "num_proc": 1}
    train = load_datasets(config, tokenizer, 48, 64, cache_dir=tmp_path / "cache").train.select(range(SAMPLES))
    for module in model.modules():  # the prefix's fixed dropout would make two forward passes differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    return tokenizer, model, train


def summed_loss(model, batch) -> torch.Tensor:
    """Sum of the token losses: num_items_in_batch=1 turns the model's token mean into the sum."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, labels=batch["labels"], num_items_in_batch=torch.tensor(1)).loss


def only_sample(batch, keep: torch.Tensor):
    return {**batch, "labels": batch["labels"].masked_fill(~keep, IGNORE_INDEX)}


def gradients(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("attention", ["eager", "sdpa"])  # the CPU preset's and the schema's default
@pytest.mark.parametrize("method", ["lora", "ptuning_v2", "sft"])
def test_packed_batch_gives_the_unpacked_losses_and_gradients(method, attention, tmp_path):
    tokenizer, model, train = setup(method, tmp_path, attention)
    assert model.config._attn_implementation == attention
    packed = pack_dataset(train, BUDGET)
    assert len(packed) < SAMPLES and max(len(r) for r in packed["lengths"]) > 1  # rows really hold several
    unpacked_batch = Collator(tokenizer.pad_token_id)([train[i] for i in range(SAMPLES)])
    packed_batch = PackedCollator(tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])

    # Where each sample sits in the packed batch: (row, first column, length), from the packing's own record.
    where, sample_of = {}, []
    order = sorted(range(SAMPLES), key=lambda i: (-len(train[i]["input_ids"]), i))
    for row, lengths in enumerate(packed["lengths"]):
        start = 0
        for n in lengths:
            sample_of.append((row, start, n))
            start += n
    # Identify samples by content, not by the packing's order.
    for row, start, n in sample_of:
        ids = packed_batch["input_ids"][row, start:start + n].tolist()
        matches = [i for i in order if train[i]["input_ids"] == ids and i not in where]
        where[matches[0]] = (row, start, n)
    assert sorted(where) == list(range(SAMPLES))

    for i, (row, start, n) in where.items():
        keep_unpacked = torch.zeros_like(unpacked_batch["labels"], dtype=torch.bool)
        keep_unpacked[i] = True
        keep_packed = torch.zeros_like(packed_batch["labels"], dtype=torch.bool)
        keep_packed[row, start:start + n] = True
        targets = sum(t != IGNORE_INDEX for t in train[i]["labels"][1:])
        assert targets > 0
        with torch.no_grad():
            expected = summed_loss(model, only_sample(unpacked_batch, keep_unpacked)) / targets
            got = summed_loss(model, only_sample(packed_batch, keep_packed)) / targets
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"sample {i}")

    summed_loss(model, unpacked_batch).backward()
    expected_grads = gradients(model)
    summed_loss(model, packed_batch).backward()
    got_grads = gradients(model)
    assert set(got_grads) == set(expected_grads) and got_grads
    for name, grad in got_grads.items():
        scale = expected_grads[name].abs().max().clamp(min=1.0)
        torch.testing.assert_close(grad / scale, expected_grads[name] / scale, atol=1e-5, rtol=1e-5, msg=name)

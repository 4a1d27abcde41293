"""glm_ft.train.generation against transformers' own `model.generate`: the same token ids, row by row, for each
method on the tiny ChatGLM3, with prompts of very different lengths and rows that stop at different steps."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from conftest import compose
from glm_ft.model import load_for_training
from glm_ft.train.generation import generate, greedy_generate, supports

METHODS = {"lora": ["method=lora"], "ptuning_v2": ["method=ptuning_v2", "method.num_virtual_tokens=4"],
           "sft": ["method=sft"]}
LENGTHS = (3, 41, 9, 70, 5, 23)
NEW = 12


@pytest.fixture(scope="module", params=list(METHODS))
def loaded(request):
    tokenizer, model, _ = load_for_training(compose(["experiment=quickstart", *METHODS[request.param]]))
    torch.manual_seed(0)
    if request.param == "lora":  # LoRA starts as the identity (B = 0); make the adapter change the outputs
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
    return request.param, tokenizer, model.eval()


def _batch(tokenizer):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 3000, (n,), generator=generator).tolist() for n in LENGTHS]
    width = max(LENGTHS)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _config(tokenizer, stops, **extra):
    return GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stops, **extra)


def _reference(model, ids, mask, gen):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:]


def test_same_ids_as_generate_with_rows_stopping_at_different_steps(loaded):
    method, tokenizer, model = loaded
    ids, mask = _batch(tokenizer)
    free = _reference(model, ids, mask, _config(tokenizer, [tokenizer.eos_token_id]))
    # Stop ids taken from what the rows write at steps 1, 4 and 7, so that rows end early and at different steps
    stops = sorted({int(free[0, 0]), int(free[1, 3]), int(free[3, 6])})
    gen = _config(tokenizer, stops)
    expected = _reference(model, ids, mask, gen)
    lengths = [next((i + 1 for i, t in enumerate(row) if t in stops), NEW) for row in expected.tolist()]
    assert min(lengths) < max(lengths), f"{method}: rows should stop at different steps, got {lengths}"
    assert supports(model, gen)
    got = greedy_generate(model, ids, mask, gen)
    assert got.tolist() == expected.tolist(), method


def test_each_row_equals_generate_on_that_prompt_alone(loaded):
    _, tokenizer, model = loaded
    ids, mask = _batch(tokenizer)
    gen = _config(tokenizer, [tokenizer.eos_token_id])
    got = greedy_generate(model, ids, mask, gen)
    for row, (prompt, keep) in enumerate(zip(ids, mask.bool())):
        alone = _reference(model, prompt[keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long), gen)
        assert got[row, :alone.shape[1]].tolist() == alone[0].tolist()


def test_other_settings_go_to_generate(loaded):
    _, tokenizer, model = loaded
    ids, mask = _batch(tokenizer)
    for extra in ({"repetition_penalty": 1.3}, {"num_beams": 2}, {"no_repeat_ngram_size": 2}):
        gen = _config(tokenizer, [tokenizer.eos_token_id], **extra)
        assert not supports(model, gen), extra
        assert generate(model, ids, mask, gen).tolist() == _reference(model, ids, mask, gen).tolist(), extra
    assert not supports(model, _config(tokenizer, [tokenizer.eos_token_id]), synced_gpus=True)

"""The training loss without the batch's full-vocabulary logits: same value and gradients as transformers' causal-LM
loss on full logits, and no [batch, seq, vocab] tensor kept for the backward pass."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from glm_ft.chatglm3.configuration import ChatGLMConfig
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration, chunked_causal_lm_loss
from glm_ft.chatglm3.tiny import TINY_CONFIG


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(TINY_CONFIG))


def batch(vocab: int):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 11), generator=generator)
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    labels[2, :] = -100  # a row without targets (all prompt) must not break the sum
    labels[0, 9] = -100
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(model, chunk, num_items):
    ids, labels = batch(model.config.padded_vocab_size)
    head = model.transformer.output_layer
    hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
    n = None if num_items is None else torch.tensor(num_items)

    expected = ForCausalLMLoss(head(hidden), labels, model.config.padded_vocab_size, num_items_in_batch=n)
    expected.backward(retain_graph=True)
    expected_grads = grads(model)
    loss = chunked_causal_lm_loss(hidden, head, labels, n, chunk=chunk)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    got = grads(model)
    assert set(got) == set(expected_grads) and len(got) > 5
    for name in got:
        torch.testing.assert_close(got[name], expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_training_forward_returns_the_same_loss_and_gradients_as_the_full_forward(model):
    ids, labels = batch(model.config.padded_vocab_size)
    model.eval()  # full logits; with dropout 0 the maths is the training maths
    full = model(input_ids=ids, labels=labels, use_cache=False)
    full.loss.backward()
    expected = grads(model)
    model.train()
    out = model(input_ids=ids, labels=labels, use_cache=False)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, full.loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def largest_saved_vocab_tensor(model, ids, labels) -> int:
    """numel of the largest tensor with a vocabulary-sized last dimension kept for the backward pass."""
    vocab, largest = model.config.padded_vocab_size, 0

    def pack(tensor):
        nonlocal largest
        if tensor.dim() and tensor.shape[-1] == vocab and tensor.dtype.is_floating_point:
            largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    return largest


def test_training_keeps_no_full_vocabulary_logits_for_the_backward_pass(model):
    ids, labels = batch(model.config.padded_vocab_size)
    full_logits = ids.numel() * model.config.padded_vocab_size
    model.eval()  # the full-logits path keeps them (the probe sees it)
    assert largest_saved_vocab_tensor(model, ids, labels) >= full_logits
    model.train()
    assert largest_saved_vocab_tensor(model, ids, labels) == 0

"""The training loss without the batch's full-vocabulary logits: same value and gradients as transformers' causal-LM
loss on full logits, and no [batch, seq, vocab] tensor kept for the backward pass; with a frozen output layer (LoRA,
P-Tuning v2) none recomputed in it either."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from glm_ft.chatglm3.configuration import ChatGLMConfig
from torch.utils._python_dispatch import TorchDispatchMode

from glm_ft.chatglm3.loss import chunked_causal_lm_loss
from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
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


@pytest.mark.parametrize("head_trains", [True, False], ids=["trained_head", "frozen_head"])
@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(model, chunk, num_items, head_trains):
    ids, labels = batch(model.config.padded_vocab_size)
    head = model.transformer.output_layer
    head.weight.requires_grad_(head_trains)
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


class VocabProducts(TorchDispatchMode):
    """Counts the matrix products whose output has the vocabulary as its last dimension (logits)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) and \
                out.shape[-1] == self.vocab:
            self.count += 1
        return out


@pytest.mark.parametrize("head_trains", [True, False], ids=["trained_head", "frozen_head"])
def test_a_frozen_output_layer_makes_logits_once_and_none_in_the_backward_pass(model, head_trains):
    """Full fine-tuning recomputes each chunk's logits in the backward pass (three products per chunk, none kept);
    with the output layer frozen, the gradient is taken as the logits are made: two products, none in the backward."""
    ids, labels = batch(model.config.padded_vocab_size)
    model.transformer.output_layer.weight.requires_grad_(head_trains)
    model.train()
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    counter = VocabProducts(model.config.padded_vocab_size)
    with counter:
        loss.backward()
    assert counter.count == (1 if head_trains else 0)
    assert largest_saved_vocab_tensor(model, ids, labels) == 0


def test_a_frozen_output_layer_under_bf16_autocast_gives_autograds_loss_and_gradients(model):
    ids, labels = batch(model.config.padded_vocab_size)
    head = model.transformer.output_layer
    head.weight.requires_grad_(False)
    results = []
    for loss_fn in (lambda h: ForCausalLMLoss(head(h), labels, model.config.padded_vocab_size),
                    lambda h: chunked_causal_lm_loss(h, head, labels, chunk=4)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model.transformer(input_ids=ids, use_cache=False).last_hidden_state)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (expected, expected_grads), (loss, got) = results
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-3)
    assert set(got) == set(expected_grads) and len(got) > 5
    for name in got:  # bf16's precision: the same products, summed in another order
        torch.testing.assert_close(got[name], expected_grads[name], atol=2e-3, rtol=2e-2, msg=name)


def test_an_output_layer_with_hooks_is_called_as_a_module(model):
    """ZeRO-3 gathers a partitioned weight in a forward hook, accelerate's offload in `_hf_hook`: such a layer is
    called, never read directly."""
    ids, labels = batch(model.config.padded_vocab_size)
    head = model.transformer.output_layer
    head.weight.requires_grad_(False)
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
    chunked_causal_lm_loss(hidden, head, labels, chunk=4).backward()
    targets = int((labels[:, 1:] != -100).sum())
    assert sum(calls) == 2 * targets  # each chunk's forward and its recomputation in the backward pass

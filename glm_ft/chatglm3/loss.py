"""The training loss over ChatGLM3's 65,024-token vocabulary, without the batch's full-vocabulary logits.

transformers' causal-LM loss (shift, ignore -100, fp32 logits, sum / num_items_in_batch or mean), computed only at
positions that have a target (prompt tokens, most of a ChatGLM3 sample, cost nothing), `chunk` rows at a time:
- a frozen output layer (LoRA, P-Tuning v2): each chunk's gradient is taken as its logits are made, so the
  backward pass neither keeps nor recomputes them (two matrix products per chunk, as with full logits);
- otherwise (full fine-tuning, an adapted or ZeRO-3-partitioned output layer): each chunk is recomputed in the
  backward pass instead of kept (three products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Rows of logits computed at once: 1024 x 65,024 fp32 is 254 MiB, against 4 x 2,048 x 65,024 (2 GiB) for a batch's
# full logits.
LOSS_CHUNK_TOKENS = 1024


def chunked_causal_lm_loss(hidden_states, output_layer, labels, num_items_in_batch=None, chunk=LOSS_CHUNK_TOKENS):
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
    keep = targets != -100
    hidden, targets = hidden_states[keep], targets[keep]
    grad_wanted = torch.is_grad_enabled()
    weight = _frozen_weight(output_layer) if grad_wanted and hidden.requires_grad else None
    if weight is not None:
        total = _FrozenHeadLoss.apply(hidden, weight, targets, chunk)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            part = hidden[start:start + chunk], output_layer, targets[start:start + chunk]
            total = total + (checkpoint(_summed_token_loss, *part, use_reentrant=False) if grad_wanted
                             else _summed_token_loss(*part))
    if num_items_in_batch is None:
        return total / keep.sum()  # a batch without targets gives NaN, as transformers' mean does
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _summed_token_loss(hidden: torch.Tensor, output_layer: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output_layer(hidden).float(), targets, reduction="sum")


def _frozen_weight(output_layer: nn.Module) -> torch.Tensor | None:
    """The weight of a plain frozen bias-free nn.Linear that computes here what calling it would: not an adapter's
    wrapper, not partitioned by ZeRO-3 (`ds_id`), without hooks (ZeRO-3's gathers, accelerate's offload)."""
    if type(output_layer) is not nn.Linear or output_layer.bias is not None:
        return None
    weight = output_layer.weight
    hooked = output_layer._forward_pre_hooks or output_layer._forward_hooks or hasattr(output_layer, "_hf_hook")
    return None if weight.requires_grad or hasattr(weight, "ds_id") or hooked else weight


class _FrozenHeadLoss(torch.autograd.Function):
    """The summed loss of `hidden` rows against `targets` through a frozen `weight`; d loss / d hidden is computed
    chunk by chunk in the forward pass, in the dtypes autograd would use (autocast included), and kept (rows x
    hidden) in place of the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            rows, target = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(rows, weight)
            scores = logits.float()
            lse = torch.logsumexp(scores, dim=-1)
            total += (lse - scores.gather(1, target[:, None]).squeeze(1)).sum()
            # d loss / d scores = softmax - one-hot, in place of the scores
            probs = scores.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(target), device=target.device), target] -= 1
            grad[start:start + chunk] = (probs.to(logits.dtype) @ weight.to(logits.dtype)).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None

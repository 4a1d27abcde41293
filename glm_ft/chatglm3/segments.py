"""Packed rows: several samples in one row, told apart by `segment_ids` ([batch, seq]; 1, 2, ... per sample in
the row, 0 for padding).

Each sample must behave exactly as if it were alone in its row: its positions count from 0 and its tokens attend
only to earlier tokens of the same sample (a block-diagonal causal mask). The P-Tuning v2 prefix stays visible to
every sample, as it is to an unpacked row.
"""

from __future__ import annotations

import torch


def segment_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own sample (padding gets harmless positions too)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


def segment_attention_mask(segment_ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Boolean [batch, 1, seq, prefix + seq] mask (True = may attend): causal within a sample, nothing across.
    Padding attends to padding only, so no query row is empty (an empty row gives NaN)."""
    batch, seq = segment_ids.shape
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    if prefix_len:
        mask = torch.cat((mask.new_ones(batch, seq, prefix_len), mask), dim=-1)
    return mask[:, None]

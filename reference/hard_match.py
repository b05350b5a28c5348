"""Pure-PyTorch hard-match attention (HMA): the ground truth for gesr_kernels.hard_match.

Simple and memory-hungry on purpose: each user's (n_b, N_b, P) comparison tensor is materialised.
Same signatures, validation and semantics as ``gesr_kernels.hard_match_count`` /
``gesr_kernels.hard_match_embedding`` (see their docstrings).
"""
from typing import Optional

import torch

from gesr_kernels.hard_match import validate_hard_match_args, validate_weight


def hard_match_count(history_ids: torch.Tensor, history_offsets: torch.Tensor,
                     candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor, max_count: int, *,
                     pad_id: Optional[int] = None,
                     candidate_history_lengths: Optional[torch.Tensor] = None,
                     validate: bool = True) -> torch.Tensor:
    """Reference of ``gesr_kernels.hard_match_count``: (total_n, P) int32 capped match counts."""
    validate_hard_match_args("hard_match_count", history_ids, history_offsets, candidate_ids,
                             candidate_offsets, max_count, pad_id, candidate_history_lengths, validate)
    total_n, num_pairs = candidate_ids.shape
    counts = torch.zeros(total_n, num_pairs, dtype=torch.int32, device=candidate_ids.device)
    hist_off = history_offsets.tolist()
    cand_off = candidate_offsets.tolist()
    for b in range(len(hist_off) - 1):
        h0, h1 = hist_off[b], hist_off[b + 1]
        c0, c1 = cand_off[b], cand_off[b + 1]
        if c1 == c0:
            continue
        hist = history_ids[h0:h1].to(torch.int64)            # (N_b, P)
        cand = candidate_ids[c0:c1].to(torch.int64)          # (n_b, P)
        match = cand[:, None, :] == hist[None, :, :]         # (n_b, N_b, P)
        if pad_id is not None:
            match &= (cand != pad_id)[:, None, :]
        if candidate_history_lengths is not None:
            position = torch.arange(h1 - h0, device=hist.device)
            visible = position[None, :] < candidate_history_lengths[c0:c1, None].to(torch.int64)
            match &= visible[:, :, None]
        counts[c0:c1] = match.sum(dim=1).clamp(max=max_count).to(torch.int32)
    return counts


def hard_match_embedding(history_ids: torch.Tensor, history_offsets: torch.Tensor,
                         candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor,
                         weight: torch.Tensor, max_count: int, *, pad_id: Optional[int] = None,
                         candidate_history_lengths: Optional[torch.Tensor] = None,
                         mode: str = "concat", validate: bool = True) -> torch.Tensor:
    """Reference of ``gesr_kernels.hard_match_embedding``: (total_n, P*D) for "concat", (total_n, D)
    for "sum" (summed in fp32), dtype of ``weight``."""
    validate_weight("hard_match_embedding", weight, history_ids, candidate_ids, max_count, mode)
    counts = hard_match_count(history_ids, history_offsets, candidate_ids, candidate_offsets, max_count,
                              pad_id=pad_id, candidate_history_lengths=candidate_history_lengths,
                              validate=validate)
    num_pairs = candidate_ids.shape[1]
    rows = counts.to(torch.int64) + torch.arange(num_pairs, device=counts.device) * (max_count + 1)
    embedded = torch.nn.functional.embedding(rows, weight)  # (total_n, P, D)
    if mode == "concat":
        return embedded.reshape(counts.shape[0], num_pairs * weight.shape[1])  # not -1: total_n may be 0
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return embedded.to(acc_dtype).sum(dim=1).to(weight.dtype)

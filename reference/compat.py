"""Pure-PyTorch twin of ``gesr_kernels.compat.hstu_mha``: same signature, same checks, dense math.

Independent of the kernel's formulation: per sequence it builds the (L, L) visibility mask of the rule
and computes ``silu(alpha * q k^T) / max_seq_len * mask @ v`` directly, in the input dtype. It forms
L x L matrices per sequence: ground truth for tests, not for speed.
"""
from typing import Optional

import torch

from gesr_kernels.compat import FN, validate_hstu_arguments


def visibility(length: int, targets: int, device=None) -> torch.Tensor:
    """(L, L) bool: entry (i, j) says whether row i of a sequence sees row j, its last ``targets`` rows
    being candidates."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    first_candidate = length - targets
    history_row, history_col = i < first_candidate, j < first_candidate
    return (history_row & history_col & (j <= i)) | (~history_row & (history_col | (i == j)))


def hstu_mha(max_seq_len: int, alpha: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             seq_offsets: torch.Tensor, *, causal: bool = True, num_targets: Optional[torch.Tensor] = None,
             validate: bool = True) -> torch.Tensor:
    """Reference for ``gesr_kernels.compat.hstu_mha`` (see its docstring for the contract)."""
    alpha = validate_hstu_arguments(FN, max_seq_len, alpha, q, k, v, seq_offsets, causal, num_targets, validate)
    offsets = seq_offsets.tolist()
    targets = [0] * (len(offsets) - 1) if num_targets is None else num_targets.tolist()
    parts = [q.new_zeros(0, q.shape[1], v.shape[2])]
    for b, t in enumerate(targets):
        start, end = offsets[b], offsets[b + 1]
        if end == start:
            continue
        qb, kb, vb = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (H, L, d)
        weights = torch.nn.functional.silu(alpha * (qb @ kb.transpose(1, 2))) / max_seq_len
        weights = weights * visibility(end - start, t, q.device)
        parts.append((weights @ vb).transpose(0, 1))
    return torch.cat(parts)

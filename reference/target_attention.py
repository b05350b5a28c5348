"""Pure-PyTorch twin of ``gesr_kernels.target_aware_attention``: same signature, same semantics.

Plain per-user loops over explicit masks, computed in the input dtype; differentiable through autograd.
It forms per-user score matrices (N_b x N_b and n_b x (N_b + 1)), which the kernel never does: use it
as ground truth and for reading, not for speed.
"""
from typing import Optional, Tuple

import torch

from gesr_kernels.target_attention import FN, validate_arguments


def _weights(scores: torch.Tensor, visible: torch.Tensor, activation: str, normalizer: float) -> torch.Tensor:
    """Attention weights (H, M, K) from scaled scores (H, M, K) and a visibility mask (M, K)."""
    if activation == "silu":
        return torch.nn.functional.silu(scores) * visible / normalizer
    sees_any = visible.any(dim=-1, keepdim=True)
    # Rows that see nothing get zeros; score 0 there keeps the softmax (and its gradient) finite.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~sees_any, 0.0)
    return torch.softmax(scores, dim=-1) * sees_any


def target_aware_attention(history_q: Optional[torch.Tensor], history_k: torch.Tensor,
                           history_v: torch.Tensor, history_offsets: torch.Tensor,
                           candidate_q: torch.Tensor, candidate_k: Optional[torch.Tensor],
                           candidate_v: Optional[torch.Tensor], candidate_offsets: torch.Tensor, *,
                           activation: str = "softmax", scale: Optional[float] = None,
                           silu_normalizer: Optional[float] = None, history_causal: bool = True,
                           candidate_history_lengths: Optional[torch.Tensor] = None,
                           max_history_len: Optional[int] = None, max_candidates: Optional[int] = None,
                           validate: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Reference for ``gesr_kernels.target_aware_attention`` (see its docstring for the contract)."""
    args = validate_arguments(
        FN, history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
        candidate_offsets, activation=activation, scale=scale, silu_normalizer=silu_normalizer,
        history_causal=history_causal, candidate_history_lengths=candidate_history_lengths,
        max_history_len=max_history_len, max_candidates=max_candidates, validate=validate)
    hoff = history_offsets.tolist()
    coff = candidate_offsets.tolist()
    lengths = None if candidate_history_lengths is None else candidate_history_lengths.long()
    history_parts, candidate_parts = [], []
    for b in range(args.num_users):
        h0, h1, c0, c1 = hoff[b], hoff[b + 1], coff[b], coff[b + 1]
        n_hist, n_cand = h1 - h0, c1 - c0
        k = history_k[h0:h1].transpose(0, 1)  # (H, N_b, d_qk)
        v = history_v[h0:h1].transpose(0, 1)  # (H, N_b, d_v)
        rows = torch.arange(n_hist, device=candidate_q.device)
        if not args.cached and n_hist > 0:
            q = history_q[h0:h1].transpose(0, 1)
            visible = rows[None, :] <= rows[:, None] if history_causal else torch.ones(
                n_hist, n_hist, dtype=torch.bool, device=q.device)
            out = _weights(args.scale * (q @ k.transpose(1, 2)), visible, activation, args.silu_normalizer) @ v
            history_parts.append(out.transpose(0, 1))
        if n_cand == 0:
            continue
        q = candidate_q[c0:c1].transpose(0, 1)  # (H, n_b, d_qk)
        seen = torch.full((n_cand,), n_hist, dtype=torch.int64, device=q.device)
        if lengths is not None:
            seen = torch.minimum(lengths[c0:c1], seen)
        visible = rows[None, :] < seen[:, None]  # (n_b, N_b)
        scores = args.scale * (q @ k.transpose(1, 2))
        if not args.cross:
            # The candidate's own key is one more column; its value is the candidate's own v.
            own = args.scale * (q * candidate_k[c0:c1].transpose(0, 1)).sum(-1, keepdim=True)
            scores = torch.cat([scores, own], dim=-1)
            visible = torch.cat([visible, visible.new_ones(n_cand, 1)], dim=-1)
        weights = _weights(scores, visible, activation, args.silu_normalizer)
        out = weights[..., :n_hist] @ v
        if not args.cross:
            out = out + weights[..., n_hist:] * candidate_v[c0:c1].transpose(0, 1)
        candidate_parts.append(out.transpose(0, 1))
    # Every row belongs to exactly one user and users are in row order, so the blocks tile the output.
    empty = candidate_q.new_zeros(0, args.num_heads, args.d_v)
    history_out = None if args.cached else torch.cat(history_parts) if history_parts else empty
    candidate_out = torch.cat(candidate_parts) if candidate_parts else empty
    return history_out, candidate_out

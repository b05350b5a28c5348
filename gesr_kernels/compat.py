"""Adapters for models written against other attention APIs.

``hstu_mha`` takes the HSTU calling convention (queries, keys and values of concatenated
``[history ; candidates]`` sequences, jagged by one offsets tensor, the last ``num_targets[b]`` tokens of
sequence b being its candidates) and computes it with ``target_aware_attention``.

How a sequence is split, without a host sync and without copying q, k or v. The op takes a history batch
and a candidate batch, each jagged by its own offsets, with the same number of users. Both batches are
the caller's q/k/v tensors themselves, seen through two offset arrays over 2B+1 "users". With s the
sequence offsets and e_b = s_{b+1} - num_targets[b] (where b's candidates start):

    user        history rows           candidate rows          role
    0           (empty)                [0, e_0)                 filler (skipped)
    2b+1        [s_b, e_b)             [e_b, s_{b+1})           sequence b: its history, its candidates
    2b+2        [e_b, s_{b+1})         [s_{b+1}, e_{b+1})       filler (skipped; the last one is empty)

Every row is a history row of one user and a candidate row of another. The even users (fillers) are
marked in the op's internal ``merged_skip``: their programs exit after the tile lookup, forward and
backward, so each row is computed once (as history of its sequence's user 2b+1, or as one of its
candidates) and no candidate x candidate attention is computed. The op writes the candidate results into
the history output's rows, so one (L_total, H, d_v) tensor holds the whole result (no second output, no
merge), and in the backward the candidates' gradients into the history gradients' rows (one gradient per
q, k, v: nothing for autograd to sum).

Why this layout rather than packing history and candidates into separate tensors: packing needs their
sizes, i.e. ``num_targets.sum()`` on the host, a device-to-host sync per call that
torch.compile(fullgraph=True) cannot trace and CUDA graphs cannot capture. Here every size follows from
the input shapes alone, so the call compiles with fullgraph=True and, with ``validate=False``, is
CUDA-graph capturable.
"""
from typing import Optional

import torch

from ._core.validation import (FLOAT_DTYPES, INDEX_DTYPES, check_int, check_kernel_device, check_offsets,
                               check_real, check_same_device, check_tensor, should_check_data)
from .target_attention import _check_head_dim, _target_aware_attention, target_aware_attention

FN = "hstu_mha"


def validate_hstu_arguments(fn, max_seq_len, alpha, q, k, v, seq_offsets, causal, num_targets,
                            validate) -> float:
    """Check every argument of ``hstu_mha`` on the host; return alpha as a float.

    Raises TypeError for wrong types/dtypes and ValueError for shapes, devices and values. The checks that
    read tensor data (offset contents, num_targets range, sequence lengths against max_seq_len) run only
    when ``should_check_data(validate)``: they cost one device-to-host copy of the offsets and one of
    num_targets.
    """
    check_int(fn, "max_seq_len", max_seq_len, minimum=1)
    alpha = check_real(fn, "alpha", alpha)
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    if not causal:
        raise ValueError(f"{fn}: only causal=True is supported (non-candidate rows attend to earlier "
                         f"non-candidate rows); got causal=False")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, ndim=3, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    total, heads, d_qk = q.shape
    if heads < 1:
        raise ValueError(f"{fn}: q must have H >= 1 heads, got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != total or v.shape[1] != heads:
        raise ValueError(f"{fn}: v must have shape ({total}, {heads}, d_v) like q, got {tuple(v.shape)}")
    _check_head_dim(fn, "q", d_qk, "d_qk")
    _check_head_dim(fn, "v", v.shape[2], "d_v")

    check_data = should_check_data(validate)
    host_offsets = check_offsets(fn, "seq_offsets", seq_offsets, total, None, check_data=check_data)
    num_seqs = seq_offsets.shape[0] - 1
    if num_targets is not None:
        check_tensor(fn, "num_targets", num_targets, dtypes=INDEX_DTYPES)
        if num_targets.dim() != 1 or num_targets.shape[0] != num_seqs:
            raise ValueError(f"{fn}: num_targets must be 1-D with B = {num_seqs} entries (one per sequence), "
                             f"got shape {tuple(num_targets.shape)}")
    check_same_device(fn, q=q, k=k, v=v, seq_offsets=seq_offsets, num_targets=num_targets)
    if check_data and num_seqs > 0:
        lengths = host_offsets.diff()  # the host copy the offset checks made
        longest = int(lengths.max())
        if longest > max_seq_len:
            raise ValueError(f"{fn}: max_seq_len must be >= the longest sequence in the batch ({longest}), "
                             f"got {max_seq_len}")
        if num_targets is not None:
            targets = num_targets.detach().to("cpu", torch.int64)
            bad = torch.nonzero((targets < 0) | (targets > lengths))
            if bad.numel():
                b = int(bad[0, 0])
                raise ValueError(f"{fn}: num_targets[{b}] must be in [0, {int(lengths[b])}] (the length of "
                                 f"sequence {b}), got {int(targets[b])}")
    return alpha


def split_offsets(seq_offsets: torch.Tensor, num_targets: torch.Tensor):
    """Offsets of the 2B+1 users of the module docstring (device-side, no sync): (history_offsets,
    candidate_offsets), each (2B+2,) int64."""
    s = seq_offsets.to(torch.int64)
    # Where sequence b-1's candidates start (e_{b-1}; 0 = s_0 for b = 0), for b = 0..B: interleaved with s,
    # that is [0, s_0, e_0, s_1, ..., e_{B-1}, s_B], the history offsets; the candidate offsets are the same
    # list shifted by one, [s_0 = 0, e_0, s_1, ..., e_{B-1}, s_B, s_B]. Four small kernels (graph replays
    # pay a few microseconds for each).
    previous_starts = s - torch.nn.functional.pad(num_targets.to(torch.int64), (1, 0))
    history = torch.stack([previous_starts, s], 1).flatten()
    return history, torch.cat([history[1:], s[-1:]])


def hstu_mha(max_seq_len: int, alpha: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             seq_offsets: torch.Tensor, *, causal: bool = True, num_targets: Optional[torch.Tensor] = None,
             validate: bool = True) -> torch.Tensor:
    """HSTU multi-head attention over jagged ``[history ; candidates]`` sequences, computed by the
    target-aware attention kernels.

    Shapes (B sequences, L_total rows over all of them, H heads):
        q, k         (L_total, H, d_qk)
        v            (L_total, H, d_v)
        seq_offsets  (B+1,) int32/int64: sequence b is rows seq_offsets[b]:seq_offsets[b+1]
        num_targets  (B,) int32/int64 or None: the last num_targets[b] rows of sequence b are its
                     candidates (0 <= num_targets[b] <= its length); None means no candidates anywhere.
    Dtypes and head dims as for ``target_aware_attention``: float16/bfloat16/float32 (float64 for
    gradcheck), one dtype for q, k, v; d_qk and d_v multiples of 16 in [16, 256].

    Returns (L_total, H, d_v) in the input dtype:
        out_i = sum_j valid(i, j) * silu(alpha * q_i . k_j) / max_seq_len * v_j,
    where a non-candidate row i sees the non-candidate rows j <= i of its sequence, and a candidate row
    sees every non-candidate row of its sequence and itself (never another candidate). Differentiable in
    q, k and v.

    It is one ``target_aware_attention`` call (activation="silu", scale=alpha,
    silu_normalizer=max_seq_len) on the caller's tensors, with offsets that split each sequence into its
    history and candidate parts on the device; see the module docstring for the layout and its cost (no
    copies of q/k/v, no host sync, no candidate x candidate work).

    ``causal``: only True is supported. ``validate=False`` skips the checks that read tensor data (offset
    contents, num_targets range, max_seq_len >= the longest sequence): with it the call makes no
    device-to-host copy. They are skipped automatically under torch.compile. max_seq_len must be a true
    bound either way: without num_targets it is also the op's ``max_history_len`` (history tiles run
    longest first across sequences, measured 1.03-1.20x faster on the H100), and unvalidated, a value
    below the longest sequence leaves the rows past it uncomputed.

    Raises:
        TypeError: q, k, v not tensors or not one float dtype; seq_offsets / num_targets not int32/int64;
            max_seq_len not an int; alpha not a number; causal not a bool.
        ValueError: causal=False; wrong ranks; k's shape differs from q's; v's rows or heads differ;
            unsupported head dims; tensors on different devices; malformed seq_offsets (wrong rank, not
            from 0, decreasing, not ending at L_total); num_targets not of shape (B,) or outside
            [0, length of its sequence]; max_seq_len < 1 or shorter than a sequence; alpha not finite; CPU tensors
            outside the Triton interpreter.
    """
    alpha = validate_hstu_arguments(FN, max_seq_len, alpha, q, k, v, seq_offsets, causal, num_targets, validate)
    check_kernel_device(FN, "q", q)
    options = dict(activation="silu", scale=alpha, silu_normalizer=float(max_seq_len), history_causal=True,
                   validate=False)  # the offsets below are valid by construction once ours are
    if num_targets is None:
        # Every row is history: no candidate batch at all.
        no_candidates = torch.zeros_like(seq_offsets)
        out, _ = target_aware_attention(q, k, v, seq_offsets, q[:0], k[:0], v[:0], no_candidates,
                                        max_history_len=max_seq_len, **options)
        return out
    history_offsets, candidate_offsets = split_offsets(seq_offsets, num_targets)
    # The same rows serve as history and as candidates. Views, not the tensors again: Dynamo cannot trace an
    # autograd.Function given one tensor twice. The even users are fillers (see the module docstring):
    # skipped, so the odd users' history and candidate results (and gradients), written into one tensor
    # each, cover every row.
    skip = torch.arange(1, history_offsets.shape[0], device=q.device, dtype=torch.int32) % 2  # 1 for even users
    out, _ = _target_aware_attention(
        q, k, v, history_offsets, q.view(q.shape), k.view(k.shape), v.view(v.shape), candidate_offsets,
        candidate_history_lengths=None, max_history_len=None, max_candidates=None, merged_skip=skip, **options)
    return out

"""Target-aware attention (GESR / HSTU style): history attends causally to itself, candidates attend to
their user's history and to themselves, never to each other.

Layout of this module (CONVENTIONS): kernels, launchers, registered ops, autograd Function, public API.
"""
import math
from typing import NamedTuple, Optional

import torch

from ._core.validation import (FLOAT_DTYPES, check_int, check_lengths, check_offsets, check_same_device,
                               check_tensor, should_check_data)

FN = "target_aware_attention"
ACTIVATIONS = ("softmax", "silu")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


# ------------------------------------------------------------------------------------------------
# Argument checks, shared with reference/target_attention.py so that both raise the same errors.
# ------------------------------------------------------------------------------------------------
class Arguments(NamedTuple):
    """What the checks resolved: modes, sizes, and the effective scalars."""
    cached: bool            # history_q is None: no history output
    cross: bool             # candidate_k/v are None: no self term
    num_users: int
    num_heads: int
    d_qk: int
    d_v: int
    scale: float
    silu_normalizer: float  # 1.0 for softmax (unused there)


def _check_head_dim(fn: str, name: str, value: int, what: str) -> None:
    if value < MIN_HEAD_DIM or value > MAX_HEAD_DIM or value % 16 != 0:
        raise ValueError(f"{fn}: {name} has {what} = {value}; supported head dims are multiples of 16 "
                         f"from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")


def _check_real(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return value


def _max_segment(offsets: torch.Tensor) -> int:
    """Longest segment of ``offsets`` (one device-to-host copy)."""
    if offsets.shape[0] < 2:
        return 0
    return int((offsets[1:] - offsets[:-1]).max().item())


def validate_arguments(fn, history_q, history_k, history_v, history_offsets,
                       candidate_q, candidate_k, candidate_v, candidate_offsets, *, activation, scale,
                       silu_normalizer, history_causal, candidate_history_lengths, max_history_len,
                       max_candidates, validate) -> Arguments:
    """Check every argument of ``target_aware_attention`` on the host and resolve the defaults.

    Raises TypeError for wrong types/dtypes and ValueError for shapes, devices and values. Data-dependent
    checks (offset contents, negative lengths, bounds smaller than the data) run only when
    ``should_check_data(validate)``.
    """
    check_data = should_check_data(validate)
    if history_q is not None:
        check_tensor(fn, "history_q", history_q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "history_k", history_k, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "history_v", history_v, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "candidate_q", candidate_q, ndim=3, dtypes=FLOAT_DTYPES)
    if (candidate_k is None) != (candidate_v is None):
        given, missing = ("candidate_k", "candidate_v") if candidate_v is None else ("candidate_v", "candidate_k")
        raise ValueError(f"{fn}: candidate_k and candidate_v must be given together (both None means "
                         f"cross attention); got {given} but {missing} is None")
    if candidate_k is not None:
        check_tensor(fn, "candidate_k", candidate_k, ndim=3, dtypes=FLOAT_DTYPES)
        check_tensor(fn, "candidate_v", candidate_v, ndim=3, dtypes=FLOAT_DTYPES)
    tensors = {"candidate_q": candidate_q, "history_q": history_q, "history_k": history_k,
               "history_v": history_v, "candidate_k": candidate_k, "candidate_v": candidate_v}
    given = {k: v for k, v in tensors.items() if v is not None}
    dtype = candidate_q.dtype
    for name, t in given.items():
        if t.dtype != dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of candidate_q ({dtype}), got {t.dtype}")

    num_heads, d_qk = candidate_q.shape[1], candidate_q.shape[2]
    d_v = history_v.shape[2]
    if num_heads < 1:
        raise ValueError(f"{fn}: candidate_q must have H >= 1 heads, got shape {tuple(candidate_q.shape)}")
    for name, t in given.items():
        if t.shape[1] != num_heads:
            raise ValueError(f"{fn}: {name} must have H = {num_heads} heads like candidate_q, "
                             f"got shape {tuple(t.shape)}")
    for name in ("history_q", "history_k", "candidate_k"):
        t = tensors[name]
        if t is not None and t.shape[2] != d_qk:
            raise ValueError(f"{fn}: {name} must have d_qk = {d_qk} like candidate_q, got shape {tuple(t.shape)}")
    if candidate_v is not None and candidate_v.shape[2] != d_v:
        raise ValueError(f"{fn}: candidate_v must have d_v = {d_v} like history_v, "
                         f"got shape {tuple(candidate_v.shape)}")
    _check_head_dim(fn, "candidate_q", d_qk, "d_qk")
    _check_head_dim(fn, "history_v", d_v, "d_v")

    total_history = history_k.shape[0]
    for name in ("history_q", "history_v"):
        t = tensors[name]
        if t is not None and t.shape[0] != total_history:
            raise ValueError(f"{fn}: {name} must have {total_history} rows like history_k, "
                             f"got shape {tuple(t.shape)}")
    total_candidates = candidate_q.shape[0]
    for name in ("candidate_k", "candidate_v"):
        t = tensors[name]
        if t is not None and t.shape[0] != total_candidates:
            raise ValueError(f"{fn}: {name} must have {total_candidates} rows like candidate_q, "
                             f"got shape {tuple(t.shape)}")

    check_offsets(fn, "candidate_offsets", candidate_offsets, total_candidates, None, check_data=check_data)
    num_users = candidate_offsets.shape[0] - 1
    check_offsets(fn, "history_offsets", history_offsets, total_history, num_users, check_data=check_data)
    check_lengths(fn, "candidate_history_lengths", candidate_history_lengths, total_candidates,
                  check_data=check_data)
    check_same_device(fn, **given, history_offsets=history_offsets, candidate_offsets=candidate_offsets,
                      candidate_history_lengths=candidate_history_lengths)

    if not isinstance(activation, str):
        raise TypeError(f"{fn}: activation must be a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be 'softmax' or 'silu', got {activation!r}")
    if not isinstance(history_causal, bool):
        raise TypeError(f"{fn}: history_causal must be a bool, got {type(history_causal).__name__}")
    scale = 1.0 / math.sqrt(d_qk) if scale is None else _check_real(fn, "scale", scale)
    if silu_normalizer is not None:
        silu_normalizer = _check_real(fn, "silu_normalizer", silu_normalizer)
        if silu_normalizer <= 0:
            raise ValueError(f"{fn}: silu_normalizer must be > 0, got {silu_normalizer}")

    for name, bound, offsets in (("max_history_len", max_history_len, history_offsets),
                                 ("max_candidates", max_candidates, candidate_offsets)):
        if bound is None:
            continue
        check_int(fn, name, bound, minimum=0)
        if check_data:
            longest = _max_segment(offsets)
            if bound < longest:
                what = "history" if name == "max_history_len" else "candidate list"
                raise ValueError(f"{fn}: {name} must be >= the longest {what} in the batch ({longest}), "
                                 f"got {bound}")

    if activation == "softmax":
        normalizer = 1.0
    elif silu_normalizer is not None:
        normalizer = silu_normalizer
    else:
        # Batch-dependent default; needs the longest history (a device-to-host copy unless given).
        longest_history = max_history_len if max_history_len is not None else _max_segment(history_offsets)
        normalizer = float(max(1, longest_history))
    return Arguments(cached=history_q is None, cross=candidate_k is None, num_users=num_users,
                     num_heads=num_heads, d_qk=d_qk, d_v=d_v, scale=scale, silu_normalizer=normalizer)

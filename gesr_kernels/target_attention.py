"""Target-aware attention (GESR / HSTU style): history attends causally to itself, candidates attend to
their user's history and to themselves, never to each other.

Design. Every row of a query tile (history or candidate) sees a prefix of its user's history: the
``visible`` length is i+1 for a causal history row i, N_b for a non-causal one, and
min(candidate_history_lengths[c], N_b) for a candidate c. One inner loop serves all of them, so history
attention is computed once per user and each candidate tile streams its user's history K/V tile by tile:
unmasked over the key tiles every row of the query tile sees, masked over the rest (the causal diagonal,
cutoffs, the last partial tile). A candidate's own key is merged row-wise (a q_c.k_c dot per row) into the
online softmax: there are no candidate x candidate tiles and no n x N or N x N intermediates. The forward
is one launch over a flat grid of (query tile, head), candidate and history tiles alike;
``_core.jagged.tile_owner`` maps a tile to its user without a host sync. In cached mode, when candidate
tiles are too few to fill the GPU, each tile's key range is cut into runs (split-K) whose partial sums a
second small launch merges through their log-sum-exp (``_key_splits``, ``_merge_splits_kernel``).

Backward without atomics, in one launch besides the delta preprocessing: a dK/dV program owns one history
key tile and loops over every query tile (history and candidate) of its user that can see it; a dQ program
owns one query tile and loops over history key tiles. A candidate's own key is seen only by that
candidate, so dk_c and dv_c are computed row-wise in the candidate dQ program. Every output element is
written by exactly one program.

Layout of this module (CONVENTIONS): kernels, launchers, registered ops, autograd Function, argument
checks, public API.
"""
import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._core.env import interpreting
from ._core.host_math import cdiv, next_power_of_2
from ._core.jagged import num_tiles, tile_owner
from ._core.ops import call_op, register_op
from ._core.validation import (FLOAT_DTYPES, check_int, check_lengths, check_offsets, check_real,
                               check_kernel_device, check_same_device, check_tensor,
                               should_check_data)

FN = "target_aware_attention"
ACTIVATIONS = ("softmax", "silu")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = tl.constexpr(1.4426950408889634)  # softmax runs in base 2: exp(x) = exp2(x * log2(e))
# tl.load cache modifiers: the default, and L2 only for data another SM has just written (see _dkdv_tile).
ANY_CACHE, L2_ONLY = tl.constexpr(""), tl.constexpr(".cg")
SUM_ROWS = tl.constexpr(32)  # keys per chunk in _sum_dkdv_parts


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _segment(off_ptr, user):
    """(first row, row count) of ``user``'s segment of a jagged tensor with offsets ``off_ptr``."""
    begin = tl.load(off_ptr + user).to(tl.int64)
    return begin, tl.load(off_ptr + user + 1).to(tl.int64) - begin


@triton.jit
def _unless_skipped(length, skip_ptr, user):
    """``length``, or 0 for a user marked in ``merged_skip`` (its programs then find no rows and exit)."""
    return tl.where(tl.load(skip_ptr + user) != 0, 0, length)


@triton.jit
def _tile_context(q_off_ptr, kv_off_ptr, num_users, tile, BLOCK_M: tl.constexpr):
    """The tile's first row (within the user; >= q_len for a spare tile), both segments, and the user of
    row tile ``tile`` (see ``_core.jagged.tile_owner``)."""
    user, first_row, q_end = tile_owner(q_off_ptr, num_users, tile, BLOCK_M)
    q_begin = tl.load(q_off_ptr + user).to(tl.int64)
    kv_begin, kv_len = _segment(kv_off_ptr, user)
    return first_row - q_begin, q_begin, q_end - q_begin, kv_begin, kv_len, user


@triton.jit
def _tile_by_position(q_off_ptr, kv_off_ptr, num_users, group_users, num_positions, job, BLOCK_M: tl.constexpr):
    """``_tile_context`` for job ``job`` of the position-major order (see ``_history_order``): users in groups
    of ``group_users``; within a group, every user's tile at position ``num_positions`` - 1 first, then every
    user's tile before it, and so on. A position past its user's rows, or a user past the batch, is a spare
    tile (first row >= length). No search: the user and the position follow from the job index."""
    group_jobs = group_users * num_positions
    in_group = job % group_jobs
    user = (job // group_jobs) * group_users + in_group % group_users
    position = num_positions - 1 - in_group // group_users
    real = user < num_users
    user = tl.minimum(user, num_users - 1)  # a spare user reads the last one's offsets, then gets length 0
    q_begin, q_len = _segment(q_off_ptr, user)
    q_len = tl.where(real, q_len, 0)
    kv_begin, kv_len = _segment(kv_off_ptr, user)
    return position.to(tl.int64) * BLOCK_M, q_begin, q_len, kv_begin, kv_len, user


@triton.jit
def _masked_load(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr,
                 CACHE: tl.constexpr = ANY_CACHE):
    """Load a 2-D tile, masking only what may be out of bounds: a mask along the contiguous head dim
    that is not known to be all-true at compile time stops the compiler from vectorising the load.
    CACHE: ``tl.load``'s cache modifier."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0, cache_modifier=CACHE)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0, cache_modifier=CACHE)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0, cache_modifier=CACHE)
    else:
        x = tl.load(ptrs, cache_modifier=CACHE)
    return x


@triton.jit
def _load_rows(ptr, rows, head, stride_n, stride_h, stride_d, width, row_ok, BLOCK_D: tl.constexpr,
               EVEN_D: tl.constexpr, CACHE: tl.constexpr = ANY_CACHE):
    """(len(rows), BLOCK_D) tile of one head of a (rows, H, width) tensor; zeros outside rows/width.
    EVEN_D: BLOCK_D == width, so the head dim needs no mask. CACHE: ``tl.load``'s cache modifier."""
    offs = tl.arange(0, BLOCK_D)
    return _masked_load(ptr + rows[:, None] * stride_n + head * stride_h + offs[None, :] * stride_d,
                        row_ok, offs < width, True, not EVEN_D, CACHE)


@triton.jit
def _store_rows(ptr, rows, head, stride_n, stride_h, stride_d, width, row_ok, value, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr):
    """Store a tile written like ``_load_rows`` reads it, cast to the tensor's dtype."""
    offs = tl.arange(0, BLOCK_D)
    ptrs = ptr + rows[:, None] * stride_n + head * stride_h + offs[None, :] * stride_d
    if EVEN_D:
        tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs < width)[None, :])


@triton.jit
def _visible(rows, q_len, kv_len, len_ptr, q_begin, IS_CANDIDATE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
             CAUSAL: tl.constexpr):
    """How many leading history rows each query row sees (0 for rows past the segment)."""
    valid = rows < q_len
    if IS_CANDIDATE:
        if HAS_LENGTHS:
            seen = tl.load(len_ptr + q_begin + rows, mask=valid, other=0).to(tl.int64)
            visible = tl.minimum(seen, kv_len)
        else:
            visible = tl.zeros_like(rows) + kv_len
    else:
        if CAUSAL:
            visible = tl.minimum(rows + 1, kv_len)
        else:
            visible = tl.zeros_like(rows) + kv_len
    return tl.where(valid, visible, 0)


@triton.jit
def _query_tile(q_ptr, len_ptr, start, q_begin, q_len, kv_len, head, stride_qn, stride_qh, stride_qd, d_qk,
                IS_CANDIDATE: tl.constexpr, HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr, EVEN_DQK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr):
    """The query tile of the forward and dQ programs: (row in range, visible history length, row index in
    the q tensor, q)."""
    rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
    valid = rows < q_len
    visible = _visible(rows, q_len, kv_len, len_ptr, q_begin, IS_CANDIDATE, HAS_LENGTHS, CAUSAL)
    q_rows = q_begin + rows
    q = _load_rows(q_ptr, q_rows, head, stride_qn, stride_qh, stride_qd, d_qk, valid, BLOCK_DQK, EVEN_DQK)
    return valid, visible, q_rows, q


@triton.jit
def _key_tiles(k_ptrs, v_ptrs, k_desc, v_desc, row, col_k, col_v, col_ok, offs_dqk, offs_dv, d_qk, d_v,
               USE_TMA: tl.constexpr, MASKED: tl.constexpr, EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr):
    """The K and V tiles of one step of a key loop (forward or dQ): TMA copies from descriptor row ``row``
    and columns ``col_k`` / ``col_v`` in unmasked loops when USE_TMA, else pointer tiles, masked by
    ``col_ok`` where MASKED and along a head dim that is not a power of two."""
    if USE_TMA and not MASKED:
        k = k_desc.load([tl.cast(row, tl.int32), tl.cast(col_k, tl.int32)])
        v = v_desc.load([tl.cast(row, tl.int32), tl.cast(col_v, tl.int32)])
    else:
        k = _masked_load(k_ptrs, col_ok, offs_dqk < d_qk, MASKED, not EVEN_DQK)
        v = _masked_load(v_ptrs, col_ok, offs_dv < d_v, MASKED, not EVEN_DV)
    return k, v


@triton.jit
def _fwd_key_range(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, desc_row, desc_col_k, desc_col_v,
                   stride_kn, stride_kd, stride_vn, stride_vd, n_lo, n_hi, kv_len, visible, d_qk, d_v, scale,
                   USE_TMA: tl.constexpr, MASKED: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
                   EVEN_DQK: tl.constexpr,
                   EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Attend a query tile to history keys [n_lo, n_hi), BLOCK_N at a time, updating the online-softmax
    state (or the SiLU sum). MASKED=False: every query row of the tile sees every one of these keys, so
    the loop needs no row/column masks; MASKED=True: the ragged rest, masked by ``visible``. USE_TMA: the
    unmasked loop copies its tiles through the TMA descriptors ``k_desc`` / ``v_desc`` (2-D views of the
    whole K / V, see ``_tma_descriptors``) at row ``desc_row`` + key and column ``desc_col_*``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = k_base + (n_lo + offs_n)[:, None] * stride_kn + offs_dqk[None, :] * stride_kd
    v_ptrs = v_base + (n_lo + offs_n)[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    qk_scale = scale * LOG2E
    if not USE_TMA:
        # Key columns as int32 (a user's history is < 2^31 rows): the masked steps compare every column with
        # each row's visible length, and a 64-bit compare takes two instructions (d = 64 masked step: 283 ->
        # 258 SASS instructions; H100, bf16: (32, 1024, 64, 4, 64) forward SiLU 0.1036 -> 0.0970 ms, softmax
        # 0.0877 -> 0.0863). Not with TMA copies: their loops ran slower so (d = 128 forward, SiLU 0.0588 ->
        # 0.0683 ms; bench/RESULTS.md session 10).
        kv_len, visible = tl.cast(kv_len, tl.int32), tl.cast(visible, tl.int32)
        n_lo, n_hi = tl.cast(n_lo, tl.int32), tl.cast(n_hi, tl.int32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < kv_len
        k, v = _key_tiles(k_ptrs, v_ptrs, k_desc, v_desc, desc_row + n0, desc_col_k, desc_col_v, col_ok, offs_dqk,
                          offs_dv, d_qk, d_v, USE_TMA, MASKED, EVEN_DQK, EVEN_DV)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision="ieee")
        if SILU:
            x = s * scale
            p = x * tl.sigmoid(x)
            if MASKED:
                p = tl.where(cols[None, :] < visible[:, None], p, 0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=ACC, input_precision="ieee")
        else:
            # s stays the raw dot product: the base-2 logit s * qk_scale only ever enters through
            # fma(s, qk_scale, -m), which never rounds it, so large logits keep their precision (the row
            # max m is rounded once per row: a common offset that cancels in the softmax).
            if MASKED:
                s = tl.where(cols[None, :] < visible[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
            else:  # every logit is finite here, so m_new is too
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                m_ref = m_new
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(tl.fma(s, qk_scale, -m_ref[:, None]))
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], out_dtype=ACC, input_precision="ieee")
            m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def _finish_rows(acc, m_i, l_i, out_ptr, lse_ptr, q_rows, valid, head, stride_on, stride_oh, stride_od, stride_lh,
                 stride_lp, d_v, out_scale, SILU: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_DV: tl.constexpr):
    """Store a query tile's output from its accumulated state, and for softmax its row statistics:
    +inf / 0 (and a zero output) for a row that sees nothing."""
    if SILU:
        out = acc * out_scale
    else:
        sees = l_i > 0
        l_safe = tl.where(sees, l_i, 1.0)
        out = acc / l_safe[:, None]
        # Row statistics: the base-2 row max m (the offset every p was taken against) and log2 of the sum.
        # The backward folds them into one log-sum-exp m + log2(l) (_backward_stats): one statistic per
        # query step instead of two frees the registers its wgmma tiles need (H100, bf16, backward of
        # (1, 8192, 1024, 4, 128): 0.774 -> 0.729 ms). The sum rounds to m's ulp, so with large logits
        # every p of the backward moves by up to |m| * 2^-24 relatively (test_large_logits' budget).
        stats = lse_ptr + head * stride_lh + q_rows
        tl.store(stats, tl.where(sees, m_i, float("inf")), mask=valid)
        tl.store(stats + stride_lp, tl.where(sees, tl.log2(l_safe), 0.0), mask=valid)
    _store_rows(out_ptr, q_rows, head, stride_on, stride_oh, stride_od, d_v, valid, out, BLOCK_DV, EVEN_DV)


@triton.jit
def _fwd_tile(q_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, out_ptr, lse_ptr, q_off_ptr, kv_off_ptr, len_ptr,
              skip_ptr, num_users, group_users, num_positions, tile, head,
              stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
              stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
              stride_on, stride_oh, stride_od, stride_lh, stride_lp,
              split, num_splits, part_ptr, part_stats_ptr, stride_ps, stride_pn, stride_ph, stride_pss, stride_psp,
              stride_psh, d_qk, d_v, scale, out_scale, USE_TMA: tl.constexpr,
              IS_CANDIDATE: tl.constexpr, HAS_SELF: tl.constexpr, HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_SKIP: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, EVEN_DQK: tl.constexpr,
              EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, POSITIONAL: tl.constexpr):
    """One (query tile, head, key split): out = attention over the visible history prefix (+ own key), and
    the softmax row statistics (see below). ``tile``: an index of the flat tile map (``_tile_context``), or
    with POSITIONAL a job of the position-major order (``_tile_by_position``, groups of ``group_users``
    users, ``num_positions`` tiles per user).
    HAS_SKIP: a user with skip_ptr[user] != 0 is not computed and its rows are not written (``merged_skip``:
    another user's results go there). With ``num_splits`` > 1 the visible keys
    are cut into that many runs of whole key tiles, this program takes run ``split`` (the own key goes with
    run 0) and writes its unnormalised partial sum and (row max, row sum) to the fp32 workspace ``part_ptr`` /
    ``part_stats_ptr``; ``_merge_splits_kernel`` combines the runs."""
    if POSITIONAL:
        start, q_begin, q_len, kv_begin, kv_len, user = _tile_by_position(q_off_ptr, kv_off_ptr, num_users,
                                                                          group_users, num_positions, tile, BLOCK_M)
    else:
        start, q_begin, q_len, kv_begin, kv_len, user = _tile_context(q_off_ptr, kv_off_ptr, num_users, tile,
                                                                      BLOCK_M)
    if HAS_SKIP:  # a skipped user's tiles are spare
        q_len = _unless_skipped(q_len, skip_ptr, user)
    if start < q_len:  # else a spare tile: the grid is an upper bound
        valid, visible, q_rows, q = _query_tile(q_ptr, len_ptr, start, q_begin, q_len, kv_len, head, stride_qn,
                                                stride_qh, stride_qd, d_qk, IS_CANDIDATE, HAS_LENGTHS, CAUSAL,
                                                EVEN_DQK, BLOCK_M, BLOCK_DQK)

        m_i = tl.full((BLOCK_M,), float("-inf"), ACC)  # running max of the base-2 logits
        l_i = tl.zeros((BLOCK_M,), ACC)                # running sum of exp2(logit - m_i)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
        if HAS_SELF:
            # The candidate's own key first (run 0 only): it is always visible, so m_i starts finite.
            own_run = split == 0
            ck = _load_rows(ck_ptr, q_rows, head, stride_ckn, stride_ckh, stride_ckd, d_qk, valid, BLOCK_DQK,
                            EVEN_DQK).to(ACC)
            cv = _load_rows(cv_ptr, q_rows, head, stride_cvn, stride_cvh, stride_cvd, d_v, valid, BLOCK_DV,
                            EVEN_DV).to(ACC)
            own = tl.sum(q.to(ACC) * ck, 1)  # the raw dot product, as in _fwd_key_range
            if SILU:
                x = own * scale
                acc = tl.where(own_run, (x * tl.sigmoid(x))[:, None] * cv, 0.0)
            else:
                qk_scale = scale * LOG2E
                m_own = own * qk_scale
                l_own = tl.exp2(tl.fma(own, qk_scale, -m_own))  # 1 up to m_own's rounding, as the backward sees it
                m_i = tl.where(own_run, m_own, m_i)
                l_i = tl.where(own_run, l_own, l_i)
                acc = cv * l_i[:, None]

        # Keys [0, full_end) are seen by every row of the tile: no masks there. The rest (the causal
        # diagonal, cutoffs, the last partial key tile) goes through the masked loop. This program takes
        # keys [lo, hi) of them: run ``split`` of ``num_splits`` runs of whole key tiles.
        full_end = (tl.min(tl.where(valid, visible, kv_len), 0) // BLOCK_N) * BLOCK_N
        scan_end = tl.max(visible, 0)
        run_len = tl.cdiv(tl.cdiv(scan_end, BLOCK_N), num_splits) * BLOCK_N
        lo = split * run_len
        hi = tl.minimum(lo + run_len, scan_end)
        k_base = k_ptr + kv_begin * stride_kn + head * stride_kh
        v_base = v_ptr + kv_begin * stride_vn + head * stride_vh
        acc, m_i, l_i = _fwd_key_range(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, kv_begin, head * d_qk,
                                       head * d_v, stride_kn, stride_kd, stride_vn, stride_vd, lo,
                                       tl.minimum(full_end, hi), kv_len, visible, d_qk, d_v, scale, USE_TMA,
                                       False, SILU, ACC, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        acc, m_i, l_i = _fwd_key_range(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, kv_begin, head * d_qk,
                                       head * d_v, stride_kn, stride_kd, stride_vn, stride_vd,
                                       tl.maximum(full_end, lo), hi, kv_len, visible, d_qk, d_v, scale, USE_TMA,
                                       True, SILU, ACC, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV)

        if num_splits > 1:  # partial results of this run, merged by _merge_splits_kernel
            part = part_ptr + split * stride_ps
            _store_rows(part, q_rows, head, stride_pn, stride_ph, 1, d_v, valid, acc, BLOCK_DV, EVEN_DV)
            if not SILU:
                stats = part_stats_ptr + split * stride_pss + head * stride_psh + q_rows
                tl.store(stats, m_i, mask=valid)
                tl.store(stats + stride_psp, l_i, mask=valid)
        else:
            _finish_rows(acc, m_i, l_i, out_ptr, lse_ptr, q_rows, valid, head, stride_on, stride_oh, stride_od,
                         stride_lh, stride_lp, d_v, out_scale, SILU, BLOCK_DV, EVEN_DV)


@triton.jit
def _target_attention_fwd_kernel(
        hq_ptr, cq_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, hout_ptr, cout_ptr, hlse_ptr, clse_ptr,
        hpart_ptr, cpart_ptr, hpart_stats_ptr, cpart_stats_ptr,
        h_off_ptr, c_off_ptr, len_ptr, skip_ptr, num_users, num_candidate_tiles, num_history_tiles, num_heads,
        num_candidate_splits, num_history_splits, num_candidate_rows, num_history_rows, history_group_users,
        history_positions, candidate_positions,
        stride_hqn, stride_hqh, stride_hqd, stride_cqn, stride_cqh, stride_cqd,
        stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
        stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
        stride_hon, stride_hoh, stride_hod, stride_con, stride_coh, stride_cod, stride_hlh, stride_clh,
        stride_hlp, stride_clp,
        d_qk, d_v, scale, out_scale,
        USE_TMA: tl.constexpr, HAS_HISTORY: tl.constexpr, HAS_SELF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_SKIP: tl.constexpr, SILU: tl.constexpr, IS_FP64: tl.constexpr, EVEN_DQK: tl.constexpr,
        EVEN_DV: tl.constexpr, BLOCK_MH: tl.constexpr, BLOCK_MC: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, POSITIONAL: tl.constexpr, INTERLEAVED: tl.constexpr):
    """History and candidate query tiles in one launch: program = (tile, key split, head), heads fastest.
    Candidate tiles (each streams its user's whole visible history) come first, then history tiles in
    reverse order, so the longest causal tiles start first and the short ones fill the tail: the flat map
    reversed (user by user), or with POSITIONAL the position-major order of ``_history_order`` (the longest
    tiles of every user in a group first), ``num_history_tiles`` jobs in either case. Each kind's
    tiles are cut into ``num_*_splits`` key runs (1: no split, results stored directly); the split
    workspaces are contiguous (splits, rows, H, d_v) partial sums and (splits, 2, H, rows) statistics.
    INTERLEAVED (with POSITIONAL, no splits): one position-major map for both kinds, ``candidate_positions``
    candidate tiles then ``history_positions`` history tiles per user, each group of users' candidate tiles
    first (see ``_candidate_positions``); ``num_history_tiles`` counts all of its jobs.
    USE_TMA: ``k_desc`` / ``v_desc`` are TMA descriptors of K / V (see ``_fwd_key_range``); else unused."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    # torch.compile hands Python floats to user kernels as fp64: fix their precision here.
    scale, out_scale = tl.cast(scale, ACC), tl.cast(out_scale, ACC)
    pid = tl.program_id(0)
    head = (pid % num_heads).to(tl.int64)
    job = pid // num_heads
    candidate_jobs = num_candidate_tiles * num_candidate_splits
    if INTERLEAVED:
        # Position-major order with each group's candidate tiles first (no key splits): a group's users' keys
        # are read by their candidate tiles and then by their history tiles while still in L2.
        slots = candidate_positions + history_positions
        group = job // (history_group_users * slots)
        slot = job % (history_group_users * slots) // history_group_users
        member = job % history_group_users
        is_candidate = slot < candidate_positions
        candidate_tile = (group * candidate_positions + slot) * history_group_users + member
        history_tile = (group * history_positions + slot - candidate_positions) * history_group_users + member
        candidate_split = 0
        history_split = 0
    else:
        is_candidate = job < candidate_jobs
        candidate_tile = job // num_candidate_splits
        candidate_split = job % num_candidate_splits
        history_job = job - candidate_jobs
        history_tile = (history_job // num_history_splits if POSITIONAL
                        else num_history_tiles - 1 - history_job // num_history_splits)
        history_split = history_job % num_history_splits
    if is_candidate:
        rows = tl.cast(num_candidate_rows, tl.int64)  # (not .to: a count of 1 arrives as a Python int)
        _fwd_tile(cq_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, cout_ptr, clse_ptr, c_off_ptr, h_off_ptr,
                  len_ptr,
                  skip_ptr, num_users, history_group_users, candidate_positions, candidate_tile, head,
                  stride_cqn, stride_cqh, stride_cqd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh,
                  stride_vd, stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
                  stride_con, stride_coh, stride_cod, stride_clh, stride_clp,
                  candidate_split, num_candidate_splits, cpart_ptr, cpart_stats_ptr,
                  rows * num_heads * d_v, num_heads * d_v, d_v, 2 * num_heads * rows, num_heads * rows, rows,
                  d_qk, d_v, scale, out_scale, USE_TMA,
                  True, HAS_SELF, HAS_LENGTHS, CAUSAL, HAS_SKIP, SILU, ACC, EVEN_DQK, EVEN_DV,
                  BLOCK_MC, BLOCK_N, BLOCK_DQK, BLOCK_DV, INTERLEAVED)
    elif HAS_HISTORY:
        rows = tl.cast(num_history_rows, tl.int64)
        _fwd_tile(hq_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, hout_ptr, hlse_ptr, h_off_ptr, h_off_ptr,
                  len_ptr, skip_ptr, num_users, history_group_users, history_positions, history_tile, head,
                  stride_hqn, stride_hqh, stride_hqd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh,
                  stride_vd, stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
                  stride_hon, stride_hoh, stride_hod, stride_hlh, stride_hlp,
                  history_split, num_history_splits, hpart_ptr, hpart_stats_ptr,
                  rows * num_heads * d_v, num_heads * d_v, d_v, 2 * num_heads * rows, num_heads * rows, rows,
                  d_qk, d_v, scale, out_scale, USE_TMA,
                  False, False, False, CAUSAL, HAS_SKIP, SILU, ACC, EVEN_DQK, EVEN_DV,
                  BLOCK_MH, BLOCK_N, BLOCK_DQK, BLOCK_DV, POSITIONAL)


@triton.jit
def _merge_splits_kernel(part_ptr, part_stats_ptr, out_ptr, lse_ptr, num_rows, num_heads, num_splits,
                         stride_on, stride_oh, stride_od, stride_lh, stride_lp, d_v, out_scale,
                         SILU: tl.constexpr, IS_FP64: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_DV: tl.constexpr):
    """Combine the key runs of split query tiles (workspaces as in ``_target_attention_fwd_kernel``), runs
    in order: SiLU sums add; softmax sums are rescaled to the largest run max (the log-sum-exp merge).
    Writes what an unsplit tile writes (``_finish_rows``)."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    out_scale = tl.cast(out_scale, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    valid = rows < num_rows
    stride_ps = num_rows * num_heads * d_v
    stride_pss = 2 * num_heads * num_rows
    part = part_ptr + rows[:, None] * (num_heads * d_v) + head * d_v + tl.arange(0, BLOCK_DV)[None, :]
    col_ok = tl.arange(0, BLOCK_DV) < d_v
    stats = part_stats_ptr + head * num_rows + rows
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    if not SILU:
        for split in range(num_splits):  # the merged row max first, so each run is rescaled once
            m_i = tl.maximum(m_i, tl.load(stats + split * stride_pss, mask=valid, other=float("-inf")))
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows no run saw anything of
    for split in range(num_splits):
        run = _masked_load(part + split * stride_ps, valid, col_ok, True, not EVEN_DV)
        if SILU:
            acc += run
        else:
            weight = tl.exp2(tl.load(stats + split * stride_pss, mask=valid, other=float("-inf")) - m_ref)
            l_i += weight * tl.load(stats + split * stride_pss + num_heads * num_rows, mask=valid, other=0.0)
            acc += weight[:, None] * run
    _finish_rows(acc, m_i, l_i, out_ptr, lse_ptr, rows, valid, head, stride_on, stride_oh, stride_od, stride_lh,
                 stride_lp, d_v, out_scale, SILU, BLOCK_DV, EVEN_DV)


@triton.jit
def _row_stats(o_ptr, do_ptr, lse_ptr, stats_ptr, block, head, num_rows, stride_on, stride_oh, stride_od,
               stride_don, stride_doh, stride_dod, stride_lh, stride_lp, stride_sh, stride_sp, d_v, ACC: tl.constexpr,
               EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The two row statistics the softmax backward reads for rows [block * BLOCK_M, +BLOCK_M) of one query
    kind and head: the base-2 log-sum-exp of the forward's logits, lse = m + log2(l) (+inf for a row that
    saw nothing), and delta = rowsum(dO * O)."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < num_rows
    o = _load_rows(o_ptr, rows, head, stride_on, stride_oh, stride_od, d_v, valid, BLOCK_DV, EVEN_DV).to(ACC)
    do = _load_rows(do_ptr, rows, head, stride_don, stride_doh, stride_dod, d_v, valid, BLOCK_DV, EVEN_DV).to(ACC)
    m = tl.load(lse_ptr + head * stride_lh + rows, mask=valid, other=0.0)
    log2_l = tl.load(lse_ptr + stride_lp + head * stride_lh + rows, mask=valid, other=0.0)
    stats = stats_ptr + head * stride_sh + rows
    tl.store(stats, m + log2_l, mask=valid)
    tl.store(stats + stride_sp, tl.sum(o * do, 1), mask=valid)


@triton.jit
def _target_attention_bwd_preprocess_kernel(
        ho_ptr, hdo_ptr, hlse_ptr, hstats_ptr, co_ptr, cdo_ptr, clse_ptr, cstats_ptr, num_history_rows,
        num_history_blocks, num_candidate_rows,
        stride_hon, stride_hoh, stride_hod, stride_hdon, stride_hdoh, stride_hdod, stride_hlh, stride_hlp,
        stride_hsh, stride_hsp,
        stride_con, stride_coh, stride_cod, stride_cdon, stride_cdoh, stride_cdod, stride_clh, stride_clp,
        stride_csh, stride_csp,
        d_v, IS_FP64: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Row statistics of both query kinds in one launch (see ``_row_stats``), program = (row block, head):
    the first ``num_history_blocks`` row blocks are history rows, the rest candidate rows. One launch, not
    one per kind: the backward's small cases are latency-bound, and each launch costs its own ramp."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    block = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    if block < num_history_blocks:
        _row_stats(ho_ptr, hdo_ptr, hlse_ptr, hstats_ptr, block, head, num_history_rows, stride_hon, stride_hoh,
                   stride_hod, stride_hdon, stride_hdoh, stride_hdod, stride_hlh, stride_hlp, stride_hsh, stride_hsp,
                   d_v, ACC, EVEN_DV, BLOCK_M, BLOCK_DV)
    else:
        _row_stats(co_ptr, cdo_ptr, clse_ptr, cstats_ptr, block - num_history_blocks, head, num_candidate_rows,
                   stride_con, stride_coh, stride_cod, stride_cdon, stride_cdoh, stride_cdod, stride_clh, stride_clp,
                   stride_csh, stride_csp, d_v, ACC, EVEN_DV, BLOCK_M, BLOCK_DV)


@triton.jit
def _dkdv_pairs(m0, key_start, seen, IS_CANDIDATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """(BLOCK_N, BLOCK_M) mask of the (key, query row) pairs that see each other in a masked dK/dV step:
    causal history rows see keys up to themselves, candidates the first ``seen`` keys of the tile."""
    keys = tl.arange(0, BLOCK_N)[:, None]
    if IS_CANDIDATE:
        return keys < seen[None, :]
    return keys <= (m0 - key_start + tl.arange(0, BLOCK_M))[None, :]


@triton.jit
def _dkdv_step(dk, dv, k, v, q_seg, do_seg, q_desc, do_desc, lse_seg, delta_seg, len_seg, q_begin, q_len,
               kv_len, m0, head, key_start, stride_qn, stride_qd, stride_don, stride_dod, d_qk, d_v, scale,
               USE_TMA: tl.constexpr, PAIRS: tl.constexpr, MASKED: tl.constexpr, IS_CANDIDATE: tl.constexpr,
               SILU: tl.constexpr, ACC: tl.constexpr, EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Add the query tile at row m0's contribution to a key tile's dK/dV, in the transposed (key-major)
    frame. MASKED=False: a full query tile whose rows all see every key of the tile (key rows past the
    history are never stored, so they need no mask); USE_TMA: its q and dO tiles are copied through the TMA
    descriptors ``q_desc`` / ``do_desc`` (as in ``_fwd_key_range``). ``*_seg``: the pointers at the
    segment's first row (and the head); ``q_begin``: that row in the descriptors.
    Register pressure decides this loop's speed (the dK and dV accumulators alone take half the register
    file at 128 keys): only scalars are 64-bit, every vector index is int32 and relative to the tile, and
    nothing but the accumulators and scalars lives across the loop. Int64 row vectors here made the
    128-key x 64-query step spill on every iteration (bench/RESULTS.md, session 8)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Rows past the segment load q = dO = 0 and lse = delta = 0 and so add nothing to dK or dV: only PAIRS
    # steps, where rows see part of the key tile (causal diagonal, cutoffs), need a (key, row) mask.
    PAIR_MASK: tl.constexpr = MASKED and PAIRS
    seen = offs_m  # set for cutoffs below; unused otherwise
    lses = lse_seg + m0  # this tile's row statistics
    deltas = delta_seg + m0
    valid = offs_m < q_len - m0
    if PAIR_MASK and IS_CANDIDATE:  # candidate pairs come from cutoffs
        # Row i sees keys [key_start, key_start + seen[i]) of the tile (int32, see above). No early exit for
        # query tiles whose cutoffs all end before the key tile: the branch around the dots kept the loop
        # from being pipelined and made Triton 3.6's ptxas crash (non-causal history, session 8).
        cutoff = tl.load(len_seg + m0 + offs_m, mask=valid, other=0)
        seen = (tl.minimum(tl.maximum(tl.minimum(cutoff, kv_len) - key_start, 0), BLOCK_N)).to(tl.int32)
    if USE_TMA and not MASKED:
        q = q_desc.load([tl.cast(q_begin + m0, tl.int32), tl.cast(head * d_qk, tl.int32)])
        do = do_desc.load([tl.cast(q_begin + m0, tl.int32), tl.cast(head * d_v, tl.int32)])
    else:
        q_base = q_seg + tl.cast(m0, tl.int64) * stride_qn
        do_base = do_seg + tl.cast(m0, tl.int64) * stride_don
        q = _masked_load(q_base + offs_m[:, None] * stride_qn + offs_dqk[None, :] * stride_qd, valid,
                         offs_dqk < d_qk, MASKED, not EVEN_DQK)
        do = _masked_load(do_base + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod, valid,
                          offs_dv < d_v, MASKED, not EVEN_DV)
    st = tl.dot(k, tl.trans(q), out_dtype=ACC, input_precision="ieee")     # (BLOCK_N, BLOCK_M)
    dpt = tl.dot(v, tl.trans(do), out_dtype=ACC, input_precision="ieee")   # dO . v per pair
    if SILU:
        x = st * scale
        sig = tl.sigmoid(x)
        pt = x * sig
        dst = dpt * sig * (1.0 + x * (1.0 - sig))
        if PAIR_MASK:
            seen_pair = _dkdv_pairs(m0, key_start, seen, IS_CANDIDATE, BLOCK_N, BLOCK_M)
            pt = tl.where(seen_pair, pt, 0.0)
            dst = tl.where(seen_pair, dst, 0.0)
    else:
        if MASKED:
            lse = tl.load(lses + offs_m, mask=valid, other=0.0)
            delta = tl.load(deltas + offs_m, mask=valid, other=0.0)
        else:
            lse = tl.load(lses + offs_m)
            delta = tl.load(deltas + offs_m)
        # The unrounded logit minus the row's log-sum-exp (see _finish_rows on its precision).
        t = tl.fma(st, scale * LOG2E, -lse[None, :])
        if PAIR_MASK:
            t = tl.where(_dkdv_pairs(m0, key_start, seen, IS_CANDIDATE, BLOCK_N, BLOCK_M), t, float("-inf"))
        pt = tl.exp2(t)
        dst = pt * (dpt - delta[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, out_dtype=ACC, input_precision="ieee")
    dk = tl.dot(dst.to(q.dtype), q, dk, out_dtype=ACC, input_precision="ieee")
    return dk, dv


@triton.jit
def _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, q_desc, do_desc, lse_ptr, delta_ptr, len_ptr, q_begin, q_len,
                  kv_len, head,
                  key_start, m_first, full_from, stride_qn, stride_qh, stride_qd, stride_don, stride_doh, stride_dod,
                  stride_sh, d_qk, d_v, scale, USE_TMA: tl.constexpr,
                  IS_CANDIDATE: tl.constexpr, HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr, SILU: tl.constexpr,
                  ACC: tl.constexpr, EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Query tiles [m_first, q_len) of one kind: masked with a (key, row) mask before ``full_from`` (the
    causal diagonal or cutoffs, where some row may not see some key of the tile), masked by rows alone for
    the ragged last tile (every row in it sees the whole key tile), unmasked in between. Row numbers within
    a segment are int32 and the pointers start at the segment (64-bit arithmetic in the loops costs
    registers, see _dkdv_step)."""
    q_seg = q_ptr + q_begin * stride_qn + head * stride_qh
    do_seg = do_ptr + q_begin * stride_don + head * stride_doh
    lse_seg = lse_ptr + head * stride_sh + q_begin
    delta_seg = delta_ptr + head * stride_sh + q_begin
    len_seg = len_ptr + q_begin
    q_len, kv_len, key_start = q_len.to(tl.int32), kv_len.to(tl.int32), key_start.to(tl.int32)
    m_first, full_from = m_first.to(tl.int32), full_from.to(tl.int32)
    mid = tl.minimum(full_from, q_len)
    full_end = mid + ((q_len - mid) // BLOCK_M) * BLOCK_M
    for m0 in range(mid, full_end, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_seg, do_seg, q_desc, do_desc, lse_seg, delta_seg, len_seg, q_begin,
                            q_len, kv_len, m0, head, key_start, stride_qn, stride_qd, stride_don, stride_dod, d_qk,
                            d_v, scale, USE_TMA, False, False, IS_CANDIDATE, SILU, ACC,
                            EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV)
    for m0 in range(full_end, q_len, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_seg, do_seg, q_desc, do_desc, lse_seg, delta_seg, len_seg, q_begin,
                            q_len, kv_len, m0, head, key_start, stride_qn, stride_qd, stride_don, stride_dod, d_qk,
                            d_v, scale, USE_TMA, False, True, IS_CANDIDATE, SILU, ACC,
                            EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV)
    # The masked head last: its (key, row) mask raises register pressure, and spills that ptxas places
    # for it before the long unmasked loop would cost there on every step (bench/RESULTS.md, session 8).
    for m0 in range(m_first, mid, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_seg, do_seg, q_desc, do_desc, lse_seg, delta_seg, len_seg, q_begin,
                            q_len, kv_len, m0, head, key_start, stride_qn, stride_qd, stride_don, stride_dod, d_qk,
                            d_v, scale, USE_TMA, HAS_LENGTHS if IS_CANDIDATE else CAUSAL, True, IS_CANDIDATE, SILU,
                            ACC, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV)
    return dk, dv


@triton.jit
def _dkdv_tile(hq_ptr, cq_ptr, k_ptr, v_ptr, hdo_ptr, cdo_ptr, hq_desc, cq_desc, hdo_desc, cdo_desc, hlse_ptr,
               clse_ptr, hdelta_ptr, cdelta_ptr,
               dk_ptr, dv_ptr, dk_part_ptr, dv_part_ptr, arrivals_ptr, h_off_ptr, c_off_ptr, len_ptr, skip_ptr,
               num_users, tile, head, part, num_heads,
               stride_hqn, stride_hqh, stride_hqd, stride_cqn, stride_cqh, stride_cqd,
               stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
               stride_hdon, stride_hdoh, stride_hdod, stride_cdon, stride_cdoh, stride_cdod,
               stride_hsh, stride_csh,
               stride_dkn, stride_dkh, stride_dkd, stride_dvn, stride_dvh, stride_dvd,
               stride_pkp, stride_pkn, stride_pkh, stride_pvp, stride_pvn, stride_pvh,
               d_qk, d_v, scale, out_scale, USE_TMA: tl.constexpr, SPLIT_DKDV: tl.constexpr, HALVES: tl.constexpr,
               HAS_HISTORY_Q: tl.constexpr, HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr, HAS_SKIP: tl.constexpr,
               SILU: tl.constexpr, ACC: tl.constexpr, EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One (history key tile, head): dK and dV from every history and candidate query that sees it.
    HAS_SKIP: a skipped user's tiles are spare (``merged_skip``: another user's gradients go to its rows).

    SPLIT_DKDV: two programs share the key tile's query rows (its history rows, then the candidates), ``part``
    0 taking the rows before a cut and ``part`` 1 the rest, so that no single program streams a long history
    and a long candidate list (with few key tiles, that program alone set the backward's time). The cut lies
    between history and candidates, or with HALVES at the query step nearest the middle, so that the two
    take about as long (see ``_split_halves``). Each stores its fp32 partial sums in the
    (2, rows, H, d) workspaces ``d*_part_ptr`` and then counts itself in ``arrivals_ptr`` (one zeroed int32 per
    key tile and head); the later of the two sums both partials and stores dK and dV (``_sum_dkdv_parts``). The
    sum of two floats does not depend on their order, so the gradients are the same whichever program comes
    second: bitwise deterministic without floating-point atomics."""
    start, kv_begin, kv_len, c_begin, c_len, user = _tile_context(h_off_ptr, c_off_ptr, num_users, tile, BLOCK_N)
    if HAS_SKIP:
        kv_len = _unless_skipped(kv_len, skip_ptr, user)
    if start < kv_len:  # else a spare tile: the grid is an upper bound
        # Tile-relative int32 row indices from 64-bit scalar bases (see _dkdv_step on register pressure).
        keys = tl.arange(0, BLOCK_N)
        first_key = kv_begin + start
        k = _load_rows(k_ptr + first_key * stride_kn, keys, head, stride_kn, stride_kh, stride_kd, d_qk,
                       keys < kv_len - start, BLOCK_DQK, EVEN_DQK)
        v = _load_rows(v_ptr + first_key * stride_vn, keys, head, stride_vn, stride_vh, stride_vd, d_v,
                       keys < kv_len - start, BLOCK_DV, EVEN_DV)
        dk = tl.zeros((BLOCK_N, BLOCK_DQK), ACC)
        dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
        c_first = c_len * 0  # the first candidate row this program takes
        if HAS_HISTORY_Q:
            if CAUSAL:
                # History rows before this key tile cannot see it: start at the query tile holding `start`;
                # from the first query tile whose first row is >= the tile's last key, all rows see all keys.
                first = (start // BLOCK_M) * BLOCK_M
                full_from = first + ((start + BLOCK_N - 1 - first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
            else:
                first = start * 0
                full_from = first
            history_begin = first
            history_end = kv_len
            history_full_from = full_from
            if SPLIT_DKDV:
                # The tile's query rows in order, history rows [first, kv_len) then the candidates, cut in two:
                # part 0 takes the rows before the cut, part 1 the rest.
                if HALVES:  # cut at the query step nearest the middle, so the two programs take about as long
                    cut = first + ((kv_len - first + c_len + 1) // 2 + BLOCK_M - 1) // BLOCK_M * BLOCK_M
                    history_cut = tl.minimum(cut, kv_len)
                    candidate_cut = tl.minimum(tl.maximum(cut - kv_len, 0), c_len)
                    history_begin = tl.where(part == 0, first, history_cut)
                    history_end = tl.where(part == 0, history_cut, kv_len)
                    # A part that starts past the diagonal has no masked head (its unmasked loop starts at
                    # full_from).
                    history_full_from = tl.maximum(full_from, history_begin)
                    c_first = tl.where(part == 0, c_first, candidate_cut)
                    c_len = tl.where(part == 0, candidate_cut, c_len)
                else:  # cut between history and candidates (a branch of its own: with the halves' runtime
                    # bounds here too, SiLU d = 64 splits ran 9-12% slower, bench/RESULTS.md session 17)
                    history_end = tl.where(part == 0, history_end, first)
                    c_len = tl.where(part == 1, c_len, 0)
            dk, dv = _dkdv_queries(dk, dv, k, v, hq_ptr, hdo_ptr, hq_desc, hdo_desc, hlse_ptr, hdelta_ptr,
                                   len_ptr, kv_begin, history_end, kv_len, head, start, history_begin,
                                   history_full_from,
                                   stride_hqn, stride_hqh, stride_hqd, stride_hdon, stride_hdoh, stride_hdod,
                                   stride_hsh, d_qk, d_v, scale, USE_TMA, False, False, CAUSAL, SILU, ACC,
                                   EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV)
        # Candidates see every history key unless cutoffs are given.
        c_full_from = c_len if HAS_LENGTHS else c_first
        dk, dv = _dkdv_queries(dk, dv, k, v, cq_ptr, cdo_ptr, cq_desc, cdo_desc, clse_ptr, cdelta_ptr, len_ptr,
                               c_begin, c_len, kv_len, head, start, c_first, c_full_from,
                               stride_cqn, stride_cqh, stride_cqd, stride_cdon, stride_cdoh, stride_cdod,
                               stride_csh, d_qk, d_v, scale, USE_TMA, True, HAS_LENGTHS, CAUSAL, SILU, ACC,
                               EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_M, BLOCK_DQK, BLOCK_DV)
        # The key mask again, not kept from the loads: held across the loops it costs registers there (the
        # compiler keeps one computed before them alive; PTX checked with Triton 3.6).
        key_ok = keys < kv_len - start
        if SPLIT_DKDV:
            _store_rows(dk_part_ptr + part * stride_pkp + first_key * stride_pkn, keys, head, stride_pkn,
                        stride_pkh, 1, d_qk, key_ok, dk, BLOCK_DQK, EVEN_DQK)
            _store_rows(dv_part_ptr + part * stride_pvp + first_key * stride_pvn, keys, head, stride_pvn,
                        stride_pvh, 1, d_v, key_ok, dv, BLOCK_DV, EVEN_DV)
            # Every thread's stores precede the count (the barrier), which one thread makes with release
            # semantics at GPU scope; the program that counts second reads (acquire) both partials through
            # L2 only (.cg): the other's, written by another SM moments ago, must not come from a stale L1 line.
            tl.debug_barrier()
            arrived = tl.atomic_add(arrivals_ptr + tile * num_heads + head, 1, sem="acq_rel", scope="gpu")
            if arrived == 1:
                _sum_dkdv_parts(dk_part_ptr, dv_part_ptr, dk_ptr, dv_ptr, first_key, kv_len - start, head,
                                stride_pkp, stride_pkn, stride_pkh, stride_pvp, stride_pvn, stride_pvh,
                                stride_dkn, stride_dkh, stride_dkd, stride_dvn, stride_dvh, stride_dvd, d_qk, d_v,
                                scale, out_scale, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        else:
            _store_dkdv(dk, dv, dk_ptr, dv_ptr, first_key, keys, head, key_ok, stride_dkn, stride_dkh, stride_dkd,
                        stride_dvn, stride_dvh, stride_dvd, d_qk, d_v, scale, out_scale, EVEN_DQK, EVEN_DV,
                        BLOCK_DQK, BLOCK_DV)


@triton.jit
def _sum_dkdv_parts(dk_part_ptr, dv_part_ptr, dk_ptr, dv_ptr, first_key, num_keys, head, stride_pkp, stride_pkn,
                    stride_pkh, stride_pvp, stride_pvn, stride_pvh, stride_dkn, stride_dkh, stride_dkd, stride_dvn,
                    stride_dvh, stride_dvd, d_qk, d_v, scale, out_scale, EVEN_DQK: tl.constexpr,
                    EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Split dK/dV (see ``_dkdv_tile``): the second program of a key tile sums the two fp32 partials, part 0
    plus part 1, and stores dK and dV, SUM_ROWS keys at a time. Both partials come back from L2, its own too,
    so the loads do not sit beside the accumulators in registers. The earlier way (the other's partial added
    to the accumulators, the same sums bit for bit) took ~11 us after the partial store at (1, 2048, 2048, 4,
    128), this one 7-11 us (per-program timestamps, bench/RESULTS.md session 17); fwd+bwd within noise."""
    CHUNK: tl.constexpr = SUM_ROWS if BLOCK_N > SUM_ROWS else BLOCK_N
    for r0 in tl.static_range(0, BLOCK_N, CHUNK):
        keys = r0 + tl.arange(0, CHUNK)
        key_ok = keys < num_keys
        dk = (_load_rows(dk_part_ptr + first_key * stride_pkn, keys, head, stride_pkn, stride_pkh, 1, d_qk, key_ok,
                         BLOCK_DQK, EVEN_DQK, L2_ONLY)
              + _load_rows(dk_part_ptr + stride_pkp + first_key * stride_pkn, keys, head, stride_pkn, stride_pkh, 1,
                           d_qk, key_ok, BLOCK_DQK, EVEN_DQK, L2_ONLY))
        dv = (_load_rows(dv_part_ptr + first_key * stride_pvn, keys, head, stride_pvn, stride_pvh, 1, d_v, key_ok,
                         BLOCK_DV, EVEN_DV, L2_ONLY)
              + _load_rows(dv_part_ptr + stride_pvp + first_key * stride_pvn, keys, head, stride_pvn, stride_pvh, 1,
                           d_v, key_ok, BLOCK_DV, EVEN_DV, L2_ONLY))
        _store_dkdv(dk, dv, dk_ptr, dv_ptr, first_key, keys, head, key_ok, stride_dkn, stride_dkh, stride_dkd,
                    stride_dvn, stride_dvh, stride_dvd, d_qk, d_v, scale, out_scale, EVEN_DQK, EVEN_DV, BLOCK_DQK,
                    BLOCK_DV)


@triton.jit
def _store_dkdv(dk, dv, dk_ptr, dv_ptr, first_key, keys, head, key_ok, stride_dkn, stride_dkh, stride_dkd,
                stride_dvn, stride_dvh, stride_dvd, d_qk, d_v, scale, out_scale, EVEN_DQK: tl.constexpr,
                EVEN_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Scale a key tile's summed dK and dV and store them in the gradients' dtype."""
    _store_rows(dk_ptr + first_key * stride_dkn, keys, head, stride_dkn, stride_dkh, stride_dkd, d_qk, key_ok,
                dk * (scale * out_scale), BLOCK_DQK, EVEN_DQK)
    _store_rows(dv_ptr + first_key * stride_dvn, keys, head, stride_dvn, stride_dvh, stride_dvd, d_v, key_ok,
                dv * out_scale, BLOCK_DV, EVEN_DV)


@triton.jit
def _dq_key_range(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, desc_row, desc_col_k, desc_col_v,
                  stride_kn, stride_kd, stride_vn, stride_vd, n_lo, n_hi, kv_len, visible, d_qk, d_v, scale,
                  USE_TMA: tl.constexpr, MASKED: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
                  EVEN_DQK: tl.constexpr,
                  EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dQ of a query tile over history keys [n_lo, n_hi); MASKED and USE_TMA as in ``_fwd_key_range``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = k_base + (n_lo + offs_n)[:, None] * stride_kn + offs_dqk[None, :] * stride_kd
    v_ptrs = v_base + (n_lo + offs_n)[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < kv_len
        k, v = _key_tiles(k_ptrs, v_ptrs, k_desc, v_desc, desc_row + n0, desc_col_k, desc_col_v, col_ok, offs_dqk,
                          offs_dv, d_qk, d_v, USE_TMA, MASKED, EVEN_DQK, EVEN_DV)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision="ieee")
        if SILU:
            x = s * scale
            sig = tl.sigmoid(x)
            ds = dp * sig * (1.0 + x * (1.0 - sig))
            if MASKED:
                ds = tl.where(cols[None, :] < visible[:, None], ds, 0.0)
        else:
            t = tl.fma(s, scale * LOG2E, -lse[:, None])  # as in _dkdv_step
            if MASKED:
                t = tl.where(cols[None, :] < visible[:, None], t, float("-inf"))
            p = tl.exp2(t)
            ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, out_dtype=ACC, input_precision="ieee")
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _dq_tile(q_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dck_ptr, dcv_ptr,
             q_off_ptr, kv_off_ptr, len_ptr, skip_ptr, num_users, tile, head,
             stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
             stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
             stride_don, stride_doh, stride_dod, stride_sh,
             stride_dqn, stride_dqh, stride_dqd, stride_dckn, stride_dckh, stride_dckd,
             stride_dcvn, stride_dcvh, stride_dcvd,
             d_qk, d_v, scale, out_scale, USE_TMA: tl.constexpr,
             IS_CANDIDATE: tl.constexpr, HAS_SELF: tl.constexpr, HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_SKIP: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, EVEN_DQK: tl.constexpr,
             EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
             BLOCK_DV: tl.constexpr):
    """One (query tile, head): dQ over the visible history; for candidates also dq, dk, dv of the own key.
    HAS_SKIP: a skipped user's tiles are spare (``merged_skip``: another user's gradients go to its rows)."""
    start, q_begin, q_len, kv_begin, kv_len, user = _tile_context(q_off_ptr, kv_off_ptr, num_users, tile, BLOCK_M)
    if HAS_SKIP:
        q_len = _unless_skipped(q_len, skip_ptr, user)
    if start < q_len:  # else a spare tile: the grid is an upper bound
        valid, visible, q_rows, q = _query_tile(q_ptr, len_ptr, start, q_begin, q_len, kv_len, head, stride_qn,
                                                stride_qh, stride_qd, d_qk, IS_CANDIDATE, HAS_LENGTHS, CAUSAL,
                                                EVEN_DQK, BLOCK_M, BLOCK_DQK)
        do = _load_rows(do_ptr, q_rows, head, stride_don, stride_doh, stride_dod, d_v, valid, BLOCK_DV, EVEN_DV)
        if SILU:
            lse = tl.zeros((BLOCK_M,), ACC)  # unused
            delta = lse
        else:
            lse = tl.load(lse_ptr + head * stride_sh + q_rows, mask=valid, other=0.0)
            delta = tl.load(delta_ptr + head * stride_sh + q_rows, mask=valid, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_DQK), ACC)
        # As in the forward: keys every row sees go through the unmasked loop. Rows past the segment have
        # q = dO = 0 and lse = delta = 0 there, so they add nothing (and are not stored).
        full_end = (tl.min(tl.where(valid, visible, kv_len), 0) // BLOCK_N) * BLOCK_N
        scan_end = tl.max(visible, 0)
        k_base = k_ptr + kv_begin * stride_kn + head * stride_kh
        v_base = v_ptr + kv_begin * stride_vn + head * stride_vh
        dq = _dq_key_range(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_begin, head * d_qk, head * d_v,
                           stride_kn, stride_kd, stride_vn, stride_vd, 0, full_end, kv_len, visible, d_qk, d_v,
                           scale, USE_TMA, False, SILU, ACC, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        dq = _dq_key_range(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, kv_begin, head * d_qk, head * d_v,
                           stride_kn, stride_kd, stride_vn, stride_vd, full_end, scan_end, kv_len, visible, d_qk,
                           d_v, scale, USE_TMA, True, SILU, ACC, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV)

        if HAS_SELF:
            ck = _load_rows(ck_ptr, q_rows, head, stride_ckn, stride_ckh, stride_ckd, d_qk, valid, BLOCK_DQK,
                            EVEN_DQK).to(ACC)
            cv = _load_rows(cv_ptr, q_rows, head, stride_cvn, stride_cvh, stride_cvd, d_v, valid, BLOCK_DV,
                            EVEN_DV).to(ACC)
            qf = q.to(ACC)
            dof = do.to(ACC)
            own = tl.sum(qf * ck, 1)  # the raw dot product, as in the forward
            dp = tl.sum(dof * cv, 1)
            if SILU:
                x = own * scale
                sig = tl.sigmoid(x)
                p = x * sig
                ds = dp * sig * (1.0 + x * (1.0 - sig))
            else:
                p = tl.exp2(tl.fma(own, scale * LOG2E, -lse))
                ds = p * (dp - delta)
            dq += ds[:, None] * ck
            dck = ds[:, None] * qf * (scale * out_scale)
            dcv = p[:, None] * dof * out_scale
            _store_rows(dck_ptr, q_rows, head, stride_dckn, stride_dckh, stride_dckd, d_qk, valid, dck, BLOCK_DQK,
                        EVEN_DQK)
            _store_rows(dcv_ptr, q_rows, head, stride_dcvn, stride_dcvh, stride_dcvd, d_v, valid, dcv, BLOCK_DV,
                        EVEN_DV)
        dq = dq * (scale * out_scale)
        _store_rows(dq_ptr, q_rows, head, stride_dqn, stride_dqh, stride_dqd, d_qk, valid, dq, BLOCK_DQK, EVEN_DQK)


@triton.jit
def _target_attention_bwd_kernel(
        hq_ptr, cq_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, hdo_ptr, cdo_ptr, hlse_ptr, clse_ptr, hdelta_ptr, cdelta_ptr,
        hq_desc, cq_desc, hdo_desc, cdo_desc, k_desc, v_desc, dhq_ptr, dcq_ptr, dk_ptr, dv_ptr, dck_ptr, dcv_ptr,
        dk_part_ptr, dv_part_ptr, arrivals_ptr,
        h_off_ptr, c_off_ptr, len_ptr, skip_ptr, num_users, num_key_tiles, num_candidate_tiles, num_history_tiles,
        num_heads,
        stride_hqn, stride_hqh, stride_hqd, stride_cqn, stride_cqh, stride_cqd,
        stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
        stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
        stride_hdon, stride_hdoh, stride_hdod, stride_cdon, stride_cdoh, stride_cdod,
        stride_hsh, stride_csh,
        stride_dhqn, stride_dhqh, stride_dhqd, stride_dcqn, stride_dcqh, stride_dcqd,
        stride_dkn, stride_dkh, stride_dkd, stride_dvn, stride_dvh, stride_dvd,
        stride_dckn, stride_dckh, stride_dckd, stride_dcvn, stride_dcvh, stride_dcvd,
        stride_pkp, stride_pkn, stride_pkh, stride_pvp, stride_pvn, stride_pvh,
        d_qk, d_v, scale, out_scale,
        DKDV: tl.constexpr, DQ: tl.constexpr, SPLIT_DKDV: tl.constexpr, HALVES: tl.constexpr,
        TMA_DKDV: tl.constexpr, TMA_DQ: tl.constexpr, HAS_HISTORY_Q: tl.constexpr, HAS_SELF: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_SKIP: tl.constexpr, SILU: tl.constexpr, IS_FP64: tl.constexpr, EVEN_DQK: tl.constexpr,
        EVEN_DV: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_KV_Q: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_Q_KV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The whole backward but the delta preprocessing in one launch, program = (tile, head), heads fastest:
    history key tiles (dK, dV; the earliest see the most queries) first, then candidate query tiles (dQ and
    the own key's dk, dv), then history query tiles in reverse order (dQ). SPLIT_DKDV: each key tile has two
    dK/dV programs, those taking the query rows before its cut (HALVES: the first half; else the history rows)
    for all key tiles first, then those taking the rest (see ``_dkdv_tile``). A dK/dV program owns BLOCK_KV keys and
    steps through queries BLOCK_KV_Q at a time; a dQ program owns BLOCK_Q queries and steps through keys BLOCK_Q_KV
    at a time. TMA_DKDV / TMA_DQ: the dK/dV programs copy their q and dO tiles, the dQ programs their K and V tiles,
    through the TMA descriptors ``*_desc`` (see ``_fwd_key_range``); else those are unused. DKDV / DQ: which program
    kinds the launch compiles (both, but for the two-launch tuning hook ``_BWD_SPLIT_OVERRIDE``, whose launches pass
    zero tiles of the other kind)."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    # torch.compile hands Python floats to user kernels as fp64: fix their precision here.
    scale, out_scale = tl.cast(scale, ACC), tl.cast(out_scale, ACC)
    pid = tl.program_id(0)
    head = (pid % num_heads).to(tl.int64)
    tile = pid // num_heads
    dkdv_programs = 2 * num_key_tiles if SPLIT_DKDV else num_key_tiles
    if tile < dkdv_programs:
        if DKDV:
            part = tile * 0
            if SPLIT_DKDV:  # part 0 takes the tile's query rows before the cut, part 1 the rest
                part = tile // num_key_tiles
                tile -= part * num_key_tiles
            _dkdv_tile(hq_ptr, cq_ptr, k_ptr, v_ptr, hdo_ptr, cdo_ptr, hq_desc, cq_desc, hdo_desc, cdo_desc, hlse_ptr,
                       clse_ptr, hdelta_ptr, cdelta_ptr,
                       dk_ptr, dv_ptr, dk_part_ptr, dv_part_ptr, arrivals_ptr, h_off_ptr, c_off_ptr, len_ptr,
                       skip_ptr, num_users, tile, head, part, num_heads,
                       stride_hqn, stride_hqh, stride_hqd, stride_cqn, stride_cqh, stride_cqd,
                       stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
                       stride_hdon, stride_hdoh, stride_hdod, stride_cdon, stride_cdoh, stride_cdod,
                       stride_hsh, stride_csh, stride_dkn, stride_dkh, stride_dkd, stride_dvn, stride_dvh, stride_dvd,
                       stride_pkp, stride_pkn, stride_pkh, stride_pvp, stride_pvn, stride_pvh,
                       d_qk, d_v, scale, out_scale, TMA_DKDV, SPLIT_DKDV, HALVES, HAS_HISTORY_Q, HAS_LENGTHS, CAUSAL,
                       HAS_SKIP, SILU, ACC, EVEN_DQK, EVEN_DV, BLOCK_KV_Q, BLOCK_KV, BLOCK_DQK, BLOCK_DV)
    elif DQ:
        if SPLIT_DKDV:  # the dQ map below counts one program per key tile
            tile -= num_key_tiles
        if tile < num_key_tiles + num_candidate_tiles:
            _dq_tile(cq_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, cdo_ptr, clse_ptr, cdelta_ptr, dcq_ptr,
                     dck_ptr, dcv_ptr,
                     c_off_ptr, h_off_ptr, len_ptr, skip_ptr, num_users, tile - num_key_tiles, head,
                     stride_cqn, stride_cqh, stride_cqd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh,
                     stride_vd, stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
                     stride_cdon, stride_cdoh, stride_cdod, stride_csh,
                     stride_dcqn, stride_dcqh, stride_dcqd, stride_dckn, stride_dckh, stride_dckd,
                     stride_dcvn, stride_dcvh, stride_dcvd, d_qk, d_v, scale, out_scale, TMA_DQ,
                     True, HAS_SELF, HAS_LENGTHS, CAUSAL, HAS_SKIP, SILU, ACC, EVEN_DQK, EVEN_DV,
                     BLOCK_Q, BLOCK_Q_KV, BLOCK_DQK, BLOCK_DV)
        elif HAS_HISTORY_Q:
            _dq_tile(hq_ptr, k_ptr, v_ptr, k_desc, v_desc, ck_ptr, cv_ptr, hdo_ptr, hlse_ptr, hdelta_ptr, dhq_ptr,
                     dck_ptr, dcv_ptr,
                     h_off_ptr, h_off_ptr, len_ptr, skip_ptr, num_users,
                     num_history_tiles - 1 - (tile - num_key_tiles - num_candidate_tiles), head,
                     stride_hqn, stride_hqh, stride_hqd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh,
                     stride_vd, stride_ckn, stride_ckh, stride_ckd, stride_cvn, stride_cvh, stride_cvd,
                     stride_hdon, stride_hdoh, stride_hdod, stride_hsh,
                     stride_dhqn, stride_dhqh, stride_dhqd, stride_dckn, stride_dckh, stride_dckd,
                     stride_dcvn, stride_dcvh, stride_dcvd, d_qk, d_v, scale, out_scale, TMA_DQ,
                     False, False, False, CAUSAL, HAS_SKIP, SILU, ACC, EVEN_DQK, EVEN_DV,
                     BLOCK_Q, BLOCK_Q_KV, BLOCK_DQK, BLOCK_DV)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
class _Blocks(NamedTuple):
    m: int        # query rows per tile
    n: int        # key rows per tile
    warps: int
    stages: int


def _row_block(total_rows: int, num_users: int, cap: int) -> int:
    """Query tile height: the average rows per user rounded up to a power of two, within [16, cap].
    Host-known sizes only (no sync); small candidate lists get small tiles instead of mostly-empty ones."""
    average = cdiv(max(total_rows, 1), max(num_users, 1))
    return max(16, min(cap, next_power_of_2(average)))


# Tuning hook: bench/tune_target_attention.py sets this to a _Blocks that replaces _fwd_blocks' choice
# (its m then serves history and candidate tiles alike).
_FWD_BLOCKS_OVERRIDE = None


def _fwd_blocks(total_rows: int, num_users: int, d_qk: int, d_v: int, dtype: torch.dtype,
                row_cap: int = 128) -> _Blocks:
    """Forward tiles from host-known sizes (the query block also fixes the tile map), query tiles at
    most ``row_cap`` rows. Measured on the H100 (bench/tune_target_attention.py, bf16): 128x64 tiles
    with 8 warps for d = 128, 64x32 tiles with 4 warps for d = 64, 3 stages."""
    if _FWD_BLOCKS_OVERRIDE is not None:
        return _FWD_BLOCKS_OVERRIDE
    if interpreting():  # few, large-enough programs; blocks stay small so tests cover several tiles
        return _Blocks(_row_block(total_rows, num_users, min(32, row_cap)), 32, 4, 1)
    d = max(d_qk, d_v)
    if dtype in (torch.float32, torch.float64) or d > 128:
        return _Blocks(_row_block(total_rows, num_users, min(64, row_cap)), 32 if d > 128 else 64, 4, 2)
    if d > 64:
        m = _row_block(total_rows, num_users, min(128, row_cap))
        return _Blocks(m, 64, 8 if m == 128 else 4, 3)
    return _Blocks(_row_block(total_rows, num_users, min(64, row_cap)), 32, 4, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """An NVIDIA GPU with the Tensor Memory Accelerator (Hopper, sm_90, and later). ROCm reports its own
    architecture numbers through the same call: never there."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)


# Tuning/testing hook: a dict {"fwd": bool, "dkdv": bool, "dq": bool} that replaces _use_tma's choice (the
# tensors must still allow descriptors, see _tma_descriptors).
_TMA_OVERRIDE = None


def _use_tma(role: str, like: torch.Tensor, d_qk: int, d_v: int, silu: bool) -> bool:
    """Whether the tiles of ``role`` ("fwd": K/V of the forward; "dkdv": q/dO of the dK/dV programs; "dq":
    K/V of the dQ programs) go through TMA copies in their unmasked loops (see ``_tma_rule``)."""
    if _TMA_OVERRIDE is not None:
        return _TMA_OVERRIDE[role]
    if interpreting() or not like.is_cuda or not _has_tma(like.device):
        return False
    return _tma_rule(role, like.dtype, d_qk, d_v, silu)


def _tma_rule(role: str, dtype: torch.dtype, d_qk: int, d_v: int, silu: bool) -> bool:
    """TMA copies on a Hopper-class GPU: half precision, head dims above 64; the forward always, the backward
    for SiLU only. Measured on the H100 (bf16, CUDA graph, ms, pointer tiles -> TMA; bench/RESULTS.md):
    forward (1, 2048, 2048, 4, 128) 0.0419 -> 0.0399, (1, 8192, 1024, 4, 128) 0.1925 -> 0.1868, SiLU 0.0661 ->
    0.0602 and 0.2796 -> 0.2618, d = 256 (1, 4096, 512, 4, 256) 0.1995 -> 0.1775; SiLU backward with every role
    0.1955 -> 0.1751 and 0.9862 -> 0.9061. The softmax backward gains at most 1-2% at d = 128 (0.1675 -> 0.1621
    at best, 0.7338 -> 0.7257; its dK/dV copies on the wide key tiles lose: 0.7643), 5% at d = 256 (0.7763 ->
    0.7382), less than the host time its descriptors cost per launch (~20 us each on the benchmark host,
    encoded by Triton's launcher: a forward + backward with six descriptors took 974 -> 1158 us of host time),
    so it keeps pointer tiles. fp16 as bf16. At d = 64 TMA lost in both directions (e.g. (32, 1024, 64, 4,
    64) forward 0.0869 -> 0.0953, with every tile shape tried)."""
    if dtype not in (torch.float16, torch.bfloat16) or max(d_qk, d_v) <= 64:
        return False
    return role == "fwd" or silu


def _tma_descriptors(block_rows: int, *tensors: Optional[torch.Tensor]):
    """TMA descriptors of (rows, H, d) tensors seen as (rows, H * d) matrices, boxes of ``block_rows`` x d
    (a kernel reads head h's tile at column h * d), or None when any tensor is absent or empty or its layout
    does not allow one: the head dim must be a power of two (a box never reaches into the next head),
    contiguous heads, 16-byte aligned base and row stride. Results do not depend on this choice: TMA and
    pointer loads copy the same values. Tensors traced by torch.compile (fake or functional wrappers) have no
    address: there the storage offset alone decides, their storage being aligned as every storage PyTorch
    allocates is."""
    views = []
    for t in tensors:
        if t is None or t.numel() == 0 or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None
        rows, heads, width = t.shape
        size = t.element_size()
        if (width != next_power_of_2(width) or t.stride(2) != 1 or (heads > 1 and t.stride(1) != width)
                or (t.storage_offset() * size) % 16 or (type(t) is torch.Tensor and t.data_ptr() % 16)
                or (t.stride(0) * size) % 16 or rows >= 2 ** 31):
            return None
        views.append(t.view(rows, heads * width))
    return [TensorDescriptor.from_tensor(v, [block_rows, t.shape[2]]) for v, t in zip(views, tensors)]


def _spread_blocks(blocks: _Blocks, rows: int, num_users: int, heads: int, sms: int, d_qk: int, d_v: int,
                   dtype: torch.dtype) -> _Blocks:
    """When query tiles alone make the grid (cached mode) and they are too few to fill the GPU, halve
    the tile height, down to 64 rows, while twice the programs still fit in one wave: each short tile
    streams the history once more, but twice as many SMs stream it. Measured on the H100 (bf16): 128 ->
    64 rows took (1, 2048, 2048, 4, 128) cached from 0.0452 to 0.0346 ms; 64 -> 32 rows made d = 64 and
    d = 128 slower."""
    while blocks.m > 64 and 2 * cdiv(rows, blocks.m) * heads <= sms:
        smaller = _fwd_blocks(rows, num_users, d_qk, d_v, dtype, row_cap=blocks.m // 2)
        if smaller.m >= blocks.m:
            break
        blocks = smaller
    return blocks


def _pairs_per_sm(total_history: int, total_candidates: int, num_users: int, heads: int, sms: int):
    """(average history rows per user, average (query, key) pairs per SM of one attention pass over the
    batch), from host-known sizes (no sync): a user's causal history sees N^2 / 2 pairs, its candidates n N."""
    users = max(num_users, 1)
    history, candidates = total_history / users, total_candidates / users
    return history, heads * users * (history * history / 2 + candidates * history) / sms


def _full_programs(history_blocks: _Blocks, candidate_blocks: _Blocks, total_h: int, total_c: int, num_users: int,
                   heads: int) -> int:
    """Programs of a full-mode forward launch with these tiles (the tile map's upper bound, no key splits)."""
    return (num_tiles(total_h, num_users, history_blocks.m) + num_tiles(total_c, num_users, candidate_blocks.m)) * heads


SPREAD_MIN_CRITICAL_SHARE = 1.5  # see _spread_full_blocks


def _spread_full_blocks(history_blocks: _Blocks, candidate_blocks: _Blocks, total_h: int, total_c: int,
                        num_users: int, heads: int, sms: int, d_qk: int, d_v: int, dtype: torch.dtype):
    """Full mode: take 64-row tiles of both kinds (a launch has one warp count, so both kinds change
    together) instead of 128-row ones
    - when the 64-row tiles still fit in one wave of ``sms`` programs: small batches (one user's 1041 history
      rows and 560 candidates, 4 heads: 64 programs of 128 rows) otherwise leave most SMs idle while each
      program streams its keys;
    - or when one 128-row program streaming a whole (average) history would take at least
      SPREAD_MIN_CRITICAL_SHARE times the average work per SM: few users with long histories, where the
      causal tiles' imbalance sets the time and 64-row tiles halve the longest program. Candidate tiles then
      take 64 rows even for fewer candidates (see below).
    Uniform (1, 2048, 2048, 4, 128) has 136 programs of 128 rows, a share of 1.37, and keeps them. Measured on
    the H100 (bf16, CUDA graph, ms, 128 -> 64 rows): the jagged case above 0.0265 -> 0.0190 softmax
    (FlexAttention on the padded batch: 0.0497), 0.0388 -> 0.0362 SiLU; uniform (1, 1024, 512, 4, 128) 0.0245
    -> 0.0178; by the share, softmax (SiLU): (1, 3000, 300, 4, 128) (2.34) 0.0546 -> 0.0358 (0.0826 -> 0.0676),
    (2, 1024, 256, 4, 128) (2.75) 0.0236 -> 0.0171 (0.0344 -> 0.0274), (1, 4096, 512, 4, 128) (1.65) 0.0718 ->
    0.0615 (0.1098 -> 0.1108), (1, 4089, 2, 4, 128) (2.07) 0.0703 -> 0.0507 with 64-row candidate tiles, 0.0726
    with their 16-row ones; kept: (1, 2048, 2048, 4, 128) (1.37) 0.0410 vs 0.0477, (2, 4096, 64, 4, 128) (1.0)
    0.0832 vs 0.1002, (1, 8192, 1024, 4, 128) (0.83) 0.1812 vs 0.2177."""
    if max(history_blocks.m, candidate_blocks.m) <= 64:
        return history_blocks, candidate_blocks
    small_h = _fwd_blocks(total_h, num_users, d_qk, d_v, dtype, row_cap=64)
    small_c = _fwd_blocks(total_c, num_users, d_qk, d_v, dtype, row_cap=64)
    if _full_programs(small_h, small_c, total_h, total_c, num_users, heads) <= sms:
        return small_h, small_c
    history, per_sm = _pairs_per_sm(total_h, total_c, num_users, heads, sms)
    longest = max(history_blocks.m, candidate_blocks.m) * history  # (query rows x keys) of that program
    if longest >= SPREAD_MIN_CRITICAL_SHARE * per_sm:
        # Candidate tiles of 64 rows here even for shorter lists: their few programs stream whole histories
        # and can set the time, and below 64 rows a tile takes the slower mma.sync steps instead of wgmma.
        return small_h, small_c._replace(m=64)
    return history_blocks, candidate_blocks


LONG_KEY_STEPS_MAX_PROGRAMS_PER_SM = 6  # see _fwd_key_steps
LONG_KEY_STEPS_MIN_HISTORY = 2048       # (softmax)


def _fwd_key_steps(history_blocks: _Blocks, candidate_blocks: _Blocks, total_h: int, total_c: int, num_users: int,
                   heads: int, sms: int, d_qk: int, d_v: int, dtype: torch.dtype, silu: bool):
    """Full mode, half precision, head dims 33-64 with 64-row history tiles: 64 keys per step instead of 32
    when the programs are few (at most LONG_KEY_STEPS_MAX_PROGRAMS_PER_SM per SM) or, for softmax, the
    average history has at least LONG_KEY_STEPS_MIN_HISTORY rows. A 64-key step issues fewer instructions per
    key (4.7 vs 6.5 SASS per key in the unmasked loop) but takes more registers (178: two programs per SM
    instead of three), which only many short programs miss. Measured on the H100 (bf16, CUDA graph, ms, 4
    heads, 32 -> 64 keys; bench/RESULTS.md session 10), softmax (SiLU): taken: (1, 1024, 64) 0.0159 -> 0.0127
    (0.0205 -> 0.0160), (1, 4096, 64) 0.0619 -> 0.0466 (0.0795 -> 0.0596), (4, 2048, 64) 0.0545 -> 0.0428 (0.0707 ->
    0.0562), (4, 1024, 256) 0.0244 -> 0.0186 (0.0315 -> 0.0231), (1, 2048, 512) 0.0305 -> 0.0236, (8, 1024, 256)
    0.0340 -> 0.0332; softmax only: (8, 2048, 64) 0.0841 -> 0.0760 (SiLU 0.1006 vs 0.0977), (8, 4096, 64) 0.248 ->
    0.223, (16, 4096, 64) 0.490 -> 0.459 (SiLU 0.581 vs 0.589), (16, 2048, 64) 0.1418 vs 0.1420 (SiLU 0.170 vs
    0.181); kept: (16, 1024, 64) 0.0510 vs 0.0506, (32, 512, 64) 0.0354 vs 0.0402, (32, 1024, 64) 0.0879 vs 0.0960,
    (64, 1024, 64) 0.1725 vs 0.1918 (SiLU alike)."""
    if (dtype not in (torch.float16, torch.bfloat16) or not 32 < max(d_qk, d_v) <= 64 or history_blocks.m != 64
            or history_blocks.n != 32):
        return history_blocks, candidate_blocks
    programs = _full_programs(history_blocks, candidate_blocks, total_h, total_c, num_users, heads)
    few = programs <= LONG_KEY_STEPS_MAX_PROGRAMS_PER_SM * sms
    if few or (not silu and total_h >= LONG_KEY_STEPS_MIN_HISTORY * max(num_users, 1)):
        return history_blocks._replace(n=64), candidate_blocks._replace(n=64)
    return history_blocks, candidate_blocks


# Tuning/testing hook: programs per group round for _history_order (0: the flat map), replacing
# POSITION_GROUP_PROGRAMS.
_HISTORY_ORDER_OVERRIDE = None
POSITION_GROUP_PROGRAMS = 64  # see _history_order


def _history_order(total_h: int, num_users: int, heads: int, block_m: int, max_history_len: Optional[int]):
    """(group_users, positions) for the forward's history tiles in position-major order, or None for the flat
    tile map reversed. The flat map runs each user's tiles longest first, but user after user: with many users
    the last user's longest tile starts near the end of the launch and sets its tail. Position-major order
    launches the tile at position ``positions`` - 1 of every user of a group, then position - 2, and so on:
    longest first across users. Users come in groups of POSITION_GROUP_PROGRAMS // heads so that a user's
    next tile starts soon after its last one, while that user's keys are still in L2 (one group of all 256
    users of (256, 512, 16, 2, 64) made that forward 26% slower). Needs the caller's ``max_history_len`` (no
    device-to-host copy here) and at least two users; a bound so loose that the position-major grid would
    exceed twice the flat one keeps the flat map (most of its programs would find no rows).
    Measured on the H100 (bf16, CUDA graph, forward ms, flat -> groups of 64 / 128 / 256 programs; bench/RESULTS.md
    session 11), softmax: (32, 1024, 64, 4, 64) 0.0873 -> 0.0809 / 0.0819 / 0.0814, jagged 0.0640 -> 0.0533 /
    0.0525 / 0.0523; (256, 512, 16, 2, 64) 0.1211 -> 0.1174 / 0.1162 / 0.1221; (64, 1024, 64, 4, 64) 0.1658 ->
    0.1577 / 0.1619 / 0.1746; (16, 1024, 64, 4, 64) 0.0504 -> 0.0415; (128, 256, 32, 4, 64) 0.0582 -> 0.0522;
    (2, 4096, 512, 4, 128) 0.1098 -> 0.1024; (64, 512, 64, 4, 128) 0.1323 -> 0.1297 / 0.1377 / 0.1425; SiLU
    1.03-1.25x faster with groups of 64 on all 11 problems measured. Groups of 64 programs never lost."""
    programs = POSITION_GROUP_PROGRAMS if _HISTORY_ORDER_OVERRIDE is None else _HISTORY_ORDER_OVERRIDE
    if not programs or max_history_len is None or num_users < 2 or total_h == 0:
        return None
    positions = max(1, cdiv(max_history_len, block_m))
    group = min(num_users, max(1, programs // heads))
    if _positional_jobs(num_users, group, positions) > 2 * num_tiles(total_h, num_users, block_m):
        return None
    return group, positions


# Tuning/testing hook: candidate tiles per user in the position-major order (0: candidate tiles first, in the
# flat map), replacing _candidate_positions' choice; a bound on every user's candidate tiles.
_CANDIDATE_POSITIONS_OVERRIDE = None


def _candidate_positions(candidate_m: int, total_c: int, max_candidates: Optional[int]) -> int:
    """With the position-major history order (``_history_order``, no key splits): how many candidate tiles
    each user's slot of that order holds, 0 for the flat map of candidate tiles ahead of all history tiles.
    1 when the caller's ``max_candidates`` fits one candidate tile (``candidate_m`` rows): then every group of
    users runs its candidate tiles first, then its history tiles, so the candidate tiles read their users'
    keys while the group's history tiles are about to read them again (in the flat map all candidate tiles
    run first, over every user's keys: at (256, 512, 16, 2, 64) the keys and values of the whole batch, 67
    MB, more than the 50 MB L2, read twice from memory). Longer lists would leave spare slots to users
    with fewer candidates. Measured on the H100 (bf16, CUDA graph, forward ms, flat -> grouped; bench/RESULTS.md
    session 13), softmax (SiLU): (256, 512, 16, 2, 64) 0.1102 -> 0.1012 (0.1176 -> 0.1065), jagged 0.0700 ->
    0.0668 (0.0739 -> 0.0669), (128, 512, 32, 4, 64) 0.1123 -> 0.1146 (0.1198 -> 0.1112), (64, 1024, 64, 4, 64)
    0.1602 -> 0.1544 (0.1734 -> 0.1686), (64, 512, 64, 4, 128) 0.1300 -> 0.1229 (0.1510 -> 0.1493), (32, 1024,
    64, 4, 64) 0.0801 -> 0.0796 (0.0866 -> 0.0869), (16, 1024, 64, 4, 64) 0.0420 -> 0.0424 (0.0454 -> 0.0455);
    with two candidate tiles per slot (not taken): jagged (32, 1024, 64, 4, 64) 0.0412 -> 0.0491 (0.0451 ->
    0.0436), (8, 2048, 256, 4, 128) 0.1200 vs 0.1191. Outputs are bitwise equal (the same tiles)."""
    if not total_c:
        return 0
    if _CANDIDATE_POSITIONS_OVERRIDE is not None:
        return _CANDIDATE_POSITIONS_OVERRIDE
    return 1 if max_candidates is not None and max_candidates <= candidate_m else 0


def _positional_jobs(num_users: int, group_users: int, positions: int) -> int:
    """History jobs of the position-major order (``_tile_by_position``): whole groups of users, the last
    group's missing users being spare jobs."""
    return cdiv(num_users, group_users) * group_users * positions


# Tuning/testing hook: a dict {"fwd": cap or None, "bwd": cap or None} that replaces _fwd_register_cap's and
# _bwd_register_cap's choices (registers per thread; None: no cap).
_REGISTER_CAP_OVERRIDE = None
FWD_REGISTER_CAP = 96                       # see _fwd_register_cap
FWD_REGISTER_CAP_MIN_PROGRAMS_PER_SM = 20


def _small_half_heads(d_qk: int, d_v: int, dtype: torch.dtype) -> bool:
    """Half precision at head dims <= 64: the tiles whose programs run several per SM (the key-split and
    dK/dV-split rules treat them apart)."""
    return max(d_qk, d_v) <= 64 and dtype in (torch.float16, torch.bfloat16)


def _may_cap_registers(sms: int, dtype: torch.dtype) -> bool:
    """Where the register caps were measured: an NVIDIA GPU of known SM count (``maxnreg`` is a CUDA option),
    half precision."""
    return bool(sms) and torch.version.hip is None and dtype in (torch.float16, torch.bfloat16)


def _fwd_register_cap(history_blocks: _Blocks, candidate_blocks: _Blocks, programs: int, sms: int, d_qk: int,
                      d_v: int, dtype: torch.dtype, silu: bool) -> Optional[int]:
    """Registers per thread for a full-mode forward launch of ``programs`` programs (None: the compiler's choice).
    Softmax, half precision, head dims 33-64 with 64x32 history tiles (4 warps, 3 stages) and candidate tiles under
    64 rows: FWD_REGISTER_CAP registers when there are at least FWD_REGISTER_CAP_MIN_PROGRAMS_PER_SM programs per SM.
    The compiler takes 110 registers there (ncu, (256, 512, 16, 2, 64): four programs per SM, latency-bound, half the
    issue slots idle); 96 fit five per SM, with a few spilled values outside the key loops (none inside). Launches of
    many short programs gain; fewer, longer programs lose. Measured on the H100 (bf16, CUDA graph, forward, ms, no
    cap -> 96; bench/RESULTS.md session 13): softmax (256, 512, 16, 2, 64) 0.1185 -> 0.1098 and 0.1168 -> 0.1105,
    jagged 0.0737 -> 0.0692, (512, 256, 16, 2, 64) 0.0991 -> 0.0924, (256, 256, 16, 4, 64) 0.0984 -> 0.0928, (128,
    512, 32, 4, 64) 0.1193 -> 0.1132, (128, 768, 32, 2, 64) 0.1057 -> 0.1018 (25 programs per SM); kept: jagged (32,
    1024, 64, 4, 64) 0.0418 vs 0.0457 (16.5 programs per SM, 32-row candidate tiles), jagged (64, 512, 64, 2, 64)
    0.0222 vs 0.0246 (8.7), and with 64-row candidate tiles (32, 1024, 64, 4, 64) 0.0805 vs 0.0810, (64, 512, 64, 4,
    64) 0.0601 vs 0.0608, (64, 1024, 64, 4, 64) 0.1559 vs 0.1625. SiLU gained nowhere (0.99-1.02x on the same
    problems). Outputs are bitwise equal: a register cap changes where values live, not the arithmetic."""
    if _REGISTER_CAP_OVERRIDE is not None:
        return _REGISTER_CAP_OVERRIDE.get("fwd")
    if (silu or not _may_cap_registers(sms, dtype) or not 32 < max(d_qk, d_v) <= 64
            or tuple(history_blocks) != (64, 32, 4, 3) or candidate_blocks.m >= 64
            or programs < FWD_REGISTER_CAP_MIN_PROGRAMS_PER_SM * sms):
        return None
    return FWD_REGISTER_CAP


# Tuning/testing hook: a (candidate splits, history splits) pair that replaces _key_splits' choice.
_KEY_SPLITS_OVERRIDE = None
MIN_KEYS_PER_SPLIT = 1024  # shorter key runs cost more in workspace traffic than they gain
# Half precision at head dims <= 64 with long histories: several programs share an SM, so more runs pay
# (see _key_splits).
SMALL_HEAD_SPLIT_MIN_HISTORY = 2048
SMALL_HEAD_SPLIT_PROGRAMS_PER_SM = 4
SMALL_HEAD_MIN_KEYS_PER_SPLIT = 512


def _key_splits(programs: int, average_keys: float, sms: int, small_heads: bool = False) -> int:
    """Into how many runs to cut the key range of ``programs`` query-tile programs (cached mode: nothing
    else shares the launch) that each stream about ``average_keys`` keys. Double the runs while the programs
    fit in two waves of ``sms`` and each run keeps MIN_KEYS_PER_SPLIT keys. With ``small_heads`` (half
    precision, head dims <= 64, whose programs run several per SM) and at least SMALL_HEAD_SPLIT_MIN_HISTORY
    keys, the limits are SMALL_HEAD_SPLIT_PROGRAMS_PER_SM programs per SM and SMALL_HEAD_MIN_KEYS_PER_SPLIT
    keys per run. Shorter histories keep the first limits, because the merge launch would cost more than
    their short programs save.
    Measured on the H100 (bf16, CUDA graph, ms; bench/RESULTS.md sessions 4 and 15):
    - d = 128, one user's 1024 candidates against 8192 cached keys, 4 heads: 0.096 unsplit, 0.055 (2 runs),
      0.047 (4 runs, this rule), 0.060 (8).
    - d = 64, session 15 (the small-head limits), rule -> old rule, softmax / SiLU:
      - (1, 8192, 1024, 4): 8 runs 0.0380 / 0.0464 vs 4 runs 0.0390 / 0.0537.
      - (2, 8192, 512, 4): 0.0373 / 0.0545 vs 0.0486 / 0.0612.
      - (1, 4096, 512, 4): 0.0183 / 0.0219 vs 0.0201 / 0.0252.
      - (4, 4096, 256, 4): 0.0254 / 0.0341 vs 0.0295 / 0.0356.
      - (1, 16384, 1024, 4): 0.0631 / 0.0822 vs 0.0688 / 0.0980.
      - (1, 2048, 2048, 4): 4 runs 0.0235 / 0.0278 vs 2 runs 0.0238 / 0.0307.
      - (8, 2048, 256, 4): 4 runs 0.0247 / 0.0323 vs 2 runs 0.0290 / 0.0349.
      - (1, 8192, 2048, 4): 4 runs 0.0617 / 0.0784 vs 2 runs 0.0678 / 0.0973.
      - (1, 8192, 256, 4): 16 runs 0.0210 / 0.0255 vs 8 runs 0.0216 / 0.0272.
      - The one loss, (1, 8192, 1024, 2): 16 runs 0.0276 / 0.0341 vs 8 runs 0.0259 / 0.0337.
      - Short histories, where the old limits stay: (32, 1024, 64, 4) unsplit 0.0237 / 0.0243 vs 2 runs
        0.0248 / 0.0274; (64, 1024, 64, 4) 0.0342 / 0.0348 vs 0.0385 / 0.0396.
    With the history tiles in the same launch (full mode) splitting was slower: split candidate tiles delay
    the longest history tiles."""
    small_heads = small_heads and average_keys >= SMALL_HEAD_SPLIT_MIN_HISTORY
    max_programs = SMALL_HEAD_SPLIT_PROGRAMS_PER_SM * sms if small_heads else 2 * sms
    min_keys = SMALL_HEAD_MIN_KEYS_PER_SPLIT if small_heads else MIN_KEYS_PER_SPLIT
    splits = 1
    while 2 * splits * programs <= max_programs and average_keys >= 2 * splits * min_keys:
        splits *= 2
    return splits


class _BwdBlocks(NamedTuple):
    kv: int       # keys a dK/dV program owns
    kv_q: int     # its query step
    q: int        # queries a dQ program owns
    q_kv: int     # its key step
    warps: int
    stages: int


WIDE_BWD_BLOCKS = _BwdBlocks(128, 32, 128, 64, 8, 3)  # d in (64, 128]: 128-key dK/dV programs, one per SM


def _bwd_blocks(d_qk: int, d_v: int, dtype: torch.dtype, total_history: int = 0, num_users: int = 1,
                heads: int = 1, sms: int = 0, silu: bool = False, total_candidates: int = 0) -> _BwdBlocks:
    """Tiles of the backward (see ``_target_attention_bwd_kernel``), from host-known sizes. Measured on
    the H100 (backward alone, bf16, CUDA graph, ms; session 8, after the dK/dV loops stopped spilling;
    bench/RESULTS.md):
    - d = 128: wide tiles (128, 32, 128, 64), 8 warps, 3 stages, when the average history has at least
      WIDE_KEY_TILES_MIN_HISTORY rows and, for softmax, the 128-key tiles x heads give at least
      WIDE_KEY_TILES_MIN_WAVE of a wave. Softmax wide vs (64, 32, 64, 64), 4 warps, 3 stages (the
      fallback): (1, 8192, 1024, 4) 0.563 vs 0.745; (8, 3072, 128, 4) 0.638 vs 0.826; (1, 4096, 512, 4) 0.162
      vs 0.212; (16, 1024, 64, 4) 0.234 vs 0.294; fewer key tiles: (1, 2560, 512, 4) 0.112 vs 0.105,
      (1, 2048, 2048, 4) 0.148 vs 0.141. SiLU takes the wide tiles from a smaller count,
      WIDE_KEY_TILES_MIN_WAVE_SILU of a wave: (1, 2048, 2048, 4) 0.167, (1, 2560, 512, 4) 0.125, (16, 1024, 64, 4)
      0.271, (1, 8192, 1024, 4) 0.731 against 0.169, 0.143, 0.324, 0.928 with its fallback (32, 64, 64, 32), 4
      warps, 3 stages, which beats (64, 32, 64, 64) there; but one user's 1041 history rows and 560 candidates
      (36 wide programs, 0.27 of a wave; session 10) 0.0721 wide vs 0.0527 with the fallback.
      Shorter average histories were not measured: they keep the fallbacks.
      Session 16 (fwd+bwd, ms): where SiLU took the wide tiles it now takes (64, 32, 64, 32), 4 warps, 3 stages,
      whose programs need 81 KB of shared memory and so run two per SM ((64, 32, 64, 64) needs 128 KB: one):
      (1, 2048, 2048, 4) 0.2111 vs 0.2245 wide, (16, 1024, 64, 4) 0.3446 vs 0.3798, (1, 2048, 1024, 4) 0.1686 vs
      0.1829, (1, 3072, 2048, 4) 0.3144 vs 0.3271, (1, 2560, 512, 4) 0.1766 vs 0.1846, (1, 4096, 4096, 4) 0.6723
      vs 0.6832, (1, 4096, 512, 4) 0.3236 vs 0.3270, (1, 8192, 1024, 4) 1.0069 vs 1.0133; (8, 3072, 128, 4)
      1.0955 vs 1.0860 and (2, 2048, 2048, 4) 0.4001 vs 0.3974 lose 1%. Below the wide rule's bound SiLU keeps its
      fallback: (1, 1041, 560, 4) 0.0890 vs 0.0824, (1, 1024, 1024, 4) 0.0966 vs 0.0855.
      Softmax takes the wide tiles with split dK/dV programs where ``_paired_wide_split`` says so.
    - d = 64: (64, 32, 64, 64), 4 warps, 3 stages: (32, 1024, 64, 4, 64) 0.252, (256, 512, 16, 2, 64) 0.363, the
      best of eight tile choices (wide tiles 0.298 and 0.437).
    ``sms`` = 0 (unknown) picks the fallbacks."""
    if interpreting():
        return _BwdBlocks(32, 32, 32, 32, 4, 1)
    if dtype in (torch.float32, torch.float64) or max(d_qk, d_v) > 128:
        return _BwdBlocks(32, 32, 32, 32, 4, 2)
    if max(d_qk, d_v) > 64:
        if _paired_wide_split(total_history, total_candidates, num_users, heads, sms, d_qk, d_v, dtype, silu):
            return WIDE_BWD_BLOCKS
        long_histories = total_history >= WIDE_KEY_TILES_MIN_HISTORY * max(num_users, 1)
        wide_programs = num_tiles(total_history, num_users, WIDE_BWD_BLOCKS.kv) * heads
        min_wave = WIDE_KEY_TILES_MIN_WAVE_SILU if silu else WIDE_KEY_TILES_MIN_WAVE
        if sms and long_histories and wide_programs >= min_wave * sms:
            return _BwdBlocks(64, 32, 64, 32, 4, 3) if silu else WIDE_BWD_BLOCKS
        return _BwdBlocks(32, 64, 64, 32, 4, 3) if silu else _BwdBlocks(64, 32, 64, 64, 4, 3)
    return _BwdBlocks(64, 32, 64, 64, 4, 3)


PAIRED_SPLIT_MIN_HISTORY = 2048          # see _paired_wide_split
PAIRED_SPLIT_MAX_CANDIDATES_PER_HISTORY = 1.5


def _paired_wide_split(total_history: int, total_candidates: int, num_users: int, heads: int, sms: int, d_qk: int,
                       d_v: int, dtype: torch.dtype, silu: bool) -> bool:
    """Whether a softmax backward at head dims in (64, 128], half precision, takes the wide tiles (128 keys, 8
    warps) with split dK/dV programs (``_split_dkdv``): when users have as many candidates as history rows, up to
    PAIRED_SPLIT_MAX_CANDIDATES_PER_HISTORY times as many, from PAIRED_SPLIT_MIN_HISTORY history rows on average,
    and the split wide programs fit in one wave (one per SM). Their two parts (history queries and candidates, or
    halves of the rows: ``_split_halves``) then cost about the same, and the first key tiles' programs no longer set
    the time. Measured on the H100 (bf16, fwd+bwd, CUDA graph, ms, split wide vs the tiles chosen without this rule;
    bench/RESULTS.md session 16): (1, 2048, 2048, 4) 0.1667 vs 0.1741, (1, 2048, 2048, 2) 0.1135 vs 0.1243, (1,
    2048, 2048, 3) 0.1398 vs 0.1439, (1, 2048, 2048, 1) 0.1108 vs 0.1197, (1, 2048, 3072, 4) 0.2072 vs 0.2230, (1,
    3072, 3072, 2) 0.1803 vs 0.1976; outside the rule it lost: more candidates ((1, 2048, 4096, 2) 0.2063 vs
    0.1871), fewer ((1, 3072, 2048, 4) 0.2499 vs 0.2303, (1, 2048, 1024, 4) 0.1361 vs 0.1241), shorter histories
    ((1, 1024, 1024, 4) 0.0717 vs 0.0699), more than a wave ((1, 2048, 2048, 8) 0.3092 vs 0.2826, (2, 2048, 2048, 4)
    0.3129 vs 0.2925, (1, 4096, 4096, 4) 0.5246 vs 0.5049). SiLU never (it lost at (1, 2048, 2048, 4): 0.2321 vs
    0.2245). ``sms`` = 0 (unknown, or the interpreter): never."""
    if silu or not sms or dtype not in (torch.float16, torch.bfloat16) or not 64 < max(d_qk, d_v) <= 128:
        return False
    users = max(num_users, 1)
    history, candidates = total_history / users, total_candidates / users
    return (history >= PAIRED_SPLIT_MIN_HISTORY and _wide_split_programs(total_history, heads) <= sms
            and history <= candidates <= PAIRED_SPLIT_MAX_CANDIDATES_PER_HISTORY * history)


def _wide_split_programs(total_history: int, heads: int) -> int:
    """dK/dV programs of a split backward with the wide tiles (two per 128-key tile and head), counted as the
    paired-split rules count them."""
    return 2 * cdiv(total_history, WIDE_BWD_BLOCKS.kv) * heads


# Tuning/testing hook: True / False replaces _split_dkdv's choice (a launch with candidates and history queries).
_DKDV_SPLIT_OVERRIDE = None
SPLIT_DKDV_MIN_SHARE = 0.75         # see _split_dkdv (softmax)
SPLIT_DKDV_MIN_SHARE_SILU = 1.0


def _split_dkdv(blocks: _BwdBlocks, total_history: int, total_candidates: int, num_users: int, heads: int,
                sms: int, d_qk: int, d_v: int, dtype: torch.dtype, silu: bool = False) -> bool:
    """Whether each history key tile's dK/dV gets two programs, one over its history queries and one over
    its candidates (see ``_dkdv_tile``): when the dK/dV program of a user's first key tile, which streams the
    whole history and candidate list, would take more than SPLIT_DKDV_MIN_SHARE (SiLU: ..._SILU) of the
    average work per SM, i.e. when that one program, not the total, sets the time. Work is counted in
    (query, key) pairs times matmuls, 4 per pair in dK/dV programs and 3 in dQ programs, from host-known
    averages (no sync). Only half precision at head dims <= 64, whose backward programs run two per SM.
    Measured on the H100 (bf16, backward alone, CUDA graph, ms, unsplit -> split; bench/RESULTS.md session 9):
    d = 64, 4 heads unless said: (1, 2048, 2048) share 0.79: softmax 0.0927 -> 0.0732, SiLU 0.0851 -> 0.0944;
    (1, 1024, 1024) 1.57: 0.0435 -> 0.0358, SiLU 0.0415 -> 0.0340; (1, 1400, 1300, 2 heads) 2.33: 0.0527 ->
    0.0392, SiLU 0.0482 -> 0.0402; (1, 4096, 512) 0.53: 0.1062 -> 0.1145, SiLU 0.1140 -> 0.1458; (2, 2048, 2048),
    (4, 1024, 1024), (1, 8192, 1024) (<= 0.39) 7-14% slower split. At d = 128 (one program per SM) the split
    lost with the tiles ``_bwd_blocks`` picks ((1, 2048, 2048) 0.1385 -> 0.1563, (1, 1400, 1300) 0.0741 ->
    0.0888, (1, 8192, 1024) 0.578 -> 0.624): the fp32 partial sums cost more than the balance gains there.
    At d in (64, 128] the split comes with the wide tiles, where ``_paired_wide_split`` says so.
    ``sms`` = 0 (unknown, or the interpreter) never splits."""
    if not sms or not total_history or not total_candidates:
        return False
    if _paired_wide_split(total_history, total_candidates, num_users, heads, sms, d_qk, d_v, dtype, silu):
        return blocks == WIDE_BWD_BLOCKS
    if not _small_half_heads(d_qk, d_v, dtype):
        return False
    history, pairs_per_sm = _pairs_per_sm(total_history, total_candidates, num_users, heads, sms)
    candidates = total_candidates / max(num_users, 1)
    share = 4 * blocks.kv * (history + candidates) / (7 * pairs_per_sm)
    return share >= (SPLIT_DKDV_MIN_SHARE_SILU if silu else SPLIT_DKDV_MIN_SHARE)


# Tuning/testing hook: True / False replaces _split_halves' choice (for launches with split dK/dV programs).
_SPLIT_HALVES_OVERRIDE = None
SPLIT_HALVES_MIN_WAVE = 0.85          # see _split_halves


def _split_halves(blocks: _BwdBlocks, total_history: int, total_candidates: int, num_users: int, heads: int,
                  sms: int, d_qk: int, d_v: int, dtype: torch.dtype, silu: bool) -> bool:
    """Where split dK/dV programs (``_split_dkdv``) cut each key tile's query rows (``_dkdv_tile``): in halves
    (True) or between history and candidates (False). Halves when the paired wide split applies and its
    split programs fill at least SPLIT_HALVES_MIN_WAVE of the SMs: the dQ programs then wait for SMs that the
    dK/dV programs free, and equal halves free them together instead of leaving a long candidate half per
    key tile. With SMs to spare the dQ programs start at once, and the history-candidate cut, whose short
    history halves free SMs early for the long dQ programs, did better. Measured on the H100 (bf16, fwd+bwd,
    CUDA graph, ms, history-candidate cut vs halves; bench/RESULTS.md session 17): (1, 2048, 2048, 4, 128)
    (split programs 0.97 of a wave) 0.1681 vs 0.1612, (1, 2048, 3072, 4, 128) (0.97) 0.2094 vs 0.2017; below
    the bound (1, 3072, 3072, 2, 128) (0.73) 0.1816 vs 0.2011, but (1, 2048, 2048, 2, 128) (0.48) 0.1138 vs 0.1092
    and (1, 2048, 2048, 1, 128) 0.1092 vs 0.1081 (small wins the rule leaves: too few points to draw a finer
    bound); the d = 64 splits lost or tied (SiLU (1, 1400, 1300, 2, 64) 0.0637 vs 0.0707, (1, 1024, 1024, 4, 64)
    0.0515 vs 0.0551; softmax (1, 2048, 2048, 4, 64) 0.0990 vs 0.1009)."""
    if blocks != WIDE_BWD_BLOCKS or not _paired_wide_split(total_history, total_candidates, num_users, heads, sms,
                                                           d_qk, d_v, dtype, silu):
        return False
    return _wide_split_programs(total_history, heads) >= SPLIT_HALVES_MIN_WAVE * sms


BWD_REGISTER_CAP = 168                      # see _bwd_register_cap
BWD_REGISTER_CAP_MIN_PROGRAMS_PER_SM = 4


def _bwd_register_cap(blocks: _BwdBlocks, programs: int, sms: int, split: bool, d_qk: int, d_v: int,
                      dtype: torch.dtype) -> Optional[int]:
    """Registers per thread for a backward launch of ``programs`` programs (None: the compiler's choice). Half
    precision, head dims <= 64 with the (64, 32, 64, 64), 4-warp, 3-stage tiles, dK/dV not split: BWD_REGISTER_CAP
    registers when there are at least BWD_REGISTER_CAP_MIN_PROGRAMS_PER_SM programs per SM. The compiler takes 232
    registers at d = 64 (ncu, (256, 512, 16, 2, 64): two programs per SM); 168 fit three, with spilled values outside
    the loops only (the split dK/dV programs would spill inside one). Measured on the H100 (bf16, CUDA graph, forward
    + backward, ms, no cap -> 168; bench/RESULTS.md session 13), softmax (SiLU): (256, 512, 16, 2, 64) 0.4834 ->
    0.4384 (0.4841 -> 0.4598), jagged 0.2989 -> 0.2713 (0.2987 -> 0.2806), (32, 1024, 64, 4, 64) 0.3342 -> 0.3058
    (0.3582 -> 0.3502), jagged 0.1497 -> 0.1359 (0.1591 -> 0.1550), (128, 256, 32, 4, 64) 0.2153 -> 0.1999 (0.2065 ->
    0.1936), (4, 2048, 256, 4, 64) 0.1569 -> 0.1485 (0.1954 -> 0.1927), d = 32 (32, 1024, 64, 4, 32) 0.2338 -> 0.2046
    (0.3187 -> 0.2727); kept: (1, 2048, 2048, 4, 64) with 2.9 programs per SM, SiLU 0.1288 vs 0.1408 (softmax splits
    there: 0.1009 vs 0.1004), (1, 1024, 1024, 4, 64) split, 0.0471 vs 0.0500 (SiLU 0.0513 vs 0.0629). Gradients are
    bitwise equal."""
    if _REGISTER_CAP_OVERRIDE is not None:
        return _REGISTER_CAP_OVERRIDE.get("bwd")
    if (split or not _may_cap_registers(sms, dtype) or max(d_qk, d_v) > 64
            or tuple(blocks) != (64, 32, 64, 64, 4, 3) or programs < BWD_REGISTER_CAP_MIN_PROGRAMS_PER_SM * sms):
        return None
    return BWD_REGISTER_CAP


WIDE_KEY_TILES_MIN_HISTORY = 1024  # average history per user from which the backward may use wide key tiles
WIDE_KEY_TILES_MIN_WAVE = 0.75  # ... and, for softmax, the fraction of an SM wave their dK/dV programs must fill
WIDE_KEY_TILES_MIN_WAVE_SILU = 0.4  # ... for SiLU, which takes (64, 32, 64, 32) tiles there (see _bwd_blocks)


def _head_block(d: int) -> int:
    return max(16, next_power_of_2(d))


def _head_options(d_qk: int, d_v: int, dtype: torch.dtype) -> dict:
    """Precision and head-dim options every attention kernel takes."""
    block_dqk, block_dv = _head_block(d_qk), _head_block(d_v)
    return dict(IS_FP64=dtype == torch.float64, EVEN_DQK=block_dqk == d_qk, EVEN_DV=block_dv == d_v,
                BLOCK_DQK=block_dqk, BLOCK_DV=block_dv)


def _fwd_options(dtype: torch.dtype, d_qk: int, d_v: int, blocks: _Blocks, history_m: int, candidate_m: int,
                 max_registers: Optional[int] = None) -> dict:
    """Launch options of the forward kernel: head dims, precision, tiles (one query tile height per
    query kind), warps and stages, and a register cap (see ``_register_options``)."""
    return dict(_head_options(d_qk, d_v, dtype), BLOCK_N=blocks.n, BLOCK_MH=history_m, BLOCK_MC=candidate_m,
                num_warps=blocks.warps, num_stages=blocks.stages, **_register_options(max_registers))


def _register_options(max_registers: Optional[int]) -> dict:
    """Triton's ``maxnreg`` launch option (registers per thread) when a cap is set: fewer registers let more
    programs share an SM. Only ever set on NVIDIA GPUs (see ``_fwd_register_cap``, ``_bwd_register_cap``)."""
    return {} if max_registers is None else dict(maxnreg=max_registers)


def _arg(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a non-empty stand-in for an input pointer the kernel never reads (absent or empty tensor)."""
    return t if t is not None and t.numel() > 0 else fallback


def _out(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a fresh one-element stand-in for an output pointer the kernel never writes (empty output).
    Never an input: torch.compile reads from the kernel's stores which arguments it mutates, and an input
    standing in for an output would count as mutated (a leaf that requires grad then fails to compile)."""
    return t if t.numel() > 0 else t.new_empty(1)


def _strides(t: Optional[torch.Tensor], rank: int = 3):
    return tuple(t.stride()) if t is not None else (0,) * rank


def _empty_rows(like: torch.Tensor, d: int) -> torch.Tensor:
    """Placeholder (0, H, d) output for a mode that has no such tensor (custom ops cannot return None)."""
    return like.new_empty(0, like.shape[1], d)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _target_attention_fwd(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
                          candidate_v, candidate_offsets, candidate_history_lengths, activation, scale,
                          silu_normalizer, history_causal, merged_skip=None, max_history_len=None,
                          max_candidates=None):
    heads, d_qk, d_v = history_v.shape[1], history_k.shape[2], history_v.shape[2]
    silu = activation == "silu"
    stats = _stats_dtype(candidate_q.dtype)
    out_scale = 1.0 / silu_normalizer if silu else 1.0

    # merged_skip: candidate results go into history_out's rows (the same rows); candidate_out is empty.
    merged = merged_skip is not None

    def outputs(q, in_history_out=False):
        if q is None:
            return _empty_rows(candidate_q, d_v), candidate_q.new_empty(2, heads, 0, dtype=stats)
        out = _empty_rows(q, d_v) if in_history_out else q.new_empty(q.shape[0], heads, d_v)
        # Merged mode: each kind's statistics rows of skipped users are never written, but the backward's
        # row-statistics pass reads every row; zeros keep it from computing on uninitialised memory.
        new_stats = q.new_zeros if merged else q.new_empty
        return out, new_stats(2, heads, 0 if silu else q.shape[0], dtype=stats)

    history_out, history_lse = outputs(history_q)
    candidate_out, candidate_lse = outputs(candidate_q, merged)
    candidate_dest = history_out if merged else candidate_out
    num_users = candidate_offsets.shape[0] - 1
    total_h = 0 if history_q is None else history_q.shape[0]
    total_c = candidate_q.shape[0]
    if total_h + total_c == 0:
        return history_out, candidate_out, history_lse, candidate_lse
    # One launch for both query kinds (see the kernel): the history tile follows the history batch, the
    # candidate tile the average candidate list, so short lists do not run mostly-empty tiles.
    history_blocks = _fwd_blocks(total_h, num_users, d_qk, d_v, candidate_q.dtype)
    candidate_blocks = _fwd_blocks(total_c, num_users, d_qk, d_v, candidate_q.dtype)
    candidate_splits = history_splits = 1
    sms = _sm_count(candidate_q.device) if candidate_q.is_cuda else 0
    if total_h == 0 and total_c and candidate_q.is_cuda:
        # Cached mode on the GPU: candidate tiles alone make the grid; when they are few, shorter tiles and
        # then key runs spread them over the SMs. Count the tiles that hold rows (the map's spare tiles exit
        # at once); candidates see their whole history, so their average key count is history rows per user.
        if _FWD_BLOCKS_OVERRIDE is None:
            candidate_blocks = _spread_blocks(candidate_blocks, total_c, num_users, heads, sms, d_qk, d_v,
                                              candidate_q.dtype)
        if not interpreting():
            candidate_splits = _key_splits(cdiv(total_c, candidate_blocks.m) * heads,
                                           history_k.shape[0] / max(num_users, 1), sms,
                                           _small_half_heads(d_qk, d_v, candidate_q.dtype))
    elif total_h and candidate_q.is_cuda and not interpreting() and _FWD_BLOCKS_OVERRIDE is None:
        history_blocks, candidate_blocks = _spread_full_blocks(history_blocks, candidate_blocks, total_h, total_c,
                                                               num_users, heads, sms, d_qk, d_v, candidate_q.dtype)
        history_blocks, candidate_blocks = _fwd_key_steps(history_blocks, candidate_blocks, total_h, total_c,
                                                          num_users, heads, sms, d_qk, d_v, candidate_q.dtype, silu)
    if _KEY_SPLITS_OVERRIDE is not None:
        candidate_splits, history_splits = _KEY_SPLITS_OVERRIDE
    candidate_tiles = num_tiles(total_c, num_users, candidate_blocks.m) if total_c else 0
    history_tiles = num_tiles(total_h, num_users, history_blocks.m) if total_h else 0
    order = _history_order(total_h, num_users, heads, history_blocks.m, max_history_len)
    group_users, positions = order or (1, 1)
    candidate_positions = 0
    if order is not None:
        history_tiles = _positional_jobs(num_users, group_users, positions)
        if candidate_splits == history_splits == 1:
            candidate_positions = _candidate_positions(candidate_blocks.m, total_c, max_candidates)
        if candidate_positions:  # one job map for both kinds (see the kernel): its jobs all count as history's
            history_tiles = _positional_jobs(num_users, group_users, positions + candidate_positions)
            candidate_tiles = 0
    history_part, history_part_stats = _split_workspace(history_splits, total_h, heads, d_v, history_k)
    candidate_part, candidate_part_stats = _split_workspace(candidate_splits, total_c, heads, d_v, history_k)
    hq = _arg(history_q, candidate_q)
    hq_strides = _strides(history_q)
    ck, cv = _arg(candidate_k, candidate_q), _arg(candidate_v, candidate_q)
    grid = (candidate_tiles * candidate_splits + history_tiles * history_splits) * heads
    cap = (_fwd_register_cap(history_blocks, candidate_blocks, grid, sms, d_qk, d_v, candidate_q.dtype, silu)
           if total_h and not interpreting() else None)
    tile_options = _fwd_options(candidate_q.dtype, d_qk, d_v, history_blocks if total_h else candidate_blocks,
                                history_blocks.m, candidate_blocks.m, cap)
    descriptors = (_tma_descriptors(tile_options["BLOCK_N"], history_k, history_v)
                   if _use_tma("fwd", candidate_q, d_qk, d_v, silu) else None)
    k_desc, v_desc = descriptors or (history_k, history_v)
    _target_attention_fwd_kernel[(grid,)](
        hq, _arg(candidate_q, hq), history_k, history_v, k_desc, v_desc, ck, cv, _out(history_out),
        _out(candidate_dest),
        _out(history_lse), _out(candidate_lse), history_part, candidate_part, history_part_stats,
        candidate_part_stats, history_offsets, candidate_offsets, _arg(candidate_history_lengths, candidate_offsets),
        _arg(merged_skip, candidate_offsets), num_users, candidate_tiles, history_tiles, heads,
        candidate_splits, history_splits, total_c, total_h, group_users, positions, candidate_positions,
        *hq_strides, *candidate_q.stride(), *history_k.stride(), *history_v.stride(),
        *_strides(candidate_k), *_strides(candidate_v), *history_out.stride(), *candidate_dest.stride(),
        history_lse.stride(1), candidate_lse.stride(1), history_lse.stride(0), candidate_lse.stride(0),
        d_qk, d_v, scale, out_scale,
        USE_TMA=descriptors is not None, HAS_HISTORY=total_h > 0, HAS_SELF=candidate_k is not None,
        HAS_LENGTHS=candidate_history_lengths is not None, CAUSAL=history_causal,
        HAS_SKIP=merged_skip is not None, SILU=silu, POSITIONAL=order is not None,
        INTERLEAVED=candidate_positions > 0, **tile_options)
    for splits, part, part_stats, out, lse in ((history_splits, history_part, history_part_stats, history_out,
                                                history_lse),
                                               (candidate_splits, candidate_part, candidate_part_stats,
                                                candidate_out, candidate_lse)):
        if splits > 1 and out.shape[0]:
            _merge_splits(part, part_stats, out, lse, splits, out_scale, silu)
    return history_out, candidate_out, history_lse, candidate_lse


def _split_workspace(splits: int, rows: int, heads: int, d_v: int, like: torch.Tensor):
    """Contiguous (splits, rows, H, d_v) partial sums and (splits, 2, H, rows) (row max, row sum) of key
    runs, in the accumulator dtype; one-element stand-ins when tiles are not split."""
    acc = _stats_dtype(like.dtype)
    if splits == 1 or rows == 0:
        return like.new_empty(1, dtype=acc), like.new_empty(1, dtype=acc)
    return like.new_empty(splits, rows, heads, d_v, dtype=acc), like.new_empty(splits, 2, heads, rows, dtype=acc)


def _merge_splits(part, part_stats, out, lse, splits: int, out_scale: float, silu: bool) -> None:
    rows, heads, d_v = out.shape
    block = 32 if interpreting() else 64
    _merge_splits_kernel[(cdiv(rows, block), heads)](
        part, part_stats, out, _out(lse), rows, heads, splits, *out.stride(), lse.stride(1), lse.stride(0),
        d_v, out_scale, SILU=silu, IS_FP64=part.dtype == torch.float64, EVEN_DV=_head_block(d_v) == d_v,
        BLOCK_M=block, BLOCK_DV=_head_block(d_v))


def _backward_stats(history_out: torch.Tensor, history_d_out: Optional[torch.Tensor], history_lse: torch.Tensor,
                    candidate_out: torch.Tensor, candidate_d_out: torch.Tensor, candidate_lse: torch.Tensor):
    """Per query kind, (2, H, rows): the base-2 log-sum-exp m + log2(l) of the forward's (2, H, rows)
    statistics ``*_lse``, and rowsum(dO * O), for the softmax backward; one launch for both kinds.
    ``history_d_out`` may be None when ``history_out`` has no rows (cached mode)."""
    rows_c, heads, d_v = candidate_out.shape
    rows_h = history_out.shape[0]
    candidate_stats = candidate_lse.new_empty(2, heads, rows_c)
    history_stats = candidate_lse.new_empty(2, heads, rows_h)
    block = 32 if interpreting() else 64
    blocks_h, blocks_c = cdiv(rows_h, block), cdiv(rows_c, block)
    if blocks_h + blocks_c == 0:
        return history_stats, candidate_stats
    # A kind without rows has no row blocks: the other kind's tensors stand in for its never-read inputs.
    if not blocks_h:
        history_out, history_d_out, history_lse = candidate_out, candidate_d_out, candidate_lse
    elif not blocks_c:
        candidate_out, candidate_d_out, candidate_lse = history_out, history_d_out, history_lse
    _target_attention_bwd_preprocess_kernel[(blocks_h + blocks_c, heads)](
        history_out, history_d_out, history_lse, _out(history_stats), candidate_out, candidate_d_out, candidate_lse,
        _out(candidate_stats), rows_h, blocks_h, rows_c,
        *history_out.stride(), *history_d_out.stride(), history_lse.stride(1), history_lse.stride(0),
        history_stats.stride(1), history_stats.stride(0),
        *candidate_out.stride(), *candidate_d_out.stride(), candidate_lse.stride(1), candidate_lse.stride(0),
        candidate_stats.stride(1), candidate_stats.stride(0),
        d_v, IS_FP64=candidate_stats.dtype == torch.float64, EVEN_DV=_head_block(d_v) == d_v, BLOCK_M=block,
        BLOCK_DV=_head_block(d_v))
    return history_stats, candidate_stats


# Tuning hook: bench/tune_target_attention.py sets this to a _Blocks that replaces _bwd_blocks' choice.
_BWD_BLOCKS_OVERRIDE = None
# Tuning hook: (dK/dV blocks, dQ blocks) runs the backward as two launches, dK/dV then dQ, each with its
# own tiles (measured slower than one launch, bench/RESULTS.md session 8); None for either skips that
# launch (its gradients are then left unwritten: for timing one kind alone).
_BWD_SPLIT_OVERRIDE = None


def _target_attention_bwd(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
                          candidate_v, candidate_offsets, candidate_history_lengths, history_out, candidate_out,
                          history_lse, candidate_lse, d_history_out, d_candidate_out, activation, scale,
                          silu_normalizer, history_causal, merged_skip=None):
    heads, d_qk, d_v = history_v.shape[1], history_k.shape[2], history_v.shape[2]
    silu = activation == "silu"
    stats = _stats_dtype(candidate_q.dtype)
    out_scale = 1.0 / silu_normalizer if silu else 1.0
    cached, cross = history_q is None, candidate_k is None
    merged = merged_skip is not None
    if merged:  # candidate results and their gradients live in history_out's rows
        candidate_out, d_candidate_out = history_out, d_history_out
    num_users = history_offsets.shape[0] - 1
    sms = 0 if interpreting() else _sm_count(history_k.device)
    blocks = _BWD_BLOCKS_OVERRIDE or _bwd_blocks(d_qk, d_v, candidate_q.dtype, history_k.shape[0], num_users, heads,
                                                 sms, silu, 0 if cached else candidate_q.shape[0])

    d_history_q = _empty_rows(candidate_q, d_qk) if cached else torch.empty_like(history_q,
                                                                                 memory_format=torch.contiguous_format)
    d_history_k = history_k.new_empty(history_k.shape)
    d_history_v = history_v.new_empty(history_v.shape)
    if merged:  # candidate gradients go into the history gradients' rows (the same rows): none of their own
        d_candidate_q, d_candidate_k, d_candidate_v = (_empty_rows(candidate_q, d) for d in (d_qk, d_qk, d_v))
        candidate_grads = (d_history_q, d_history_k, d_history_v)
    else:
        d_candidate_q = candidate_q.new_empty(candidate_q.shape)
        d_candidate_k = _empty_rows(candidate_q, d_qk) if cross else candidate_k.new_empty(candidate_k.shape)
        d_candidate_v = _empty_rows(candidate_q, d_v) if cross else candidate_v.new_empty(candidate_v.shape)
        candidate_grads = (d_candidate_q, d_candidate_k, d_candidate_v)
    # Softmax: per query kind, (2, H, rows) row statistics [log-sum-exp, delta] (see _backward_stats); an
    # empty stand-in (allocated only when needed) where there are none (SiLU, cached-mode history).
    if silu:
        history_stats = candidate_stats = candidate_q.new_empty(2, heads, 0, dtype=stats)
    else:
        history_stats, candidate_stats = _backward_stats(history_out, d_history_out, history_lse, candidate_out,
                                                         d_candidate_out, candidate_lse)

    # One launch (see the kernel): dK/dV of history key tiles, dQ (+ own key) of candidate tiles, dQ of
    # history tiles; or two (_BWD_SPLIT_OVERRIDE: dK/dV, then dQ, each with its own tiles). Every output
    # element is written by exactly one program.
    total_h, total_c = history_k.shape[0], candidate_q.shape[0]
    # Absent or empty tensors (cached or cross mode, no candidates) get a non-empty stand-in pointer.
    hq, cq = _arg(history_q, history_k), _arg(candidate_q, history_k)
    hdo, cdo = _arg(d_history_out, hq), _arg(d_candidate_out, cq)
    lengths = candidate_history_lengths

    def launch(blocks: _BwdBlocks, dkdv: bool, dq: bool) -> None:
        key_tiles = num_tiles(total_h, num_users, blocks.kv) if total_h and dkdv else 0
        candidate_tiles = num_tiles(total_c, num_users, blocks.q) if total_c and dq else 0
        history_tiles = num_tiles(total_h, num_users, blocks.q) if total_h and not cached and dq else 0
        split = bool(key_tiles) and not cached and bool(total_c) and (
            _split_dkdv(blocks, total_h, total_c, num_users, heads, sms, d_qk, d_v, candidate_q.dtype, silu)
            if _DKDV_SPLIT_OVERRIDE is None
            else _DKDV_SPLIT_OVERRIDE)
        halves = split and (_split_halves(blocks, total_h, total_c, num_users, heads, sms, d_qk, d_v,
                                          candidate_q.dtype, silu)
                            if _SPLIT_HALVES_OVERRIDE is None else _SPLIT_HALVES_OVERRIDE)
        programs = (key_tiles * (2 if split else 1) + candidate_tiles + history_tiles) * heads
        if programs == 0:
            return
        if split:  # see _dkdv_tile: fp32 partial sums of both parts, and the zeroed arrival counts
            dk_part = history_k.new_empty(2, total_h, heads, d_qk, dtype=stats)
            dv_part = history_v.new_empty(2, total_h, heads, d_v, dtype=stats)
            arrivals = torch.zeros(key_tiles * heads, dtype=torch.int32, device=history_k.device)
        else:  # unused stand-ins
            dk_part = dv_part = arrivals = _out(d_history_k)
        dkdv_descriptors = (_tma_descriptors(blocks.kv_q, history_q, candidate_q, d_history_out, d_candidate_out)
                            if dkdv and _use_tma("dkdv", candidate_q, d_qk, d_v, silu) else None)
        dq_descriptors = (_tma_descriptors(blocks.q_kv, history_k, history_v)
                          if dq and _use_tma("dq", candidate_q, d_qk, d_v, silu) else None)
        _target_attention_bwd_kernel[(programs,)](
            hq, cq, history_k, history_v, _arg(candidate_k, cq), _arg(candidate_v, cq), hdo, cdo,
            _arg(history_stats, history_k), _arg(candidate_stats, history_k), _arg(history_stats[1], history_k),
            _arg(candidate_stats[1], history_k), *(dkdv_descriptors or (hq, cq, hdo, cdo)),
            *(dq_descriptors or (history_k, history_v)),
            _out(d_history_q), _out(candidate_grads[0]), _out(d_history_k), _out(d_history_v),
            _out(candidate_grads[1]), _out(candidate_grads[2]), dk_part, dv_part, arrivals,
            history_offsets, candidate_offsets, _arg(lengths, candidate_offsets),
            _arg(merged_skip, candidate_offsets), num_users,
            key_tiles, candidate_tiles, history_tiles, heads,
            *_strides(history_q), *candidate_q.stride(), *history_k.stride(), *history_v.stride(),
            *_strides(candidate_k), *_strides(candidate_v), *_strides(d_history_out), *d_candidate_out.stride(),
            history_stats.stride(1), candidate_stats.stride(1),
            *d_history_q.stride(), *candidate_grads[0].stride(), *d_history_k.stride(), *d_history_v.stride(),
            *candidate_grads[1].stride(), *candidate_grads[2].stride(),
            *(dk_part.stride()[:3] if split else (0, 0, 0)), *(dv_part.stride()[:3] if split else (0, 0, 0)),
            d_qk, d_v, scale, out_scale, DKDV=dkdv, DQ=dq, SPLIT_DKDV=split, HALVES=halves,
            TMA_DKDV=dkdv_descriptors is not None, TMA_DQ=dq_descriptors is not None, HAS_HISTORY_Q=not cached,
            HAS_SELF=not cross, HAS_LENGTHS=lengths is not None, CAUSAL=history_causal,
            HAS_SKIP=merged_skip is not None, SILU=silu, **_head_options(d_qk, d_v, candidate_q.dtype),
            BLOCK_KV=blocks.kv, BLOCK_KV_Q=blocks.kv_q, BLOCK_Q=blocks.q, BLOCK_Q_KV=blocks.q_kv,
            num_warps=blocks.warps, num_stages=blocks.stages,
            **_register_options(_bwd_register_cap(blocks, programs, sms, split, d_qk, d_v, candidate_q.dtype)))

    if _BWD_SPLIT_OVERRIDE is not None:
        if _BWD_SPLIT_OVERRIDE[0] is not None:
            launch(_BWD_SPLIT_OVERRIDE[0], True, False)
        if _BWD_SPLIT_OVERRIDE[1] is not None:
            launch(_BWD_SPLIT_OVERRIDE[1], False, True)
    else:
        launch(blocks, True, True)
    return d_history_q, d_history_k, d_history_v, d_candidate_q, d_candidate_k, d_candidate_v


# ------------------------------------------------------------------------------------------------
# Registered ops (absent outputs are (0, H, d) / (H, 0) tensors: custom ops cannot return None)
# ------------------------------------------------------------------------------------------------
@register_op("target_attention_fwd")
def target_attention_fwd(history_q: Optional[torch.Tensor], history_k: torch.Tensor, history_v: torch.Tensor,
                         history_offsets: torch.Tensor, candidate_q: torch.Tensor,
                         candidate_k: Optional[torch.Tensor], candidate_v: Optional[torch.Tensor],
                         candidate_offsets: torch.Tensor, candidate_history_lengths: Optional[torch.Tensor],
                         activation: str, scale: float, silu_normalizer: float, history_causal: bool,
                         merged_skip: Optional[torch.Tensor] = None, max_history_len: Optional[int] = None,
                         max_candidates: Optional[int] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(history_out, candidate_out, history_stats (2, H, total_N), candidate_stats (2, H, total_n)); the
    softmax row statistics are [0] the base-2 row max and [1] log2 of the row sum (the backward folds them
    into one log-sum-exp, see _finish_rows); they are empty for silu, history_out and its stats are empty in
    cached mode.
    ``merged_skip`` (B,) int32, internal (compat.hstu_mha's merged layout): history and candidate tensors are
    views of the same rows (the same row count); users with merged_skip != 0 are not computed at all (their
    history rows are another user's candidates and their candidates another user's history), and candidate
    results are written into history_out, which then holds every row; candidate_out has no rows. Every row
    must be a history or candidate row of exactly one user that is not skipped (else it is never written).
    ``max_history_len`` / ``max_candidates``: the caller's bounds on the longest history / candidate list, if
    given (they only choose the order of the tiles, see ``_history_order`` and ``_candidate_positions``)."""
    return _target_attention_fwd(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
                                 candidate_v, candidate_offsets, candidate_history_lengths, activation, scale,
                                 silu_normalizer, history_causal, merged_skip, max_history_len, max_candidates)


@target_attention_fwd.register_fake
def _(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
      candidate_offsets, candidate_history_lengths, activation, scale, silu_normalizer, history_causal,
      merged_skip=None, max_history_len=None, max_candidates=None):
    heads, d_v = history_v.shape[1], history_v.shape[2]
    stats = _stats_dtype(candidate_q.dtype)
    silu = activation == "silu"
    history_rows = 0 if history_q is None else history_q.shape[0]
    candidate_rows = candidate_q.shape[0]
    candidate_out_rows = 0 if merged_skip is not None else candidate_rows  # merged into history_out
    return (candidate_q.new_empty(history_rows, heads, d_v),
            candidate_q.new_empty(candidate_out_rows, heads, d_v),
            candidate_q.new_empty(2, heads, 0 if silu else history_rows, dtype=stats),
            candidate_q.new_empty(2, heads, 0 if silu else candidate_rows, dtype=stats))


@register_op("target_attention_bwd")
def target_attention_bwd(history_q: Optional[torch.Tensor], history_k: torch.Tensor, history_v: torch.Tensor,
                         history_offsets: torch.Tensor, candidate_q: torch.Tensor,
                         candidate_k: Optional[torch.Tensor], candidate_v: Optional[torch.Tensor],
                         candidate_offsets: torch.Tensor, candidate_history_lengths: Optional[torch.Tensor],
                         history_out: torch.Tensor, candidate_out: torch.Tensor, history_lse: torch.Tensor,
                         candidate_lse: torch.Tensor, d_history_out: Optional[torch.Tensor],
                         d_candidate_out: torch.Tensor, activation: str, scale: float, silu_normalizer: float,
                         history_causal: bool, merged_skip: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """Gradients (history q, k, v, candidate q, k, v); those of absent inputs are (0, H, d) tensors. With
    ``merged_skip`` (see ``target_attention_fwd``) the history gradients hold every row's gradient (history
    rows from history queries and keys, candidate rows from the candidates' own q, k, v), and the
    candidate gradients have no rows."""
    return _target_attention_bwd(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
                                 candidate_v, candidate_offsets, candidate_history_lengths, history_out,
                                 candidate_out, history_lse, candidate_lse, d_history_out, d_candidate_out,
                                 activation, scale, silu_normalizer, history_causal, merged_skip)


@target_attention_bwd.register_fake
def _(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
      candidate_offsets, candidate_history_lengths, history_out, candidate_out, history_lse, candidate_lse,
      d_history_out, d_candidate_out, activation, scale, silu_normalizer, history_causal, merged_skip=None):
    d_qk, d_v = history_k.shape[2], history_v.shape[2]

    def like(t, d, merged=False):
        return _empty_rows(candidate_q, d) if t is None or merged else t.new_empty(t.shape)

    merged = merged_skip is not None  # candidate gradients are in the history gradients' rows
    return (like(history_q, d_qk), like(history_k, d_qk), like(history_v, d_v), like(candidate_q, d_qk, merged),
            like(candidate_k, d_qk, merged), like(candidate_v, d_v, merged))


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
class TargetAttentionFunction(torch.autograd.Function):
    """Autograd over the registered ops; saves inputs, outputs and the per-row log-sum-exp only."""

    @staticmethod
    def forward(ctx, history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
                candidate_offsets, candidate_history_lengths, activation, scale, silu_normalizer, history_causal,
                merged_skip=None, max_history_len=None, max_candidates=None):
        history_out, candidate_out, history_lse, candidate_lse = call_op(
            target_attention_fwd, history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
            candidate_v, candidate_offsets, candidate_history_lengths, activation, scale, silu_normalizer,
            history_causal, merged_skip, max_history_len, max_candidates)
        ctx.save_for_backward(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
                              candidate_v, candidate_offsets, candidate_history_lengths, history_out,
                              candidate_out, history_lse, candidate_lse, merged_skip)
        ctx.options = (activation, scale, silu_normalizer, history_causal)
        if history_q is None:
            ctx.mark_non_differentiable(history_out)
        return history_out, candidate_out

    @staticmethod
    def backward(ctx, d_history_out, d_candidate_out):
        (history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
         candidate_offsets, candidate_history_lengths, history_out, candidate_out, history_lse,
         candidate_lse, merged_skip) = ctx.saved_tensors
        cached, cross = history_q is None, candidate_k is None
        # A .sum().backward() gradient is an expanded stride-0 tensor; give the kernels dense ones.
        d_candidate_out = d_candidate_out.contiguous()
        d_history_out = None if cached else d_history_out.contiguous()
        grads = call_op(
            target_attention_bwd, history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
            candidate_v, candidate_offsets, candidate_history_lengths, history_out, candidate_out, history_lse,
            candidate_lse, d_history_out, d_candidate_out, *ctx.options, merged_skip)
        dhq, dhk, dhv, dcq, dck, dcv = grads
        if merged_skip is not None:  # the history gradients hold the candidate rows' gradients too
            dcq = dck = dcv = None
        return (None if cached else dhq, dhk, dhv, None, dcq, None if cross else dck, None if cross else dcv,
                None, None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------
# Argument checks (public API), shared with reference/target_attention.py: both raise the same errors.
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


def _max_segment(offsets: torch.Tensor) -> int:
    """Longest segment of ``offsets`` (a device-to-host copy unless ``offsets`` is on the host)."""
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

    candidate_host = check_offsets(fn, "candidate_offsets", candidate_offsets, total_candidates, None,
                                   check_data=check_data)
    num_users = candidate_offsets.shape[0] - 1
    history_host = check_offsets(fn, "history_offsets", history_offsets, total_history, num_users,
                                 check_data=check_data)
    # Offsets already copied to the host by the checks serve the bounds and the default normalizer below.
    history_values = history_offsets if history_host is None else history_host
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
    scale = 1.0 / math.sqrt(d_qk) if scale is None else check_real(fn, "scale", scale)
    if silu_normalizer is not None:
        silu_normalizer = check_real(fn, "silu_normalizer", silu_normalizer)
        if silu_normalizer <= 0:
            raise ValueError(f"{fn}: silu_normalizer must be > 0, got {silu_normalizer}")

    for name, bound, offsets in (("max_history_len", max_history_len, history_values),
                                 ("max_candidates", max_candidates, candidate_host)):
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
        longest_history = max_history_len if max_history_len is not None else _max_segment(history_values)
        normalizer = float(max(1, longest_history))
    return Arguments(cached=history_q is None, cross=candidate_k is None, num_users=num_users,
                     num_heads=num_heads, d_qk=d_qk, d_v=d_v, scale=scale, silu_normalizer=normalizer)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def target_aware_attention(history_q: Optional[torch.Tensor], history_k: torch.Tensor, history_v: torch.Tensor,
                           history_offsets: torch.Tensor, candidate_q: torch.Tensor,
                           candidate_k: Optional[torch.Tensor], candidate_v: Optional[torch.Tensor],
                           candidate_offsets: torch.Tensor, *, activation: str = "softmax",
                           scale: Optional[float] = None, silu_normalizer: Optional[float] = None,
                           history_causal: bool = True, candidate_history_lengths: Optional[torch.Tensor] = None,
                           max_history_len: Optional[int] = None, max_candidates: Optional[int] = None,
                           validate: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Target-aware attention over jagged batches of users: each user's history attends to itself, and
    each candidate attends to its user's history and to itself, never to another candidate.

    Shapes (B users, H heads; total_N history rows and total_n candidate rows over all users):
        history_q      (total_N, H, d_qk) or None   None selects cached mode (see below)
        history_k      (total_N, H, d_qk)
        history_v      (total_N, H, d_v)
        history_offsets   (B+1,) int32/int64: user b's history is rows offsets[b]:offsets[b+1], oldest first
        candidate_q    (total_n, H, d_qk)
        candidate_k    (total_n, H, d_qk) or None   both None selects cross mode (see below)
        candidate_v    (total_n, H, d_v)  or None
        candidate_offsets (B+1,) int32/int64: user b's candidates are rows offsets[b]:offsets[b+1]
    Offsets start at 0, never decrease and end at the row count; empty histories and users without
    candidates are fine. Inputs may be strided (any layout); they need not be contiguous.

    Dtypes: float16, bfloat16 or float32, the same for every q/k/v (float64 is accepted for gradcheck).
    Loads are upcast and accumulation is float32 (float64 for float64); tensor-core products take float16
    or bfloat16 operands, float32 and float64 use exact ("ieee") products, never tf32. Head dims d_qk and
    d_v are multiples of 16 from 16 to 256 (d_qk != d_v is allowed); H >= 1.

    Semantics:
        A history row i of user b sees history rows j <= i of b (all of b's history if
        ``history_causal=False``). A candidate c of user b sees the first ``candidate_history_lengths[c]``
        history rows of b (all of them when None; values above the history length mean all) and itself,
        except in cross mode. With s_ij = scale * q_i . k_j over the visible j:
        ``activation="softmax"``: out_i = sum_j softmax_j(s_ij) v_j; a row that sees nothing gets zeros.
        ``activation="silu"`` (HSTU): out_i = sum_j silu(s_ij) v_j / silu_normalizer; no softmax.
        ``scale`` defaults to 1 / sqrt(d_qk). ``silu_normalizer`` defaults to max(1, longest history in
        the batch), which makes an output depend on which other users share the batch (and costs a
        device-to-host copy unless ``max_history_len`` is given): pass a constant, e.g. the maximum history
        length of the model, so that outputs do not depend on batch composition. It is ignored for softmax.
    Modes:
        cached (``history_q=None``): history K/V were computed earlier (e.g. once per user and reused across
        candidate batches, M-FALCON); only candidates are computed and ``history_out`` is None.
        cross (``candidate_k=candidate_v=None``): a candidate sees only the history, not its own key.

    Returns ``(history_out, candidate_out)``: (total_N, H, d_v) or None in cached mode, and
    (total_n, H, d_v), in the input dtype. Differentiable with respect to every q/k/v given; the backward
    is deterministic (no atomics) and saves only inputs, outputs and a per-row log-sum-exp.

    Cost: history attention is computed once per user, and each tile of candidates streams its user's
    history K/V once; nothing of size n x N or N x N is ever formed.

    ``max_history_len`` / ``max_candidates``: optional host-side upper bounds on the longest history and
    candidate list. When given, ``max_history_len`` replaces the synchronising default of
    ``silu_normalizer``, so with it (or an explicit ``silu_normalizer``) the call makes no device-to-host
    copy once ``validate=False``; and for batches of several users it lets the forward launch every user's
    longest history tiles first (position-major order, see ``_history_order``: measured 1-25% faster). It
    must be a true bound: ``validate=True`` checks it, but with ``validate=False`` (and under torch.compile) a
    value below the longest history is not caught and the history rows past it are left uncomputed (their
    outputs are undefined). Pass a constant such as the pipeline's truncation length. With it, a
    ``max_candidates`` that fits one candidate tile (at most the average candidate list rounded up to a power
    of two, e.g. 16 for 16 candidates per user) lets each group of users run its candidate tiles next to its
    history tiles (see ``_candidate_positions``: up to 9% faster); the same caveat holds for it.

    ``validate=False`` skips the checks that read tensor data (offset contents, negative lengths, bounds
    smaller than the data); they are skipped automatically under torch.compile. Shapes, dtypes, devices
    and options are always checked. Under torch.compile(fullgraph=True) with silu, pass
    ``silu_normalizer`` or ``max_history_len``.

    Raises:
        TypeError: a tensor argument that is not a tensor or has an unsupported or mismatched dtype;
            offsets or lengths that are not int32/int64; ``activation`` not a str, ``history_causal`` not a
            bool, ``scale``/``silu_normalizer`` not a number, ``max_*`` not an int.
        ValueError: wrong ranks; H or head-dim mismatches between q, k and v; unsupported head dims; row
            counts that disagree; tensors on different devices; only one of candidate_k/candidate_v;
            malformed offsets (wrong length, not starting at 0, decreasing, not ending at the row count);
            unknown activation; scale not finite; silu_normalizer not finite or <= 0;
            candidate_history_lengths of the wrong shape or negative; max_history_len / max_candidates
            negative or smaller than the data; CPU tensors outside the Triton interpreter.
    """
    return _target_aware_attention(
        history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v, candidate_offsets,
        activation=activation, scale=scale, silu_normalizer=silu_normalizer, history_causal=history_causal,
        candidate_history_lengths=candidate_history_lengths, max_history_len=max_history_len,
        max_candidates=max_candidates, validate=validate)


def _target_aware_attention(history_q, history_k, history_v, history_offsets, candidate_q, candidate_k,
                            candidate_v, candidate_offsets, *, activation, scale, silu_normalizer, history_causal,
                            candidate_history_lengths, max_history_len, max_candidates, validate,
                            merged_skip=None):
    """``target_aware_attention`` plus ``merged_skip`` ((B,) int32 or None), compat.hstu_mha's merged layout:
    the history and candidate tensors are views of the same rows; users with merged_skip != 0 are not
    computed (neither their history nor their candidate rows), forward or backward; candidate results are
    written into history_out, which holds every row, and the candidate output has no rows (see the
    ``target_attention_fwd`` op). Not for cached or cross mode."""
    if merged_skip is not None and (history_q is None or candidate_k is None
                                    or history_q.shape[0] != candidate_q.shape[0]):
        raise ValueError(f"{FN}: merged_skip needs history and candidate queries over the same rows, with "
                         f"candidate keys")
    args = validate_arguments(
        FN, history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
        candidate_offsets, activation=activation, scale=scale, silu_normalizer=silu_normalizer,
        history_causal=history_causal, candidate_history_lengths=candidate_history_lengths,
        max_history_len=max_history_len, max_candidates=max_candidates, validate=validate)
    check_kernel_device(FN, "candidate_q", candidate_q)
    history_out, candidate_out = TargetAttentionFunction.apply(
        history_q, history_k, history_v, history_offsets, candidate_q, candidate_k, candidate_v,
        candidate_offsets, candidate_history_lengths, activation, args.scale, args.silu_normalizer,
        history_causal, merged_skip, max_history_len, max_candidates)
    return (None if args.cached else history_out), candidate_out

"""Hard-match attention (HMA): capped history/candidate id match counts and their embeddings.

For P feature pairs, candidate i of user b and pair p:

    count[i, p] = min(max_count, #{ j visible to i : history_ids[j, p] == candidate_ids[i, p] != pad_id })

and ``hard_match_embedding`` looks up row ``p * (max_count + 1) + count[i, p]`` of one table. One fused
kernel does the counting, the cap and the lookup; nothing of size n·N is ever materialised.

Kernel layout: the grid is a flat list of candidate tiles (``BLOCK_I`` candidates of one user, all P
pairs; ``_core.jagged.tile_owner`` maps a tile to its user without a host sync). Counting takes one of
three paths, chosen from host-known sizes by ``_count_path``:

- Comparison (few candidates per user): a program keeps its candidate ids in registers and streams its
  user's history ``BLOCK_J`` events at a time, accumulating (BLOCK_I, BLOCK_J, P) matches elementwise; it
  stops early once every count in the tile has reached ``max_count``.
- Candidate tables (a moderate number of candidates per user, or visible-length cutoffs): a build kernel
  puts every candidate row into a small per-(user, pair) bucketed table keyed by its id; a probe kernel
  streams the history once, looks each event up in its (user, pair) table and, on the rare match, adds 1
  to the count of every matching candidate row that sees the event (integer atomics). The tile kernel
  then only caps the counts and embeds them. O(N + n + matches) work.
- History tables (many candidates per user, no cutoffs): a build kernel puts every history id into a
  per-(user, pair) bucketed table with one integer atomic per event; the tile kernel then reads one
  bucket per candidate. O(N + n) work instead of O(n·N).

Counts are integers, so every path gives identical results whatever the order threads run in. The weight
gradient is a deterministic two-stage reduction: each program owns one (pair, row split) and sums its
rows' gradients by count level in a fixed order (a one-hot matrix product); the splits are summed by
``torch.sum``. No floating-point atomics, so gradients are bitwise reproducible.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._core.host_math import cdiv, next_power_of_2
from ._core.jagged import num_tiles, tile_owner
from ._core.ops import call_op, register_op
from ._core.validation import (FLOAT_DTYPES, INDEX_DTYPES, check_int, check_lengths, check_offsets,
                               check_kernel_device, check_same_device, check_tensor, should_check_data)

EMBED_NONE, EMBED_CONCAT, EMBED_SUM = 0, 1, 2
_MODES = {"concat": EMBED_CONCAT, "sum": EMBED_SUM}
_COUNT_MODES = {"brute": 0, "history_table": 1, "candidate_table": 2}  # _hard_match_fwd_kernel's COUNT_MODE


# ----------------------------------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------------------------------
# Hash tables: user b, pair p owns N_b buckets of BUCKET_SLOTS ids each. An event's id goes to bucket
# hash(id) % N_b at the position an atomic increment of the bucket's size returns; ids past the bucket's
# capacity go to the (user, pair) overflow list. Counting a candidate is then one bucket read (plus a
# scan of the overflow list in the rare case its bucket overflowed). Sizes are integer atomics, so the
# result does not depend on the order threads arrive in; equal ids are stored once per occurrence.
BUCKET_SLOTS = 8  # with N_b buckets for N_b events, a bucket overflows with probability ~1e-6 on distinct ids
_HASH_MULTIPLIER = tl.constexpr(0x5BD1E9955BD1E995)


@triton.jit
def _hash_bucket(ids, num_buckets):
    """Bucket in [0, num_buckets) of each int64 id (multiplicative hashing; ``num_buckets`` >= 1).

    The 32-bit hash h maps to (h * num_buckets) >> 32 rather than h % num_buckets: a 64-bit division is a
    long instruction sequence on the GPU (the candidate-table probe ran ~10% faster on an H100). Any
    num_buckets stays in range: below 2**32 the product fits, above it the result is < 2**32."""
    x = ids.to(tl.uint64, bitcast=True)
    x = x ^ (x >> 29)
    x = x * tl.full([], _HASH_MULTIPLIER, tl.int64).to(tl.uint64, bitcast=True)
    return (((x >> 32) * tl.cast(num_buckets, tl.uint64)) >> 32).to(tl.int64)


@triton.jit(do_not_specialize=["pad_id"])
def _hard_match_build_kernel(
    hist_ids_ptr, hist_off_ptr, bucket_sizes_ptr, bucket_ids_ptr, overflow_sizes_ptr, overflow_ids_ptr,
    num_users, num_pairs, pad_id, stride_h_row, stride_h_pair,
    HAS_PAD: tl.constexpr, SLOTS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Put every history id of a tile of BLOCK_H events into its (user, pair) hash table."""
    user, first_row, hist_end = tile_owner(hist_off_ptr, num_users, tl.program_id(0), BLOCK_H)
    if first_row >= hist_end:
        return
    hist_start = tl.load(hist_off_ptr + user).to(tl.int64)
    hist_len = hist_end - hist_start
    rows = first_row + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    valid = (rows < hist_end)[:, None] & (pairs < num_pairs)[None, :]
    ids = tl.load(hist_ids_ptr + rows[:, None] * stride_h_row + pairs[None, :] * stride_h_pair,
                  mask=valid, other=0).to(tl.int64)
    if HAS_PAD:
        valid = valid & (ids != pad_id)
    table = num_pairs * hist_start + pairs[None, :] * hist_len          # first bucket of (user, pair)
    bucket = table + _hash_bucket(ids, hist_len)
    # Relaxed: the position only picks a slot; the counting kernel reads the tables after this launch ends.
    position = tl.atomic_add(bucket_sizes_ptr + bucket, 1, mask=valid, sem="relaxed")
    tl.store(bucket_ids_ptr + bucket * SLOTS + position, ids, mask=valid & (position < SLOTS))
    spill = valid & (position >= SLOTS)
    list_id = user * num_pairs + pairs[None, :] + 0 * rows[:, None]
    spill_position = tl.atomic_add(overflow_sizes_ptr + list_id, 1, mask=spill, sem="relaxed")
    tl.store(overflow_ids_ptr + table + spill_position, ids, mask=spill)


@triton.jit
def _hash_probe_counts(cand, active, bucket_sizes_ptr, bucket_ids_ptr, overflow_sizes_ptr, overflow_ids_ptr,
                       user, hist_start, hist_len, pairs, num_pairs, max_count,
                       SLOTS: tl.constexpr):
    """Occurrences of each candidate id in its (user, pair) hash table (exact up to max_count)."""
    ids = cand.to(tl.int64)
    todo = active & (ids * 0 + hist_len > 0)  # (a scalar & block is no mask in the interpreter)
    table = num_pairs * hist_start + pairs[None, :] * hist_len
    bucket = table + _hash_bucket(ids, tl.maximum(hist_len, 1))
    size = tl.load(bucket_sizes_ptr + bucket, mask=todo, other=0)
    slots = tl.arange(0, SLOTS)
    stored = tl.load(bucket_ids_ptr + bucket[:, :, None] * SLOTS + slots[None, None, :],
                     mask=todo[:, :, None] & (slots[None, None, :] < size[:, :, None]), other=0)
    count = tl.sum(((stored == ids[:, :, None]) & (slots[None, None, :] < size[:, :, None])).to(tl.int32), axis=2)
    # Rare: the bucket overflowed, so the rest of its ids are in the (user, pair) overflow list, which is
    # scanned SLOTS entries at a time until every count that needs it is capped.
    scan = todo & (size > SLOTS)
    spilled = tl.load(overflow_sizes_ptr + user * num_pairs + pairs, mask=pairs < num_pairs, other=0)
    scan_len = tl.where(scan, spilled[None, :], 0)[:, :, None]
    k = 0
    more = tl.max(tl.max(scan_len, axis=2)) > 0
    while more:
        entry = k + slots[None, None, :]
        spilled_ids = tl.load(overflow_ids_ptr + table[:, :, None] + entry, mask=entry < scan_len, other=0)
        count += tl.sum(((spilled_ids == ids[:, :, None]) & (entry < scan_len)).to(tl.int32), axis=2)
        k += SLOTS
        more = tl.max(tl.max(tl.where((k < scan_len) & (count < max_count)[:, :, None], 1, 0), axis=2)) > 0
    return count


# Candidate tables: user b, pair p owns 2*n_b buckets of CANDIDATE_SLOTS entries (n_b = the user's
# candidate count, so the tables are at most half full), starting at bucket 2*P*cand_start + p*2*n_b:
# users are laid out in candidate order, so a table's position comes from the candidate offsets alone.
# An entry is a candidate's id (int64) and its row within the user (int32); the ids of one bucket fill one
# 32-byte sector, and rows are read only on a match. Entries past a bucket's capacity go to the (user,
# pair) overflow list (n_b entries from P*cand_start + p*n_b). Pad candidates are never inserted. Equal
# candidate ids are stored once per row, so a shared id (a common category) fills its bucket and spills:
# exact, but every event that lands in that bucket scans the overflow list (slower, never wrong). Each
# matching (event, candidate) pair costs one atomic and nothing stops at max_count, so data where most
# events match many candidates approaches O(n*N) atomics; the comparison path suits that better.
CANDIDATE_SLOTS = 4  # load 1/2: a bucket of distinct ids overflows with probability ~2e-4


@triton.jit(do_not_specialize=["pad_id"])
def _hard_match_candidate_build_kernel(
    cand_ids_ptr, cand_off_ptr, counts_ptr, bucket_sizes_ptr, slot_ids_ptr, slot_rows_ptr,
    overflow_sizes_ptr, overflow_ids_ptr, overflow_rows_ptr,
    num_users, num_pairs, pad_id, stride_c_row, stride_c_pair, stride_cnt_row, stride_cnt_pair,
    HAS_PAD: tl.constexpr, SLOTS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Insert a tile of BLOCK_I candidate rows (all pairs) into their (user, pair) tables; zero their counts."""
    user, first_row, cand_end = tile_owner(cand_off_ptr, num_users, tl.program_id(0), BLOCK_I)
    if first_row >= cand_end:
        return
    cand_start = tl.load(cand_off_ptr + user).to(tl.int64)
    num_cands = cand_end - cand_start
    rows = first_row + tl.arange(0, BLOCK_I)
    pairs = tl.arange(0, BLOCK_P)
    valid = (rows < cand_end)[:, None] & (pairs < num_pairs)[None, :]
    # The counts start at zero here rather than in a fill launch: the probe kernel runs after this one.
    tl.store(counts_ptr + rows[:, None] * stride_cnt_row + pairs[None, :] * stride_cnt_pair,
             tl.zeros((BLOCK_I, BLOCK_P), dtype=tl.int32), mask=valid)
    ids = tl.load(cand_ids_ptr + rows[:, None] * stride_c_row + pairs[None, :] * stride_c_pair,
                  mask=valid, other=0).to(tl.int64)
    if HAS_PAD:
        valid = valid & (ids != pad_id)
    local = (rows - cand_start).to(tl.int32)[:, None] + 0 * pairs[None, :]   # row within the user
    bucket = 2 * num_pairs * cand_start + pairs[None, :] * (2 * num_cands) + _hash_bucket(ids, 2 * num_cands)
    # Relaxed: the position only picks a slot; the probe kernel reads the tables after this launch ends.
    position = tl.atomic_add(bucket_sizes_ptr + bucket, 1, mask=valid, sem="relaxed")
    kept = valid & (position < SLOTS)
    tl.store(slot_ids_ptr + bucket * SLOTS + position, ids, mask=kept)
    tl.store(slot_rows_ptr + bucket * SLOTS + position, local, mask=kept)
    spill = valid & (position >= SLOTS)
    list_id = user * num_pairs + pairs[None, :] + 0 * rows[:, None]
    spill_position = tl.atomic_add(overflow_sizes_ptr + list_id, 1, mask=spill, sem="relaxed")
    entry = num_pairs * cand_start + pairs[None, :] * num_cands + spill_position
    tl.store(overflow_ids_ptr + entry, ids, mask=spill)
    tl.store(overflow_rows_ptr + entry, local, mask=spill)


@triton.jit
def _add_candidate_matches(counts_ptr, vis_len_ptr, match, local, cand_start, events, pairs,
                           stride_vis, stride_cnt_row, stride_cnt_pair, HAS_VIS: tl.constexpr):
    """counts[cand_start + local, p] += 1 where ``match`` (3-D: events x pairs x entries) and the event
    (its position ``events`` in the user's history) is visible to that candidate row."""
    row = cand_start + local.to(tl.int64)
    if HAS_VIS:  # j < length; a length past the history (or a negative one) needs no clamp here
        visible = tl.load(vis_len_ptr + row * stride_vis, mask=match, other=0).to(tl.int64)
        match = match & (events[:, None, None] < visible)
    # Integer atomics: the sums do not depend on the order events arrive in. Relaxed: nothing here reads
    # the counts; the tile kernel reads them after this launch ends.
    tl.atomic_add(counts_ptr + row * stride_cnt_row + pairs[None, :, None] * stride_cnt_pair, 1,
                  mask=match, sem="relaxed")


@triton.jit(do_not_specialize=["pad_id"])
def _hard_match_candidate_probe_kernel(
    hist_ids_ptr, hist_off_ptr, cand_off_ptr, vis_len_ptr, counts_ptr,
    bucket_sizes_ptr, slot_ids_ptr, slot_rows_ptr, overflow_sizes_ptr, overflow_ids_ptr, overflow_rows_ptr,
    num_users, num_pairs, pad_id, stride_h_row, stride_h_pair, stride_vis, stride_cnt_row, stride_cnt_pair,
    HAS_PAD: tl.constexpr, HAS_VIS: tl.constexpr, SLOTS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Look up a tile of BLOCK_H history events (all pairs) in their user's candidate tables and count
    every match into the (uncapped) counts of the candidate rows it matches."""
    user, first_row, hist_end = tile_owner(hist_off_ptr, num_users, tl.program_id(0), BLOCK_H)
    if first_row >= hist_end:
        return
    cand_start = tl.load(cand_off_ptr + user).to(tl.int64)
    num_cands = tl.load(cand_off_ptr + user + 1).to(tl.int64) - cand_start
    if num_cands == 0:
        return
    hist_start = tl.load(hist_off_ptr + user).to(tl.int64)
    rows = first_row + tl.arange(0, BLOCK_H)
    events = rows - hist_start
    pairs = tl.arange(0, BLOCK_P)
    valid = (rows < hist_end)[:, None] & (pairs < num_pairs)[None, :]
    ids = tl.load(hist_ids_ptr + rows[:, None] * stride_h_row + pairs[None, :] * stride_h_pair,
                  mask=valid, other=0).to(tl.int64)
    if HAS_PAD:
        valid = valid & (ids != pad_id)
    bucket = 2 * num_pairs * cand_start + pairs[None, :] * (2 * num_cands) + _hash_bucket(ids, 2 * num_cands)
    size = tl.load(bucket_sizes_ptr + bucket, mask=valid, other=0)
    slots = tl.arange(0, SLOTS)
    entry = bucket[:, :, None] * SLOTS + slots[None, None, :]
    held = slots[None, None, :] < size[:, :, None]
    stored = tl.load(slot_ids_ptr + entry, mask=held, other=0)
    match = held & (stored == ids[:, :, None])
    local = tl.load(slot_rows_ptr + entry, mask=match, other=0)
    _add_candidate_matches(counts_ptr, vis_len_ptr, match, local, cand_start, events, pairs,
                           stride_vis, stride_cnt_row, stride_cnt_pair, HAS_VIS)
    # Rare: the bucket overflowed, so the rest of its rows are in the (user, pair) overflow list, which is
    # scanned SLOTS entries at a time.
    spilled = tl.load(overflow_sizes_ptr + user * num_pairs + pairs, mask=pairs < num_pairs, other=0)
    scan_len = tl.where(size > SLOTS, spilled[None, :], 0)[:, :, None]
    list_start = (num_pairs * cand_start + pairs * num_cands)[None, :, None]
    # (New names in the loop: a compiled loop may not give a variable of the enclosing scope a new type.)
    for k in range(0, tl.max(tl.max(tl.max(scan_len, axis=2), axis=1), axis=0), SLOTS):
        item = k + slots[None, None, :]
        listed = item < scan_len
        listed_ids = tl.load(overflow_ids_ptr + list_start + item, mask=listed, other=0)
        found = listed & (listed_ids == ids[:, :, None])
        found_local = tl.load(overflow_rows_ptr + list_start + item, mask=found, other=0)
        _add_candidate_matches(counts_ptr, vis_len_ptr, found, found_local, cand_start, events, pairs,
                               stride_vis, stride_cnt_row, stride_cnt_pair, HAS_VIS)


@triton.jit
def _brute_force_counts(cand, active, visible, hist_ids_ptr, hist_start, scan_len, full_len, pairs,
                        pair_ok, stride_h_row, stride_h_pair, max_count,
                        HAS_VIS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_P: tl.constexpr, CHECK_EVERY: tl.constexpr):
    """Matches of each candidate among the first ``scan_len`` events (``visible`` per row if HAS_VIS),
    by comparing (BLOCK_I, BLOCK_J, BLOCK_P) blocks. Every row sees events [0, full_len) in full.

    The per-event matches accumulate elementwise into a 3-D counter and are summed over events only
    every CHECK_EVERY blocks (to stop once every count is capped) and at the end: a reduction across
    threads in every step would cost more than the comparisons.
    """
    acc = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_P), dtype=tl.int32)
    hist_ptrs = hist_ids_ptr + hist_start * stride_h_row + pairs[None, :] * stride_h_pair
    full_end = (full_len // BLOCK_J) * BLOCK_J
    j0 = full_end * 0
    more = j0 < full_end
    while more:  # whole blocks that every row sees: no per-element masks
        stop = tl.minimum(j0 + CHECK_EVERY * BLOCK_J, full_end)
        for jb in range(j0, stop, BLOCK_J):
            events = jb + tl.arange(0, BLOCK_J)
            hist = tl.load(hist_ptrs + events[:, None] * stride_h_row, mask=pair_ok[None, :], other=0)
            acc += (cand[:, None, :] == hist[None, :, :]).to(tl.int32)
        j0 = stop
        capped = tl.min(tl.where(active, tl.sum(acc, axis=1), max_count)) >= max_count
        more = (j0 < full_end) & (capped == 0)
    capped = tl.min(tl.where(active, tl.sum(acc, axis=1), max_count)) >= max_count
    for jb in range(tl.where(capped, scan_len, full_end), scan_len, BLOCK_J):  # the ragged rest
        events = jb + tl.arange(0, BLOCK_J)
        hist = tl.load(hist_ptrs + events[:, None] * stride_h_row,
                       mask=(events < scan_len)[:, None] & pair_ok[None, :], other=0)
        match = cand[:, None, :] == hist[None, :, :]
        if HAS_VIS:
            match = match & (events[None, :] < visible[:, None])[:, :, None]
        else:
            match = match & (events < scan_len)[None, :, None]
        acc += match.to(tl.int32)
    return tl.sum(acc, axis=1)


@triton.jit(do_not_specialize=["max_count", "pad_id"])
def _hard_match_fwd_kernel(
    hist_ids_ptr, hist_off_ptr, cand_ids_ptr, cand_off_ptr, vis_len_ptr,
    bucket_sizes_ptr, bucket_ids_ptr, overflow_sizes_ptr, overflow_ids_ptr,
    weight_ptr, counts_ptr, out_ptr,
    num_users, num_pairs, max_count, pad_id, emb_dim,
    stride_h_row, stride_h_pair, stride_c_row, stride_c_pair, stride_vis,
    stride_w_row, stride_w_col, stride_cnt_row, stride_cnt_pair, stride_o_row, stride_o_col,
    COUNT_MODE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_VIS: tl.constexpr, WRITE_COUNTS: tl.constexpr,
    EMBED: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, CHECK_EVERY: tl.constexpr, BUCKET_SLOTS: tl.constexpr,
):
    """One tile of BLOCK_I candidates of one user, all pairs: counts, cap, and the embedding lookup.

    COUNT_MODE (``_COUNT_MODES``): 0 compares with the history, 1 probes the history tables, 2 loads the
    uncapped counts that the candidate-table kernels left in ``counts_ptr`` (and writes them back capped)."""
    user, first_row, cand_end = tile_owner(cand_off_ptr, num_users, tl.program_id(0), BLOCK_I)
    if first_row >= cand_end:
        return  # spare tile: the grid is an upper bound
    hist_start = tl.load(hist_off_ptr + user).to(tl.int64)
    hist_len = tl.load(hist_off_ptr + user + 1).to(tl.int64) - hist_start

    rows = first_row + tl.arange(0, BLOCK_I)
    row_ok = rows < cand_end
    pairs = tl.arange(0, BLOCK_P)
    pair_ok = pairs < num_pairs
    lookup_ok = row_ok[:, None] & pair_ok[None, :]
    cand = tl.load(cand_ids_ptr + rows[:, None] * stride_c_row + pairs[None, :] * stride_c_pair,
                   mask=lookup_ok, other=0)
    active = lookup_ok
    if HAS_PAD:
        active = active & (cand != pad_id)

    if COUNT_MODE == 2:  # candidate tables
        count = tl.load(counts_ptr + rows[:, None] * stride_cnt_row + pairs[None, :] * stride_cnt_pair,
                        mask=active, other=0)
    elif COUNT_MODE == 1:  # history tables
        count = _hash_probe_counts(cand, active, bucket_sizes_ptr, bucket_ids_ptr, overflow_sizes_ptr,
                                   overflow_ids_ptr, user, hist_start, hist_len, pairs, num_pairs, max_count,
                                   BUCKET_SLOTS)
    else:
        if HAS_VIS:
            visible = tl.load(vis_len_ptr + rows * stride_vis, mask=row_ok, other=0).to(tl.int64)
            visible = tl.minimum(tl.maximum(visible, 0), hist_len)
            scan_len = tl.max(tl.where(row_ok, visible, 0), axis=0)
            full_len = tl.min(tl.where(row_ok, visible, hist_len), axis=0)
        else:
            visible = hist_len
            scan_len = hist_len
            full_len = hist_len
        count = _brute_force_counts(cand, active, visible, hist_ids_ptr, hist_start, scan_len, full_len,
                                    pairs, pair_ok, stride_h_row, stride_h_pair, max_count,
                                    HAS_VIS, BLOCK_I, BLOCK_J, BLOCK_P, CHECK_EVERY)
    count = tl.where(active, tl.minimum(count, max_count), 0)

    if WRITE_COUNTS:
        tl.store(counts_ptr + rows[:, None] * stride_cnt_row + pairs[None, :] * stride_cnt_pair, count,
                 mask=lookup_ok)

    if EMBED != 0:
        table_rows = (pairs[None, :] * (max_count + 1) + count).to(tl.int64)   # (BLOCK_I, BLOCK_P)
        for d0 in range(0, emb_dim, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < emb_dim
            emb = tl.load(weight_ptr + table_rows[:, :, None] * stride_w_row + dims[None, None, :] * stride_w_col,
                          mask=lookup_ok[:, :, None] & dim_ok[None, None, :], other=0.0)
            if EMBED == 1:  # concat: pair p fills columns [p*D, (p+1)*D)
                cols = pairs[None, :, None] * emb_dim + dims[None, None, :]
                tl.store(out_ptr + rows[:, None, None] * stride_o_row + cols * stride_o_col,
                         emb.to(out_ptr.dtype.element_ty), mask=lookup_ok[:, :, None] & dim_ok[None, None, :])
            else:  # sum over pairs, accumulated in fp32 (fp64 for fp64 tables)
                if weight_ptr.dtype.element_ty == tl.float64:
                    total = tl.sum(emb.to(tl.float64), axis=1)
                else:
                    total = tl.sum(emb.to(tl.float32), axis=1)
                tl.store(out_ptr + rows[:, None] * stride_o_row + dims[None, :] * stride_o_col,
                         total.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["max_count", "rows_per_split"])
def _hard_match_bwd_kernel(
    grad_ptr, counts_ptr, partial_ptr,
    total_rows, max_count, emb_dim, rows_per_split,
    stride_g_row, stride_g_col, stride_g_pair, stride_cnt_row, stride_cnt_pair,
    stride_part_split, stride_part_row, stride_part_col,
    BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """partial[split, p*(M+1) + c, :] = sum of the grad rows of pair p whose count is c, over the rows of
    one split (in fp32, or fp64 for fp64 gradients; cast on store): a one-hot (count levels x rows) matrix
    times the (rows x D) gradient, on the tensor cores.
    One-hot entries are exact in every dtype and products accumulate in fp32 (fp64 for fp64)."""
    pair = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, total_rows)
    for c0 in range(0, max_count + 1, BLOCK_C):
        levels = c0 + tl.arange(0, BLOCK_C)
        for d0 in range(0, emb_dim, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < emb_dim
            acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float64 if grad_ptr.dtype.element_ty == tl.float64
                           else tl.float32)
            for r0 in range(row_start, row_end, BLOCK_I):
                rows = r0 + tl.arange(0, BLOCK_I)
                row_ok = rows < row_end
                cnt = tl.load(counts_ptr + rows * stride_cnt_row + pair * stride_cnt_pair, mask=row_ok, other=-1)
                grad = tl.load(grad_ptr + rows[:, None] * stride_g_row + pair * stride_g_pair
                               + dims[None, :] * stride_g_col, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
                one_hot = (levels[:, None] == cnt[None, :]).to(grad.dtype)       # (BLOCK_C, BLOCK_I)
                if grad.dtype == tl.float64:  # no fp64 tl.dot on GPU (fp64 tables are for gradcheck)
                    acc += tl.sum(one_hot[:, :, None] * grad[None, :, :], axis=1)
                else:
                    acc = tl.dot(one_hot, grad, acc, input_precision="ieee")
            out_rows = pair * (max_count + 1) + levels
            tl.store(partial_ptr + split * stride_part_split + out_rows[:, None] * stride_part_row
                     + dims[None, :] * stride_part_col, acc.to(partial_ptr.dtype.element_ty),
                     mask=(levels <= max_count)[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# 2. Launchers
# ----------------------------------------------------------------------------------------------------
# Path choice (``_count_path``), from the average number of candidates per user. Comparing costs O(n*N)
# per user, a candidate table O(N + n + matches), a history table O(N + n) but with a slow build (an
# atomic and a scattered 8-byte store per history event). H100, CUDA graph, embedding forward, us, vocab
# 4096 (brute / history table / candidate table; with cutoffs: brute / candidate table):
#   (B, N, n, P) = (64, 2048, 64, 16)   67 / 159 / 37    cutoffs  72 / 41
#                  (64, 2048, 128, 16) 132 / 164 / 47             130 / 51
#                  (1, 8192, 4096, 16) 229 /  13 / 21             223 / 24
#                  (256, 512, 32, 8)    24 /  79 / 27              29 / 29
#                  (1024, 256, 16, 16)  73 / 287 / 96              79 / 103
# Rule from these numbers (the history table wins only where a user's candidates are many and not much
# fewer than its history events; the comparison wins below ~32-48 candidates per user):
# - no cutoffs, at least HASH_MIN_CANDIDATES candidates per user and at least 1/HASH_MAX_HISTORY_RATIO as
#   many candidates as history events: history tables;
# - at least CANDIDATE_TABLE_MIN_CANDIDATES per user: candidate tables (they also apply cutoffs);
# - otherwise the comparison.
HASH_MIN_CANDIDATES = 128
HASH_MAX_HISTORY_RATIO = 4
CANDIDATE_TABLE_MIN_CANDIDATES = 48

# Testing and tuning hooks: tests and bench/tune_hard_match.py set _FORCE_PATH to a key of _COUNT_MODES
# (a forced "history_table" still falls back to "brute" when there are cutoffs), and _FWD_CONFIG_OVERRIDE
# / _PROBE_CONFIG_OVERRIDE to dicts overriding _fwd_config's / _candidate_table_config's choices.
_FORCE_PATH = None
_FWD_CONFIG_OVERRIDE = None
_PROBE_CONFIG_OVERRIDE = None


def _count_path(total_n: int, total_N: int, num_users: int, candidate_history_lengths) -> str:
    """"brute", "history_table" or "candidate_table", from host-known sizes only (see the thresholds)."""
    has_cutoffs = candidate_history_lengths is not None
    if _FORCE_PATH is not None:
        if _FORCE_PATH not in _COUNT_MODES:
            raise ValueError(f"_FORCE_PATH must be one of {tuple(_COUNT_MODES)} or None, got {_FORCE_PATH!r}")
        # History tables keep no event positions, so they cannot apply visible-length cutoffs.
        return "brute" if _FORCE_PATH == "history_table" and has_cutoffs else _FORCE_PATH
    users = max(1, num_users)
    if (not has_cutoffs and total_n >= HASH_MIN_CANDIDATES * users
            and total_n * HASH_MAX_HISTORY_RATIO >= total_N):
        return "history_table"
    if total_n >= CANDIDATE_TABLE_MIN_CANDIDATES * users:
        return "candidate_table"
    return "brute"


def _fwd_config(total_n: int, num_users: int, num_pairs: int, emb_dim: int, path: str) -> dict:
    """Block sizes and warps from host-known sizes only (no device sync); measured best on H100 for the
    "brute" and "history_table" paths (the "candidate_table" tile kernel only caps and embeds: a guess)."""
    block_p = next_power_of_2(num_pairs)
    per_user = max(1, total_n // max(1, num_users))
    if path != "brute":
        block_i = max(1, min(8, 128 // block_p))
        block_j = 16  # unused
    else:
        block_i = min(4, next_power_of_2(per_user))
        # A (BLOCK_I, BLOCK_J, BLOCK_P) counter of ~4K int32 per program keeps it in registers.
        block_j = max(16, min(256, next_power_of_2(max(1, 4096 // (block_i * block_p)))))
    block_d = min(next_power_of_2(max(emb_dim, 1)), max(16, 8192 // (block_i * block_p)))
    config = dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_P=block_p, BLOCK_D=block_d, CHECK_EVERY=8,
                  num_warps=4)
    if _FWD_CONFIG_OVERRIDE:
        config.update(_FWD_CONFIG_OVERRIDE)
    return config


def _build_hash_tables(history_ids, history_offsets, pad_id):
    """The (user, pair) hash tables of ``_hard_match_build_kernel``: bucket sizes and overflow-list sizes
    (int32, zeroed in one fill), bucket ids and overflow ids (int64, never read before written)."""
    total_N, num_pairs = history_ids.shape
    num_users = history_offsets.shape[0] - 1
    device = history_ids.device
    sizes = torch.zeros(num_pairs * total_N + num_users * num_pairs, dtype=torch.int32, device=device)
    bucket_sizes, overflow_sizes = sizes[:num_pairs * total_N], sizes[num_pairs * total_N:]
    bucket_ids = torch.empty(max(1, num_pairs * total_N * BUCKET_SLOTS), dtype=torch.int64, device=device)
    overflow_ids = torch.empty(max(1, num_pairs * total_N), dtype=torch.int64, device=device)
    if total_N > 0:
        block_p = next_power_of_2(num_pairs)
        block_h = max(1, 1024 // block_p)
        _hard_match_build_kernel[(num_tiles(total_N, num_users, block_h),)](
            history_ids, history_offsets, bucket_sizes, bucket_ids, overflow_sizes, overflow_ids,
            num_users, num_pairs, 0 if pad_id is None else pad_id, history_ids.stride(0), history_ids.stride(1),
            HAS_PAD=pad_id is not None, SLOTS=BUCKET_SLOTS, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=4,
        )
    return bucket_sizes, bucket_ids, overflow_sizes, overflow_ids


def _candidate_table_config(num_pairs: int) -> dict:
    """Tiles of the candidate-table kernels. Probe: 256 (event, pair) ids per program, 4 warps, the best
    or within ~1 us of it at 4 of 5 shapes swept on an H100 (64..1024 ids, 1..4 warps; 1024 ids took 46
    instead of 37 us at (64, 2048, 64, 16)): small tiles keep more lookups in flight. Build: 1024 ids per
    program, not measured (it touches only the n candidates)."""
    block_p = next_power_of_2(num_pairs)
    config = dict(BLOCK_I=max(1, 1024 // block_p), BLOCK_H=max(1, 256 // block_p), BLOCK_P=block_p,
                  num_warps=4)
    if _PROBE_CONFIG_OVERRIDE:
        config.update(_PROBE_CONFIG_OVERRIDE)
    return config


def _count_with_candidate_tables(history_ids, history_offsets, candidate_ids, candidate_offsets, pad_id,
                                 candidate_history_lengths, counts):
    """Fill ``counts`` (total_n, P) int32 with the uncapped match counts, through candidate tables: the
    build kernel zeroes the counts and fills the tables, the probe kernel streams the history."""
    total_N, num_pairs = history_ids.shape
    total_n = candidate_ids.shape[0]
    num_users = candidate_offsets.shape[0] - 1
    device = candidate_ids.device
    num_buckets = 2 * num_pairs * total_n
    sizes = torch.zeros(num_buckets + num_users * num_pairs, dtype=torch.int32, device=device)
    bucket_sizes, overflow_sizes = sizes[:num_buckets], sizes[num_buckets:]
    # Entries are never read before written (reads are bounded by the sizes).
    slot_ids = torch.empty(num_buckets * CANDIDATE_SLOTS, dtype=torch.int64, device=device)
    slot_rows = torch.empty(num_buckets * CANDIDATE_SLOTS, dtype=torch.int32, device=device)
    overflow_ids = torch.empty(num_pairs * total_n, dtype=torch.int64, device=device)
    overflow_rows = torch.empty(num_pairs * total_n, dtype=torch.int32, device=device)
    tables = (bucket_sizes, slot_ids, slot_rows, overflow_sizes, overflow_ids, overflow_rows)
    config = _candidate_table_config(num_pairs)
    block_i, block_h, warps = config["BLOCK_I"], config["BLOCK_H"], config["num_warps"]
    pad = 0 if pad_id is None else pad_id
    _hard_match_candidate_build_kernel[(num_tiles(total_n, num_users, block_i),)](
        candidate_ids, candidate_offsets, counts, *tables,
        num_users, num_pairs, pad, candidate_ids.stride(0), candidate_ids.stride(1),
        counts.stride(0), counts.stride(1),
        HAS_PAD=pad_id is not None, SLOTS=CANDIDATE_SLOTS, BLOCK_I=block_i, BLOCK_P=config["BLOCK_P"],
        num_warps=warps,
    )
    if total_N == 0:
        return
    has_vis = candidate_history_lengths is not None
    vis = candidate_history_lengths if has_vis else counts
    _hard_match_candidate_probe_kernel[(num_tiles(total_N, num_users, block_h),)](
        history_ids, history_offsets, candidate_offsets, vis, counts, *tables,
        num_users, num_pairs, pad, history_ids.stride(0), history_ids.stride(1), vis.stride(0),
        counts.stride(0), counts.stride(1),
        HAS_PAD=pad_id is not None, HAS_VIS=has_vis, SLOTS=CANDIDATE_SLOTS, BLOCK_H=block_h,
        BLOCK_P=config["BLOCK_P"], num_warps=warps,
    )


def _launch_fwd(history_ids, history_offsets, candidate_ids, candidate_offsets, max_count, pad_id,
                candidate_history_lengths, weight, mode: int):
    """Counts (int32, always) and, for mode != EMBED_NONE, the embedding output."""
    total_n, num_pairs = candidate_ids.shape
    num_users = candidate_offsets.shape[0] - 1
    device = candidate_ids.device
    counts = torch.empty(total_n, num_pairs, dtype=torch.int32, device=device)
    if mode == EMBED_NONE:
        emb_dim = 0
        out = counts  # unused placeholder pointer
    else:
        emb_dim = weight.shape[1]
        width = num_pairs * emb_dim if mode == EMBED_CONCAT else emb_dim
        out = torch.empty(total_n, width, dtype=weight.dtype, device=device)
    if total_n == 0:
        return counts, out
    path = _count_path(total_n, history_ids.shape[0], num_users, candidate_history_lengths)
    tables = (counts,) * 4  # unused placeholder pointers unless history tables
    if path == "history_table":
        tables = _build_hash_tables(history_ids, history_offsets, pad_id)
    elif path == "candidate_table":
        _count_with_candidate_tables(history_ids, history_offsets, candidate_ids, candidate_offsets, pad_id,
                                     candidate_history_lengths, counts)
    config = _fwd_config(total_n, num_users, num_pairs, emb_dim, path)
    has_vis = candidate_history_lengths is not None
    vis = candidate_history_lengths if has_vis else counts
    w = weight if weight is not None else counts
    _hard_match_fwd_kernel[(num_tiles(total_n, num_users, config["BLOCK_I"]),)](
        history_ids, history_offsets, candidate_ids, candidate_offsets, vis,
        *tables, w, counts, out,
        num_users, num_pairs, max_count, 0 if pad_id is None else pad_id, emb_dim,
        history_ids.stride(0), history_ids.stride(1), candidate_ids.stride(0), candidate_ids.stride(1),
        vis.stride(0), w.stride(0), w.stride(1), counts.stride(0), counts.stride(1),
        out.stride(0), out.stride(1),
        COUNT_MODE=_COUNT_MODES[path], HAS_PAD=pad_id is not None, HAS_VIS=has_vis and path == "brute",
        WRITE_COUNTS=True, EMBED=mode,
        BUCKET_SLOTS=BUCKET_SLOTS, **config,
    )
    return counts, out


def _launch_bwd(grad_out, counts, max_count, mode: int, num_rows: int, emb_dim: int, weight_dtype):
    total_n, num_pairs = counts.shape
    device = counts.device
    if total_n == 0:
        return torch.zeros(num_rows, emb_dim, dtype=weight_dtype, device=device)
    block_i, block_c = 64, max(16, min(64, next_power_of_2(max_count + 1)))
    block_d = max(16, min(64, next_power_of_2(max(emb_dim, 1))))
    # Enough (pair, split) programs to fill the GPU with at least 512 rows per split. The split count
    # depends only on shapes, so the summation order (and the result) is the same on every run.
    splits = max(1, min(cdiv(total_n, 512), cdiv(1024, num_pairs)))
    rows_per_split = cdiv(cdiv(total_n, splits), block_i) * block_i
    splits = cdiv(total_n, rows_per_split)
    # One split writes the gradient in the weight's dtype; several write fp32 (fp64) partial sums that a
    # fixed-order torch.sum adds up: deterministic, no atomics. Every element is written by the kernel.
    acc_dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
    partial = torch.empty(splits, num_rows, emb_dim, dtype=weight_dtype if splits == 1 else acc_dtype,
                          device=device)
    pair_stride = emb_dim * grad_out.stride(1) if mode == EMBED_CONCAT else 0
    _hard_match_bwd_kernel[(num_pairs, splits)](
        grad_out, counts, partial,
        total_n, max_count, emb_dim, rows_per_split,
        grad_out.stride(0), grad_out.stride(1), pair_stride, counts.stride(0), counts.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        BLOCK_I=block_i, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4,
    )
    return partial[0] if splits == 1 else partial.sum(dim=0).to(weight_dtype)


# ----------------------------------------------------------------------------------------------------
# 3. Registered ops (gesr::...) and their fake implementations
# ----------------------------------------------------------------------------------------------------
@register_op("hard_match_count")
def _hard_match_count_op(history_ids: torch.Tensor, history_offsets: torch.Tensor,
                         candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor, max_count: int,
                         pad_id: Optional[int], candidate_history_lengths: Optional[torch.Tensor]
                         ) -> torch.Tensor:
    counts, _ = _launch_fwd(history_ids, history_offsets, candidate_ids, candidate_offsets, max_count,
                            pad_id, candidate_history_lengths, None, EMBED_NONE)
    return counts


@_hard_match_count_op.register_fake
def _(history_ids, history_offsets, candidate_ids, candidate_offsets, max_count, pad_id,
      candidate_history_lengths):
    return candidate_ids.new_empty(candidate_ids.shape, dtype=torch.int32)


@register_op("hard_match_embedding_fwd")
def _hard_match_embedding_fwd_op(history_ids: torch.Tensor, history_offsets: torch.Tensor,
                                 candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor,
                                 weight: torch.Tensor, max_count: int, pad_id: Optional[int],
                                 candidate_history_lengths: Optional[torch.Tensor], mode: str
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    counts, out = _launch_fwd(history_ids, history_offsets, candidate_ids, candidate_offsets, max_count,
                              pad_id, candidate_history_lengths, weight, _MODES[mode])
    return out, counts


@_hard_match_embedding_fwd_op.register_fake
def _(history_ids, history_offsets, candidate_ids, candidate_offsets, weight, max_count, pad_id,
      candidate_history_lengths, mode):
    total_n, num_pairs = candidate_ids.shape
    width = num_pairs * weight.shape[1] if mode == "concat" else weight.shape[1]
    out = weight.new_empty(total_n, width)
    counts = candidate_ids.new_empty(total_n, num_pairs, dtype=torch.int32)
    return out, counts


@register_op("hard_match_embedding_bwd")
def _hard_match_embedding_bwd_op(grad_out: torch.Tensor, counts: torch.Tensor, max_count: int,
                                 mode: str, num_rows: int, emb_dim: int, weight_dtype: torch.dtype
                                 ) -> torch.Tensor:
    return _launch_bwd(grad_out, counts, max_count, _MODES[mode], num_rows, emb_dim, weight_dtype)


@_hard_match_embedding_bwd_op.register_fake
def _(grad_out, counts, max_count, mode, num_rows, emb_dim, weight_dtype):
    return grad_out.new_empty(num_rows, emb_dim, dtype=weight_dtype)


# ----------------------------------------------------------------------------------------------------
# 4. Autograd
# ----------------------------------------------------------------------------------------------------
class HardMatchEmbeddingFunction(torch.autograd.Function):
    """Differentiable in ``weight`` only; saves the int32 counts (total_n × P) for the backward."""

    @staticmethod
    def forward(ctx, history_ids, history_offsets, candidate_ids, candidate_offsets, weight, max_count,
                pad_id, candidate_history_lengths, mode):
        out, counts = call_op(_hard_match_embedding_fwd_op, history_ids, history_offsets, candidate_ids,
                              candidate_offsets, weight, max_count, pad_id, candidate_history_lengths, mode)
        ctx.save_for_backward(counts)
        ctx.max_count, ctx.mode = max_count, mode
        ctx.weight_shape, ctx.weight_dtype = tuple(weight.shape), weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (counts,) = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[4]:
            # A .sum().backward() gradient is an expanded stride-0 tensor: make it dense first.
            grad_weight = call_op(_hard_match_embedding_bwd_op, grad_out.contiguous(), counts, ctx.max_count,
                                  ctx.mode, ctx.weight_shape[0], ctx.weight_shape[1], ctx.weight_dtype)
        return None, None, None, None, grad_weight, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# 5. Public API: validation and documentation
# ----------------------------------------------------------------------------------------------------
def validate_hard_match_args(fn, history_ids, history_offsets, candidate_ids, candidate_offsets,
                             max_count, pad_id, candidate_history_lengths, validate) -> None:
    """Raise TypeError/ValueError for any bad argument shared by the HMA functions (and their twins)."""
    check_tensor(fn, "history_ids", history_ids, dtypes=INDEX_DTYPES, ndim=2)
    check_tensor(fn, "candidate_ids", candidate_ids, dtypes=INDEX_DTYPES, ndim=2)
    if candidate_ids.dtype != history_ids.dtype:
        raise TypeError(f"{fn}: candidate_ids must have the dtype of history_ids ({history_ids.dtype}), "
                        f"got {candidate_ids.dtype}")
    if candidate_ids.shape[1] != history_ids.shape[1]:
        raise ValueError(f"{fn}: candidate_ids must have P = {history_ids.shape[1]} columns like "
                         f"history_ids, got shape {tuple(candidate_ids.shape)}")
    if history_ids.shape[1] < 1:
        raise ValueError(f"{fn}: history_ids must have at least one pair column, got shape "
                         f"{tuple(history_ids.shape)}")
    check_data = should_check_data(validate)
    check_offsets(fn, "history_offsets", history_offsets, history_ids.shape[0], None,
                  check_data=check_data)
    num_users = history_offsets.shape[0] - 1
    check_offsets(fn, "candidate_offsets", candidate_offsets, candidate_ids.shape[0], num_users,
                  check_data=check_data)
    check_int(fn, "max_count", max_count, minimum=1)
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        raise TypeError(f"{fn}: pad_id must be an int or None, got {type(pad_id).__name__}")
    if pad_id is not None and not -(2 ** 63) <= pad_id < 2 ** 63:
        raise ValueError(f"{fn}: pad_id must fit in int64, got {pad_id}")
    check_lengths(fn, "candidate_history_lengths", candidate_history_lengths, candidate_ids.shape[0],
                  check_data=check_data)
    check_same_device(fn, history_ids=history_ids, history_offsets=history_offsets,
                      candidate_ids=candidate_ids, candidate_offsets=candidate_offsets,
                      candidate_history_lengths=candidate_history_lengths)


def validate_weight(fn, weight, history_ids, candidate_ids, max_count, mode) -> None:
    """Raise TypeError/ValueError for a bad embedding table or mode."""
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode must be 'concat' or 'sum', got {mode!r}")
    check_tensor(fn, "weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if isinstance(max_count, int) and not isinstance(max_count, bool) and isinstance(candidate_ids, torch.Tensor) \
            and candidate_ids.dim() == 2:
        rows = candidate_ids.shape[1] * (max_count + 1)
        if weight.shape[0] != rows:
            raise ValueError(f"{fn}: weight must have P*(max_count+1) = {candidate_ids.shape[1]}*"
                             f"{max_count + 1} = {rows} rows, got shape {tuple(weight.shape)}")
    if isinstance(history_ids, torch.Tensor):
        check_same_device(fn, history_ids=history_ids, weight=weight)


def hard_match_count(history_ids: torch.Tensor, history_offsets: torch.Tensor,
                     candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor, max_count: int, *,
                     pad_id: Optional[int] = None,
                     candidate_history_lengths: Optional[torch.Tensor] = None,
                     validate: bool = True) -> torch.Tensor:
    """Capped counts of history events that carry each candidate's id, per feature pair.

    Args:
        history_ids: (total_N, P) int32 or int64. User b's history is rows
            ``history_offsets[b]:history_offsets[b+1]``, oldest first. Any int64 value is a valid id.
        history_offsets: (B+1,) int32 or int64, from 0, non-decreasing, ending at total_N.
        candidate_ids: (total_n, P), dtype of ``history_ids``; user b's candidates are rows
            ``candidate_offsets[b]:candidate_offsets[b+1]``.
        candidate_offsets: (B+1,) like ``history_offsets``, ending at total_n.
        max_count: cap M >= 1.
        pad_id: candidates whose id equals it count 0 (history events carrying it match nothing).
        candidate_history_lengths: optional (total_n,) int32/int64 >= 0: candidate i sees only the first
            ``candidate_history_lengths[i]`` events of its user's history (more than the history length
            means all of it), so a training batch does not count events after the impression.
        validate: run the data-dependent checks (offsets monotone and ending at the row count, lengths
            non-negative). They copy small tensors to the host; pass False in hot loops. They are skipped
            while torch.compile traces. Shape, dtype and device checks always run.

    Returns:
        (total_n, P) int32: ``min(max_count, #{j visible to i: history_ids[j,p] == candidate_ids[i,p] != pad_id})``.

    Raises:
        TypeError: non-tensor inputs, float or mismatched id dtypes, non-integer offsets/lengths/max_count.
        ValueError: wrong ranks, P mismatch, bad offsets, max_count < 1, negative lengths, mixed devices,
            CPU tensors outside the Triton interpreter.
    """
    validate_hard_match_args("hard_match_count", history_ids, history_offsets, candidate_ids,
                             candidate_offsets, max_count, pad_id, candidate_history_lengths, validate)
    check_kernel_device("hard_match_count", "history_ids", history_ids)
    return call_op(_hard_match_count_op, history_ids, history_offsets, candidate_ids, candidate_offsets,
                   max_count, pad_id, candidate_history_lengths)


def hard_match_embedding(history_ids: torch.Tensor, history_offsets: torch.Tensor,
                         candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor,
                         weight: torch.Tensor, max_count: int, *, pad_id: Optional[int] = None,
                         candidate_history_lengths: Optional[torch.Tensor] = None,
                         mode: str = "concat", validate: bool = True) -> torch.Tensor:
    """Embeddings of the hard-match counts, fused with the counting (see ``hard_match_count``).

    Args:
        history_ids, history_offsets, candidate_ids, candidate_offsets, max_count, pad_id,
        candidate_history_lengths, validate: as in ``hard_match_count``.
        weight: (P*(max_count+1), D) float32/float16/bfloat16 (float64 accepted for gradcheck); row
            ``p*(max_count+1) + c`` embeds "pair p matched c times".
        mode: ``"concat"`` returns (total_n, P*D), pair p in columns ``[p*D, (p+1)*D)``;
            ``"sum"`` returns (total_n, D), the sum over pairs accumulated in fp32.

    Returns:
        A tensor of ``weight.dtype``. Differentiable with respect to ``weight`` (ids are not); the
        weight gradient is deterministic (bitwise identical across runs; no atomics).

    Raises:
        As ``hard_match_count``, plus TypeError for a non-float weight and ValueError for a weight of the
        wrong rank or row count, on another device, or an unknown mode.
    """
    fn = "hard_match_embedding"
    validate_hard_match_args(fn, history_ids, history_offsets, candidate_ids, candidate_offsets,
                             max_count, pad_id, candidate_history_lengths, validate)
    validate_weight(fn, weight, history_ids, candidate_ids, max_count, mode)
    check_kernel_device(fn, "history_ids", history_ids)
    return HardMatchEmbeddingFunction.apply(history_ids, history_offsets, candidate_ids,
                                            candidate_offsets, weight, max_count, pad_id,
                                            candidate_history_lengths, mode)

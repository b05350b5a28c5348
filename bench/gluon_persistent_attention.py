"""Prototype for shape 1's forward balance: a persistent, warp-specialized Gluon attention kernel over a job
table, with split query tiles merged inside the kernel (GPU only, Hopper:
``python -m bench.gluon_persistent_attention [--trace]``).

Not a code path of the package. It keeps what session 15 measured (bench/RESULTS.md) about the issue-#3 target
that the Triton forward misses most clearly, (1, 2048, 2048, 4, 128) at 400 TFLOP/s: that forward is one wave of
128-row programs whose longest ones (the candidate tiles and the last causal history tiles) take 32 steps of 64
keys, while the average work per SM is 23.8 steps. Splitting the long tiles' key ranges would balance the SMs,
but each split tile then needs a merge of its partial results, and a non-persistent kernel pays its prologue
and epilogue once per job.

Problem: shape 1 without masks (the balance question does not depend on them). Per head (4 heads, d = 128,
bf16), 16 "history" tiles of 128 rows attend to keys [0, 128 (i + 1)) and 16 candidate tiles to keys [0, 2048).
A job is one tile's key range. A policy ``T<steps>`` cuts every tile longer than that many 64-key steps
into a chunk of that length and the rest; ``none`` keeps whole tiles. A host-side greedy schedule
(longest job first, to the program that is free first) gives each of the SM-count programs its own list
of jobs. Without ``persistent``, each job is its own program, launched longest first.

Kernel: the two compute warpgroups of ``bench/gluon_attention_loop.py`` (64 rows each, P through shared memory)
and a loader warp. The warps loop over the program's jobs. The K/V ring of shared-memory stages runs on across
jobs, so the loader streams the next job's Q and keys while the warpgroups finish the current one. Each
warpgroup merges its own 64 rows of a split tile, as follows. It takes a ticket (an atomic count per tile
half) while its last P.V product runs. The chunk that finishes last merges. The others publish their
unnormalised fp32 partial O and their row max and sum, then set a flag with release semantics. The merger
waits only on chunks that already hold a ticket, and those never wait themselves, so nothing can deadlock.
It keeps its own partial in registers and combines the chunks in split order, so the sums are the same
whoever finishes last. It then resets the ticket and the flags for the next launch (CUDA-graph replays).
``run(..., static_merger=True)`` (STATIC_MERGER) makes chunk 0 of each two-chunk tile the merger. The schedule
then runs publish-only chunks first in every program, and the merger loads its partner's partial while its own
last P.V runs. That needs all programs resident at once, so it is for measurement only.

Measured on the H100 (bench/RESULTS.md, session 15):
- Whole tiles: 0.0352-0.0359 ms.
- T26 with the ticket: 0.0340-0.0346 ms. T26 with the fixed merger: 0.0334-0.0338 ms. The merge stays on the
  critical path.

Gluon kernels do not run under the Triton interpreter; this file compiles for sm_90 with Triton 3.6 and 3.9.
"""
import argparse
import heapq
import sys
from typing import List, Optional, Tuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

from .common import graph_timing
from .gluon_attention_loop import LOG2E, _first_step, _next_step, _shared_buffers, _sync_warps, _tma_load

HEADS, HISTORY, CANDIDATES, D = 4, 2048, 2048, 128
TILE_ROWS, STEP_KEYS = 128, 64
JOB_FIELDS = 8  # key base, first query row, first key, end key, tile, split, splits, unused


@gluon.jit
def _now():
    """The global nanosecond timer (for the --trace breakdown)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [gl.program_id(0)], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _finish_job(acc, m_i, l_i, ticket, o_ptr, partial_o, partial_stats, tickets, flags, unit, split, splits,
                row0, trace, entry, BLOCK_M: gl.constexpr, D: gl.constexpr, MAX_SPLITS: gl.constexpr,
                o_layout: gl.constexpr, TRACE: gl.constexpr):
    """Store this warpgroup's rows (a whole tile), publish its partial (a split tile's chunk that is not
    last) or merge all chunks (the last one)."""
    rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = gl.arange(0, BLOCK_M, layout=rows_layout)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    l_i = gl.convert_layout(l_i, rows_layout)
    m_i = gl.convert_layout(m_i, rows_layout)
    if splits == 1:
        gl.store(o_ptr + (row0 + rows)[:, None] * D + cols[None, :], (acc / l_i[:, None]).to(gl.bfloat16))
    else:
        if TRACE:
            gl.store(trace + entry * 8 + 3, _now())
            gl.store(trace + entry * 8 + 4, (ticket == splits - 1).to(gl.int64))
        first_slot = unit * MAX_SPLITS
        if ticket < splits - 1:
            slot = first_slot + split
            gl.store(partial_o + slot * BLOCK_M * D + rows[:, None] * D + cols[None, :], acc)
            gl.store(partial_stats + slot * 2 * BLOCK_M + rows, m_i)
            gl.store(partial_stats + slot * 2 * BLOCK_M + BLOCK_M + rows, l_i)
            _sync_warps()  # every thread's stores before the flag
            gl.atomic_xchg(flags + slot, 1, sem="release")
        else:
            # Online merge in split order: the same sums whoever finishes last.
            m_run = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_layout)
            o_sum = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
            l_sum = gl.zeros([BLOCK_M], gl.float32, rows_layout)
            for s in range(0, splits):
                slot = first_slot + s
                if s == split:
                    m_s = m_i
                    l_s = l_i
                    o_s = acc
                else:
                    while gl.atomic_add(flags + slot, 0, sem="acquire") == 0:
                        pass
                    _sync_warps()
                    m_s = gl.load(partial_stats + slot * 2 * BLOCK_M + rows, cache_modifier=".cg")
                    l_s = gl.load(partial_stats + slot * 2 * BLOCK_M + BLOCK_M + rows, cache_modifier=".cg")
                    o_s = gl.load(partial_o + slot * BLOCK_M * D + rows[:, None] * D + cols[None, :],
                                  cache_modifier=".cg")
                if TRACE:
                    gl.store(trace + entry * 8 + 5, _now())
                m_new = gl.maximum(m_run, m_s)
                old_weight = gl.exp2(m_run - m_new)
                new_weight = gl.exp2(m_s - m_new)
                o_sum = o_sum * old_weight[:, None] + o_s * new_weight[:, None]
                l_sum = l_sum * old_weight + l_s * new_weight
                m_run = m_new
            gl.store(o_ptr + (row0 + rows)[:, None] * D + cols[None, :], (o_sum / l_sum[:, None]).to(gl.bfloat16))
            for s in range(0, splits):  # ready for the next launch
                gl.store(flags + first_slot + s, 0)
            gl.store(tickets + unit, 0)


@gluon.jit
def _merge_static(acc_token, acc, m_i, l_i, p_buffer, v_buffer, v_free, o_ptr, partial_o, partial_stats, flags,
                  unit, row0, trace, entry, BLOCK_M: gl.constexpr, D: gl.constexpr, MAX_SPLITS: gl.constexpr,
                  o_layout: gl.constexpr, TRACE: gl.constexpr):
    """STATIC_MERGER: chunk 0 of a two-chunk tile waits for chunk 1's flag (chunk 1 never waits, and the
    schedule runs such chunks first in their programs), loads its partial while this chunk's last P.V runs,
    then merges (always in the same order) and stores the rows."""
    rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = gl.arange(0, BLOCK_M, layout=rows_layout)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    slot = unit * MAX_SPLITS + 1
    while gl.atomic_add(flags + slot, 0, sem="acquire") == 0:
        pass
    _sync_warps()
    m_p = gl.load(partial_stats + slot * 2 * BLOCK_M + rows, cache_modifier=".cg")
    l_p = gl.load(partial_stats + slot * 2 * BLOCK_M + BLOCK_M + rows, cache_modifier=".cg")
    o_p = gl.load(partial_o + slot * BLOCK_M * D + rows[:, None] * D + cols[None, :], cache_modifier=".cg")
    acc, _, _ = warpgroup_mma_wait(0, deps=[acc_token, v_buffer, p_buffer])
    mbarrier.arrive(v_free, count=1)
    if TRACE:
        gl.store(trace + entry * 8 + 1, _now())
        gl.store(trace + entry * 8 + 4, 1)
    m_i = gl.convert_layout(m_i, rows_layout)
    l_i = gl.convert_layout(l_i, rows_layout)
    m_new = gl.maximum(m_i, m_p)
    own_weight = gl.exp2(m_i - m_new)
    partner_weight = gl.exp2(m_p - m_new)
    out = (acc * own_weight[:, None] + o_p * partner_weight[:, None]) / (l_i * own_weight + l_p * partner_weight)[:, None]
    gl.store(o_ptr + (row0 + rows)[:, None] * D + cols[None, :], out.to(gl.bfloat16))
    gl.store(flags + slot, 0)  # ready for the next launch


@gluon.jit
def _compute(o_ptr, jobs, job_begin, job_end, partial_o, partial_stats, tickets, flags, q_smem, k_smem, v_smem,
             p_smem, q_ready, q_free, kv_ready, kv_free, qk_scale, half, trace,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
             MAX_SPLITS: gl.constexpr, TRACE: gl.constexpr, STATIC_MERGER: gl.constexpr):
    """One warpgroup's 64 rows of each job: the loop of gluon_attention_loop (scores of step j issued with
    P.V of step j - 1), then _finish_job."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    rows_of_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    no_scores = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    used = 0  # K/V stages consumed so far: the ring runs on across jobs
    for t in range(job_begin, job_end):
        job = jobs + t * 8
        row0 = gl.load(job + 1) + half * BLOCK_M
        steps = (gl.load(job + 3) - gl.load(job + 2)) // BLOCK_N
        unit = gl.load(job + 4) * 2 + half  # each warpgroup merges its own rows
        split = gl.load(job + 5)
        splits = gl.load(job + 6)
        entry = t * 2 + half
        if TRACE:
            gl.store(trace + entry * 8, _now())
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        mbarrier.wait(q_ready, (t - job_begin) & 1)
        m_i, l_i = _first_step(q_smem, k_smem, p_smem, kv_ready, used, qk_scale, no_scores, STAGES)
        for j in range(1, steps):
            acc, m_i, l_i = _next_step(q_smem, k_smem, v_smem, p_smem, kv_ready, kv_free, acc, m_i, l_i, used + j,
                                       j, qk_scale, no_scores, STAGES, rows_of_o)
        mbarrier.arrive(q_free, count=1)  # every score product is done: the loader may bring the next Q
        last = (used + steps - 1) % STAGES
        acc_token = warpgroup_mma(p_smem.index((steps - 1) % 2), v_smem.index(last), acc, is_async=True)
        if STATIC_MERGER and splits > 1 and split == 0:
            # the first chunk always merges: its partner's partial is loaded while the last product runs
            _merge_static(acc_token, acc, m_i, l_i, p_smem.index((steps - 1) % 2), v_smem.index(last),
                          kv_free.index(last), o_ptr, partial_o, partial_stats, flags, unit, row0, trace, entry,
                          BLOCK_M, D, MAX_SPLITS, o_layout, TRACE)
        else:
            ticket = 0
            if splits > 1 and not STATIC_MERGER:  # its round trip (~0.8 us) overlaps the last product
                ticket = gl.atomic_add(tickets + unit, 1, sem="relaxed")
            acc, _, _ = warpgroup_mma_wait(0, deps=[acc_token, v_smem.index(last), p_smem.index((steps - 1) % 2)])
            mbarrier.arrive(kv_free.index(last), count=1)
            if TRACE:
                gl.store(trace + entry * 8 + 1, _now())
            # with STATIC_MERGER a later chunk has ticket 0 < splits - 1: it publishes
            _finish_job(acc, m_i, l_i, ticket, o_ptr, partial_o, partial_stats, tickets, flags, unit, split,
                        splits, row0, trace, entry, BLOCK_M, D, MAX_SPLITS, o_layout, TRACE)
        used += steps
        if TRACE:
            gl.store(trace + entry * 8 + 2, _now())


@gluon.jit
def _load(q_desc, k_desc, v_desc, jobs, job_begin, job_end, q0_smem, q1_smem, k_smem, v_smem, q_ready, q_free,
          kv_ready, kv_free, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The loader warp: each job's two Q halves once both warpgroups are done with the previous ones, and its
    K/V stages whenever both warpgroups released them."""
    used = 0
    for t in range(job_begin, job_end):
        job = jobs + t * 8
        first_key = gl.load(job) + gl.load(job + 2)
        row0 = gl.load(job + 1)
        steps = (gl.load(job + 3) - gl.load(job + 2)) // BLOCK_N
        if t > job_begin:
            mbarrier.wait(q_free, (t - job_begin - 1) & 1)
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [row0, 0], q_ready, q0_smem)
        _tma_load(q_desc, [row0 + BLOCK_M, 0], q_ready, q1_smem)
        for j in range(steps):
            n = used + j
            stage = n % STAGES
            if n >= STAGES:
                mbarrier.wait(kv_free.index(stage), ((n // STAGES) - 1) & 1)
            mbarrier.expect(kv_ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [first_key + j * BLOCK_N, 0], kv_ready.index(stage), k_smem.index(stage))
            _tma_load(v_desc, [first_key + j * BLOCK_N, 0], kv_ready.index(stage), v_smem.index(stage))
        used += steps


@gluon.jit
def _persistent_attention_kernel(q_desc, k_desc, v_desc, o_ptr, jobs, program_jobs, partial_o, partial_stats,
                                 tickets, flags, qk_scale, trace, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                 D: gl.constexpr, STAGES: gl.constexpr, MAX_SPLITS: gl.constexpr,
                                 COMPUTE_REGISTERS: gl.constexpr, TRACE: gl.constexpr,
                                 STATIC_MERGER: gl.constexpr):
    """Program p runs jobs program_jobs[p] .. program_jobs[p + 1] - 1; launched with num_warps=4."""
    program = gl.program_id(0)
    job_begin = gl.load(program_jobs + program)
    job_end = gl.load(program_jobs + program + 1)
    q0_smem, q1_smem, k_smem, v_smem, p0_smem, p1_smem, kv_ready, kv_free, q_ready = _shared_buffers(
        q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, D, STAGES)
    q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_free, count=2)  # both warpgroups are done with their Q halves
    gl.warp_specialize(
        [(_compute, (o_ptr, jobs, job_begin, job_end, partial_o, partial_stats, tickets, flags, q0_smem, k_smem,
                     v_smem, p0_smem, q_ready, q_free, kv_ready, kv_free, qk_scale, 0, trace, BLOCK_M, BLOCK_N, D,
                     STAGES, MAX_SPLITS, TRACE, STATIC_MERGER)),
         (_compute, (o_ptr, jobs, job_begin, job_end, partial_o, partial_stats, tickets, flags, q1_smem, k_smem,
                     v_smem, p1_smem, q_ready, q_free, kv_ready, kv_free, qk_scale, 1, trace, BLOCK_M, BLOCK_N, D,
                     STAGES, MAX_SPLITS, TRACE, STATIC_MERGER)),
         (_load, (q_desc, k_desc, v_desc, jobs, job_begin, job_end, q0_smem, q1_smem, k_smem, v_smem, q_ready,
                  q_free, kv_ready, kv_free, BLOCK_M, BLOCK_N, STAGES))],
        [4, 1], [COMPUTE_REGISTERS, 24])


def shape1_tiles() -> List[Tuple[int, int, int]]:
    """(first key row of its head, first query row, key count) of every 128-row query tile."""
    tiles = []
    for head in range(HEADS):
        rows = head * (HISTORY + CANDIDATES)
        tiles += [(head * HISTORY, rows + i * TILE_ROWS, (i + 1) * TILE_ROWS) for i in range(HISTORY // TILE_ROWS)]
        tiles += [(head * HISTORY, rows + HISTORY + i * TILE_ROWS, HISTORY) for i in range(CANDIDATES // TILE_ROWS)]
    return tiles


def split_jobs(policy: str) -> List[Tuple[int, List[int]]]:
    """(steps, job fields) of every job, longest first: ``none`` or ``T<steps>`` (see the module docstring)."""
    chunk = int(policy[1:]) if policy != "none" else None
    jobs = []
    for tile, (key_base, row0, keys) in enumerate(shape1_tiles()):
        steps = keys // STEP_KEYS
        sizes = [steps] if chunk is None or steps <= chunk else [chunk] + [steps - chunk]
        start = 0
        for split, size in enumerate(sizes):
            jobs.append((size, [key_base, row0, start * STEP_KEYS, (start + size) * STEP_KEYS, tile, split,
                                len(sizes), 0]))
            start += size
    jobs.sort(key=lambda job: -job[0])
    return jobs


def schedule(jobs, programs: Optional[int], job_overhead_steps: float = 1.0, publishers_first: bool = False):
    """(job table in program order, each program's first job + the end) as int32 tensors: a greedy
    longest-first list schedule over ``programs`` programs, or one job per program (``programs`` None).
    ``publishers_first``: each program runs its chunks that only publish (split > 0) before the rest, so that
    a chunk 0 waiting for its partner (STATIC_MERGER) only ever waits on a job that needs nothing itself."""
    if programs is None:
        return (torch.tensor([fields for _, fields in jobs], dtype=torch.int32),
                torch.arange(len(jobs) + 1, dtype=torch.int32))
    free_at = [(0.0, program) for program in range(programs)]
    lists = [[] for _ in range(programs)]
    for steps, fields in jobs:
        time, program = heapq.heappop(free_at)
        lists[program].append(fields)
        heapq.heappush(free_at, (time + steps + job_overhead_steps, program))
    if publishers_first:
        lists = [sorted(job_list, key=lambda fields: fields[5] == 0) for job_list in lists]  # stable
    table = [fields for job_list in lists for fields in job_list]
    bounds = [0]
    for job_list in lists:
        bounds.append(bounds[-1] + len(job_list))
    return torch.tensor(table, dtype=torch.int32), torch.tensor(bounds, dtype=torch.int32)


def run(policy: str, persistent: bool, trace: bool = False, static_merger: bool = False, stages: int = 4,
        compute_registers: int = 232):
    """Time one job set; returns (ms, max error against fp32, replays bitwise equal, programs, trace or None).
    ``static_merger``: chunk 0 of each split tile merges, waiting for chunk 1 (persistent schedules only: a
    program waits on another program's job, so all programs must be resident at once)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(HEADS * (HISTORY + CANDIDATES), D, device="cuda", dtype=torch.bfloat16, generator=generator)
    k = torch.randn(HEADS * HISTORY, D, device="cuda", dtype=torch.bfloat16, generator=generator)
    v = torch.randn(HEADS * HISTORY, D, device="cuda", dtype=torch.bfloat16, generator=generator)
    out = torch.zeros_like(q)
    jobs = split_jobs(policy)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if static_merger and not persistent:
        raise ValueError("static_merger needs the persistent schedule")
    table, bounds = schedule(jobs, sms if persistent else None, publishers_first=static_merger)
    table, bounds = table.cuda(), bounds.cuda()
    programs = bounds.shape[0] - 1
    max_splits = max(fields[6] for _, fields in jobs)
    units = 2 * len(shape1_tiles())
    partial_o = torch.empty(units * max_splits * 64 * D, device="cuda")
    partial_stats = torch.empty(units * max_splits * 2 * 64, device="cuda")
    tickets = torch.zeros(units, device="cuda", dtype=torch.int32)
    flags = torch.zeros(units * max_splits, device="cuda", dtype=torch.int32)
    times = torch.zeros(table.shape[0] * 2 * 8, device="cuda", dtype=torch.int64)
    layout = gl.NVMMASharedLayout.get_default_for([64, D], gl.bfloat16)
    q_desc, k_desc, v_desc = (GluonDescriptor.from_tensor(t, [64, D], layout) for t in (q, k, v))

    def launch(traced=False):
        _persistent_attention_kernel[(programs,)](
            q_desc, k_desc, v_desc, out, table, bounds, partial_o, partial_stats, tickets, flags, D ** -0.5 * LOG2E,
            times, BLOCK_M=64, BLOCK_N=STEP_KEYS, D=D, STAGES=stages, MAX_SPLITS=max_splits,
            COMPUTE_REGISTERS=compute_registers, TRACE=traced, STATIC_MERGER=static_merger, num_warps=4)

    launch()
    torch.cuda.synchronize()
    error = 0.0
    for key_base, row0, keys in shape1_tiles():
        qq = q[row0:row0 + TILE_ROWS].float()
        kk, vv = (t[key_base:key_base + keys].float() for t in (k, v))
        expected = torch.softmax(qq @ kk.T * D ** -0.5, -1) @ vv
        error = max(error, (out[row0:row0 + TILE_ROWS].float() - expected).abs().max().item())
    first = out.clone()
    ms = graph_timing(launch).median
    replay_equal = torch.equal(first, out)
    summary = None
    if trace:
        launch(True)
        torch.cuda.synchronize()
        summary = _trace_summary(times.view(-1, 2, 8)[:, 0].cpu(), table.cpu(), bounds.cpu())
    return ms, error, replay_equal, programs, summary


def _trace_summary(times, table, bounds) -> str:
    """Warpgroup 0's view: program end times, the loop's cost per step, and the split jobs' finishing costs."""
    start = times[:, 0].min()
    us = lambda column: (times[:, column] - start).double() / 1000  # noqa: E731
    begin, loop_end, end = us(0), us(1), us(2)
    steps = ((table[:, 3] - table[:, 2]) // STEP_KEYS).double()
    fit = torch.linalg.lstsq(torch.stack([torch.ones_like(steps), steps], 1), (loop_end - begin)[:, None]).solution
    ends = [end[bounds[p + 1] - 1].item() for p in range(bounds.shape[0] - 1) if bounds[p + 1] > bounds[p]]
    split = table[:, 6] > 1
    finish = end - loop_end
    text = (f"program end min / median / max {min(ends):.1f} / {sorted(ends)[len(ends) // 2]:.1f} / {max(ends):.1f} us; "
            f"loop {fit[0, 0]:.2f} + {fit[1, 0]:.3f} us x steps; store of a whole tile {finish[~split].median():.2f} us")
    if split.any():
        merger = times[split, 4] == 1
        text += (f"; publish {finish[split][~merger].median():.2f} us, merge {finish[split][merger].median():.2f} "
                 f"(max {finish[split][merger].max():.2f}) us")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", action="store_true", help="also print a per-job timing breakdown")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("needs a Hopper-class GPU (sm_90 or later)")
        return 1
    flops = 4 * D * sum(TILE_ROWS * keys for _, _, keys in shape1_tiles())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, bf16, d = 128, "
          f"shape 1 without masks ({flops / 1e9:.2f} GFLOP), CUDA-graph medians")
    print("| jobs | programs | ms | TFLOP/s | max error | replays equal |")
    print("|---|---|---|---|---|---|")
    for policy, persistent, static in (("none", False, False), ("none", True, False), ("T26", False, False),
                                       ("T26", True, False), ("T24", True, False), ("T26", True, True),
                                       ("T24", True, True), ("T22", True, True), ("T20", True, True)):
        ms, error, equal, programs, summary = run(policy, persistent, trace=args.trace, static_merger=static)
        kind = ("persistent" if persistent else "one job each") + (", static merger" if static else "")
        print(f"| {policy} | {programs} ({kind}) | {ms:.4f} | {flops / ms / 1e9:.0f} | {error:.1e} | {equal} |",
              flush=True)
        if summary:
            print(f"|   | trace: {summary} | | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

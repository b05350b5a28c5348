"""Prototype for a faster d = 128 backward: the dK/dV loop of our backward in Triton against the same loop
written in Gluon with warp specialization (GPU only, Hopper: ``python -m bench.gluon_dkdv_loop``).

Not a code path of the package. Measured in session 17 (bench/RESULTS.md): errors equal to the Triton loop's;
the synchronous Gluon loop 1.01-1.02x (2048 queries) and 1.05x (8192) the Triton loop; the pipelined one
(``pipelined=True``: asynchronous products, exponentials between the waits) is slower than the synchronous
one (0.995x / 1.03x at its best, 3 stages, 248 registers): the two warpgroups already keep the tensor cores
busy for each other. Its ``main`` checks both loops against an fp32 PyTorch computation before timing them.

Why (bench/RESULTS.md, session 16): the backward's dK/dV programs run Triton's compiled loop; the d = 128
targets of issue #3 need more than tiles, split programs or launch orders gave. The forward's Gluon loop
(``bench.gluon_attention_loop``) ran 5% faster than Triton's on long programs; this file asks the same of the
dK/dV loop, the backward's larger half, before any dQ work goes into Gluon.

Problem: ``programs`` = heads x key blocks of 128 keys (heads = 4, d = 128, bf16); each program computes dK and
dV of its keys from all ``queries`` rows of its head, without masks (the unmasked loop of ``_dkdv_step``):
    P^T = exp2(K Q^T * scale * log2(e) - lse),  dS^T = P^T * (V dO^T - delta),
    dV = P^T dO,  dK = scale * dS^T Q,
with given row statistics lse (log2 units) and delta. The Gluon kernel runs three partitions per program:
two compute warpgroups (keys 0-63 and 64-127 of the block, each with its dK/dV accumulators in registers and
its own P^T / dS^T buffers in shared memory) and one loader warp that streams (Q, dO) stages of 64 query rows
through TMA; a stage is refilled once both warpgroups released it. ``_dkdv_compute`` issues its products
synchronously; ``_dkdv_compute_pipelined`` overlaps them with the exponentials.
"""
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor

from .common import graph_timing
from .gluon_attention_loop import LOG2E, _sync_warps, _tma_load, report

KEYS_PER_PROGRAM = 128  # two compute warpgroups of 64 keys each
HEADS = 4
# The optional fifth product of the Gluon loop (see _dkdv_compute): none, dQ partials stored, or atomically added.
DQ_NONE, DQ_STORED, DQ_ATOMIC = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)


@triton.jit
def _triton_dkdv_loop_kernel(q_desc, do_desc, k_ptr, v_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, queries,
                             key_blocks, heads, scale, qk_scale, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                             D: tl.constexpr):
    """The unmasked dK/dV loop of our backward (``_dkdv_step``, transposed frame) on its own."""
    program = tl.program_id(0)
    head = program % heads
    key_row0 = (head * key_blocks + program // heads) * BLOCK_N
    q_row0 = head * queries
    keys = key_row0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    k = tl.load(k_ptr + keys[:, None] * D + cols[None, :])
    v = tl.load(v_ptr + keys[:, None] * D + cols[None, :])
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(0, queries, BLOCK_M):
        q = q_desc.load([q_row0 + m0, 0])
        do = do_desc.load([q_row0 + m0, 0])
        lse = tl.load(lse_ptr + q_row0 + m0 + offs_m)
        delta = tl.load(delta_ptr + q_row0 + m0 + offs_m)
        st = tl.dot(k, tl.trans(q))
        dpt = tl.dot(v, tl.trans(do))
        pt = tl.exp2(tl.fma(st, qk_scale, -lse[None, :]))
        dst = pt * (dpt - delta[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dk = tl.dot(dst.to(q.dtype), q, dk)
    tl.store(dk_ptr + keys[:, None] * D + cols[None, :], (dk * scale).to(tl.bfloat16))
    tl.store(dv_ptr + keys[:, None] * D + cols[None, :], dv.to(tl.bfloat16))


@gluon.jit
def _step_row(q_row0, first_step, j, steps, BLOCK_M: gl.constexpr, ROTATE: gl.constexpr):
    """First query row of step j: in order, or (ROTATE) from ``first_step`` round the ring. The modulo stays out
    of the plain loop: there it cost registers (spills in the synchronous compute loop)."""
    if ROTATE == 0:
        row = q_row0 + j * BLOCK_M
    else:
        row = q_row0 + ((first_step + j) % steps) * BLOCK_M
    return row


@gluon.jit
def _dkdv_compute(k_smem, v_smem, q_smem, do_smem, pt_smem, dst_smem, kv_ready, qd_ready, qd_free, lse_ptr,
                  delta_ptr, dk_ptr, dv_ptr, dq_ptr, key_row0, q_row0, first_step, steps, scale, qk_scale,
                  BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                  ROTATE: gl.constexpr, DQ: gl.constexpr):
    """One warpgroup's BLOCK_N keys: per step of BLOCK_M queries (see ``_step_row``), P^T and
    dS^T (through shared memory, as wgmma's A operand) into the dV and dK accumulators. DQ (for
    ``bench.gluon_fused_bwd_loop``): a fifth product per step, dQ_part = dS K of its keys, stored (DQ_STORED)
    or atomically added (DQ_ATOMIC) into the step's fp32 dQ rows at ``dq_ptr``; DQ_NONE: no dQ."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    query_of_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    no_scores = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    no_rows = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    dk = gl.zeros([BLOCK_N, D], gl.float32, o_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, o_layout)
    offs_m = gl.arange(0, BLOCK_M, layout=query_of_s)
    # dQ leaves through a row-major blocked layout: 4 consecutive columns per thread, so each 16-byte vector
    # needs one address (the wgmma layout holds pairs, and their 64-bit addresses made the loop spill).
    dq_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    dq_offsets = (gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))[:, None] * D
                  + gl.arange(0, D, layout=gl.SliceLayout(0, dq_layout))[None, :])
    mbarrier.wait(kv_ready, 0)
    for j in range(steps):
        stage = j % STAGES
        query0 = _step_row(q_row0, first_step, j, steps, BLOCK_M, ROTATE)
        # The row statistics first: their loads are in flight while the two products run.
        lse = gl.load(lse_ptr + query0 + offs_m)
        delta = gl.load(delta_ptr + query0 + offs_m)
        mbarrier.wait(qd_ready.index(stage), (j // STAGES) & 1)
        st = warpgroup_mma(k_smem, q_smem.index(stage).permute((1, 0)), no_scores, use_acc=False)
        dpt = warpgroup_mma(v_smem, do_smem.index(stage).permute((1, 0)), no_scores, use_acc=False)
        pt = gl.exp2(gl.fma(st, qk_scale, -lse[None, :]))
        dst = pt * (dpt - delta[None, :])
        pt_smem.store(pt.to(gl.bfloat16))
        dst_smem.store(dst.to(gl.bfloat16))
        fence_async_shared()
        _sync_warps()  # every thread's P^T / dS^T rows are in shared memory before the products read them
        dv = warpgroup_mma(pt_smem, do_smem.index(stage), dv)
        dk = warpgroup_mma(dst_smem, q_smem.index(stage), dk)
        if DQ != DQ_NONE:
            dq = warpgroup_mma(dst_smem.permute((1, 0)), k_smem, no_rows, use_acc=False)
        _sync_warps()  # ... and every product has read them before the next step overwrites them
        mbarrier.arrive(qd_free.index(stage), count=1)
        if DQ == DQ_ATOMIC:
            gl.atomic_add(dq_ptr + query0 * D + dq_offsets, gl.convert_layout(dq * scale, dq_layout))
        elif DQ == DQ_STORED:
            gl.store(dq_ptr + query0 * D + dq_offsets, gl.convert_layout(dq * scale, dq_layout))
    rows = key_row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(dk_ptr + rows[:, None] * D + cols[None, :], (dk * scale).to(gl.bfloat16))
    gl.store(dv_ptr + rows[:, None] * D + cols[None, :], dv.to(gl.bfloat16))


@gluon.jit
def _dkdv_compute_pipelined(k_smem, v_smem, q_smem, do_smem, pt_smem, dst_smem, kv_ready, qd_ready, qd_free,
                            lse_ptr, delta_ptr, dk_ptr, dv_ptr, key_row0, q_row0, steps, scale, qk_scale,
                            BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """``_dkdv_compute`` with asynchronous products: step j issues its two score products together with step
    j - 1's dV and dK products, in the order S^T_j, dV_{j-1}, dP^T_j, dK_{j-1}, and computes P^T_j and dS^T_j
    between the waits, so the exponentials run while the tensor cores work. wgmma groups complete in issue
    order, which lets the single P^T / dS^T buffers be overwritten as soon as the product reading them is
    waited for. A (Q, dO) stage is in use for two steps: run it with STAGES >= 3."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    query_of_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    no_scores = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dk = gl.zeros([BLOCK_N, D], gl.float32, o_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, o_layout)
    offs_m = gl.arange(0, BLOCK_M, layout=query_of_s)
    mbarrier.wait(kv_ready, 0)
    # Step 0: its scores alone, synchronously.
    lse = gl.load(lse_ptr + q_row0 + offs_m)
    delta = gl.load(delta_ptr + q_row0 + offs_m)
    mbarrier.wait(qd_ready.index(0), 0)
    st = warpgroup_mma(k_smem, q_smem.index(0).permute((1, 0)), no_scores, use_acc=False)
    dpt = warpgroup_mma(v_smem, do_smem.index(0).permute((1, 0)), no_scores, use_acc=False)
    pt = gl.exp2(gl.fma(st, qk_scale, -lse[None, :]))
    pt_smem.store(pt.to(gl.bfloat16))
    dst_smem.store((pt * (dpt - delta[None, :])).to(gl.bfloat16))
    fence_async_shared()
    _sync_warps()
    for j in range(1, steps):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        lse = gl.load(lse_ptr + q_row0 + j * BLOCK_M + offs_m)
        delta = gl.load(delta_ptr + q_row0 + j * BLOCK_M + offs_m)
        mbarrier.wait(qd_ready.index(stage), (j // STAGES) & 1)
        s_token = warpgroup_mma(k_smem, q_smem.index(stage).permute((1, 0)), no_scores, use_acc=False,
                                is_async=True)
        dv_token = warpgroup_mma(pt_smem, do_smem.index(prev), dv, is_async=True)
        dp_token = warpgroup_mma(v_smem, do_smem.index(stage).permute((1, 0)), no_scores, use_acc=False,
                                 is_async=True)
        dk_token = warpgroup_mma(dst_smem, q_smem.index(prev), dk, is_async=True)
        st, _, _ = warpgroup_mma_wait(3, deps=[s_token, k_smem, q_smem.index(stage)])
        pt = gl.exp2(gl.fma(st, qk_scale, -lse[None, :]))
        dv, _, _ = warpgroup_mma_wait(2, deps=[dv_token, pt_smem, do_smem.index(prev)])
        pt_smem.store(pt.to(gl.bfloat16))
        dpt, _, _ = warpgroup_mma_wait(1, deps=[dp_token, v_smem, do_smem.index(stage)])
        dst = pt * (dpt - delta[None, :])
        dk, _, _ = warpgroup_mma_wait(0, deps=[dk_token, dst_smem, q_smem.index(prev)])
        mbarrier.arrive(qd_free.index(prev), count=1)
        dst_smem.store(dst.to(gl.bfloat16))
        fence_async_shared()
        _sync_warps()  # every thread's P^T / dS^T rows are in shared memory before the next products read them
    last = (steps - 1) % STAGES
    dv = warpgroup_mma(pt_smem, do_smem.index(last), dv)
    dk = warpgroup_mma(dst_smem, q_smem.index(last), dk)
    rows = key_row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(dk_ptr + rows[:, None] * D + cols[None, :], (dk * scale).to(gl.bfloat16))
    gl.store(dv_ptr + rows[:, None] * D + cols[None, :], dv.to(gl.bfloat16))


@gluon.jit
def _dkdv_partition(k_smem, v_smem, q_smem, do_smem, pt_smem, dst_smem, kv_ready, qd_ready, qd_free, lse_ptr,
                    delta_ptr, dk_ptr, dv_ptr, dq_ptr, key_row0, q_row0, first_step, steps, scale, qk_scale,
                    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                    PIPELINED: gl.constexpr, ROTATE: gl.constexpr, DQ: gl.constexpr):
    """A compute warpgroup: ``_dkdv_compute_pipelined`` when PIPELINED (no dQ, no rotation), else
    ``_dkdv_compute``."""
    if PIPELINED:
        gl.static_assert(DQ == DQ_NONE and ROTATE == 0)
        _dkdv_compute_pipelined(k_smem, v_smem, q_smem, do_smem, pt_smem, dst_smem, kv_ready, qd_ready, qd_free,
                                lse_ptr, delta_ptr, dk_ptr, dv_ptr, key_row0, q_row0, steps, scale, qk_scale,
                                BLOCK_N, BLOCK_M, D, STAGES)
    else:
        _dkdv_compute(k_smem, v_smem, q_smem, do_smem, pt_smem, dst_smem, kv_ready, qd_ready, qd_free, lse_ptr,
                      delta_ptr, dk_ptr, dv_ptr, dq_ptr, key_row0, q_row0, first_step, steps, scale, qk_scale,
                      BLOCK_N, BLOCK_M, D, STAGES, ROTATE, DQ)


@gluon.jit
def _dkdv_load(k_desc, v_desc, q_desc, do_desc, k0_smem, k1_smem, v0_smem, v1_smem, q_smem, do_smem, kv_ready,
               qd_ready, qd_free, key_row0, q_row0, first_step, steps, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
               STAGES: gl.constexpr, ROTATE: gl.constexpr):
    """The loader warp: both warpgroups' K and V halves, then a (Q, dO) stage whenever both released it; the
    query steps in the compute warpgroups' order (``_step_row``)."""
    mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    _tma_load(k_desc, [key_row0, 0], kv_ready, k0_smem)
    _tma_load(k_desc, [key_row0 + BLOCK_N, 0], kv_ready, k1_smem)
    _tma_load(v_desc, [key_row0, 0], kv_ready, v0_smem)
    _tma_load(v_desc, [key_row0 + BLOCK_N, 0], kv_ready, v1_smem)
    for j in range(steps):
        stage = j % STAGES
        if j >= STAGES:
            mbarrier.wait(qd_free.index(stage), ((j // STAGES) - 1) & 1)
        query0 = _step_row(q_row0, first_step, j, steps, BLOCK_M, ROTATE)
        mbarrier.expect(qd_ready.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [query0, 0], qd_ready.index(stage), q_smem.index(stage))
        _tma_load(do_desc, [query0, 0], qd_ready.index(stage), do_smem.index(stage))


@gluon.jit
def _gluon_dkdv_loop_kernel(q_desc, do_desc, k_desc, v_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, queries,
                            key_blocks, heads, scale, qk_scale, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                            D: gl.constexpr, STAGES: gl.constexpr, COMPUTE_REGISTERS: gl.constexpr,
                            PIPELINED: gl.constexpr, ROTATE: gl.constexpr, DQ: gl.constexpr):
    """A program owns 2 * BLOCK_N keys of one head; launched with num_warps=4 (the first warpgroup's).
    PIPELINED picks the compute warpgroups' loop (``_dkdv_partition``). ROTATE: query steps between the start
    points of consecutive key blocks' programs; DQ: the fifth product's mode (see ``_dkdv_compute``)."""
    program = gl.program_id(0)
    head = program % heads
    block = program // heads
    key_row0 = (head * key_blocks + block) * 2 * BLOCK_N
    q_row0 = head * queries
    steps = queries // BLOCK_M
    first_step = (block * ROTATE) % steps
    k0_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, D], k_desc.layout)
    k1_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, D], k_desc.layout)
    v0_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, D], v_desc.layout)
    v1_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, D], v_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, D], do_desc.layout)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], gl.bfloat16)
    pt0_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, BLOCK_M], p_layout)
    pt1_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, BLOCK_M], p_layout)
    dst0_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, BLOCK_M], p_layout)
    dst1_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, BLOCK_M], p_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qd_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qd_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(qd_ready.index(i), count=1)
        mbarrier.init(qd_free.index(i), count=2)  # both warpgroups release a stage
    gl.warp_specialize(
        [(_dkdv_partition, (k0_smem, v0_smem, q_smem, do_smem, pt0_smem, dst0_smem, kv_ready, qd_ready, qd_free,
                            lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, key_row0, q_row0, first_step, steps, scale,
                            qk_scale, BLOCK_N, BLOCK_M, D, STAGES, PIPELINED, ROTATE, DQ)),
         (_dkdv_partition, (k1_smem, v1_smem, q_smem, do_smem, pt1_smem, dst1_smem, kv_ready, qd_ready, qd_free,
                            lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, key_row0 + BLOCK_N, q_row0, first_step,
                            steps, scale, qk_scale, BLOCK_N, BLOCK_M, D, STAGES, PIPELINED, ROTATE, DQ)),
         (_dkdv_load, (k_desc, v_desc, q_desc, do_desc, k0_smem, k1_smem, v0_smem, v1_smem, q_smem, do_smem,
                       kv_ready, qd_ready, qd_free, key_row0, q_row0, first_step, steps, BLOCK_N, BLOCK_M,
                       STAGES, ROTATE))],
        [4, 1], [COMPUTE_REGISTERS, 24])


def _problem(key_blocks: int, queries: int, d: int = 128):
    """bf16 q, dO (HEADS * queries rows), k, v (HEADS * key_blocks * 128 rows) and fp32 row statistics. The
    lse values are the rows' true log-sum-exp (log2 units) over their head's keys, so P stays in [0, 1]."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda rows: torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, generator=generator)  # noqa
    keys = key_blocks * KEYS_PER_PROGRAM
    q, do, k, v = rand(HEADS * queries), rand(HEADS * queries), rand(HEADS * keys), rand(HEADS * keys)
    scale = d ** -0.5
    lse = torch.empty(HEADS * queries, device="cuda", dtype=torch.float32)
    for head in range(HEADS):
        rows, cols = slice(head * queries, (head + 1) * queries), slice(head * keys, (head + 1) * keys)
        lse[rows] = torch.logsumexp(q[rows].float() @ k[cols].float().T * scale, 1) * LOG2E
    delta = torch.randn(HEADS * queries, device="cuda", dtype=torch.float32, generator=generator)
    return q, do, k, v, lse, delta, scale


def _error(dk, dv, q, do, k, v, lse, delta, scale, key_blocks: int, queries: int, checked: int = 8) -> float:
    """Max abs difference of dK and dV from an fp32 computation, over the first ``checked`` programs."""
    worst = 0.0
    for program in range(checked):
        head = program % HEADS
        keys = slice((head * key_blocks + program // HEADS) * KEYS_PER_PROGRAM,
                     (head * key_blocks + program // HEADS + 1) * KEYS_PER_PROGRAM)
        rows = slice(head * queries, (head + 1) * queries)
        qq, dd = q[rows].float(), do[rows].float()
        pt = torch.exp2(k[keys].float() @ qq.T * scale * LOG2E - lse[rows][None, :])
        dst = pt * (v[keys].float() @ dd.T - delta[rows][None, :])
        worst = max(worst, (dv[keys].float() - pt @ dd).abs().max().item(),
                    (dk[keys].float() - scale * dst @ qq).abs().max().item())
    return worst


def run(queries: int = 2048, key_blocks: int = 33, stages: int = 2, compute_registers: int = 232,
        pipelined: bool = False):
    """(Triton ms, Gluon ms, (Triton error, Gluon error), FLOPs) for HEADS x key_blocks programs."""
    q, do, k, v, lse, delta, scale = _problem(key_blocks, queries)
    d = q.shape[1]
    programs = HEADS * key_blocks
    flops = 4 * 2 * programs * KEYS_PER_PROGRAM * queries * d

    dk_triton, dv_triton = torch.empty_like(k), torch.empty_like(v)
    triton_q, triton_do = (TritonDescriptor.from_tensor(t, [32, d]) for t in (q, do))

    def triton_loop():
        _triton_dkdv_loop_kernel[(programs,)](triton_q, triton_do, k, v, lse, delta, dk_triton, dv_triton, queries,
                                              key_blocks, HEADS, scale, scale * LOG2E, BLOCK_N=KEYS_PER_PROGRAM,
                                              BLOCK_M=32, D=d, num_warps=8, num_stages=3)

    dk_gluon, dv_gluon = torch.empty_like(k), torch.empty_like(v)
    box_layout = gl.NVMMASharedLayout.get_default_for([64, d], gl.bfloat16)
    gluon_q, gluon_do, gluon_k, gluon_v = (GluonDescriptor.from_tensor(t, [64, d], box_layout) for t in (q, do, k, v))

    def gluon_loop():
        _gluon_dkdv_loop_kernel[(programs,)](gluon_q, gluon_do, gluon_k, gluon_v, lse, delta, dk_gluon, dv_gluon,
                                             lse, queries, key_blocks, HEADS, scale, scale * LOG2E,  # lse: no dQ
                                             BLOCK_N=KEYS_PER_PROGRAM // 2, BLOCK_M=64, D=d, STAGES=stages,
                                             COMPUTE_REGISTERS=compute_registers, PIPELINED=pipelined, ROTATE=0,
                                             DQ=DQ_NONE.value, num_warps=4)

    triton_loop()
    gluon_loop()
    torch.cuda.synchronize()
    errors = tuple(_error(dk_, dv_, q, do, k, v, lse, delta, scale, key_blocks, queries)
                   for dk_, dv_ in ((dk_triton, dv_triton), (dk_gluon, dv_gluon)))
    return graph_timing(triton_loop).median, graph_timing(gluon_loop).median, errors, flops


def main() -> int:
    def run_variant(label: str):  # "2048": synchronous, 2 stages; "2048 pipelined": 3 stages, 248 registers
        queries, *pipelined = label.split()
        options = dict(stages=3, compute_registers=248, pipelined=True) if pipelined else {}
        return run(queries=int(queries), **options)

    return report(f"d = 128, {HEADS} heads, 132 programs of {KEYS_PER_PROGRAM} keys, no masks",
                  "queries per head (Gluon loop)", ("2048", "2048 pipelined", "8192", "8192 pipelined"), run_variant)


if __name__ == "__main__":
    sys.exit(main())

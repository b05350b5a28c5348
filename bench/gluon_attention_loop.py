"""Prototype for a faster d = 128 forward: a plain attention loop in Triton against the same loop written in
Gluon with warp specialization (GPU only, Hopper: ``python -m bench.gluon_attention_loop``).

Not a code path of the package. It keeps the measured lead for the two d = 128 targets of issue #3
(bench/RESULTS.md, session 14): our forward's unmasked loop runs as fast as this Triton loop, and Triton's
compiler does not overlap a step's softmax with its matrix products on Hopper. Gluon
(``triton.experimental.gluon``, in Triton 3.6 and 3.9) exposes what that overlap needs: asynchronous wgmma
with explicit waits, TMA copies, mbarriers and warp-specialized partitions.

Problem: ``programs`` independent query tiles of 128 rows, each attending (softmax, no mask) to ``keys`` keys
of its head (heads = 4), d = 128, bf16, 64-key steps. The Gluon kernel runs three partitions per program:
two compute warpgroups (rows 0-63 and 64-127, 4 warps each, each with its own P buffers in shared memory)
and one loader warp that streams K/V stages through TMA; a stage is refilled once both warpgroups released
it. Each warpgroup issues step j's scores together with step j-1's P.V and computes the softmax between
the two waits, so the exponentials overlap the tensor cores.

Gluon kernels do not run under the Triton interpreter, so a Gluon path in the package would be GPU-only next
to the Triton kernels that CI tests.
"""
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor

from .common import graph_timing

LOG2E = 1.4426950408889634
# Gluon is experimental and renames things between releases: the barrier among a partition's warps is
# gl.thread_barrier in Triton 3.6 and gl.barrier in 3.9; a TMA load is tma.async_copy_global_to_shared in 3.6
# and tma.async_load in 3.9 (same arguments).
_sync_warps = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@triton.jit
def _triton_attention_loop_kernel(q_desc, k_desc, v_desc, out_ptr, keys, heads, qk_scale,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The unmasked loop of our forward (``_fwd_key_range``) on its own: online softmax over 64-key steps."""
    program = tl.program_id(0)
    first_key = (program % heads) * keys
    q = q_desc.load([program * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, keys, BLOCK_N):
        k = k_desc.load([first_key + n0, 0])
        v = v_desc.load([first_key + n0, 0])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    rows = program * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(out_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], (acc / l_i[:, None]).to(tl.bfloat16))


@gluon.jit
def _first_step(q_smem, k_smem, p_smem, kv_ready, n, qk_scale, no_scores, STAGES: gl.constexpr):
    """A warpgroup's first key step, from stage ``n`` of the K/V ring: its scores and softmax. P goes to
    p_smem[0]; returns the row max and sum."""
    mbarrier.wait(kv_ready.index(n % STAGES), (n // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(n % STAGES).permute((1, 0)), no_scores, use_acc=False)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(gl.fma(s, qk_scale, -m_i[:, None]))
    l_i = gl.sum(p, 1)
    p_smem.index(0).store(p.to(gl.bfloat16))
    fence_async_shared()
    _sync_warps()
    return m_i, l_i


@gluon.jit
def _next_step(q_smem, k_smem, v_smem, p_smem, kv_ready, kv_free, acc, m_i, l_i, n, j, qk_scale, no_scores,
               STAGES: gl.constexpr, rows_of_o: gl.constexpr):
    """Step j (>= 1) of a warpgroup's loop, from stage ``n`` of the K/V ring: its scores are issued together
    with step j - 1's P.V and the softmax runs between the two waits. Releases step j - 1's stage and
    returns (acc, m, l)."""
    stage, prev = n % STAGES, (n - 1) % STAGES
    mbarrier.wait(kv_ready.index(stage), (n // STAGES) & 1)
    s_token = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), no_scores, use_acc=False, is_async=True)
    # P comes from shared memory: a register operand in flight made ptxas wait for this product as soon as
    # the new P reused its registers, so nothing overlapped.
    acc_token = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index(prev), acc, is_async=True)
    s, _, _ = warpgroup_mma_wait(1, deps=[s_token, q_smem, k_smem.index(stage)])
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(gl.fma(s, qk_scale, -m_new[:, None]))
    l_i = l_i * alpha + gl.sum(p, 1)
    p_smem.index(j % 2).store(p.to(gl.bfloat16))
    acc, _, _ = warpgroup_mma_wait(0, deps=[acc_token, v_smem.index(prev), p_smem.index((j - 1) % 2)])
    mbarrier.arrive(kv_free.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, rows_of_o)[:, None]
    fence_async_shared()
    _sync_warps()
    return acc, m_new, l_i


@gluon.jit
def _compute(o_ptr, q_smem, k_smem, v_smem, p_smem, q_ready, kv_ready, kv_free, steps, qk_scale, row0,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup's BLOCK_M rows: scores of step j issued with P.V of step j - 1, softmax between."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    rows_of_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    no_scores = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    mbarrier.wait(q_ready, 0)
    m_i, l_i = _first_step(q_smem, k_smem, p_smem, kv_ready, 0, qk_scale, no_scores, STAGES)
    for j in range(1, steps):
        acc, m_i, l_i = _next_step(q_smem, k_smem, v_smem, p_smem, kv_ready, kv_free, acc, m_i, l_i, j, j,
                                   qk_scale, no_scores, STAGES, rows_of_o)
    acc = warpgroup_mma(p_smem.index((steps - 1) % 2), v_smem.index((steps - 1) % STAGES), acc)
    out = acc / gl.convert_layout(l_i, rows_of_o)[:, None]
    rows = row0 + gl.arange(0, BLOCK_M, layout=rows_of_o)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(o_ptr + rows[:, None] * D + cols[None, :], out.to(gl.bfloat16))


@gluon.jit
def _load(q_desc, k_desc, v_desc, q0_smem, q1_smem, k_smem, v_smem, q_ready, kv_ready, kv_free, row0,
          first_key, steps, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The loader warp: both Q halves, then a K/V stage whenever both warpgroups released it."""
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [row0, 0], q_ready, q0_smem)
    _tma_load(q_desc, [row0 + BLOCK_M, 0], q_ready, q1_smem)
    for j in range(steps):
        stage = j % STAGES
        if j >= STAGES:
            mbarrier.wait(kv_free.index(stage), ((j // STAGES) - 1) & 1)
        mbarrier.expect(kv_ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [first_key + j * BLOCK_N, 0], kv_ready.index(stage), k_smem.index(stage))
        _tma_load(v_desc, [first_key + j * BLOCK_N, 0], kv_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _shared_buffers(q_desc, k_desc, v_desc, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                    STAGES: gl.constexpr):
    """Shared memory of a program with two compute warpgroups and a loader: each warpgroup's Q half and P
    buffers, the K/V ring, and its barriers (initialised; a stage is free once both warpgroups released it)."""
    q0_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
    q1_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.bfloat16)
    p0_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, BLOCK_N], p_layout)
    p1_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, BLOCK_N], p_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_free.index(i), count=2)  # both warpgroups release a stage
    mbarrier.init(q_ready, count=1)
    return q0_smem, q1_smem, k_smem, v_smem, p0_smem, p1_smem, kv_ready, kv_free, q_ready


@gluon.jit
def _gluon_attention_loop_kernel(q_desc, k_desc, v_desc, o_ptr, keys, heads, qk_scale,
                                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                                 STAGES: gl.constexpr, COMPUTE_REGISTERS: gl.constexpr):
    """A program owns 2 * BLOCK_M query rows; launched with num_warps=4 (the first warpgroup's)."""
    program = gl.program_id(0)
    q0_smem, q1_smem, k_smem, v_smem, p0_smem, p1_smem, kv_ready, kv_free, q_ready = _shared_buffers(
        q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, D, STAGES)
    steps = keys // BLOCK_N
    row0 = program * 2 * BLOCK_M
    first_key = (program % heads) * keys
    gl.warp_specialize(
        [(_compute, (o_ptr, q0_smem, k_smem, v_smem, p0_smem, q_ready, kv_ready, kv_free, steps, qk_scale, row0,
                     BLOCK_M, BLOCK_N, D, STAGES)),
         (_compute, (o_ptr, q1_smem, k_smem, v_smem, p1_smem, q_ready, kv_ready, kv_free, steps, qk_scale,
                     row0 + BLOCK_M, BLOCK_M, BLOCK_N, D, STAGES)),
         (_load, (q_desc, k_desc, v_desc, q0_smem, q1_smem, k_smem, v_smem, q_ready, kv_ready, kv_free, row0,
                  first_key, steps, BLOCK_M, BLOCK_N, STAGES))],
        [4, 1], [COMPUTE_REGISTERS, 24])


def _problem(programs: int, keys: int, heads: int, d: int = 128):
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(programs * 128, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    k = torch.randn(heads * keys, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    v = torch.randn(heads * keys, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    return q, k, v


def _error(out, q, k, v, keys: int, heads: int, checked: int = 8) -> float:
    """Max abs difference from an fp32 softmax attention over the first ``checked`` programs."""
    d = q.shape[1]
    worst = 0.0
    for program in range(checked):
        head = program % heads
        qq = q[program * 128:(program + 1) * 128].float()
        kk, vv = (t[head * keys:(head + 1) * keys].float() for t in (k, v))
        expected = torch.softmax(qq @ kk.T * d ** -0.5, -1) @ vv
        worst = max(worst, (out[program * 128:(program + 1) * 128].float() - expected).abs().max().item())
    return worst


def run(programs: int = 132, keys: int = 2048, heads: int = 4, stages: int = 4, compute_registers: int = 232):
    """(Triton ms, Gluon ms, (Triton error, Gluon error), useful FLOPs) for one problem."""
    q, k, v = _problem(programs, keys, heads)
    d = q.shape[1]
    qk_scale = d ** -0.5 * LOG2E
    flops = 4 * programs * 128 * keys * d

    out_triton = torch.empty_like(q)
    triton_q = TritonDescriptor.from_tensor(q, [128, d])
    triton_k, triton_v = (TritonDescriptor.from_tensor(t, [64, d]) for t in (k, v))

    def triton_loop():
        _triton_attention_loop_kernel[(programs,)](triton_q, triton_k, triton_v, out_triton, keys, heads, qk_scale,
                                                   BLOCK_M=128, BLOCK_N=64, D=d, num_warps=8, num_stages=3)

    out_gluon = torch.empty_like(q)
    # 64-row boxes for all three: a warpgroup's Q half and a K/V step have the same shape
    box_layout = gl.NVMMASharedLayout.get_default_for([64, d], gl.bfloat16)
    gluon_q, gluon_k, gluon_v = (GluonDescriptor.from_tensor(t, [64, d], box_layout) for t in (q, k, v))

    def gluon_loop():
        _gluon_attention_loop_kernel[(programs,)](gluon_q, gluon_k, gluon_v, out_gluon, keys, heads, qk_scale,
                                                  BLOCK_M=64, BLOCK_N=64, D=d, STAGES=stages,
                                                  COMPUTE_REGISTERS=compute_registers, num_warps=4)

    triton_loop()
    gluon_loop()
    torch.cuda.synchronize()
    errors = (_error(out_triton, q, k, v, keys, heads), _error(out_gluon, q, k, v, keys, heads))
    return graph_timing(triton_loop).median, graph_timing(gluon_loop).median, errors, flops


def report(description: str, size_label: str, sizes, run) -> int:
    """The Triton-vs-Gluon table both loop prototypes print: ``run(size)`` gives (Triton ms, Gluon ms,
    (Triton error, Gluon error), FLOPs) for each of ``sizes``. Returns the exit status."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("needs a Hopper-class GPU (sm_90 or later)")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, bf16, "
          f"{description}, CUDA-graph medians")
    print(f"| {size_label} | Triton ms (TFLOP/s) | Gluon ms (TFLOP/s) | Gluon speedup | max error Triton / Gluon |")
    print("|---|---|---|---|---|")
    for size in sizes:
        triton_ms, gluon_ms, (triton_error, gluon_error), flops = run(size)
        print(f"| {size} | {triton_ms:.4f} ({flops / triton_ms / 1e9:.0f}) | {gluon_ms:.4f} "
              f"({flops / gluon_ms / 1e9:.0f}) | {triton_ms / gluon_ms:.2f} | {triton_error:.1e} / {gluon_error:.1e} |",
              flush=True)
    return 0


def main() -> int:
    return report("d = 128, 4 heads, 132 programs of 128 rows", "keys per program", (2048, 8192),
                  lambda keys: run(keys=keys))


if __name__ == "__main__":
    sys.exit(main())

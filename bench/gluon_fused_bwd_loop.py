"""Bound for a 5-matmul backward at d = 128 (GPU only, Hopper: ``python -m bench.gluon_fused_bwd_loop``).

Not a code path of the package. Our deterministic backward runs 7 matmuls per visible (query, key) pair: 4 in
the dK/dV programs and 3 in the dQ programs, which recompute the scores because no floating-point atomics may
accumulate dQ. A backward that also computed dQ inside the dK/dV loop would run 5, but it must accumulate each
query tile's dQ over the key blocks in a fixed order (ordered read-modify-writes, not atomics). Before building
that ordering, this file bounds what the 5-matmul loop can give at all:

- ``triton``: the library's split as two plain loops, the unmasked dK/dV loop (``_triton_dkdv_loop_kernel`` of
  ``bench.gluon_dkdv_loop``, wide tiles) and an unmasked dQ loop (``_triton_dq_loop_kernel``, 128 queries, 64-key
  steps, 8 warps), run one after the other.
- ``gluon, dQ stored``: the warp-specialized Gluon dK/dV loop of ``bench.gluon_dkdv_loop`` (its ``DQ`` modes) plus,
  per step and warpgroup, the fifth product dQ_part = dS K (64 queries x 128 columns from its 64 keys) stored into
  the query tile's fp32 dQ rows *without* accumulation (racy overwrites: the result is wrong by design). The time of
  the products and the dQ traffic, with none of the ordering cost: an upper bound on speed.
- ``gluon, dQ atomics``: the same with fp32 atomic adds (FlashAttention-2's non-deterministic accumulation, not
  allowed in the package): a correct dQ, for reference.

Measured (session 17, H100, Triton 3.6, bf16; bench/RESULTS.md): the Triton loops 0.2197 / 0.8635 ms at 4224 /
8448 keys per head, the Gluon loop with dQ stored 0.2513 / 0.9840 (0.87-0.88x), with atomics 1.04 / 4.36 (0.20x).
Even without accumulation or ordering the 5-matmul loop is slower: its fp32 dQ traffic (64 query rows x 128
columns per warpgroup and step, ~2 TB/s here) costs more than the two recomputed products it saves. An ordered
read-modify-write moves at least as many bytes. So the package keeps its recomputing dQ programs (a
5-matmul design with fewer dQ bytes per product, e.g. longer key blocks, would need new register budgets).

Problem: ``HEADS`` heads, ``key_blocks`` x 128 keys and as many queries per head (so both loops have the same
number of programs), d = 128, bf16, no masks. A Gluon program owns 128 keys of one head and starts its query
steps at a different point of the ring per key block (``ROTATION``), so the programs that add into one query tile
do so at different times.
"""
import sys

import torch
import triton
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor

from .common import graph_timing
from .gluon_attention_loop import LOG2E
from .gluon_dkdv_loop import (DQ_ATOMIC, DQ_STORED, HEADS, KEYS_PER_PROGRAM, _error, _gluon_dkdv_loop_kernel,
                              _problem, _triton_dkdv_loop_kernel)

ROTATION = 2  # query steps between the start points of consecutive key blocks' programs


@triton.jit
def _triton_dq_loop_kernel(q_desc, do_desc, k_desc, v_desc, lse_ptr, delta_ptr, dq_ptr, queries, keys, heads,
                           scale, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The unmasked dQ loop of our backward (``_dq_key_range``) on its own: BLOCK_M queries of one head against
    all its keys, recomputing the scores."""
    program = tl.program_id(0)
    head = program % heads
    q_row0 = head * queries + (program // heads) * BLOCK_M
    k_row0 = head * keys
    rows = q_row0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([q_row0, 0])
    do = do_desc.load([q_row0, 0])
    lse = tl.load(lse_ptr + rows)
    delta = tl.load(delta_ptr + rows)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, keys, BLOCK_N):
        k = k_desc.load([k_row0 + n0, 0])
        v = v_desc.load([k_row0 + n0, 0])
        p = tl.exp2(tl.fma(tl.dot(q, tl.trans(k)), qk_scale, -lse[:, None]))
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(dq_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], dq * scale)


def _dq_error(dq, q, do, k, v, lse, delta, scale, key_blocks: int, queries: int, checked_blocks: int = 4) -> float:
    """Max abs difference of dQ from an fp32 computation, over the first ``checked_blocks`` 128-row query blocks
    of each head."""
    keys, worst = key_blocks * KEYS_PER_PROGRAM, 0.0
    for head in range(HEADS):
        rows = slice(head * queries, head * queries + checked_blocks * 128)
        cols = slice(head * keys, (head + 1) * keys)
        qq, dd, kk = q[rows].float(), do[rows].float(), k[cols].float()
        p = torch.exp2(qq @ kk.T * scale * LOG2E - lse[rows][:, None])
        ds = p * (dd @ v[cols].float().T - delta[rows][:, None])
        worst = max(worst, (dq[rows] - scale * ds @ kk).abs().max().item())
    return worst


def run(key_blocks: int = 33, stages: int = 2, compute_registers: int = 248, rotate: int = ROTATION):
    """{variant: (ms, dK/dV error, dQ error)} and the FLOPs of 5 matmuls per pair, for HEADS x key_blocks programs
    of 128 keys and as many queries per head as keys."""
    queries = key_blocks * KEYS_PER_PROGRAM
    q, do, k, v, lse, delta, scale = _problem(key_blocks, queries)
    d = q.shape[1]
    programs = HEADS * key_blocks
    flops = 5 * 2 * HEADS * queries * queries * d
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)

    triton_boxes = {name: TritonDescriptor.from_tensor(t, [rows, d])
                    for name, t, rows in (("q32", q, 32), ("do32", do, 32), ("q", q, 128), ("do", do, 128),
                                          ("k", k, 64), ("v", v, 64))}

    def triton_loops():
        _triton_dkdv_loop_kernel[(programs,)](triton_boxes["q32"], triton_boxes["do32"], k, v, lse, delta, dk, dv,
                                              queries, key_blocks, HEADS, scale, scale * LOG2E,
                                              BLOCK_N=KEYS_PER_PROGRAM, BLOCK_M=32, D=d, num_warps=8, num_stages=3)
        _triton_dq_loop_kernel[(HEADS * (queries // 128),)](
            triton_boxes["q"], triton_boxes["do"], triton_boxes["k"], triton_boxes["v"], lse, delta, dq, queries,
            queries, HEADS, scale, scale * LOG2E, BLOCK_M=128, BLOCK_N=64, D=d, num_warps=8, num_stages=3)

    box_layout = gl.NVMMASharedLayout.get_default_for([64, d], gl.bfloat16)
    gluon_boxes = [GluonDescriptor.from_tensor(t, [64, d], box_layout) for t in (q, do, k, v)]

    def gluon_loop(atomic: bool):
        _gluon_dkdv_loop_kernel[(programs,)](*gluon_boxes, lse, delta, dk, dv, dq, queries, key_blocks, HEADS, scale,
                                             scale * LOG2E, BLOCK_N=KEYS_PER_PROGRAM // 2, BLOCK_M=64, D=d,
                                             STAGES=stages, COMPUTE_REGISTERS=compute_registers, PIPELINED=False,
                                             ROTATE=rotate, DQ=(DQ_ATOMIC if atomic else DQ_STORED).value,
                                             num_warps=4)

    results = {}
    for name, loop, correct_dq in (("triton dK/dV + dQ loops", triton_loops, True),
                                   ("gluon, dQ stored (racy)", lambda: gluon_loop(False), False),
                                   ("gluon, dQ atomics", lambda: gluon_loop(True), True)):
        dk.zero_(), dv.zero_(), dq.zero_()
        loop()
        torch.cuda.synchronize()
        errors = (_error(dk, dv, q, do, k, v, lse, delta, scale, key_blocks, queries),
                  _dq_error(dq, q, do, k, v, lse, delta, scale, key_blocks, queries) if correct_dq else float("nan"))
        results[name] = (graph_timing(loop).median,) + errors
    return results, flops


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("needs a Hopper-class GPU (sm_90 or later)")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, bf16, d = 128, "
          f"{HEADS} heads, as many queries as keys per head, no masks, CUDA-graph medians; TFLOP/s count 5 matmuls")
    print("| keys per head | variant | ms | TFLOP/s | vs Triton | dK/dV error | dQ error |")
    print("|---|---|---|---|---|---|---|")
    for key_blocks in (33, 66):
        results, flops = run(key_blocks)
        base = results["triton dK/dV + dQ loops"][0]
        for name, (ms, dkdv_error, dq_error) in results.items():
            print(f"| {key_blocks * KEYS_PER_PROGRAM} | {name} | {ms:.4f} | {flops / ms / 1e9:.0f} | {base / ms:.2f} | "
                  f"{dkdv_error:.1e} | {dq_error:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

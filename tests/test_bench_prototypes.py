"""The Gluon prototypes in bench/ (GPU-only kernels): their host-side job schedule, and that they still compile
for an H100 with the installed Triton (Gluon's API changes between releases; CI has no GPU to run them)."""
import pytest
import torch
from helpers import compile_for_h100_in_subprocess

gpa = pytest.importorskip("bench.gluon_persistent_attention")


@pytest.mark.parametrize("policy", ["none", "T26", "T24", "T8"])
def test_split_jobs_cover_every_tile_key_range_once(policy):
    jobs = gpa.split_jobs(policy)
    assert [steps for steps, _ in jobs] == sorted((steps for steps, _ in jobs), reverse=True)
    by_tile = {}
    for steps, (key_base, row0, first, end, tile, split, splits, _) in jobs:
        assert end - first == steps * gpa.STEP_KEYS and steps > 0
        by_tile.setdefault(tile, []).append((split, first, end, splits, key_base, row0))
    tiles = gpa.shape1_tiles()
    assert sorted(by_tile) == list(range(len(tiles)))
    for tile, chunks in by_tile.items():
        chunks.sort()
        key_base, row0, keys = tiles[tile]
        assert [c[0] for c in chunks] == list(range(len(chunks)))          # splits numbered 0..n-1
        assert all(c[3] == len(chunks) for c in chunks)                    # each knows the count
        assert all(c[4:] == (key_base, row0) for c in chunks)
        assert chunks[0][1] == 0 and chunks[-1][2] == keys                 # the whole range ...
        assert all(a[2] == b[1] for a, b in zip(chunks, chunks[1:]))        # ... without gaps or overlaps
        chunk = None if policy == "none" else int(policy[1:])
        assert len(chunks) == (1 if chunk is None or keys // gpa.STEP_KEYS <= chunk else 2)


@pytest.mark.parametrize("programs, publishers_first", [(None, False), (132, False), (7, False), (132, True),
                                                       (7, True)])
def test_schedule_gives_every_job_to_one_program(programs, publishers_first):
    jobs = gpa.split_jobs("T26")
    table, bounds = gpa.schedule(jobs, programs, publishers_first=publishers_first)
    assert table.dtype == bounds.dtype == torch.int32
    assert table.shape == (len(jobs), gpa.JOB_FIELDS)
    assert bounds[0] == 0 and bounds[-1] == len(jobs) and bool((bounds.diff() >= 0).all())
    assert bounds.shape[0] == (len(jobs) if programs is None else programs) + 1
    assert sorted(map(tuple, table.tolist())) == sorted(tuple(fields) for _, fields in jobs)
    if programs is not None:  # greedy longest-first: the busiest program within one job of the least busy
        steps = (table[:, 3] - table[:, 2]) // gpa.STEP_KEYS + 1  # + the schedule's 1-step job overhead
        loads = [int(steps[bounds[p]:bounds[p + 1]].sum()) for p in range(programs)]
        assert max(loads) - min(loads) <= int(steps.max())
    if publishers_first:  # in every program, no chunk 0 of a split tile before a later chunk
        for p in range(programs):
            kinds = [int(split) == 0 for split in table[bounds[p]:bounds[p + 1], 5]]
            assert kinds == sorted(kinds)


_COMPILE = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
import bench.gluon_attention_loop as loop
import bench.gluon_persistent_attention as persistent
import bench.gluon_dkdv_loop as dkdv

layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
desc = f"tensordesc<bf16[64, 128],{layout!r}>"
boxes = {"q_desc": desc, "k_desc": desc, "v_desc": desc}

def compile_for_h100(kernel, types, constexprs):
    signature = dict(boxes, **types, **{name: "constexpr" for name in constexprs})
    source = GluonASTSource(kernel, signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

compile_for_h100(loop._gluon_attention_loop_kernel,
                 {"o_ptr": "*bf16", "keys": "i32", "heads": "i32", "qk_scale": "fp32"},
                 dict(BLOCK_M=64, BLOCK_N=64, D=128, STAGES=4, COMPUTE_REGISTERS=232))
for trace, static_merger in ((False, False), (True, True), (False, True)):
    compile_for_h100(persistent._persistent_attention_kernel,
                     {"o_ptr": "*bf16", "jobs": "*i32", "program_jobs": "*i32", "partial_o": "*fp32",
                      "partial_stats": "*fp32", "tickets": "*i32", "flags": "*i32", "qk_scale": "fp32",
                      "trace": "*i64"},
                     dict(BLOCK_M=64, BLOCK_N=64, D=128, STAGES=4, MAX_SPLITS=2, COMPUTE_REGISTERS=232, TRACE=trace,
                          STATIC_MERGER=static_merger))
for stages, pipelined, dq in ((2, False, 0), (3, False, 0), (3, True, 0), (2, False, 1), (2, False, 2)):
    compile_for_h100(dkdv._gluon_dkdv_loop_kernel,
                     {"do_desc": desc, "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": "*bf16", "dv_ptr": "*bf16",
                      "dq_ptr": "*fp32", "queries": "i32", "key_blocks": "i32", "heads": "i32", "scale": "fp32",
                      "qk_scale": "fp32"},
                     dict(BLOCK_N=64, BLOCK_M=64, D=128, STAGES=stages, COMPUTE_REGISTERS=232 if dq == 0 else 248,
                          PIPELINED=pipelined, ROTATE=0 if dq == 0 else 2, DQ=dq))
import bench.gluon_fused_bwd_loop  # noqa: E402,F401  (it launches the kernel above with DQ = 1 and 2)
print("compiled")
'''


def test_gluon_prototypes_compile_for_h100_without_a_gpu():
    compile_for_h100_in_subprocess(_COMPILE)

"""Sweep the HMA forward kernel's block sizes on the GPU: ``python -m bench.tune_hard_match``.

Prints, per benchmark shape, the median forward time of each config (checked against the broadcast
composition), the default config's time, and the CUDA-graph time of the default (launch overhead removed).
"""
import itertools
import sys

import torch
import triton.testing

import gesr_kernels.hard_match as hm
from bench.hard_match import MAX_COUNT, SHAPES, broadcast_composition, make_inputs


def sweep(shape):
    users, hist, cand, pairs = shape
    sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", torch.bfloat16)
    h, c = sets[0]["h"], sets[0]["c"]
    expected = broadcast_composition(h, c, weight, *shape, MAX_COUNT)
    run = lambda: hm.hard_match_embedding(h, hist_off, c, cand_off, weight, MAX_COUNT, validate=False)  # noqa
    hm._FWD_CONFIG_OVERRIDE = None
    default = hm._fwd_config(users * cand, users, pairs, weight.shape[1])
    results = [("default " + str(default), triton.testing.do_bench(run, return_mode="median"))]
    results.append(("default, CUDA graph", triton.testing.do_bench_cudagraph(run, return_mode="median")))
    block_is = [1] if cand == 1 else [8, 16, 32, 64]
    block_js = [64, 128, 256, 512] if cand == 1 else [8, 16, 32, 64]
    for bi, bj, warps in itertools.product(block_is, block_js, [4, 8]):
        if bi * bj * 16 > 32768:
            continue
        hm._FWD_CONFIG_OVERRIDE = dict(BLOCK_I=bi, BLOCK_J=bj, num_warps=warps)
        if not torch.equal(run(), expected):
            raise RuntimeError(f"wrong result for {hm._FWD_CONFIG_OVERRIDE} at {shape}")
        results.append((str(hm._FWD_CONFIG_OVERRIDE), triton.testing.do_bench(run, warmup=10, rep=60,
                                                                           return_mode="median")))
    hm._FWD_CONFIG_OVERRIDE = None
    print(f"\n{shape}")
    for name, ms in sorted(results, key=lambda r: r[1]):
        print(f"  {ms * 1e3:9.1f} us  {name}")


if __name__ == "__main__":
    for shape in SHAPES if len(sys.argv) == 1 else [eval(a) for a in sys.argv[1:]]:
        sweep(shape)

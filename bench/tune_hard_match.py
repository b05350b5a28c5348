"""Sweep the HMA forward kernel's paths and block sizes on the GPU: ``python -m bench.tune_hard_match``.

For each benchmark shape: the default choice (eager call, and CUDA-graph replay without launch
overhead), then the best configs of the brute-force and the hash-table paths, each checked against the
broadcast composition.
"""
import itertools
import sys

import torch
import triton.testing

import gesr_kernels.hard_match as hm
from bench.hard_match import MAX_COUNT, SHAPES, broadcast_composition, make_inputs


def sweep(shape, top=4):
    users, hist, cand, pairs = shape
    sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", torch.bfloat16)
    h, c = sets[0]["h"], sets[0]["c"]
    expected = broadcast_composition(h, c, weight, *shape, MAX_COUNT)
    run = lambda: hm.hard_match_embedding(h, hist_off, c, cand_off, weight, MAX_COUNT, validate=False)  # noqa
    default_hash = hm._uses_hash(users * cand, users, None)
    print(f"\n{shape}: default path {'hash' if default_hash else 'brute force'}, "
          f"config {hm._fwd_config(users * cand, users, pairs, weight.shape[1], default_hash)}")
    print(f"  default eager     {triton.testing.do_bench(run, return_mode='median') * 1e3:8.1f} us")
    print(f"  default CUDA graph {triton.testing.do_bench_cudagraph(run, return_mode='median') * 1e3:8.1f} us")
    saved = hm.HASH_MIN_CANDIDATES
    paths = {"brute": (10 ** 9, [1] if cand == 1 else [4, 8, 16, 32], [16, 32, 64, 128, 256, 512], [4, 8])}
    if cand > 1:
        paths["hash"] = (0, [8, 16, 32, 64, 128], [16], [2, 4, 8])
    for path, (threshold, block_is, block_js, warps_list) in paths.items():
        hm.HASH_MIN_CANDIDATES = threshold
        results = []
        for bi, bj, warps in itertools.product(block_is, block_js, warps_list):
            if path == "brute" and not 2048 <= bi * bj * 16 <= 16384:
                continue
            hm._FWD_CONFIG_OVERRIDE = dict(BLOCK_I=bi, BLOCK_J=bj, num_warps=warps)
            if not torch.equal(run(), expected):
                raise RuntimeError(f"wrong result for {path} {hm._FWD_CONFIG_OVERRIDE} at {shape}")
            results.append((triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median"),
                            str(hm._FWD_CONFIG_OVERRIDE)))
        for ms, name in sorted(results)[:top]:
            print(f"  {path:5s} graph {ms * 1e3:8.1f} us  {name}")
    hm.HASH_MIN_CANDIDATES = saved
    hm._FWD_CONFIG_OVERRIDE = None


if __name__ == "__main__":
    for shape in SHAPES if len(sys.argv) == 1 else [eval(a) for a in sys.argv[1:]]:
        sweep(shape)

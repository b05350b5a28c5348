"""Sweep the HMA forward kernel's paths and block sizes on the GPU: ``python -m bench.tune_hard_match``.

For each benchmark shape: the default choice (eager call, and CUDA-graph replay without launch
overhead), then the best configs of each counting path (brute force, history tables, candidate tables;
forced through ``hard_match._FORCE_PATH``), each checked against the broadcast composition.
"""
import itertools
import sys

import torch
import triton.testing

import gesr_kernels.hard_match as hm
from bench.hard_match import MAX_COUNT, SHAPES, broadcast_composition, make_inputs


def path_configs(cand):
    """{path: [(fwd kernel override, candidate-table kernels override)]} to sweep."""
    brute = [(dict(BLOCK_I=bi, BLOCK_J=bj, num_warps=warps), None)
             for bi, bj, warps in itertools.product([1] if cand == 1 else [4, 8, 16, 32],
                                                    [16, 32, 64, 128, 256, 512], [4, 8])
             if 2048 <= bi * bj * 16 <= 16384]
    configs = {"brute": brute}
    if cand > 1:
        configs["history_table"] = [(dict(BLOCK_I=bi, num_warps=warps), None)
                                    for bi, warps in itertools.product([8, 16, 32, 64, 128], [2, 4, 8])]
    configs["candidate_table"] = [(dict(BLOCK_I=bi), dict(BLOCK_H=bh, num_warps=warps))
                                  for bi, bh, warps in itertools.product([8, 16, 32], [4, 8, 16, 32, 64],
                                                                         [2, 4, 8])]
    return configs


def sweep(shape, top=4):
    users, hist, cand, pairs = shape
    sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", torch.bfloat16)
    h, c = sets[0]["h"], sets[0]["c"]
    expected = broadcast_composition(h, c, weight, *shape, MAX_COUNT)
    run = lambda: hm.hard_match_embedding(h, hist_off, c, cand_off, weight, MAX_COUNT, validate=False)  # noqa
    default_path = hm._count_path(users * cand, users * hist, users, None)
    print(f"\n{shape}: default path {default_path}, "
          f"config {hm._fwd_config(users * cand, users, pairs, weight.shape[1], default_path)}")
    print(f"  default eager     {triton.testing.do_bench(run, return_mode='median') * 1e3:8.1f} us")
    print(f"  default CUDA graph {triton.testing.do_bench_cudagraph(run, return_mode='median') * 1e3:8.1f} us")
    try:
        for path, configs in path_configs(cand).items():
            hm._FORCE_PATH = path
            results = []
            for fwd, probe in configs:
                hm._FWD_CONFIG_OVERRIDE, hm._PROBE_CONFIG_OVERRIDE = fwd, probe
                name = str(fwd) if probe is None else f"{fwd} {probe}"
                if not torch.equal(run(), expected):
                    raise RuntimeError(f"wrong result for {path} {name} at {shape}")
                results.append((triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median"), name))
            for ms, name in sorted(results)[:top]:
                print(f"  {path:15s} graph {ms * 1e3:8.1f} us  {name}")
    finally:
        hm._FORCE_PATH = hm._FWD_CONFIG_OVERRIDE = hm._PROBE_CONFIG_OVERRIDE = None


if __name__ == "__main__":
    for shape in SHAPES if len(sys.argv) == 1 else [eval(a) for a in sys.argv[1:]]:
        sweep(shape)

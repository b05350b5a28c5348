"""Host-side cost of one eager HMA call: ``python -m bench.overhead`` (CUDA only).

Prints the per-call wall time of the public function with the GPU kept busy-free (synchronising every
100 calls), and the cProfile entries that cost the most, to find Python overhead on the hot path.
"""
import cProfile
import pstats
import time

import torch

import gesr_kernels
from bench.hard_match import MAX_COUNT, make_inputs


def main(shape=(1024, 1024, 1, 16), calls=300):
    sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", torch.bfloat16)
    h, c = sets[0]["h"], sets[0]["c"]
    run = lambda: gesr_kernels.hard_match_embedding(h, hist_off, c, cand_off, weight, MAX_COUNT,  # noqa
                                                    validate=False)
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    print(f"{shape}: {host:.1f} us of host time per eager call (launch-bound if above the GPU time)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()

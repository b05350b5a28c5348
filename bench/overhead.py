"""Host-side cost of eager HMA calls, piece by piece: ``python -m bench.overhead`` (CUDA only).

An eager call is launch-bound when its host time exceeds its GPU time; this finds where the host time goes.
"""
import time

import torch

import gesr_kernels
import gesr_kernels.hard_match as hm
from gesr_kernels._core.ops import call_op
from bench.hard_match import MAX_COUNT, make_inputs


def host_us(fn, calls=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def main(shape=(1024, 1024, 1, 16)):
    sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", torch.bfloat16)
    h, c = sets[0]["h"], sets[0]["c"]
    w = weight.detach().clone().requires_grad_()
    out = gesr_kernels.hard_match_embedding(h, hist_off, c, cand_off, w, MAX_COUNT, validate=False)
    grad = torch.randn_like(out)
    counts = gesr_kernels.hard_match_count(h, hist_off, c, cand_off, MAX_COUNT, validate=False)
    pieces = {
        "validation only": lambda: hm.validate_hard_match_args("x", h, hist_off, c, cand_off, MAX_COUNT, None,
                                                               None, False),
        "2x torch.empty": lambda: (torch.empty(1024, 16, device="cuda"), torch.empty(1024, 512, device="cuda")),
        "_launch_fwd (embedding)": lambda: hm._launch_fwd(h, hist_off, c, cand_off, MAX_COUNT, None, None, weight,
                                                          hm.EMBED_CONCAT),
        "hard_match_count": lambda: gesr_kernels.hard_match_count(h, hist_off, c, cand_off, MAX_COUNT,
                                                                  validate=False),
        "hard_match_embedding (no grad)": lambda: gesr_kernels.hard_match_embedding(
            h, hist_off, c, cand_off, weight, MAX_COUNT, validate=False),
        "hard_match_embedding (requires grad)": lambda: gesr_kernels.hard_match_embedding(
            h, hist_off, c, cand_off, w, MAX_COUNT, validate=False),
        "_launch_bwd": lambda: hm._launch_bwd(grad, counts, MAX_COUNT, hm.EMBED_CONCAT, w.shape[0], w.shape[1],
                                              w.dtype),
        "backward op (eager call_op)": lambda: call_op(hm._hard_match_embedding_bwd_op, grad, counts, MAX_COUNT,
                                                       "concat", w.shape[0], w.shape[1], w.dtype),
        "forward + autograd.grad": lambda: torch.autograd.grad(gesr_kernels.hard_match_embedding(
            h, hist_off, c, cand_off, w, MAX_COUNT, validate=False), w, grad),
        "forward + backward": lambda: gesr_kernels.hard_match_embedding(
            h, hist_off, c, cand_off, w, MAX_COUNT, validate=False).backward(grad),
    }
    print(f"host time per eager call at {shape}:")
    for name, fn in pieces.items():
        print(f"  {host_us(fn):8.1f} us  {name}")
    import triton.testing
    graph_us = lambda fn: triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3  # noqa: E731
    total_N, pairs = h.shape
    gpu = {
        "_launch_fwd (embedding)": pieces["_launch_fwd (embedding)"],
        "_launch_bwd": pieces["_launch_bwd"],
        "hash tables: zero fill": lambda: torch.zeros(pairs * total_N + shape[0] * pairs, dtype=torch.int32,
                                                      device="cuda"),
        "hash tables: fill + build": lambda: hm._build_hash_tables(h, hist_off, None),
    }
    for name, fn in gpu.items():
        print(f"  GPU (CUDA graph) {graph_us(fn):8.1f} us  {name}")


if __name__ == "__main__":
    main()
    main((64, 2048, 64, 16))

"""Sweep the target-aware attention tiles on the GPU: ``python -m bench.tune_target_attention [fwd|bwd] [shape ...]``.

Times the bf16 softmax forward, or forward + backward, (history + candidates, uniform batch) at the
benchmark shapes for a handful of (BLOCK_M, BLOCK_N, warps, stages) choices, each checked against the
default choice's results.
"""
import sys

import torch

import gesr_kernels.target_attention as ta
from bench.common import graph_timing

SHAPES = [(1, 2048, 2048, 4, 128), (1, 8192, 1024, 4, 128), (32, 1024, 64, 4, 64), (256, 512, 16, 2, 64)]
FWD_CONFIGS = [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
               (128, 128, 8, 2), (32, 64, 4, 3)]
BWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2),
               (64, 128, 8, 2), (32, 32, 4, 2), (128, 32, 8, 2)]


def sweep(shape, backward):
    users, hist, cand, heads, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda rows: torch.randn(rows, heads, d, device="cuda", dtype=torch.bfloat16, generator=g,  # noqa
                                    requires_grad=backward)
    offsets = lambda per: torch.arange(users + 1, device="cuda") * per  # noqa: E731
    args = (rand(users * hist), rand(users * hist), rand(users * hist), offsets(hist),
            rand(users * cand), rand(users * cand), rand(users * cand), offsets(cand))
    inputs = [a for a in args if a.requires_grad]
    cotangents = [torch.randn(users * hist, heads, d, device="cuda", dtype=torch.bfloat16),
                  torch.randn(users * cand, heads, d, device="cuda", dtype=torch.bfloat16)]

    def run():
        outs = ta.target_aware_attention(*args, validate=False, max_history_len=hist)
        if not backward:
            return outs
        return torch.autograd.grad(outs, inputs, cotangents)

    ta._FWD_BLOCKS_OVERRIDE = ta._BWD_BLOCKS_OVERRIDE = None
    expected = run()
    results = [(graph_timing(run).median, "default")]
    for m, n, warps, stages in BWD_CONFIGS if backward else FWD_CONFIGS:
        blocks = ta._Blocks(m, n, warps, stages)
        if backward:
            ta._BWD_BLOCKS_OVERRIDE = blocks
        else:
            ta._FWD_BLOCKS_OVERRIDE = blocks
        try:
            got = run()
        except Exception as error:  # e.g. out of shared memory
            print(f"  {m}x{n} w{warps} s{stages}: {type(error).__name__}")
            continue
        for a, b in zip(got, expected):
            if not torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2):
                raise RuntimeError(f"config {m}x{n} w{warps} s{stages} disagrees at {shape}")
        results.append((graph_timing(run, rep_ms=50).median,
                        f"BLOCK_M={m} BLOCK_N={n} warps={warps} stages={stages}"))
    ta._FWD_BLOCKS_OVERRIDE = ta._BWD_BLOCKS_OVERRIDE = None
    flops = 4 * heads * d * users * (hist * (hist + 1) / 2 + cand * (hist + 1)) * (3.5 if backward else 1)
    timing = "CUDA graph, " + ("fwd+bwd" if backward else "fwd")
    print(f"\n{shape} (ms, bf16 softmax, {timing})")
    for ms, name in sorted(results)[:8]:
        print(f"  {ms:8.4f}  {flops / ms / 1e9:6.1f} TFLOP/s  {name}")


if __name__ == "__main__":
    backward = sys.argv[1:2] == ["bwd"]
    for shape in [eval(a) for a in sys.argv[2:]] or SHAPES:
        sweep(shape, backward)

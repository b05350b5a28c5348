"""Sweep the target-aware attention forward's tiles on the GPU: ``python -m bench.tune_target_attention``.

Times the bf16 softmax forward (history + candidates, uniform batch) at a few shapes for a handful of
(BLOCK_M, BLOCK_N, warps, stages) choices, checked against the default choice's output.
"""
import torch
import triton.testing

import gesr_kernels.target_attention as ta

SHAPES = [(1, 2048, 2048, 4, 128), (1, 8192, 1024, 4, 128), (32, 1024, 64, 4, 64), (256, 512, 16, 2, 64)]


def sweep(shape):
    users, hist, cand, heads, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda rows: torch.randn(rows, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa
    offsets = lambda per: torch.arange(users + 1, device="cuda") * per  # noqa: E731
    args = (rand(users * hist), rand(users * hist), rand(users * hist), offsets(hist),
            rand(users * cand), rand(users * cand), rand(users * cand), offsets(cand))
    run = lambda: ta.target_aware_attention(*args, validate=False, max_history_len=hist)  # noqa: E731
    ta._FWD_BLOCKS_OVERRIDE = None
    expected = run()
    results = [(triton.testing.do_bench_cudagraph(run, return_mode="median"), "default")]
    configs = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3),
               (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3), (32, 64, 4, 3)]
    for m, n, warps, stages in configs:
        ta._FWD_BLOCKS_OVERRIDE = ta._Blocks(m, n, warps, stages)
        try:
            got = run()
        except Exception as error:  # e.g. out of shared memory
            print(f"  {m}x{n} w{warps} s{stages}: {type(error).__name__}")
            continue
        for a, b in zip(got, expected):
            if not torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2):
                raise RuntimeError(f"config {m}x{n} w{warps} s{stages} disagrees at {shape}")
        results.append((triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median"),
                        f"BLOCK_M={m} BLOCK_N={n} warps={warps} stages={stages}"))
    ta._FWD_BLOCKS_OVERRIDE = None
    print(f"\n{shape} (CUDA-graph ms, bf16 softmax forward)")
    flops = 4 * heads * d * users * (hist * (hist + 1) / 2 + cand * (hist + 1))
    for ms, name in sorted(results)[:8]:
        print(f"  {ms:8.4f}  {flops / ms / 1e9:6.1f} TFLOP/s  {name}")


if __name__ == "__main__":
    for shape in SHAPES:
        sweep(shape)

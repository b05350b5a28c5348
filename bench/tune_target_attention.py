"""Sweep the target-aware attention tiles on the GPU:
``python -m bench.tune_target_attention [fwd|bwd|split|splitfull][-silu] [shape ...]``.

Times the bf16 softmax forward, or forward + backward, (history + candidates, uniform batch; ``split``:
cached mode, candidates only) at the benchmark shapes for a handful of choices, each checked against the
default choice's results: forward (BLOCK_M, BLOCK_N, warps, stages); backward (keys per dK/dV program, its
query step, queries per dQ program, its key step, warps, stages), each unsplit and with split dK/dV programs
(``_split_dkdv``) cut between history queries and candidates or in halves (``_split_halves``); split (cached
mode) and splitfull
(history + candidates): (candidate key runs, history key runs) of the forward. ``-silu``: SiLU instead.
"""
import sys

import torch

import gesr_kernels.target_attention as ta
from bench.common import graph_timing

SHAPES = [(1, 2048, 2048, 4, 128), (1, 8192, 1024, 4, 128), (32, 1024, 64, 4, 64), (256, 512, 16, 2, 64)]
FWD_CONFIGS = [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
               (128, 128, 8, 2), (32, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 4),
               (64, 16, 4, 3), (64, 32, 2, 3)]
BWD_CONFIGS = [(32, 64, 64, 32, 4, 2), (32, 64, 64, 32, 4, 3), (32, 64, 64, 32, 4, 4), (32, 64, 64, 64, 4, 3),
               (32, 128, 64, 32, 4, 3), (32, 32, 64, 32, 4, 3), (64, 32, 64, 32, 4, 3), (64, 64, 64, 64, 4, 3),
               (64, 64, 64, 64, 4, 4), (32, 64, 64, 16, 4, 3), (128, 32, 128, 32, 8, 3), (64, 32, 64, 64, 4, 3)]
SPLIT_CONFIGS = [(1, 1), (2, 1), (4, 1), (2, 2), (8, 1)]


def sweep(shape, backward, split=False, cached=False, activation="softmax"):
    users, hist, cand, heads, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda rows: torch.randn(rows, heads, d, device="cuda", dtype=torch.bfloat16, generator=g,  # noqa
                                    requires_grad=backward)
    offsets = lambda per: torch.arange(users + 1, device="cuda") * per  # noqa: E731
    args = (None if cached else rand(users * hist), rand(users * hist), rand(users * hist), offsets(hist),
            rand(users * cand), rand(users * cand), rand(users * cand), offsets(cand))
    inputs = [a for a in args if a is not None and a.requires_grad]
    cotangents = [torch.randn(users * hist, heads, d, device="cuda", dtype=torch.bfloat16),
                  torch.randn(users * cand, heads, d, device="cuda", dtype=torch.bfloat16)]

    def run():
        outs = ta.target_aware_attention(*args, validate=False, max_history_len=hist, activation=activation)
        if not backward:
            return outs
        return torch.autograd.grad(outs, inputs, cotangents)

    def reset():
        ta._FWD_BLOCKS_OVERRIDE = ta._BWD_BLOCKS_OVERRIDE = ta._KEY_SPLITS_OVERRIDE = None
        ta._DKDV_SPLIT_OVERRIDE = ta._SPLIT_HALVES_OVERRIDE = None

    reset()
    expected = [o for o in run() if o is not None]
    results = [(graph_timing(run).median, "default")]
    # (tiles, split dK/dV programs, their cut in halves)
    bwd_configs = [(c, split, halves) for c in BWD_CONFIGS for split, halves in ((False, False), (True, False),
                                                                                (True, True))]
    for config in SPLIT_CONFIGS if split else bwd_configs if backward else FWD_CONFIGS:
        if split:
            ta._KEY_SPLITS_OVERRIDE = config
            name = f"candidate splits={config[0]} history splits={config[1]}"
        elif backward:
            config, ta._DKDV_SPLIT_OVERRIDE, ta._SPLIT_HALVES_OVERRIDE = config
            ta._BWD_BLOCKS_OVERRIDE = ta._BwdBlocks(*config)
            name = "dKdV {}x{}, dQ {}x{}, warps={} stages={}".format(*config) + (
                ", split dK/dV" + (" in halves" if ta._SPLIT_HALVES_OVERRIDE else "") if ta._DKDV_SPLIT_OVERRIDE
                else "")
        else:
            ta._FWD_BLOCKS_OVERRIDE = ta._Blocks(*config)
            name = "BLOCK_M={} BLOCK_N={} warps={} stages={}".format(*config)
        try:
            got = [o for o in run() if o is not None]
        except Exception as error:  # e.g. out of shared memory
            print(f"  {name}: {type(error).__name__}")
            continue
        for a, b in zip(got, expected):
            if not torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2):
                raise RuntimeError(f"config {name} disagrees at {shape}")
        results.append((graph_timing(run, rep_ms=50).median, name))
    reset()
    history_flops = 0 if cached else hist * (hist + 1) / 2
    flops = 4 * heads * d * users * (history_flops + cand * (hist + 1)) * (3.5 if backward else 1)
    timing = "CUDA graph, " + ("fwd+bwd" if backward else "cached fwd" if cached else "fwd")
    print(f"\n{shape} (ms, bf16 {activation}, {timing})")
    for ms, name in sorted(results)[:8]:
        print(f"  {ms:8.4f}  {flops / ms / 1e9:6.1f} TFLOP/s  {name}")


if __name__ == "__main__":
    kind, _, activation = (sys.argv[1] if len(sys.argv) > 1 else "fwd").partition("-")
    for shape in [eval(a) for a in sys.argv[2:]] or SHAPES:
        sweep(shape, kind == "bwd", split=kind.startswith("split"), cached=kind == "split",
              activation=activation or "softmax")

"""Speed of the module-level targets (issue #4): ``python -m bench.integration [--json PATH]`` (CUDA only).

1. Serving: a 3-layer ``TargetAwareSelfAttention`` (embed 256, 4 heads, qk/v dim 64, SiLU with a constant
   normaliser), one user, N = 8192 history rows, n = 1024 candidates, bf16, inference (no grad). Timed:
   the full forward on both backends, ``prefill``, and ``score`` on the prefilled cache. Each row gives the
   eager time (``triton.testing.do_bench``: includes host launch cost when the host is the bottleneck) and,
   for the Triton backend, the CUDA-graph time (GPU time alone; the reference backend syncs on the host
   and cannot be captured).
2. Training: one step (forward, backward, Adam) of the example ``GESRModel`` (examples/gesr_example.py) at
   B = 256 users, N = 512 history rows and n = 16 candidates each, fp32 parameters, both backends, eager
   and ``torch.compile`` (inductor; ``fullgraph=True`` for Triton, the reference backend graph-breaks on
   its per-user loop).

Every ratio compares figures of the same run. ``--skip-compiled-reference`` leaves out the slowest row
(compiling the reference backend's per-user loop).
"""
import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

from .common import Timing, device_info, format_rows, gpu_timing, graph_timing

STACK = dict(num_layers=3, embed_dim=256, num_heads=4, qk_dim=64, v_dim=64, history=8192, candidates=1024)
TRAIN = dict(users=256, history=512, candidates=16)


def _row(what, backend, mode, timing: Timing, **extra) -> dict:
    row = dict(what=what, backend=backend, mode=mode, ms=timing.median, p20=timing.p20, p80=timing.p80, **extra)
    print(f"{what:>14} {backend:>9} {mode:>8}: {timing.median:9.4f} ms (p20 {timing.p20:.4f}, p80 {timing.p80:.4f})",
          flush=True)  # as measured: a run cut short still reports what it had
    return row


def serving_rows(progress=print) -> list:
    from gesr_kernels.nn import TargetAwareSelfAttention
    s = STACK
    torch.manual_seed(0)
    model = TargetAwareSelfAttention(s["num_layers"], s["embed_dim"], s["num_heads"], s["qk_dim"], s["v_dim"],
                                     silu_normalizer=float(s["history"]), backend="triton")
    model = model.cuda().to(torch.bfloat16).eval()
    hx = torch.randn(s["history"], s["embed_dim"], device="cuda", dtype=torch.bfloat16)
    cx = torch.randn(s["candidates"], s["embed_dim"], device="cuda", dtype=torch.bfloat16)
    hoff = torch.tensor([0, s["history"]], device="cuda")
    coff = torch.tensor([0, s["candidates"]], device="cuda")
    rows = []
    with torch.no_grad():
        _, cache = model.prefill(hx, hoff)
        full = model(hx, hoff, cx, coff)[1]
        scored = model.score(cx, coff, cache)
        score_error = (scored.float() - full.float()).abs().max().item()
        calls = {
            "forward": lambda: model(hx, hoff, cx, coff, validate=False),
            "prefill": lambda: model.prefill(hx, hoff, validate=False),
            "score": lambda: model.score(cx, coff, cache, validate=False),
        }
        for what, fn in calls.items():
            progress(f"serving: {what} (triton)")
            rows.append(_row(what, "triton", "eager", gpu_timing(fn)))
            rows.append(_row(what, "triton", "graph", graph_timing(fn)))
        model.backend = "reference"
        reference_full = model(hx, hoff, cx, coff)[1]
        reference_error = (reference_full.float() - full.float()).abs().max().item()
        progress("serving: forward (reference)")
        rows.append(_row("forward", "reference", "eager", gpu_timing(calls["forward"])))
    for r in rows:
        r["shape"] = "3 layers, embed 256, 4x64, N 8192, n 1024, bf16"
    rows[0]["max_abs_error_score_vs_forward"] = score_error
    rows[0]["max_abs_error_vs_reference"] = reference_error
    return rows


def _load_example():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "examples"))
    import gesr_example
    return gesr_example


def training_rows(skip_compiled_reference: bool, progress=print, modes=("eager", "compiled")) -> list:
    example = _load_example()
    t = TRAIN
    torch.manual_seed(0)
    data = example.SyntheticGESR(history_len=(t["history"], t["history"]), candidates_per_user=t["candidates"])
    batch = example.to_device(data.batch(t["users"], torch.Generator().manual_seed(1)), "cuda")
    base = example.GESRModel(data.num_items, data.num_categories, max_history=t["history"],
                             max_candidates=t["candidates"]).cuda()
    rows = []
    for mode in modes:
        for backend in ("triton", "reference"):
            if mode == "compiled" and backend == "reference" and skip_compiled_reference:
                continue
            progress(f"training step: {backend} {mode}")
            model = example.gesr_kernels.set_backend(copy.deepcopy(base), backend)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            runner = model
            if mode == "compiled":
                runner = torch.compile(model, fullgraph=backend == "triton")

            def step():
                objective, _ = example.loss_fn(runner, batch)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()

            started = time.perf_counter()
            for _ in range(3):  # compilation (Triton and inductor) and allocator warm-up
                step()
            torch.cuda.synchronize()
            warmup_s = time.perf_counter() - started
            progress(f"training step: {backend} {mode}: first 3 steps (compilation included) {warmup_s:.1f} s")
            rows.append(_row("training step", backend, mode, gpu_timing(step, warmup_ms=200, rep_ms=2000),
                             shape=f"B {t['users']}, N {t['history']}, n {t['candidates']}, fp32",
                             first_three_steps_s=warmup_s))
    return rows


def _speedups(rows) -> dict:
    def ms(what, backend, mode):
        return next((r["ms"] for r in rows if (r["what"], r["backend"], r["mode"]) == (what, backend, mode)), None)
    out = {}
    for mode in ("eager", "graph"):
        f, s = ms("forward", "triton", mode), ms("score", "triton", mode)
        if f and s:
            out[f"score vs full forward ({mode}), target >= 3"] = f / s
    ref = ms("forward", "reference", "eager")
    for mode in ("eager", "graph"):
        f = ms("forward", "triton", mode)
        if ref and f:
            out[f"full forward triton ({mode}) vs reference (eager), target >= 10"] = ref / f
    for mode in ("eager", "compiled"):
        tri, ref = ms("training step", "triton", mode), ms("training step", "reference", mode)
        if tri and ref:
            out[f"training step triton vs reference ({mode}), target >= 3"] = ref / tri
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.integration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    parser.add_argument("--only", choices=["serving", "training", "training-compiled"],
                        help="run one of the two parts (training-compiled: the compiled training rows only)")
    parser.add_argument("--skip-compiled-reference", action="store_true",
                        help="leave out torch.compile of the reference backend (slow to compile)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m bench.integration: needs a CUDA device (module speed is a GPU figure); nothing run.")
        return 0
    info = device_info()
    print("gesr_kernels integration benchmark: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    say = lambda what: print(f"... {what}", file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    if args.only in (None, "serving"):
        rows += serving_rows(say)
    if args.only in (None, "training"):
        rows += training_rows(args.skip_compiled_reference, say)
    if args.only == "training-compiled":
        rows += training_rows(args.skip_compiled_reference, say, modes=("compiled",))
    print(format_rows(rows, ["what", "backend", "mode", "ms", "p20", "p80", "shape"]))
    ratios = _speedups(rows)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        meta = dict(info, utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    command="python -m bench.integration " + " ".join(sys.argv[1:] if argv is None else argv))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, ratios=ratios), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

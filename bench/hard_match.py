"""Hard-match embedding benchmark: the fused kernel against the PyTorch compositions a user would write.

Providers (each ends in ``F.embedding`` of row ``p*(M+1) + count``, mode "concat"):
  gesr       gesr_kernels.hard_match_embedding (validate=False: no host sync in the timed loop)
  broadcast  (c[:, :, None, :] == h[:, None, :, :]).sum(2): materialises the n×N×P comparison
  sort       sort each user's history per pair, count = searchsorted(right) - searchsorted(left)
Shapes are (B users, N history events per user, n candidates per user, P pairs); ids are int64 drawn from
a vocabulary of 4096, M = 16, D = 32, bf16 table (fp32 on the CPU run). Batches are uniform (the two
compositions need one N and one n for all users), so HMA has no rows in the ``jagged`` suite.

Suites (``python -m bench --suite``): ``serving`` = the shapes with many candidates per user (n >= 64),
forward only, eager and CUDA-graph; ``training`` = every shape, forward+backward (weight gradient);
``all`` = every shape and pass. ``--quick`` keeps the first two shapes of the suite.

``run(quick, suite, peaks, progress) -> (rows, notes)``: one dict per shape x pass x provider with the
median ms and p20/p80, ``speedup`` (see ``bench.common.add_speedups``), GB/s over the counted minimum
bytes and its percentage of the copy bandwidth measured in the same run.
"""
import torch
import torch.nn.functional as F

from .common import (Progress, add_speedups, cpu_timing, format_rows, gpu_timing, graph_timing,
                     measured_bandwidth_gbs, peak_memory_mb)

SHAPES = [(1, 2048, 2048, 16), (1, 8192, 4096, 16), (1024, 1024, 1, 16), (64, 2048, 64, 16)]
CPU_SHAPES = [(1, 256, 64, 4), (16, 64, 4, 4)]
VOCAB, MAX_COUNT, EMB_DIM = 4096, 16, 32
PASSES = ("fwd", "fwd (graph)", "fwd+bwd", "fwd+bwd (graph)")
SUITES = {"serving": (lambda shape: shape[2] >= 64, ("fwd", "fwd (graph)")),
          "training": (lambda shape: True, ("fwd+bwd", "fwd+bwd (graph)")),
          "jagged": (lambda shape: False, ()),
          "all": (lambda shape: True, PASSES)}


def _pair_rows(counts: torch.Tensor, num_pairs: int, max_count: int) -> torch.Tensor:
    return counts + torch.arange(num_pairs, device=counts.device) * (max_count + 1)


def broadcast_composition(h, c, weight, users, hist, cand, pairs, max_count):
    counts = (c.view(users, cand, 1, pairs) == h.view(users, 1, hist, pairs)).sum(2).clamp_(max=max_count)
    rows = _pair_rows(counts.view(users * cand, pairs), pairs, max_count)
    return F.embedding(rows, weight).view(users * cand, -1)


def sort_composition(h, c, weight, users, hist, cand, pairs, max_count):
    sorted_hist = h.view(users, hist, pairs).transpose(1, 2).contiguous().sort(dim=-1).values
    queries = c.view(users, cand, pairs).transpose(1, 2).contiguous()
    counts = (torch.searchsorted(sorted_hist, queries, right=True)
              - torch.searchsorted(sorted_hist, queries)).clamp_(max=max_count)
    rows = _pair_rows(counts.transpose(1, 2).reshape(users * cand, pairs), pairs, max_count)
    return F.embedding(rows, weight).view(users * cand, -1)


def make_inputs(users, hist, cand, pairs, device, dtype, copies=1):
    offsets = lambda per: torch.arange(users + 1, device=device, dtype=torch.int64) * per  # noqa: E731
    sets = [dict(h=torch.randint(0, VOCAB, (users * hist, pairs), device=device),
                 c=torch.randint(0, VOCAB, (users * cand, pairs), device=device))
            for _ in range(copies)]
    weight = torch.randn(pairs * (MAX_COUNT + 1), EMB_DIM, device=device, dtype=dtype)
    return sets, offsets(hist), offsets(cand), weight


def providers(hist_off, cand_off, shape):
    import gesr_kernels
    users, hist, cand, pairs = shape
    return {
        "gesr": lambda h, c, w: gesr_kernels.hard_match_embedding(h, hist_off, c, cand_off, w, MAX_COUNT,
                                                                  validate=False),
        "broadcast": lambda h, c, w: broadcast_composition(h, c, w, users, hist, cand, pairs, MAX_COUNT),
        "sort": lambda h, c, w: sort_composition(h, c, w, users, hist, cand, pairs, MAX_COUNT),
    }


def min_bytes(shape, dtype, grad: bool = False) -> int:
    """Ids read once, output written once (the table and offsets are negligible); the backward adds the
    output gradient read once (the weight gradient is table-sized, negligible)."""
    users, hist, cand, pairs = shape
    out = torch.finfo(dtype).bits // 8 * users * cand * pairs * EMB_DIM
    return 8 * pairs * users * (hist + cand) + out * (2 if grad else 1)


def suite_plan(suite: str, quick: bool, shapes=None):
    """(shapes, passes) of a suite."""
    keep, passes = SUITES[suite]
    chosen = [s for s in (SHAPES if shapes is None else shapes) if keep(s)]
    return (chosen[:2] if quick else chosen), passes


def _row(shape, pass_, provider, timing, dtype, **extra):
    row = dict(op="hard_match_embedding", shape=str(shape), pass_=pass_, provider=provider, ms=timing.median,
               p20=timing.p20, p80=timing.p80, speedup=None, dtype=str(dtype).replace("torch.", ""), note="")
    row.update(extra)
    return row


def run_gpu(quick: bool = False, suite: str = "all", peaks: dict = None, progress: bool = False):
    """GPU rows of a suite; returns (markdown table, notes, rows)."""
    dtype = torch.bfloat16
    bandwidth = (peaks or {}).get("copy_gbs") or measured_bandwidth_gbs()
    shapes, passes = suite_plan(suite, quick)
    bar = Progress(len(shapes) * 3, "hma", progress)
    rows = []
    for shape in shapes:
        users, hist, cand, pairs = shape
        copies = 1 if 8 * pairs * users * hist > (64 << 20) else 4  # rotate inputs that would sit in L2
        sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", dtype, copies)
        funcs = providers(hist_off, cand_off, shape)
        expected = funcs["broadcast"](sets[0]["h"], sets[0]["c"], weight)
        grad_out = torch.randn_like(expected)
        for name, fn in funcs.items():
            bar.step(f"{shape} {name}")
            got = fn(sets[0]["h"], sets[0]["c"], weight)
            if not torch.equal(got, expected):
                raise RuntimeError(f"{name} disagrees with the broadcast composition at {shape}")
            step = {"i": 0}

            def forward(fn=fn):
                s = sets[step["i"] % copies]
                step["i"] += 1
                return fn(s["h"], s["c"], weight)

            w_train = weight.detach().clone().requires_grad_()

            def train(fn=fn):
                s = sets[step["i"] % copies]
                step["i"] += 1
                fn(s["h"], s["c"], w_train).backward(grad_out)

            timers = {"fwd": lambda: gpu_timing(forward), "fwd (graph)": lambda: graph_timing(forward),
                      "fwd+bwd": lambda: gpu_timing(train), "fwd+bwd (graph)": lambda: graph_timing(train)}
            mem = peak_memory_mb(forward) if "fwd" in passes else None
            for pass_ in passes:
                timing = timers[pass_]()
                gbs = min_bytes(shape, dtype, pass_.startswith("fwd+bwd")) / timing.median / 1e6
                rows.append(_row(shape, pass_, name, timing, dtype, peak_mb=mem if pass_ == "fwd" else None,
                                 gbs=gbs, pct_peak=100 * gbs / bandwidth))
    bar.close()
    order = {str(shape): i for i, shape in enumerate(shapes)}
    rows.sort(key=lambda r: (order[r["shape"]], PASSES.index(r["pass_"])))  # stable: providers keep order
    add_speedups(rows, ("shape", "pass_"), "gesr")
    notes = (f"speedup: on an alternative's row its median / gesr's (> 1: gesr is faster); on gesr's row the "
             f"faster composition's median / gesr's. bf16 table, int64 ids from a vocabulary of {VOCAB}, "
             f"M={MAX_COUNT}, D={EMB_DIM}, mode=concat. fwd / fwd+bwd: CUDA-event times of whole eager calls, "
             f"host overhead included; (graph): CUDA-graph replay of the captured call(s) (GPU time only). "
             f"ms = median, p20/p80 = 20th/80th percentiles. GB/s counts ids read and output written once "
             f"(+ the output gradient read for fwd+bwd); % peak is against the device-to-device copy "
             f"bandwidth measured in this run, {bandwidth:.0f} GB/s (read+write).")
    return format_table(rows), notes, rows


COLUMNS = ["shape", "pass_", "provider", "ms", "p20", "p80", "speedup", "gbs", "pct_peak", "peak_mb", "note"]
HEADERS = ["(B, N, n, P)", "pass", "provider", "median ms", "p20 ms", "p80 ms", "speedup", "GB/s",
           "% of copy BW", "peak MB", "note"]


def format_table(rows) -> str:
    return format_rows(rows, COLUMNS, HEADERS)


def cpu_rows(quick: bool = False, progress: bool = False):
    """Small shapes through the Triton interpreter (forward): checked against the references, timed on
    the CPU. The same check runs for every suite but ``jagged``."""
    import gesr_kernels
    import reference
    rows = []
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    bar = Progress(len(shapes), "hma (CPU)", progress)
    for shape in shapes:
        bar.step(str(shape))
        users, hist, cand, pairs = shape
        sets, hist_off, cand_off, weight = make_inputs(*shape, "cpu", torch.float32)
        h, c = sets[0]["h"], sets[0]["c"]
        kernel = lambda: gesr_kernels.hard_match_embedding(h, hist_off, c, cand_off, weight, MAX_COUNT)  # noqa
        twin = lambda: reference.hard_match_embedding(h, hist_off, c, cand_off, weight, MAX_COUNT)  # noqa
        sort = lambda: sort_composition(h, c, weight, *shape, MAX_COUNT)  # noqa: E731
        expected = twin()
        for name, fn in (("gesr (interpreter)", kernel), ("reference", twin), ("sort", sort)):
            if not torch.equal(fn(), expected):
                raise RuntimeError(f"{name} disagrees with the reference at {shape}")
            rows.append(_row(shape, "fwd", name, cpu_timing(fn), torch.float32, note="equal to reference"))
    bar.close()
    add_speedups(rows, ("shape", "pass_"), "gesr (interpreter)")
    return rows


CPU_COLUMNS = ["shape", "pass_", "provider", "ms", "p20", "p80", "note"]


def format_cpu_table(rows) -> str:
    return format_rows(rows, CPU_COLUMNS, ["(B, N, n, P)", "pass", "provider", "CPU ms", "p20", "p80", "check"])


def run_cpu(quick: bool = False, progress: bool = False) -> str:
    """The CPU check as a markdown table (CPU wall ms)."""
    return format_cpu_table(cpu_rows(quick, progress))


def run(quick: bool = False, suite: str = "all", peaks: dict = None, progress: bool = False):
    """Rows and notes of a suite: GPU timings on CUDA, the interpreter check otherwise."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    if torch.cuda.is_available():
        _, notes, rows = run_gpu(quick, suite, peaks, progress)
        return rows, notes
    if suite == "jagged":
        return [], "no HMA rows in the jagged suite (the compositions need uniform batches)"
    return cpu_rows(quick, progress), ("CPU run: kernels through the Triton interpreter at small shapes, "
                                       "checked against the references; CPU ms say nothing about GPU speed.")


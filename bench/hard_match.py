"""Hard-match embedding benchmark: the fused kernel against the PyTorch compositions a user would write.

Providers (each ends in ``F.embedding`` of row ``p*(M+1) + count``, mode "concat"):
  gesr       gesr_kernels.hard_match_embedding (validate=False: no host sync in the timed loop)
  broadcast  (c[:, :, None, :] == h[:, None, :, :]).sum(2): materialises the n×N×P comparison
  sort       sort each user's history per pair, count = searchsorted(right) - searchsorted(left)
Shapes are (B users, N history events per user, n candidates per user, P pairs); ids are int64 drawn from
a vocabulary of 4096, M = 16, D = 32, bf16 table (fp32 on the CPU run).
"""
import torch
import torch.nn.functional as F

from .common import (cpu_time_ms, format_table, gpu_time_ms, graph_time_ms, measured_bandwidth_gbs,
                     peak_memory_mb)

SHAPES = [(1, 2048, 2048, 16), (1, 8192, 4096, 16), (1024, 1024, 1, 16), (64, 2048, 64, 16)]
CPU_SHAPES = [(1, 256, 64, 4), (16, 64, 4, 4)]
VOCAB, MAX_COUNT, EMB_DIM = 4096, 16, 32


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


def min_bytes(shape, dtype) -> int:
    """Ids read once, output written once (the table and offsets are negligible)."""
    users, hist, cand, pairs = shape
    return 8 * pairs * users * (hist + cand) + torch.finfo(dtype).bits // 8 * users * cand * pairs * EMB_DIM


def run_gpu(quick: bool = False):
    dtype = torch.bfloat16
    bandwidth = measured_bandwidth_gbs()
    rows = []
    for shape in SHAPES[:2] if quick else SHAPES:
        users, hist, cand, pairs = shape
        copies = 1 if 8 * pairs * users * hist > (64 << 20) else 4  # rotate inputs that would sit in L2
        sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", dtype, copies)
        funcs = providers(hist_off, cand_off, shape)
        expected = funcs["broadcast"](sets[0]["h"], sets[0]["c"], weight)
        grad_out = torch.randn_like(expected)
        results = {}
        for name, fn in funcs.items():
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

            results[name] = dict(fwd=gpu_time_ms(forward), graph=graph_time_ms(forward),
                                 train=gpu_time_ms(train), mem=peak_memory_mb(forward))
        best = {key: min(v[key] for k, v in results.items() if k != "gesr") for key in ("fwd", "graph", "train")}
        for name, r in results.items():
            gbs = min_bytes(shape, dtype) / r["graph"] / 1e6
            rows.append([str(shape), name, r["fwd"], best["fwd"] / r["fwd"], r["graph"], best["graph"] / r["graph"],
                         r["train"], best["train"] / r["train"], r["mem"], gbs, 100 * gbs / bandwidth])
    headers = ["(B, N, n, P)", "provider", "fwd ms (eager)", "speedup*", "fwd ms (CUDA graph)", "speedup*",
               "fwd+bwd ms (eager)", "speedup*", "peak MB (fwd)", "GB/s (graph)", "% of copy BW"]
    table = format_table(headers, rows)
    notes = (f"* against the faster PyTorch composition in the same run. bf16 table, int64 ids from a "
             f"vocabulary of {VOCAB}, M={MAX_COUNT}, D={EMB_DIM}, mode=concat. Eager times are CUDA-event "
             f"medians of whole calls, host overhead included; CUDA-graph times replay the captured call "
             f"(GPU time only). Measured copy bandwidth {bandwidth:.0f} GB/s (read+write); GB/s counts ids "
             f"read and output written once, over the CUDA-graph time.")
    return table, notes, rows


def run_cpu():
    """Small shapes through the Triton interpreter: checked against the references, timed on the CPU."""
    import gesr_kernels
    import reference
    rows = []
    for shape in CPU_SHAPES:
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
            rows.append([str(shape), name, cpu_time_ms(fn), "equal to reference"])
    return format_table(["(B, N, n, P)", "provider", "CPU ms", "check"], rows)

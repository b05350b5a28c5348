"""Benchmark target_aware_attention against what a user would pick instead.

``run(quick, suite, peaks, progress) -> list[dict]`` (one row per shape x layout x activation x mode x
pass x provider); importable and runnable without CUDA. On CUDA it times bf16 at the issue's shapes with
``triton.testing.do_bench`` (median and p20/p80; warm-up, compilation and the first correctness run come
first; do_bench flushes L2 before every run, so inputs do not sit in cache).

Suites (``plan``): ``serving`` = uniform batches, forward only, full and cached mode; ``training`` =
uniform batches, forward+backward; ``jagged`` = the jagged layouts (history lengths uniform in [N/4, N],
candidates in [1, n]), every pass and mode; ``all`` = everything.

Without CUDA it runs tiny shapes through the Triton interpreter (that needs TRITON_INTERPRET=1 before
gesr_kernels is first imported; this module sets it when it is the first to import them), checks every
provider against the twin, and records CPU wall times, which say nothing about GPU speed.

Providers (every one computes the same rule; padded layouts are built outside the timed region):
  ours          gesr_kernels.target_aware_attention on the jagged tensors.
  flex          FlexAttention (compiled) on the padded batch [history ; candidates] per user, block mask
                expressing the rule. Softmax only: flex normalises scores by a softmax, and score_mod cannot
                undo it, so there is no exact SiLU formulation; its SiLU rows are skipped.
  flex_packed   FlexAttention on the concatenated (packed) sequence of all users, document-style mask
                (jagged layouts only; for uniform ones it equals ``flex``).
  sdpa_dense    softmax: SDPA with a dense boolean mask (B, 1, L, L) on the padded batch.
                silu: the same dense formulation in PyTorch ops (scores, silu, mask, matmul).
  sdpa_lse      softmax, forward only: SDPA flash causal on history; candidates against history with
                flash (uniform) or the memory-efficient kernel with a key-padding bias (jagged, flash takes
                no mask), merged with the own-key term through the log-sum-exp. No fwd+bwd row: ATen does
                not differentiate the log-sum-exp output, so its gradients would be wrong.
  naive         per-candidate expansion [history ; own key] (n.N.d memory, included in the timing), SDPA
                per candidate (+ SDPA causal on history); small shapes only.
Columns: ms (median of eager calls, host launch cost included) with p20/p80; graph_ms: median of
CUDA-graph replays (GPU time alone), with graph_speedup and graph_tflops from it; tflops = useful FLOPs /
time with useful forward FLOPs
4.H.d.sum_b(N_b(N_b+1)/2 + n_b(N_b+1)) (fwd+bwd counts 3.5x that, the usual 1 + 2.5); speedup > 1 means
ours is faster: on an ``ours`` row the fastest alternative's ms / ours, on an alternative row its ms /
ours (``speedup_vs`` on ours' row in the JSON holds every ratio); max_abs_diff is against ours
(fp32 upcast); pct_peak = graph_tflops as a percentage of the dense bf16 matmul rate measured in the
same run (``peaks["matmul_tflops"]``, CUDA only). Cached mode (candidates only, history K/V given; its
FLOPs count the candidate rows only) compares ours with sdpa_lse.
"""
import math
import os
import warnings
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import triton  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gesr_kernels._core.env import interpreting  # noqa: E402
from gesr_kernels.target_attention import target_aware_attention  # noqa: E402

from .common import (Progress, Timing, add_speedups, cpu_timing, format_rows, gpu_timing,  # noqa: E402
                     graph_timing)

SHAPES = [(1, 2048, 2048, 4, 128), (1, 8192, 1024, 4, 128), (32, 1024, 64, 4, 64), (256, 512, 16, 2, 64)]
QUICK_SHAPES = [(1, 2048, 2048, 4, 128), (32, 1024, 64, 4, 64)]
CPU_SHAPES = [(2, 40, 8, 2, 32), (3, 70, 12, 1, 16)]
SUITES = ("serving", "training", "jagged", "all")
NAIVE_MAX_BYTES = 3 << 30  # expanded candidate K+V beyond this: skip the naive provider


# ------------------------------------------------------------------------------------------------
# Problems: jagged tensors plus the padded / packed layouts the alternatives need
# ------------------------------------------------------------------------------------------------
class Problem(NamedTuple):
    B: int
    N: int
    n: int
    H: int
    d: int
    layout: str
    hist_lens: List[int]
    cand_lens: List[int]
    t: Dict[str, torch.Tensor]  # jagged hq hk hv cq ck cv (leaves) and hoff coff
    scale: float
    normalizer: float


def _offsets(lengths, device):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out.to(device)


def problem_generator(shape, layout) -> torch.Generator:
    """A generator seeded from the shape and layout alone, so a problem's lengths and values are the same
    whichever suite (or subset of SHAPES) draws it. A jagged problem with B = 1 is one draw of its lengths,
    and its timings mean little next to another suite's draw."""
    return torch.Generator().manual_seed(zlib.crc32(repr((tuple(shape), layout)).encode()))


def make_problem(shape, layout, device, dtype, generator: Optional[torch.Generator] = None) -> Problem:
    """Jagged tensors and offsets for ``shape`` = (B, N, n, H, d); ``generator`` defaults to the shape's own
    (``problem_generator``)."""
    B, N, n, H, d = shape
    generator = generator or problem_generator(shape, layout)
    if layout == "uniform":
        hist, cand = [N] * B, [n] * B
    else:  # history lengths uniform in [N/4, N], candidates in [1, n]
        hist = torch.randint(N // 4, N + 1, (B,), generator=generator).tolist()
        cand = torch.randint(1, n + 1, (B,), generator=generator).tolist()

    def rand(rows):
        return torch.randn(rows, H, d, generator=generator).to(device=device, dtype=dtype)

    t = {"hq": rand(sum(hist)), "hk": rand(sum(hist)), "hv": rand(sum(hist)),
         "cq": rand(sum(cand)), "ck": rand(sum(cand)), "cv": rand(sum(cand)),
         "hoff": _offsets(hist, device), "coff": _offsets(cand, device)}
    return Problem(B, N, n, H, d, layout, hist, cand, t, 1.0 / math.sqrt(d), float(N))


def useful_flops(p: Problem, cached: bool = False) -> float:
    """Useful forward FLOPs; cached mode computes the candidate rows only."""
    history = 0 if cached else 1
    return 4.0 * p.H * p.d * sum(history * N * (N + 1) / 2 + n * (N + 1) for N, n in zip(p.hist_lens, p.cand_lens))


class _Pad(NamedTuple):
    """Gather maps between jagged rows and a padded (B, L) layout."""
    index: torch.Tensor  # (B, L) jagged row of each slot (clamped for padding)
    valid: torch.Tensor  # (B, L) bool
    flat: torch.Tensor   # positions b * L + i of the valid slots, in jagged order


def _pad_map(lengths, width, device) -> _Pad:
    lens = torch.tensor(lengths, device=device)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(width, device=device)
    valid = pos[None, :] < lens[:, None]
    index = (starts[:, None] + pos[None, :]).clamp(max=max(sum(lengths) - 1, 0))
    flat = torch.nonzero(valid.flatten()).flatten()
    return _Pad(index, valid, flat)


def _to_padded(x, pad: _Pad):
    """(rows, H, d) jagged -> (B, H, L, d) padded copy (zeros in padding)."""
    out = x.detach()[pad.index] * pad.valid[..., None, None]
    return out.permute(0, 2, 1, 3).contiguous()


def _from_padded(y, pad: _Pad):
    """(B, H, L, d) -> (rows, H, d) jagged."""
    B, H, L, d = y.shape
    return y.permute(0, 2, 1, 3).reshape(B * L, H, d)[pad.flat]


# ------------------------------------------------------------------------------------------------
# Providers: build(problem, activation, cached) -> Runner or None (unsupported)
# ------------------------------------------------------------------------------------------------
class Runner(NamedTuple):
    forward: Callable[[], tuple]                 # native outputs (tensors)
    to_jagged: Callable[[tuple], tuple]          # native outputs -> (history_out or None, candidate_out)
    leaves: List[torch.Tensor]                   # inputs that take gradients
    differentiable: bool = True


def _leaves(p: Problem, cached: bool, requires_grad: bool):
    names = ["hk", "hv", "cq", "ck", "cv"] if cached else ["hq", "hk", "hv", "cq", "ck", "cv"]
    return {k: p.t[k].detach().requires_grad_(requires_grad) for k in names}


def build_ours(p: Problem, activation: str, cached: bool, grad: bool) -> Runner:
    x = _leaves(p, cached, grad)

    def forward():
        return target_aware_attention(
            x.get("hq"), x["hk"], x["hv"], p.t["hoff"], x["cq"], x["ck"], x["cv"], p.t["coff"],
            activation=activation, scale=p.scale, silu_normalizer=p.normalizer, max_history_len=p.N,
            max_candidates=p.n, validate=False)

    return Runner(lambda: tuple(o for o in forward() if o is not None),
                  (lambda o: (None, o[0])) if cached else (lambda o: o), list(x.values()))


def _rule(q_pos, kv, hist_len, n_max_hist):
    """The visibility rule on the padded [history (n_max_hist slots) ; candidates] layout (broadcasting)."""
    q_hist = q_pos < n_max_hist
    kv_hist = kv < n_max_hist
    history = q_hist & kv_hist & (kv <= q_pos)
    candidate = ~q_hist & ((kv_hist & (kv < hist_len)) | (kv == q_pos))
    return history | candidate


class _Padded(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hist_pad: _Pad
    cand_pad: _Pad
    hist_len: torch.Tensor
    width: int  # history slots


def _padded_all(p: Problem, grad: bool) -> _Padded:
    device = p.t["hk"].device
    width, cwidth = max(p.hist_lens), max(p.cand_lens)
    hp, cp = _pad_map(p.hist_lens, width, device), _pad_map(p.cand_lens, cwidth, device)

    def both(h, c):
        return torch.cat([_to_padded(p.t[h], hp), _to_padded(p.t[c], cp)], dim=2).detach().requires_grad_(grad)

    return _Padded(both("hq", "cq"), both("hk", "ck"), both("hv", "cv"), hp, cp,
                   torch.tensor(p.hist_lens, device=device), width)


def _split_padded(out, x: _Padded):
    return _from_padded(out[:, :, :x.width], x.hist_pad), _from_padded(out[:, :, x.width:], x.cand_pad)


_FLEX = {}


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        if torch.cuda.is_available():
            # One compilation per shape and layout: keep dynamo from falling back to eager flex.
            import torch._dynamo.config as dynamo_config
            dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
            dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 512)
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        else:  # eager on CPU (correctness only)
            _FLEX["fn"] = flex_attention
    return _FLEX["fn"], create_block_mask


def _block_mask(create_block_mask, mask_mod, batch, length, device):
    """Block mask built once outside the timed region (compiled on CUDA: long packed sequences would
    otherwise materialise a dense length x length mask)."""
    return create_block_mask(mask_mod, batch, None, length, length, device=device,
                             _compile=torch.cuda.is_available())


def build_flex(p: Problem, activation: str, cached: bool, grad: bool) -> Optional[Runner]:
    if activation != "softmax" or cached:
        return None
    flex, create_block_mask = _flex()
    x = _padded_all(p, grad)
    L = x.q.shape[2]
    hist_len, width = x.hist_len, x.width

    def mask_mod(b, h, q_idx, kv_idx):
        return _rule(q_idx, kv_idx, hist_len[b], width)

    block_mask = _block_mask(create_block_mask, mask_mod, p.B, L, x.q.device)
    return Runner(lambda: (flex(x.q, x.k, x.v, block_mask=block_mask, scale=p.scale),),
                  lambda o: _split_padded(o[0], x), [x.q, x.k, x.v])


def build_flex_packed(p: Problem, activation: str, cached: bool, grad: bool) -> Optional[Runner]:
    if activation != "softmax" or cached or p.layout == "uniform":
        return None
    flex, create_block_mask = _flex()
    device = p.t["hk"].device
    total_h = sum(p.hist_lens)
    order, user, hpos = [], [], []
    hoff, coff = p.t["hoff"].tolist(), p.t["coff"].tolist()
    for b in range(p.B):  # per user: its history rows, then its candidate rows
        order += list(range(hoff[b], hoff[b + 1])) + [total_h + r for r in range(coff[b], coff[b + 1])]
        user += [b] * (p.hist_lens[b] + p.cand_lens[b])
        hpos += list(range(p.hist_lens[b])) + [-1] * p.cand_lens[b]
    order = torch.tensor(order, device=device)
    user, hpos = torch.tensor(user, device=device), torch.tensor(hpos, device=device)
    is_hist = hpos >= 0

    def pack(h, c):
        rows = torch.cat([p.t[h], p.t[c]])[order]  # (T, H, d)
        return rows.transpose(0, 1)[None].contiguous().requires_grad_(grad)

    q, k, v = pack("hq", "cq"), pack("hk", "ck"), pack("hv", "cv")
    T = q.shape[2]

    def mask_mod(b, h, q_idx, kv_idx):
        q_hist, kv_hist = hpos[q_idx] >= 0, hpos[kv_idx] >= 0
        same = user[q_idx] == user[kv_idx]
        history = q_hist & kv_hist & (hpos[kv_idx] <= hpos[q_idx])
        candidate = ~q_hist & (kv_hist | (kv_idx == q_idx))
        return same & (history | candidate)

    block_mask = _block_mask(create_block_mask, mask_mod, 1, T, device)

    def to_jagged(o):
        rows = o[0][0].transpose(0, 1)  # (T, H, d)
        return rows[is_hist], rows[~is_hist]

    return Runner(lambda: (flex(q, k, v, block_mask=block_mask, scale=p.scale),), to_jagged, [q, k, v])


def build_sdpa_dense(p: Problem, activation: str, cached: bool, grad: bool) -> Optional[Runner]:
    if cached:
        return None
    x = _padded_all(p, grad)
    L = x.q.shape[2]
    pos = torch.arange(L, device=x.q.device)
    mask = _rule(pos[None, :, None], pos[None, None, :], x.hist_len[:, None, None], x.width)[:, None]  # (B,1,L,L)

    if activation == "softmax":
        def forward():
            return (F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask, scale=p.scale),)
    else:
        def forward():
            scores = (x.q @ x.k.transpose(-1, -2)) * p.scale
            return ((F.silu(scores) * mask) @ x.v / p.normalizer,)
    return Runner(forward, lambda o: _split_padded(o[0], x), [x.q, x.k, x.v])


def _attention_with_lse(q, k, v, key_valid, scale):
    """Softmax attention of q (B, H, M, d) over k/v (B, H, K, d) with a per-batch key-padding mask
    (B, K) or None; returns (out, natural-log LSE (B, H, M) fp32). Flash when no mask on CUDA."""
    if q.is_cuda and key_valid is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    bias = None
    if key_valid is not None:
        B, K = key_valid.shape
        padded = (K + 15) // 16 * 16  # the efficient kernel wants an aligned last dimension
        bias = torch.zeros(B, 1, q.shape[2], padded, device=q.device, dtype=q.dtype)
        bias[..., :K].masked_fill_(~key_valid[:, None, None, :], float("-inf"))
        bias = bias[..., :K].expand(B, q.shape[1], q.shape[2], K)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[:2]
        return out, lse[..., :q.shape[2]]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    return out, lse


def build_sdpa_lse(p: Problem, activation: str, cached: bool, grad: bool) -> Optional[Runner]:
    if activation != "softmax" or grad:
        return None
    device = p.t["hk"].device
    width, cwidth = max(p.hist_lens), max(p.cand_lens)
    hp, cp = _pad_map(p.hist_lens, width, device), _pad_map(p.cand_lens, cwidth, device)
    hq = None if cached else _to_padded(p.t["hq"], hp)
    hk, hv = _to_padded(p.t["hk"], hp), _to_padded(p.t["hv"], hp)
    cq, ck, cv = (_to_padded(p.t[name], cp) for name in ("cq", "ck", "cv"))
    key_valid = None if p.layout == "uniform" else hp.valid

    def forward():
        outs = ()
        if not cached:  # padding sits after each history, so causal rows never see it
            outs = (F.scaled_dot_product_attention(hq, hk, hv, is_causal=True, scale=p.scale),)
        out, lse = _attention_with_lse(cq, hk, hv, key_valid, p.scale)
        own = (cq.float() * ck.float()).sum(-1) * p.scale
        top = torch.maximum(lse, own)
        w_hist, w_own = torch.exp(lse - top), torch.exp(own - top)
        merged = (w_hist[..., None] * out.float() + w_own[..., None] * cv.float()) / (w_hist + w_own)[..., None]
        return outs + (merged.to(cq.dtype),)

    def to_jagged(o):
        return (None if cached else _from_padded(o[0], hp)), _from_padded(o[-1], cp)

    return Runner(forward, to_jagged, [], differentiable=False)


def build_naive(p: Problem, activation: str, cached: bool, grad: bool) -> Optional[Runner]:
    if cached:
        return None
    width = max(p.hist_lens)
    total_c = sum(p.cand_lens)
    itemsize = p.t["hk"].element_size()
    if 2 * total_c * p.H * (width + 1) * p.d * itemsize > NAIVE_MAX_BYTES:
        return None
    device = p.t["hk"].device
    hp = _pad_map(p.hist_lens, width, device)
    hq, hk, hv = (_to_padded(p.t[name], hp).requires_grad_(grad) for name in ("hq", "hk", "hv"))
    cq, ck, cv = (p.t[name].detach().requires_grad_(grad) for name in ("cq", "ck", "cv"))
    owner = torch.repeat_interleave(torch.arange(p.B, device=device), torch.tensor(p.cand_lens, device=device))
    hist_len = torch.tensor(p.hist_lens, device=device)
    pos = torch.arange(width + 1, device=device)
    # Keys of candidate c: its user's history (padded to width) then its own key in the last slot.
    key_ok = ((pos[None, :] < hist_len[owner][:, None]) | (pos[None, :] == width))[:, None, None, :]
    mask = None if p.layout == "uniform" else key_ok
    hist_mask = torch.ones(width, width, device=device, dtype=torch.bool).tril()

    def forward():
        k = torch.cat([hk[owner], ck[:, :, None]], dim=2)  # (n, H, width + 1, d): the n.N.d expansion
        v = torch.cat([hv[owner], cv[:, :, None]], dim=2)
        q = cq[:, :, None]                                  # (n, H, 1, d)
        if activation == "softmax":
            hist = F.scaled_dot_product_attention(hq, hk, hv, is_causal=True, scale=p.scale)
            cand = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)
        else:
            hist = (F.silu(hq @ hk.transpose(-1, -2) * p.scale) * hist_mask) @ hv / p.normalizer
            cand = (F.silu(q @ k.transpose(-1, -2) * p.scale) * key_ok) @ v / p.normalizer
        return hist, cand[:, :, 0]

    return Runner(forward, lambda o: (_from_padded(o[0], hp), o[1]), [hq, hk, hv, cq, ck, cv])


PROVIDERS = {"ours": build_ours, "flex": build_flex, "flex_packed": build_flex_packed,
             "sdpa_dense": build_sdpa_dense, "sdpa_lse": build_sdpa_lse, "naive": build_naive}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def _step(runner: Runner, grad: bool) -> Callable[[], object]:
    if not grad:
        return runner.forward
    outs = runner.forward()
    cotangents = [torch.randn_like(o) for o in outs]

    def step():
        return torch.autograd.grad(runner.forward(), runner.leaves, cotangents, allow_unused=True)
    return step


def _timing(fn) -> Timing:
    if torch.cuda.is_available():
        return gpu_timing(fn, warmup_ms=25, rep_ms=100)
    return cpu_timing(fn)


def _max_diff(got, ref) -> float:
    diffs = [(g.float() - r.float()).abs().max().item() for g, r in zip(got, ref)
             if g is not None and r is not None and r.numel()]
    return max(diffs, default=0.0)


def _environment(device: str) -> Dict[str, str]:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__}


def _measure(p: Problem, activation: str, cached: bool, grad: bool, providers, env, dtype,
             peak_tflops: Optional[float] = None) -> List[dict]:
    rows, reference_out = [], None
    flops = useful_flops(p, cached) * (3.5 if grad else 1.0)
    for name in providers:
        row = dict(op="target_attention", shape=f"B={p.B} N={p.N} n={p.n} H={p.H} d={p.d}", layout=p.layout,
                   activation=activation, mode="cached" if cached else "full", pass_="fwd+bwd" if grad else "fwd",
                   provider=name, ms=None, p20=None, p80=None, tflops=None, pct_peak=None, speedup=None,
                   max_abs_diff=None, dtype=str(dtype).replace("torch.", ""), note="", **env)
        if name == "ours" and p.layout == "jagged":  # the draw, so a reader can tell two draws apart
            row["note"] = f"history rows {sum(p.hist_lens)}, candidate rows {sum(p.cand_lens)}"
        try:
            runner = PROVIDERS[name](p, activation, cached, grad)
            if runner is None:
                continue
            with torch.no_grad():
                out = runner.to_jagged(runner.forward())
            if name == "ours":
                reference_out = out
            elif reference_out is not None:
                row["max_abs_diff"] = _max_diff(out, reference_out)
            step = _step(runner, grad)
            timing = _timing(step)
            row.update(ms=timing.median, p20=timing.p20, p80=timing.p80)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            if torch.cuda.is_available():
                # GPU time alone (no host launch cost): what the kernels do, and what a CUDA-graph user sees.
                try:
                    row["graph_ms"] = graph_timing(step, rep_ms=100).median
                    row["graph_tflops"] = flops / (row["graph_ms"] * 1e-3) / 1e12
                except Exception as error:  # e.g. a provider that syncs with the host cannot be captured
                    row["note"] = f"no CUDA graph: {type(error).__name__}"
            if peak_tflops:
                row["pct_peak"] = 100 * row.get("graph_tflops", row["tflops"]) / peak_tflops
        except Exception as error:  # one failing provider (e.g. out of memory) must not end the run
            row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        finally:
            runner = out = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
    add_speedups(rows, (), "ours")
    add_speedups(rows, (), "ours", time_key="graph_ms", speedup_key="graph_speedup")
    return rows


# ------------------------------------------------------------------------------------------------
# Suites
# ------------------------------------------------------------------------------------------------
class Case(NamedTuple):
    shape: tuple
    layout: str
    activation: str
    cached: bool
    grad: bool


def _suite_keeps(suite: str, layout: str, cached: bool, grad: bool) -> bool:
    if suite == "serving":
        return layout == "uniform" and not grad
    if suite == "training":
        return layout == "uniform" and grad and not cached
    if suite == "jagged":
        return layout == "jagged"
    return True


def plan(quick: bool = False, suite: str = "all", cuda: Optional[bool] = None) -> List[Case]:
    """The cases a suite runs, in order. Cached mode is softmax only on CUDA (its alternative, sdpa_lse,
    is softmax only); the CPU run also checks the SiLU cached path against the twin."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    shapes = (QUICK_SHAPES if quick else SHAPES) if cuda else (CPU_SHAPES[:1] if quick else CPU_SHAPES)
    cases = []
    for shape in shapes:
        for layout in ("uniform", "jagged"):
            for activation in ("softmax", "silu"):
                for cached, grad in ((False, False), (False, True), (True, False)):
                    if cached and cuda and activation != "softmax":
                        continue
                    if _suite_keeps(suite, layout, cached, grad):
                        cases.append(Case(shape, layout, activation, cached, grad))
    return cases


def _run_cuda(quick: bool, suite: str = "all", peak_tflops: Optional[float] = None,
              progress: bool = False) -> List[dict]:
    dtype, env = torch.bfloat16, _environment("cuda")
    cases = plan(quick, suite, cuda=True)
    bar = Progress(len(cases), "attention", progress)
    problems, rows = {}, []
    for case in cases:
        bar.step(f"{case.shape} {case.layout} {case.activation} {'cached' if case.cached else 'full'} "
                 f"{'fwd+bwd' if case.grad else 'fwd'}")
        key = (case.shape, case.layout)
        if key not in problems:
            problems.clear()  # one problem in memory at a time; cases of a problem are consecutive
            problems[key] = make_problem(case.shape, case.layout, "cuda", dtype)
        if case.cached:
            names = ["ours", "sdpa_lse"]
        else:
            names = [n for n in PROVIDERS if not (quick and n == "naive")]
        rows += _measure(problems[key], case.activation, case.cached, case.grad, names, env, dtype, peak_tflops)
    bar.close()
    return rows


def _run_cpu(quick: bool, suite: str = "all", progress: bool = False) -> List[dict]:
    """Tiny shapes through the interpreter: every provider checked against the twin, CPU wall times."""
    env = _environment("cpu")
    if not interpreting():
        return [dict(op="target_attention", provider="ours", note="no CUDA and TRITON_INTERPRET unset when "
                     "gesr_kernels was imported: set TRITON_INTERPRET=1 to run the CPU path", **env)]
    import reference
    dtype = torch.float32
    cases = plan(quick, suite, cuda=False)
    bar = Progress(len(cases), "attention (CPU)", progress)
    problems, rows = {}, []
    for case in cases:
        activation, cached, grad = case.activation, case.cached, case.grad
        bar.step(f"{case.shape} {case.layout} {activation} {'cached' if cached else 'full'} "
                 f"{'fwd+bwd' if grad else 'fwd'}")
        key = (case.shape, case.layout)
        if key not in problems:
            problems.clear()
            problems[key] = make_problem(case.shape, case.layout, "cpu", dtype)
        p = problems[key]
        names = ["ours", "sdpa_lse"] if cached else [
            n for n in PROVIDERS if not (grad and n.startswith("flex"))]  # no flex backward on CPU
        with warnings.catch_warnings():  # eager flex on CPU warns that it is slow
            warnings.simplefilter("ignore")
            measured = _measure(p, activation, cached, grad, names, env, dtype)
        twin = reference.target_aware_attention(
            None if cached else p.t["hq"], p.t["hk"], p.t["hv"], p.t["hoff"], p.t["cq"], p.t["ck"],
            p.t["cv"], p.t["coff"], activation=activation, scale=p.scale, silu_normalizer=p.normalizer)
        ours = build_ours(p, activation, cached, False)
        with torch.no_grad():
            error = _max_diff(ours.to_jagged(ours.forward()), twin)
        for r in measured:
            r["note"] = "; ".join(filter(None, (r["note"], f"ours vs twin max|diff| {error:.2e}")))
            if r["max_abs_diff"] is not None and r["max_abs_diff"] > 1e-4:
                r["note"] += " MISMATCH vs ours"
        rows += measured
    bar.close()
    return rows


def run(quick: bool = False, suite: str = "all", peaks: Optional[dict] = None,
        progress: bool = False) -> List[dict]:
    """Benchmark rows (see the module docstring); GPU timings on CUDA, an interpreter check otherwise.
    ``peaks``: {"matmul_tflops": ...} measured on this device, for the % of peak column."""
    if torch.cuda.is_available():
        return _run_cuda(quick, suite, (peaks or {}).get("matmul_tflops"), progress)
    return _run_cpu(quick, suite, progress)


COLUMNS = ["shape", "layout", "activation", "mode", "pass_", "provider", "ms", "p20", "p80", "speedup",
           "graph_ms", "graph_speedup", "graph_tflops", "pct_peak", "max_abs_diff", "note"]
HEADERS = ["shape", "layout", "activation", "mode", "pass", "provider", "eager ms", "p20 ms", "p80 ms",
           "eager speedup", "graph ms", "graph speedup", "graph TFLOP/s", "% of matmul peak", "max_abs_diff",
           "note"]


def format_table(rows: List[dict]) -> str:
    """Markdown table of the rows, with the environment of the first row above it."""
    head = rows[0] if rows else {}
    return (f"device: {head.get('device')}, torch {head.get('torch')}, triton {head.get('triton')}, "
            f"dtype {head.get('dtype')}\n\n" + format_rows(rows, COLUMNS, HEADERS))


if __name__ == "__main__":
    import sys
    print(format_table(run(quick="--quick" in sys.argv)))

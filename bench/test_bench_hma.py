"""pytest-benchmark regression tests of hard_match_embedding and its PyTorch alternatives (CUDA only).

``pytest bench/ --benchmark-only``; see the README (Benchmarks) for saving a run and comparing two.
Skipped without CUDA or without pytest-benchmark; not collected by ``pytest tests``.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("benchmark tests need CUDA", allow_module_level=True)

from bench.common import benchmark_synced  # noqa: E402
from bench.hard_match import MAX_COUNT, make_inputs, min_bytes, providers  # noqa: E402

# One shape with many candidates per user (hash path), one with a single candidate per user (brute force).
SHAPES = [(1, 8192, 4096, 16), (1024, 1024, 1, 16)]
PROVIDERS = ["gesr", "broadcast", "sort"]


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-n{}-P{}".format(*s))
def test_hard_match_embedding(benchmark, shape, provider, pass_):
    dtype = torch.bfloat16
    torch.manual_seed(0)
    sets, hist_off, cand_off, weight = make_inputs(*shape, "cuda", dtype)
    h, c = sets[0]["h"], sets[0]["c"]
    funcs = providers(hist_off, cand_off, shape)
    fn = funcs[provider]
    out = fn(h, c, weight)
    assert torch.equal(out, funcs["broadcast"](h, c, weight)), f"{provider} disagrees with broadcast"
    if pass_ == "fwd":
        def call():
            return fn(h, c, weight)
    else:
        w = weight.detach().clone().requires_grad_()
        grad_out = torch.randn_like(out)

        def call():
            fn(h, c, w).backward(grad_out)
    del out
    benchmark.group = f"hard_match_embedding {shape} {pass_}"
    benchmark_synced(benchmark, call, op="hard_match_embedding", shape=list(shape), provider=provider,
                     pass_=pass_, dtype="bfloat16", max_count=MAX_COUNT,
                     gbytes_per_call=min_bytes(shape, dtype, pass_ == "fwd+bwd") / 1e9)

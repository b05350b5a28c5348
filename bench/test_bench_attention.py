"""pytest-benchmark regression tests of target_aware_attention and its alternatives (CUDA only).

``pytest bench/ --benchmark-only``; see the README (Benchmarks) for saving a run and comparing two.
Skipped without CUDA or without pytest-benchmark; not collected by ``pytest tests``.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():  # checked before bench.target_attention, which sets TRITON_INTERPRET
    pytest.skip("benchmark tests need CUDA", allow_module_level=True)

from bench.common import benchmark_synced  # noqa: E402
from bench.target_attention import PROVIDERS, _max_diff, _step, make_problem, useful_flops  # noqa: E402

# Many users with short candidate lists (ranking batch) and one long history with many candidates.
SHAPES = [(32, 1024, 64, 4, 64), (1, 2048, 2048, 4, 128)]
_PROBLEMS = {}


def _problem(shape):
    if shape not in _PROBLEMS:
        _PROBLEMS.clear()  # one problem on the device at a time
        _PROBLEMS[shape] = make_problem(shape, "uniform", "cuda", torch.bfloat16,
                                        torch.Generator().manual_seed(0))
    return _PROBLEMS[shape]


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("provider", [name for name in PROVIDERS if name != "flex_packed"])  # = flex here
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-n{}-H{}-d{}".format(*s))
def test_target_aware_attention(benchmark, shape, provider, activation, pass_):
    p = _problem(shape)
    grad = pass_ == "fwd+bwd"
    runner = PROVIDERS[provider](p, activation, False, grad)
    if runner is None:
        pytest.skip(f"{provider} has no {activation} {pass_} formulation at this shape")
    with torch.no_grad():
        out = runner.to_jagged(runner.forward())
        if provider != "ours":
            ours = PROVIDERS["ours"](p, activation, False, False)
            diff = _max_diff(out, ours.to_jagged(ours.forward()))
            assert diff < 0.1, f"{provider} differs from ours by {diff}"
    del out
    benchmark.group = f"target_aware_attention {shape} {activation} {pass_}"
    benchmark_synced(benchmark, _step(runner, grad), op="target_aware_attention", shape=list(shape),
                     layout="uniform", provider=provider, activation=activation, pass_=pass_, dtype="bfloat16",
                     tflop_per_call=useful_flops(p) * (3.5 if grad else 1.0) / 1e12)

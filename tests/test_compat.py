"""compat.hstu_mha: the kernel path against the dense PyTorch twin in reference/compat.py."""
import pytest
import torch

from conftest import DEVICE
from helpers import assert_max_error_within_budget, offsets_from_lengths, record_results, set_arg, set_kw

import reference.compat as twin_module
from gesr_kernels.compat import hstu_mha, split_offsets

FN = "hstu_mha"
twin = twin_module.hstu_mha


def make_case(lengths, targets, *, heads=2, d_qk=16, d_v=16, dtype=torch.float32, device=DEVICE,
              requires_grad=True, offsets_dtype=torch.int64):
    """(max_seq_len, alpha, q, k, v, seq_offsets) and kwargs for hstu_mha; fresh random values."""
    total = sum(lengths)

    def rand(d):
        return torch.randn(total, heads, d, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)

    q, k, v = rand(d_qk), rand(d_qk), rand(d_v)
    kwargs = {}
    if targets is not None:
        kwargs["num_targets"] = torch.tensor(targets, dtype=offsets_dtype, device=device)
    max_seq_len = max(lengths + [1]) + 3
    return [max_seq_len, 0.37, q, k, v, offsets_from_lengths(lengths, offsets_dtype, device)], kwargs


def random_case_lengths(num_seqs, longest):
    """Random lengths (one empty sequence) and targets in [0, length], one sequence all candidates."""
    lengths = torch.randint(1, longest + 1, (num_seqs,)).tolist()
    lengths[0] = 0
    targets = [int(torch.randint(0, n + 1, ())) for n in lengths]
    targets[1] = lengths[1]
    return lengths, targets


def _to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def _run(fn, args, kwargs, cotangent):
    out = fn(*args, **kwargs)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(out, inputs, cotangent.to(out.dtype)) if inputs else []
    return [out, *grads]


def assert_within_budget(args, kwargs, band=1e-5):
    """Kernel error vs the fp64 twin <= 2 x (twin in the input dtype vs fp64) + band * scale, for the
    output and the q, k, v gradients."""
    ref_out = twin(*[_to64(a) for a in args], **kwargs)
    cotangent = torch.randn_like(ref_out)
    ref64 = _run(twin, [_to64(a) for a in args], kwargs, cotangent)
    same = _run(twin, args, kwargs, cotangent)
    kern = _run(hstu_mha, args, kwargs, cotangent)
    for i, (k, t, r) in enumerate(zip(kern, same, ref64)):
        assert_max_error_within_budget(f"tensor {i}", k, t, r, band)


# ------------------------------------------------------------------------------------------------
# The twin itself: its mask is the rule of the issue, written out by hand for one sequence.
# ------------------------------------------------------------------------------------------------
def test_twin_visibility_rule():
    mask = twin_module.visibility(5, 2)
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],    # first candidate: all history and itself
                             [1, 1, 1, 0, 1]],   # second candidate: not the first
                            dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(twin_module.visibility(3, 0), torch.ones(3, 3).tril().bool())
    assert torch.equal(twin_module.visibility(3, 3), torch.eye(3, dtype=torch.bool))


def test_split_offsets():
    offsets = torch.tensor([0, 5, 5, 9, 12])
    targets = torch.tensor([2, 0, 4, 1])
    history, candidate = split_offsets(offsets, targets)
    # users: filler, seq0, filler, seq1 (empty), filler, seq2, filler, seq3, filler
    assert history.tolist() == [0, 0, 3, 5, 5, 5, 5, 9, 11, 12]
    assert candidate.tolist() == [0, 3, 5, 5, 5, 5, 9, 11, 12, 12]


# ------------------------------------------------------------------------------------------------
# Kernel path against the twin
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_targets", [True, False], ids=["targets", "no_targets"])
def test_matches_twin_random(with_targets):
    # Lengths cross the interpreter's 32-row tiles; one empty sequence, one that is all candidates.
    for _ in range(2):
        lengths, targets = random_case_lengths(4, 45)
        args, kwargs = make_case(lengths, targets if with_targets else None)
        assert_within_budget(args, kwargs)


def test_edge_cases():
    # Only candidates; no candidates through zeros; single rows; every sequence empty but one.
    for lengths, targets in (([3, 4], [3, 4]), ([6, 2], [0, 0]), ([1, 1, 1], [1, 0, 1]), ([0, 7, 0], [0, 3, 0])):
        args, kwargs = make_case(lengths, targets)
        assert_within_budget(args, kwargs)
    # No rows at all.
    args, kwargs = make_case([0, 0], [0, 0])
    assert hstu_mha(*args, **kwargs).shape == (0, 2, 16)


def test_head_dims_int32_and_strided_inputs():
    lengths, targets = [7, 0, 12], [2, 0, 5]
    args, kwargs = make_case(lengths, targets, heads=1, d_qk=32, d_v=48, offsets_dtype=torch.int32)
    assert_within_budget(args, kwargs)
    # A transposed k and a v broadcast over heads (stride 0).
    args, kwargs = make_case(lengths, targets, heads=3)
    args[3] = torch.randn(3, 19, 16, device=DEVICE).transpose(0, 1).requires_grad_()
    args[4] = torch.randn(19, 1, 16, device=DEVICE).expand(-1, 3, -1).detach().requires_grad_()
    assert_within_budget(args, kwargs)


def test_matches_target_aware_attention_on_split_inputs():
    # One user: hstu_mha on [history ; candidates] equals the op called on the two parts.
    from gesr_kernels import target_aware_attention
    args, kwargs = make_case([11], [4], requires_grad=False)
    max_seq_len, alpha, q, k, v, offsets = args
    out = hstu_mha(*args, **kwargs)
    split = lambda x: (x[:7], x[7:])  # noqa: E731
    (hq, cq), (hk, ck), (hv, cv) = split(q), split(k), split(v)
    history_offsets, candidate_offsets = torch.tensor([0, 7], device=q.device), torch.tensor([0, 4], device=q.device)
    history, candidates = target_aware_attention(
        hq, hk, hv, history_offsets, cq, ck, cv, candidate_offsets, activation="silu", scale=alpha,
        silu_normalizer=float(max_seq_len))
    torch.testing.assert_close(out, torch.cat([history, candidates]))


def test_no_targets_passes_max_seq_len_as_the_history_bound(monkeypatch):
    # Without targets every row is history and max_seq_len bounds it: the op gets it as max_history_len and
    # runs the history tiles position-major, bitwise equal to the flat order, outputs and gradients in budget.
    import gesr_kernels.target_attention as ta
    args, kwargs = make_case([37, 5, 40, 0, 33], None)
    orders = record_results(monkeypatch, ta, "_history_order")
    with torch.no_grad():
        positional = hstu_mha(*args, **kwargs)
    assert orders and orders[-1] is not None
    assert_within_budget(args, kwargs)
    monkeypatch.setattr(ta, "_HISTORY_ORDER_OVERRIDE", 0)
    with torch.no_grad():
        assert torch.equal(positional, hstu_mha(*args, **kwargs))
    assert orders[-1] is None


def test_gradcheck_fp64():
    args, kwargs = make_case([3, 0, 4], [1, 0, 2], heads=1, dtype=torch.float64)
    inputs = args[2:5]
    assert torch.autograd.gradcheck(lambda q, k, v: hstu_mha(*args[:2], q, k, v, args[5], **kwargs), inputs,
                                    fast_mode=True)


def test_validate_false_skips_data_checks():
    args, kwargs = make_case([4, 6], [1, 2], requires_grad=False)
    args[0] = 5  # shorter than the second sequence: caught only by the data checks
    with pytest.raises(ValueError, match="max_seq_len must be >= the longest sequence"):
        hstu_mha(*args, **kwargs)
    hstu_mha(*args, **kwargs, validate=False)


def test_cpu_tensors_outside_the_interpreter_raise(monkeypatch):
    import gesr_kernels._core.validation as validation
    monkeypatch.setattr(validation, "interpreting", lambda: False)
    args, kwargs = make_case([4, 6], [1, 2], requires_grad=False, device="cpu")
    with pytest.raises(ValueError, match="hstu_mha: the Triton kernels need CUDA tensors, got q on cpu"):
        hstu_mha(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Bad input: the kernel path and the twin raise the same errors, before any work.
# ------------------------------------------------------------------------------------------------
def _bad_cases():
    """(id, mutate(args list, kwargs dict), exception type, message fragment); base: lengths [4, 0, 5]."""

    return [
        ("causal_false", set_kw("causal", False), ValueError, "only causal=True is supported"),
        ("causal_type", set_kw("causal", 1), TypeError, "causal must be a bool"),
        ("max_seq_len_type", set_arg(0, 9.0), TypeError, "max_seq_len must be an int"),
        ("max_seq_len_zero", set_arg(0, 0), ValueError, "max_seq_len must be >= 1"),
        ("max_seq_len_short", set_arg(0, 4), ValueError, "max_seq_len must be >= the longest sequence in the "
                                                        "batch (5), got 4"),
        ("alpha_type", set_arg(1, "0.5"), TypeError, "alpha must be a float"),
        ("alpha_bool", set_arg(1, True), TypeError, "alpha must be a float"),
        ("alpha_nan", set_arg(1, float("nan")), ValueError, "alpha must be finite"),
        ("q_not_tensor", set_arg(2, 1.0), TypeError, "q must be a torch.Tensor"),
        ("k_rank", set_arg(3, lambda a: a[3][:, 0]), ValueError, "k must be 3-D"),
        ("v_int", set_arg(4, lambda a: a[4].long()), TypeError, "v must have dtype"),
        ("k_dtype", set_arg(3, lambda a: a[3].double()), TypeError, "k must have the dtype of q"),
        ("k_shape", set_arg(3, lambda a: a[3].repeat(1, 1, 2)), ValueError, "k must have the shape of q"),
        ("v_heads", set_arg(4, lambda a: a[4].repeat(1, 2, 1)), ValueError, "v must have shape (9, 2, d_v)"),
        ("v_rows", set_arg(4, lambda a: a[4][:-1]), ValueError, "v must have shape (9, 2, d_v)"),
        ("head_dim", lambda a, kw: a.__setitem__(slice(2, 4), [a[2][..., :8], a[3][..., :8]]), ValueError,
         "q has d_qk = 8"),
        ("d_v", set_arg(4, lambda a: a[4][..., :8]), ValueError, "v has d_v = 8"),
        ("zero_heads", lambda a, kw: a.__setitem__(slice(2, 5), [x[:, :0] for x in a[2:5]]), ValueError,
         "H >= 1"),
        ("device", set_arg(4, lambda a: a[4].to("meta")), ValueError, "v is on meta"),
        ("offsets_float", set_arg(5, lambda a: a[5].float()), TypeError, "seq_offsets must have dtype"),
        ("offsets_2d", set_arg(5, lambda a: a[5][None]), ValueError, "seq_offsets must be 1-D"),
        ("offsets_start", set_arg(5, lambda a: a[5] + 1), ValueError, "seq_offsets must start at 0"),
        ("offsets_decreasing", set_arg(5, lambda a: torch.tensor([0, 5, 4, 9])), ValueError,
         "seq_offsets must be non-decreasing"),
        ("offsets_end", set_arg(5, lambda a: torch.tensor([0, 4, 4, 8])), ValueError,
         "seq_offsets must end at the row count 9"),
        ("targets_float", set_kw("num_targets", torch.zeros(3)), TypeError, "num_targets must have dtype"),
        ("targets_shape", set_kw("num_targets", torch.zeros(2, dtype=torch.int64)), ValueError,
         "num_targets must be 1-D with B = 3 entries"),
        ("targets_2d", set_kw("num_targets", torch.zeros(1, 3, dtype=torch.int64)), ValueError,
         "num_targets must be 1-D with B = 3 entries"),
        ("targets_negative", set_kw("num_targets", torch.tensor([1, 0, -1])), ValueError,
         "num_targets[2] must be in [0, 5] (the length of sequence 2), got -1"),
        ("targets_too_many", set_kw("num_targets", torch.tensor([5, 0, 1])), ValueError,
         "num_targets[0] must be in [0, 4]"),
        ("targets_device", set_kw("num_targets", torch.zeros(3, dtype=torch.int64, device="meta")), ValueError,
         "num_targets is on meta"),
    ]


@pytest.mark.parametrize("fn", [pytest.param(twin, id="twin"), pytest.param(hstu_mha, id="kernel")])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(fn, case):
    _, mutate, error, fragment = case
    args, kwargs = make_case([4, 0, 5], [1, 0, 2], requires_grad=False, device="cpu")
    args[0] = 5
    mutate(args, kwargs)
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert info.value.args[0].startswith(f"{FN}: "), info.value.args[0]
    assert fragment in info.value.args[0], info.value.args[0]


# ------------------------------------------------------------------------------------------------
# torch.compile: nothing data-dependent, so fullgraph works
# ------------------------------------------------------------------------------------------------
def _check_compiled(backend, device, with_targets=True):
    args, kwargs = make_case([6, 0, 11], [2, 0, 11] if with_targets else None, device=device)

    def loss(q, k, v):
        return hstu_mha(args[0], args[1], q, k, v, args[5], **kwargs).sin().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    inputs = args[2:5]
    expected = torch.autograd.grad(loss(*inputs), inputs)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("with_targets", [True, False], ids=["targets", "no_targets"])
def test_torch_compile_aot_eager(with_targets):
    torch._dynamo.reset()
    _check_compiled("aot_eager", DEVICE, with_targets)


@pytest.mark.gpu
def test_torch_compile_inductor_gpu():
    torch._dynamo.reset()
    _check_compiled("inductor", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_realistic_shapes(dtype):
    lengths = torch.randint(200, 700, (8,)).tolist()
    targets = [int(torch.randint(0, 64, ())) for _ in lengths]
    args, kwargs = make_case(lengths, targets, heads=2, d_qk=64, d_v=64, dtype=dtype, device="cuda")
    args[0] = 1024
    assert_within_budget(args, kwargs, band={torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype])


@pytest.mark.gpu
def test_gpu_cuda_graph_capturable():
    args, kwargs = make_case([40, 0, 90], [5, 0, 17], device="cuda", requires_grad=False)
    expected = hstu_mha(*args, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        hstu_mha(*args, **kwargs, validate=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hstu_mha(*args, **kwargs, validate=False)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)

"""target_aware_attention: the Triton kernels against the PyTorch twin in reference/."""
import math

import pytest
import torch

import reference

FN = "target_aware_attention"


def offsets_of(lengths, device):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out.to(device)


def make_case(history_lens, candidate_lens, *, heads=2, d_qk=16, d_v=16, dtype=torch.float32,
              device="cpu", cached=False, cross=False, cutoffs=False, requires_grad=False, spread=1.0):
    """Random jagged inputs: (args, kwargs) for target_aware_attention."""
    total_h, total_c = sum(history_lens), sum(candidate_lens)

    def rand(rows, d):
        t = (spread * torch.randn(rows, heads, d, dtype=torch.float64)).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    hq = None if cached else rand(total_h, d_qk)
    hk, hv = rand(total_h, d_qk), rand(total_h, d_v)
    cq = rand(total_c, d_qk)
    ck, cv = (None, None) if cross else (rand(total_c, d_qk), rand(total_c, d_v))
    kwargs = {}
    if cutoffs:
        longest = max(history_lens, default=0)
        kwargs["candidate_history_lengths"] = torch.randint(0, longest + 3, (total_c,), device=device)
    args = (hq, hk, hv, offsets_of(history_lens, device), cq, ck, cv, offsets_of(candidate_lens, device))
    return args, kwargs


# ------------------------------------------------------------------------------------------------
# Bad input: both the twin and the kernel raise before doing any work.
# ------------------------------------------------------------------------------------------------
def _bad_cases():
    """(id, mutate(args list, kwargs dict), exception type, message fragment)."""

    def set_arg(i, value):
        def mutate(a, kw):
            a[i] = value(a) if callable(value) else value
        return mutate

    def set_kw(name, value):
        def mutate(a, kw):
            kw[name] = value(a) if callable(value) else value
        return mutate

    return [
        ("history_k_not_tensor", set_arg(1, 3.0), TypeError, "history_k must be a torch.Tensor"),
        ("candidate_q_rank", set_arg(4, lambda a: a[4][:, 0]), ValueError, "candidate_q must be 3-D"),
        ("history_q_rank", set_arg(0, lambda a: a[0][None]), ValueError, "history_q must be 3-D"),
        ("int_dtype", set_arg(2, lambda a: a[2].long()), TypeError, "history_v must have dtype"),
        ("dtype_mismatch", set_arg(1, lambda a: a[1].double()), TypeError,
         "history_k must have the dtype of candidate_q (torch.float32), got torch.float64"),
        ("device_mismatch", set_arg(6, lambda a: a[6].to("meta")), ValueError, "candidate_v is on meta"),
        ("only_candidate_k", set_arg(6, None), ValueError, "candidate_k and candidate_v must be given together"),
        ("only_candidate_v", set_arg(5, None), ValueError, "got candidate_v but candidate_k is None"),
        ("heads_mismatch", set_arg(1, lambda a: a[1].repeat(1, 2, 1)), ValueError,
         "history_k must have H = 2 heads like candidate_q"),
        ("d_qk_mismatch", set_arg(5, lambda a: a[5].repeat(1, 1, 2)), ValueError,
         "candidate_k must have d_qk = 16 like candidate_q"),
        ("d_v_mismatch", set_arg(6, lambda a: a[6].repeat(1, 1, 2)), ValueError,
         "candidate_v must have d_v = 16 like history_v"),
        ("head_dim_unsupported", lambda a, kw: a.__setitem__(slice(0, 8), [
            t[..., :8] if isinstance(t, torch.Tensor) and t.dim() == 3 else t for t in a]),
         ValueError, "supported head dims are multiples of 16"),
        ("d_v_too_large", lambda a, kw: (a.__setitem__(2, a[2].repeat(1, 1, 17)), a.__setitem__(6, a[6].repeat(1, 1, 17))),
         ValueError, "history_v has d_v = 272"),
        ("zero_heads", lambda a, kw: a.__setitem__(slice(0, 8), [
            t[:, :0] if isinstance(t, torch.Tensor) and t.dim() == 3 else t for t in a]),
         ValueError, "H >= 1"),
        ("history_rows_mismatch", set_arg(2, lambda a: a[2][:-1]), ValueError,
         "history_v must have 9 rows like history_k"),
        ("candidate_rows_mismatch", set_arg(5, lambda a: a[5][:-1]), ValueError,
         "candidate_k must have 6 rows like candidate_q"),
        ("offsets_float", set_arg(3, lambda a: a[3].float()), TypeError, "history_offsets must have dtype"),
        ("offsets_2d", set_arg(7, lambda a: a[7][None]), ValueError, "candidate_offsets must be 1-D"),
        ("offsets_count_mismatch", set_arg(3, lambda a: a[3][:-1]), ValueError,
         "history_offsets must be 1-D with B+1 = 4 entries"),
        ("offsets_start", set_arg(3, lambda a: a[3] + 1), ValueError, "history_offsets must start at 0"),
        ("offsets_decreasing", set_arg(7, lambda a: torch.tensor([0, 4, 2, 6])), ValueError,
         "candidate_offsets must be non-decreasing"),
        ("offsets_end", set_arg(3, lambda a: torch.tensor([0, 2, 2, 8])), ValueError,
         "history_offsets must end at the row count 9"),
        ("activation_unknown", set_kw("activation", "relu"), ValueError, "activation must be 'softmax' or 'silu'"),
        ("activation_type", set_kw("activation", 1), TypeError, "activation must be a str"),
        ("scale_nan", set_kw("scale", float("nan")), ValueError, "scale must be finite"),
        ("scale_inf", set_kw("scale", float("inf")), ValueError, "scale must be finite"),
        ("scale_type", set_kw("scale", "0.5"), TypeError, "scale must be a float"),
        ("normalizer_zero", set_kw("silu_normalizer", 0.0), ValueError, "silu_normalizer must be > 0"),
        ("normalizer_negative", set_kw("silu_normalizer", -2), ValueError, "silu_normalizer must be > 0"),
        ("normalizer_inf", set_kw("silu_normalizer", float("inf")), ValueError, "silu_normalizer must be finite"),
        ("causal_type", set_kw("history_causal", 1), TypeError, "history_causal must be a bool"),
        ("lengths_shape", set_kw("candidate_history_lengths", torch.zeros(5, dtype=torch.int64)), ValueError,
         "candidate_history_lengths must be 1-D with 6 entries"),
        ("lengths_dtype", set_kw("candidate_history_lengths", torch.zeros(6)), TypeError,
         "candidate_history_lengths must have dtype"),
        ("lengths_negative", set_kw("candidate_history_lengths", torch.tensor([0, 1, -1, 2, 3, 4])), ValueError,
         "candidate_history_lengths must be non-negative, got -1"),
        ("max_history_small", set_kw("max_history_len", 3), ValueError,
         "max_history_len must be >= the longest history in the batch (5), got 3"),
        ("max_candidates_small", set_kw("max_candidates", 2), ValueError,
         "max_candidates must be >= the longest candidate list in the batch (3), got 2"),
        ("max_history_negative", set_kw("max_history_len", -1), ValueError, "max_history_len must be >= 0"),
        ("max_candidates_type", set_kw("max_candidates", 2.0), TypeError, "max_candidates must be an int"),
    ]


def _implementations():
    impls = [pytest.param(reference.target_aware_attention, id="twin")]
    try:
        from gesr_kernels import target_aware_attention
    except ImportError:
        return impls
    return impls + [pytest.param(target_aware_attention, id="kernel")]


IMPLEMENTATIONS = _implementations()


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(fn, case):
    _, mutate, error, fragment = case
    args, kwargs = make_case([4, 0, 5], [2, 3, 1])
    args = list(args)
    mutate(args, kwargs)
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert info.value.args[0].startswith(f"{FN}: "), info.value.args[0]
    assert fragment in info.value.args[0], info.value.args[0]


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
def test_validate_false_skips_data_checks(fn):
    args, kwargs = make_case([4, 0, 5], [2, 3, 1])
    # A bound smaller than the data is only caught by the data checks.
    fn(*args, max_history_len=3, validate=False)
    with pytest.raises(ValueError):
        fn(*args, max_history_len=3)

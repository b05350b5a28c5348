"""Hard-match attention: the Triton kernels against the pure-PyTorch twins (reference/hard_match.py)."""
import pytest
import torch

import gesr_kernels
import reference
from gesr_kernels.nn import HardMatchAttention
from helpers import assert_within_budget, offsets_from_lengths

HAS_CUDA = torch.cuda.is_available()


def make_case(hist_lens, cand_lens, num_pairs, *, vocab=6, id_dtype=torch.int64, device="cpu",
              base=0, with_visible=False, offsets_dtype=torch.int64):
    """Random jagged ids drawn from a small vocabulary, so that matches and capped counts are common."""
    total_N, total_n = sum(hist_lens), sum(cand_lens)
    history = (torch.randint(0, vocab, (total_N, num_pairs)) + base).to(id_dtype).to(device)
    candidates = (torch.randint(0, vocab, (total_n, num_pairs)) + base).to(id_dtype).to(device)
    visible = None
    if with_visible:
        per_cand_hist = torch.repeat_interleave(torch.tensor(hist_lens), torch.tensor(cand_lens))
        visible = (torch.rand(total_n) * (per_cand_hist + 3).float()).long().to(device)  # some > length
    return dict(history_ids=history, history_offsets=offsets_from_lengths(hist_lens, offsets_dtype, device),
                candidate_ids=candidates,
                candidate_offsets=offsets_from_lengths(cand_lens, offsets_dtype, device),
                candidate_history_lengths=visible)


@pytest.fixture(params=["brute", "history_table", "candidate_table"])
def count_path(request, monkeypatch):
    """Run a test through each counting path, forced (the launcher otherwise picks one from the candidates
    per user); a forced history-table path counts with brute force when there are cutoffs."""
    import gesr_kernels.hard_match as hm
    monkeypatch.setattr(hm, "_FORCE_PATH", request.param)
    return request.param


def call(fn, case, *args, **kwargs):
    return fn(case["history_ids"], case["history_offsets"], case["candidate_ids"], case["candidate_offsets"],
              *args, candidate_history_lengths=case["candidate_history_lengths"], **kwargs)


CASES = {
    # name: (history lengths, candidate lengths, P)
    "one_user": ([37], [19], 3),
    "jagged_empty": ([0, 45, 3, 70, 0], [5, 0, 33, 17, 2], 4),
    "pairs_1": ([21, 64], [9, 40], 1),
    "odd_pairs": ([17, 1, 30], [3, 1, 50], 5),
    "many_users_one_cand": ([13] * 9 + [40], [1] * 10, 2),
    "no_candidates": ([10, 20], [0, 0], 2),
}


# ---------------------------------------------------------------------------------------------------
# Counts: exact
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_visible", [False, True])
def test_counts_match_reference(device, name, with_visible, count_path):
    hist, cand, pairs = CASES[name]
    case = make_case(hist, cand, pairs, device=device, with_visible=with_visible)
    for max_count in (1, 3, 100):
        got = call(gesr_kernels.hard_match_count, case, max_count)
        want = call(reference.hard_match_count, case, max_count)
        assert got.dtype == torch.int32 and got.shape == want.shape
        assert torch.equal(got, want), f"max_count={max_count}"


@pytest.mark.parametrize("name", list(CASES))
def test_counts_candidate_tables_small_tiles(device, name, monkeypatch):
    # Tiles smaller than one user's rows: several build and probe programs per user, and spare tiles.
    import gesr_kernels.hard_match as hm
    monkeypatch.setattr(hm, "_FORCE_PATH", "candidate_table")
    monkeypatch.setattr(hm, "_PROBE_CONFIG_OVERRIDE", dict(BLOCK_I=4, BLOCK_H=8))
    hist, cand, pairs = CASES[name]
    case = make_case(hist, cand, pairs, device=device, with_visible=True)
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 3, pad_id=2),
                       call(reference.hard_match_count, case, 3, pad_id=2))


@pytest.mark.parametrize("with_visible", [False, True])
@pytest.mark.parametrize("pad_id", [None, -(2 ** 62)])
def test_counts_shared_candidate_ids(device, with_visible, pad_id, count_path):
    # Every candidate of a user carries one id (a common category): candidate-table buckets overflow and
    # every matching event counts for all of them. Other history ids spread over many buckets, so some
    # land in the overflowed bucket without matching.
    hist_lens, cand_lens = [150, 0, 61, 40], [23, 5, 9, 1]
    case = make_case(hist_lens, cand_lens, 2, vocab=500, device=device, base=-250, with_visible=with_visible)
    shared = [2 ** 62 + 5, 3, -(2 ** 62), 2 ** 62 + 5]
    for b, id_ in enumerate(shared):
        rows = slice(sum(cand_lens[:b]), sum(cand_lens[:b + 1]))
        case["candidate_ids"][rows, 0] = id_
        case["candidate_ids"][rows, 1][::2] = id_
        events = slice(sum(hist_lens[:b]), sum(hist_lens[:b + 1]))
        case["history_ids"][events][::3] = id_
    assert (case["candidate_ids"] == -(2 ** 62)).any()
    for max_count in (3, 1000):
        got = call(gesr_kernels.hard_match_count, case, max_count, pad_id=pad_id)
        assert torch.equal(got, call(reference.hard_match_count, case, max_count, pad_id=pad_id))
    assert (got[:23, 0] > 3).any(), "the case must contain counts above the cap"


def test_counts_cutoff_edges(device, count_path):
    # Visible lengths 0, 1, the whole history, past it (far past it: 2**40), as int64 and int32.
    case = make_case([30, 0, 17], [8, 2, 6], 3, vocab=3, device=device)
    lengths = torch.tensor([0, 1, 29, 30, 31, 2 ** 40, 15, 0, 0, 5, 0, 16, 17, 18, 2 ** 40, 3], device=device)
    for dtype in (torch.int64, torch.int32):
        vis = lengths if dtype == torch.int64 else lengths.clamp(max=2 ** 31 - 1).to(dtype)
        got = gesr_kernels.hard_match_count(case["history_ids"], case["history_offsets"], case["candidate_ids"],
                                            case["candidate_offsets"], 100, candidate_history_lengths=vis)
        want = reference.hard_match_count(case["history_ids"], case["history_offsets"], case["candidate_ids"],
                                          case["candidate_offsets"], 100, candidate_history_lengths=vis)
        assert torch.equal(got, want), dtype
        assert (got[lengths == 0] == 0).all()


def test_count_path_choice():
    import gesr_kernels.hard_match as hm
    assert hm._FORCE_PATH is None
    lengths = torch.zeros(1)
    low, high, ratio = hm.CANDIDATE_TABLE_MIN_CANDIDATES, hm.HASH_MIN_CANDIDATES, hm.HASH_MAX_HISTORY_RATIO
    history = 10 * high * ratio  # history events of 10 users: high * ratio per user
    assert hm._count_path(10 * (low - 1), history, 10, None) == "brute"
    assert hm._count_path(10 * (low - 1), history, 10, lengths) == "brute"
    assert hm._count_path(10 * low, history, 10, None) == "candidate_table"
    assert hm._count_path(10 * high - 1, history, 10, None) == "candidate_table"
    assert hm._count_path(10 * high, history, 10, None) == "history_table"
    assert hm._count_path(10 * high, history + 1, 10, None) == "candidate_table"  # history too long for it
    assert hm._count_path(10 * high, history, 10, lengths) == "candidate_table"  # history tables cannot apply cutoffs
    assert hm._count_path(5, 5, 0, None) == "brute"


def test_count_path_forced(monkeypatch):
    import gesr_kernels.hard_match as hm
    for path in ("brute", "history_table", "candidate_table"):
        monkeypatch.setattr(hm, "_FORCE_PATH", path)
        assert hm._count_path(1, 1, 1, None) == path
    assert hm._count_path(1, 1, 1, torch.zeros(1)) == "candidate_table"
    monkeypatch.setattr(hm, "_FORCE_PATH", "history_table")
    assert hm._count_path(1, 1, 1, torch.zeros(1)) == "brute"
    monkeypatch.setattr(hm, "_FORCE_PATH", "hash")
    with pytest.raises(ValueError, match="_FORCE_PATH"):
        hm._count_path(1, 1, 1, None)


def test_counts_saturate_and_early_exit(device, count_path):
    # Every history event equals the candidate id: counts reach the cap after the first block.
    case = make_case([300], [7], 2, vocab=1, device=device)
    got = call(gesr_kernels.hard_match_count, case, 5)
    assert torch.equal(got, torch.full((7, 2), 5, dtype=torch.int32, device=device))
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 1000),
                       torch.full((7, 2), 300, dtype=torch.int32, device=device))


@pytest.mark.parametrize("base", [2 ** 62, -(2 ** 62), -(2 ** 63)])
def test_counts_extreme_ids(device, base, count_path):
    case = make_case([50, 31], [12, 20], 3, device=device, base=base)
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 4),
                       call(reference.hard_match_count, case, 4))


def test_counts_high_bits_distinguish(device, count_path):
    # Ids equal in the low 32 bits but not the high ones must not match.
    low = torch.randint(0, 3, (40, 2), device=device)
    history = low + (torch.randint(0, 2, (40, 2), device=device) << 40)
    candidates = low[:8].clone()
    case = dict(history_ids=history, history_offsets=offsets_from_lengths([40], device=device),
                candidate_ids=candidates, candidate_offsets=offsets_from_lengths([8], device=device),
                candidate_history_lengths=None)
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 50),
                       call(reference.hard_match_count, case, 50))


def test_counts_many_distinct_ids(device, count_path):
    # Ids over the whole int64 range (hash collisions and long probe chains), candidates drawn from history.
    hist_lens, cand_lens = [300, 1, 129], [40, 20, 33]
    case = make_case(hist_lens, cand_lens, 2, device=device)
    case["history_ids"] = torch.randint(-2 ** 63, 2 ** 63 - 1, case["history_ids"].shape, device=device)
    case["history_ids"][2::3] = case["history_ids"][1::3][: case["history_ids"][2::3].shape[0]]  # repeats
    picks = torch.randint(0, sum(hist_lens), (sum(cand_lens),), device=device)
    case["candidate_ids"] = case["history_ids"][picks].clone()
    case["candidate_ids"][::4, 0] += 1  # some misses
    got = call(gesr_kernels.hard_match_count, case, 7)
    assert torch.equal(got, call(reference.hard_match_count, case, 7))
    assert (got > 0).float().mean() > 0.2, "the case must contain matches"


@pytest.mark.parametrize("with_visible", [False, True])
def test_counts_int32_ids_and_offsets(device, count_path, with_visible):
    case = make_case([33, 0, 9], [4, 6, 11], 3, id_dtype=torch.int32, device=device,
                     offsets_dtype=torch.int32, with_visible=with_visible)
    if with_visible:
        case["candidate_history_lengths"] = case["candidate_history_lengths"].int()
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 2),
                       call(reference.hard_match_count, case, 2))


@pytest.mark.parametrize("pad_id", [0, 2 ** 62 + 1])
@pytest.mark.parametrize("with_visible", [False, True])
def test_counts_pad_id(device, pad_id, with_visible, count_path):
    base = 0 if pad_id == 0 else 2 ** 62
    case = make_case([25, 18], [10, 9], 3, vocab=3, device=device, base=base, with_visible=with_visible)
    got = call(gesr_kernels.hard_match_count, case, 3, pad_id=pad_id)
    want = call(reference.hard_match_count, case, 3, pad_id=pad_id)
    assert torch.equal(got, want)
    assert (got[case["candidate_ids"] == pad_id] == 0).all()
    assert (case["candidate_ids"] == pad_id).any(), "the test must contain pad candidates"


def test_counts_non_contiguous_and_stride0(device, count_path):
    case = make_case([40, 7], [6, 13], 6, device=device, with_visible=True)
    strided = dict(case)
    strided["history_ids"] = case["history_ids"][:, ::2]          # column stride 2
    strided["candidate_ids"] = case["candidate_ids"][:, ::2]
    strided["candidate_history_lengths"] = torch.stack([case["candidate_history_lengths"]] * 2, 1)[:, 0]
    dense = {k: (v.contiguous() if v is not None else None) for k, v in strided.items()}
    assert not strided["history_ids"].is_contiguous()
    got = call(gesr_kernels.hard_match_count, strided, 3)
    assert torch.equal(got, call(reference.hard_match_count, dense, 3))
    # Transposed storage (pairs-major) and a broadcast (stride-0) candidate row.
    t = dict(dense)
    t["history_ids"] = dense["history_ids"].t().contiguous().t()
    t["candidate_ids"] = dense["candidate_ids"][:1].expand(19, -1)
    assert t["candidate_ids"].stride(0) == 0
    assert torch.equal(call(gesr_kernels.hard_match_count, t, 3),
                       call(reference.hard_match_count, {**t, "candidate_ids": t["candidate_ids"].contiguous()}, 3))


def test_counts_empty_inputs(device, count_path):
    empty_cands = make_case([5, 3], [0, 0], 2, device=device)
    assert call(gesr_kernels.hard_match_count, empty_cands, 2).shape == (0, 2)
    empty_hist = make_case([0, 0], [3, 4], 2, device=device)
    assert torch.equal(call(gesr_kernels.hard_match_count, empty_hist, 2),
                       torch.zeros(7, 2, dtype=torch.int32, device=device))


# ---------------------------------------------------------------------------------------------------
# Embeddings and weight gradients
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("emb_dim", [8, 20])
def test_embedding_and_grad_match_reference(device, float_dtype, mode, emb_dim, count_path):
    max_count = 3
    case = make_case([30, 0, 61], [9, 4, 27], 3, device=device, with_visible=True)
    weight = torch.randn(3 * (max_count + 1), emb_dim, device=device, dtype=float_dtype, requires_grad=True)
    out = call(gesr_kernels.hard_match_embedding, case, weight, max_count, pad_id=1, mode=mode)
    ref = call(reference.hard_match_embedding, case, weight, max_count, pad_id=1, mode=mode)
    w64 = weight.detach().double().requires_grad_()
    ref64 = call(reference.hard_match_embedding, case, w64, max_count, pad_id=1, mode=mode)
    assert out.dtype == float_dtype and out.shape == ref.shape
    if mode == "concat":
        assert torch.equal(out, ref)  # a pure gather: bit-exact
    else:
        assert_within_budget(out, ref, ref64)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, weight, grad_out)
    (grad64,) = torch.autograd.grad(ref64, w64, grad_out.double())
    assert grad.dtype == float_dtype
    assert_within_budget(grad, grad_ref, grad64)


def test_embedding_grad_from_sum_backward(device):
    # .sum().backward() hands the backward an expanded stride-0 gradient.
    case = make_case([20, 9], [15, 6], 2, device=device)
    weight = torch.randn(2 * 5, 16, device=device, requires_grad=True)
    call(gesr_kernels.hard_match_embedding, case, weight, 4).sum().backward()
    counts = call(reference.hard_match_count, case, 4)
    rows = (counts.long() + torch.arange(2, device=device) * 5).flatten()
    expected = torch.zeros(10, device=device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
    assert torch.equal(weight.grad, expected[:, None].expand(-1, 16))


def test_embedding_many_rows_uses_several_splits(device):
    # Enough candidates for the backward's split reduction (> 256 rows) on a small history.
    case = make_case([4], [600], 2, device=device)
    weight = torch.randn(2 * 3, 16, device=device, requires_grad=True)
    out = call(gesr_kernels.hard_match_embedding, case, weight, 2, mode="sum")
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    w64 = weight.detach().double().requires_grad_()
    ref64 = call(reference.hard_match_embedding, case, w64, 2, mode="sum")
    (grad64,) = torch.autograd.grad(ref64, w64, grad_out.double())
    ref = call(reference.hard_match_embedding, case, weight, 2, mode="sum")
    (grad_ref,) = torch.autograd.grad(ref, weight, grad_out)
    assert_within_budget(grad, grad_ref, grad64)


@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_embedding_gradcheck_fp64(device, mode):
    case = make_case([6, 3], [4, 3], 2, device=device, vocab=3)
    weight = torch.randn(2 * 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: call(gesr_kernels.hard_match_embedding, case, w, 2, mode=mode),
                                    (weight,))


def test_embedding_ids_not_differentiable(device):
    case = make_case([6], [4], 2, device=device)
    weight = torch.randn(2 * 3, 4, device=device)
    out = call(gesr_kernels.hard_match_embedding, case, weight, 2)
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folded", [False, True])
def test_module_backends_and_folding_agree(device, folded):
    torch.manual_seed(1)
    case = make_case([35, 12], [10, 22], 3, device=device, with_visible=True)
    kwargs = dict(candidate_history_lengths=case["candidate_history_lengths"], pad_id=0)
    args = (case["history_ids"], case["history_offsets"], case["candidate_ids"], case["candidate_offsets"])
    model = HardMatchAttention(3, 4, 8, [16, 5], folded=folded, backend="triton").to(device)
    twin = HardMatchAttention(3, 4, 8, [16, 5], folded=False, backend="reference").to(device)
    twin.load_state_dict(model.state_dict())
    assert model.state_dict().keys() == twin.state_dict().keys()
    out, want = model(*args, **kwargs), twin(*args, **kwargs)
    assert out.shape == (32, 5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_module_auto_backend_uses_reference_on_cpu():
    model = HardMatchAttention(2, 3, 4, [8])
    assert model.backend == "auto"
    from gesr_kernels._core.backend import use_triton
    assert not use_triton("auto", torch.device("cpu")) and use_triton("auto", torch.device("cuda"))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        HardMatchAttention(2, 3, 4, [8], backend="cuda")
    with pytest.raises(ValueError, match="mlp_dims"):
        HardMatchAttention(2, 3, 4, [])
    with pytest.raises(ValueError, match="max_count"):
        HardMatchAttention(2, 0, 4, [8])


# ---------------------------------------------------------------------------------------------------
# Errors: raised before any launch, naming the argument
# ---------------------------------------------------------------------------------------------------
def good_args(device="cpu"):
    case = make_case([5, 4], [3, 2], 2, device=device)
    case["weight"] = torch.randn(2 * 4, 8, device=device)
    return case


def run_embedding(case, max_count=3, **kwargs):
    return gesr_kernels.hard_match_embedding(case["history_ids"], case["history_offsets"],
                                             case["candidate_ids"], case["candidate_offsets"],
                                             case["weight"], max_count,
                                             candidate_history_lengths=case["candidate_history_lengths"], **kwargs)


@pytest.mark.parametrize("change, error, message", [
    (dict(history_ids=torch.rand(9, 2)), TypeError, "history_ids must have dtype int32 or int64"),
    (dict(candidate_ids=torch.zeros(5, 2, dtype=torch.int32)), TypeError, "candidate_ids must have the dtype"),
    (dict(candidate_ids=torch.zeros(5, 3, dtype=torch.int64)), ValueError, "P = 2"),
    (dict(history_ids=torch.zeros(9, dtype=torch.int64)), ValueError, "history_ids must be 2-D"),
    (dict(history_offsets=torch.tensor([[0, 5, 9]])), ValueError, "history_offsets must be 1-D"),
    (dict(history_offsets=torch.tensor([0.0, 5.0, 9.0])), TypeError, "history_offsets must have dtype"),
    (dict(candidate_offsets=torch.tensor([0, 5])), ValueError, "candidate_offsets must be 1-D with B\\+1 = 3"),
    (dict(history_offsets=torch.tensor([1, 5, 9])), ValueError, "history_offsets must start at 0"),
    (dict(history_offsets=torch.tensor([0, 10, 9])), ValueError, "history_offsets must be non-decreasing"),
    (dict(candidate_offsets=torch.tensor([0, 3, 4])), ValueError, "candidate_offsets must end at the row count 5"),
    (dict(candidate_history_lengths=torch.tensor([1, 2, 3])), ValueError, "candidate_history_lengths must be 1-D with 5"),
    (dict(candidate_history_lengths=torch.tensor([1, -2, 3, 0, 0])), ValueError, "non-negative"),
    (dict(candidate_history_lengths=torch.ones(5)), TypeError, "candidate_history_lengths must have dtype"),
    (dict(weight=torch.randn(7, 8)), ValueError, "weight must have P\\*\\(max_count\\+1\\) = 2\\*4 = 8 rows"),
    (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.ones(8, 8, dtype=torch.int64)), TypeError, "weight must have dtype"),
    (dict(weight=[[0.0]]), TypeError, "weight must be a torch.Tensor"),
])
def test_errors(change, error, message):
    case = {**good_args(), **change}
    with pytest.raises(error, match=message):
        run_embedding(case)


def test_errors_scalars():
    case = good_args()
    with pytest.raises(ValueError, match="max_count must be >= 1"):
        run_embedding({**case, "weight": torch.randn(2, 8)}, max_count=0)
    with pytest.raises(TypeError, match="max_count must be an int"):
        run_embedding(case, max_count=3.0)
    with pytest.raises(ValueError, match="mode must be 'concat' or 'sum'"):
        run_embedding(case, mode="mean")
    with pytest.raises(TypeError, match="pad_id must be an int"):
        run_embedding(case, pad_id=1.5)
    with pytest.raises(ValueError, match="pad_id must fit in int64"):
        run_embedding(case, pad_id=2 ** 63)
    with pytest.raises(ValueError, match="max_count must be >= 1"):
        gesr_kernels.hard_match_count(case["history_ids"], case["history_offsets"], case["candidate_ids"],
                                      case["candidate_offsets"], 0)


def test_cpu_tensors_outside_the_interpreter_raise(monkeypatch):
    """Where the kernels compile for a GPU, CPU inputs get a clear error, not the launcher's pointer error."""
    import gesr_kernels._core.validation as validation
    monkeypatch.setattr(validation, "interpreting", lambda: False)
    case = good_args("cpu")
    with pytest.raises(ValueError, match="hard_match_embedding: the Triton kernels need CUDA tensors, "
                                         "got history_ids on cpu"):
        run_embedding(case)
    with pytest.raises(ValueError, match="hard_match_count: the Triton kernels need CUDA tensors"):
        gesr_kernels.hard_match_count(case["history_ids"], case["history_offsets"], case["candidate_ids"],
                                      case["candidate_offsets"], 3)


def test_errors_same_in_reference():
    case = {**good_args(), "history_offsets": torch.tensor([0, 10, 9])}
    with pytest.raises(ValueError, match="history_offsets must be non-decreasing"):
        reference.hard_match_embedding(case["history_ids"], case["history_offsets"], case["candidate_ids"],
                                       case["candidate_offsets"], case["weight"], 3)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_errors_mixed_devices():
    case = {**good_args(), "weight": torch.randn(8, 8, device="cuda")}
    with pytest.raises(ValueError, match="weight is on cuda"):
        run_embedding(case)


def test_validate_false_skips_data_checks(device, count_path):
    case = {**good_args(device), "candidate_history_lengths": torch.tensor([1, -2, 3, 0, 0], device=device)}
    # Negative lengths only fail the data check; with validate=False they mean "sees nothing".
    out = gesr_kernels.hard_match_count(case["history_ids"], case["history_offsets"], case["candidate_ids"],
                                        case["candidate_offsets"], 3,
                                        candidate_history_lengths=case["candidate_history_lengths"],
                                        validate=False)
    assert (out[1] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------
def test_opcheck(device):
    case = make_case([9, 14], [5, 3], 2, device=device, with_visible=True)
    weight = torch.randn(2 * 4, 8, device=device, requires_grad=True)
    base = (case["history_ids"], case["history_offsets"], case["candidate_ids"], case["candidate_offsets"])
    torch.library.opcheck(torch.ops.gesr.hard_match_count.default,
                          (*base, 3, 1, case["candidate_history_lengths"]))
    torch.library.opcheck(torch.ops.gesr.hard_match_embedding_fwd.default,
                          (*base, weight.detach(), 3, None, None, "concat"))
    out, counts = torch.ops.gesr.hard_match_embedding_fwd(*base, weight.detach(), 3, None, None, "sum")
    torch.library.opcheck(torch.ops.gesr.hard_match_embedding_bwd.default,
                          (torch.randn_like(out), counts, 3, "sum", 8, 8, torch.float32))


def test_torch_compile_fullgraph(device):
    case = make_case([17, 30], [6, 9], 2, device=device, with_visible=True)
    weight = torch.randn(2 * 4, 8, device=device, requires_grad=True)

    def f(h, ho, c, co, w, lengths):
        counts = gesr_kernels.hard_match_count(h, ho, c, co, 3, candidate_history_lengths=lengths)
        emb = gesr_kernels.hard_match_embedding(h, ho, c, co, w, 3, candidate_history_lengths=lengths,
                                                mode="sum")
        return emb * 2 + counts.sum(1, keepdim=True)

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    args = (case["history_ids"], case["history_offsets"], case["candidate_ids"], case["candidate_offsets"],
            weight, case["candidate_history_lengths"])
    got = compiled(*args)
    want = f(*args)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got.sum(), weight)
    (g2,) = torch.autograd.grad(want.sum(), weight)
    torch.testing.assert_close(g1, g2)


# ---------------------------------------------------------------------------------------------------
# GPU only: half-precision tables, large shapes, determinism
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2048, 2048, 16), (64, 2048, 64, 16), (1024, 256, 1, 16)])
def test_gpu_large_shapes_match_reference(shape):
    users, hist, cand, pairs = shape
    case = make_case([hist] * users, [cand] * users, pairs, vocab=512, device="cuda")
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 16),
                       call(reference.hard_match_count, case, 16))
    case["candidate_history_lengths"] = torch.randint(0, hist + 10, (users * cand,), device="cuda")
    assert torch.equal(call(gesr_kernels.hard_match_count, case, 16, pad_id=3),
                       call(reference.hard_match_count, case, 16, pad_id=3))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_gpu_weight_grad_deterministic(mode):
    case = make_case([2048] * 4, [1024] * 4, 16, vocab=64, device="cuda")
    weight = torch.randn(16 * 17, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = call(gesr_kernels.hard_match_embedding, case, weight, 16, mode=mode)
    grad_out = torch.randn_like(out)
    grads = [torch.autograd.grad(call(gesr_kernels.hard_match_embedding, case, weight, 16, mode=mode),
                                 weight, grad_out)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    w64 = weight.detach().double().requires_grad_()
    ref64 = call(reference.hard_match_embedding, case, w64, 16, mode=mode)
    (grad64,) = torch.autograd.grad(ref64, w64, grad_out.double())
    ref = call(reference.hard_match_embedding, case, weight, 16, mode=mode)
    (grad_ref,) = torch.autograd.grad(ref, weight, grad_out)
    assert_within_budget(grads[0], grad_ref, grad64)

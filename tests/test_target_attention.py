"""target_aware_attention: the Triton kernels against the PyTorch twin in reference/."""

import pytest
import torch

from conftest import DEVICE  # cuda when available: the same cases run on the GPU
from helpers import (assert_max_error_within_budget, compile_for_h100_in_subprocess, record_results, set_arg,
                     set_kw)

import reference

FN = "target_aware_attention"


def offsets_of(lengths, device):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out.to(device)


def make_case(history_lens, candidate_lens, *, heads=2, d_qk=16, d_v=16, dtype=torch.float32,
              device=DEVICE, cached=False, cross=False, cutoffs=False, requires_grad=False, spread=1.0):
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
        ("d_v_too_large", lambda a, kw: (a.__setitem__(2, a[2].repeat(1, 1, 17)), a.__setitem__(6, a[6].repeat(1, 1,
        17))),
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
def test_validate_false_skips_data_checks(fn, device):
    args, kwargs = make_case([4, 0, 5], [2, 3, 1], device=device)
    # A bound smaller than the data is only caught by the data checks.
    fn(*args, max_history_len=3, validate=False)
    with pytest.raises(ValueError):
        fn(*args, max_history_len=3)


def test_cpu_tensors_outside_the_interpreter_raise(monkeypatch):
    """On a machine where the kernels compile for a GPU, CPU inputs get a clear error instead of the
    launcher's message about pointers; the twin still takes them."""
    import gesr_kernels._core.validation as validation
    monkeypatch.setattr(validation, "interpreting", lambda: False)
    args, kwargs = make_case([4, 0, 5], [2, 3, 1], device="cpu")
    with pytest.raises(ValueError, match=f"{FN}: the Triton kernels need CUDA tensors, got candidate_q on cpu"):
        kernel_fn(*args, **kwargs)  # (defined below)
    reference.target_aware_attention(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Kernel against the twin: error budget against an fp64 run of the twin.
# ------------------------------------------------------------------------------------------------
kernel_fn = pytest.importorskip("gesr_kernels").target_aware_attention


def random_lengths(num_users, longest, *, empty=True):
    """Random lengths in [1, longest] with one user at 0 when ``empty`` (fresh every call)."""
    lengths = torch.randint(1, longest + 1, (num_users,)).tolist()
    if empty:
        lengths[int(torch.randint(0, num_users, ()))] = 0
    return lengths


def _to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def _run(fn, args, kwargs, cotangents=None):
    """Outputs (None dropped) and, given cotangents, the gradients of every q/k/v that requires grad."""
    outs = [o for o in fn(*args, **kwargs) if o is not None]
    if cotangents is None:
        return outs
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs],
                                allow_unused=True) if pairs else [None] * len(inputs)
    return outs + [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_bitwise_repeatable(args, kwargs, repeats=2):
    """Outputs and gradients of ``repeats`` more runs with the same cotangents equal the first run's bitwise."""
    cotangents = [torch.randn(o.shape, device=o.device, dtype=o.dtype) for o in kernel_fn(*args, **kwargs)]
    first = _run(kernel_fn, args, kwargs, cotangents)
    for _ in range(repeats):
        for a, b in zip(first, _run(kernel_fn, args, kwargs, cotangents)):
            assert torch.equal(a, b)


def assert_within_budget(args, kwargs, *, grads=False, band=1e-5):
    """Kernel error vs the fp64 twin <= 2 x (twin in the input dtype vs fp64) + band * scale, per tensor."""
    ref64 = _run(reference.target_aware_attention, [_to64(a) for a in args], kwargs)
    cotangents = [torch.randn_like(o) for o in ref64] if grads else None
    if grads:
        ref64 = _run(reference.target_aware_attention, [_to64(a) for a in args], kwargs, cotangents)
    twin = _run(reference.target_aware_attention, args, kwargs, cotangents)
    kern = _run(kernel_fn, args, kwargs, cotangents)
    assert len(kern) == len(ref64)
    for i, (k, t, r) in enumerate(zip(kern, twin, ref64)):
        assert_max_error_within_budget(f"tensor {i}", k, t, r, band)


MODES = [pytest.param({}, id="full"), pytest.param({"cached": True}, id="cached"),
         pytest.param({"cross": True}, id="cross")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("grads", [False, True], ids=["fwd", "bwd"])
def test_matches_twin(grads, activation, causal, cutoffs, mode):
    # Lengths cross several 32-row tiles (the interpreter's blocks) and leave partial tails.
    history, candidates = random_lengths(4, 75), random_lengths(4, 40)
    args, kwargs = make_case(history, candidates, cutoffs=cutoffs, requires_grad=grads, **mode)
    kwargs.update(activation=activation, history_causal=causal)
    assert_within_budget(args, kwargs, grads=grads)


@pytest.mark.parametrize("d_qk,d_v", [(16, 32), (48, 16), (32, 80), (256, 256)])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_head_dims(activation, d_qk, d_v):
    args, kwargs = make_case([9, 33], [5, 3], heads=1, d_qk=d_qk, d_v=d_v, cutoffs=True, requires_grad=True)
    assert_within_budget(args, {**kwargs, "activation": activation}, grads=True)


@pytest.mark.parametrize("m,n", [(16, 32), (32, 16)])
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_query_and_key_tiles_of_different_heights(activation, cutoffs, m, n):
    # The GPU's tiles differ from the interpreter's: where the causal diagonal and the unmasked key and
    # query ranges start depends on both tile heights, so run the kernels with unequal ones here.
    import gesr_kernels.target_attention as ta
    args, kwargs = make_case([37, 70, 5], [9, 20, 0], cutoffs=cutoffs, requires_grad=True)
    ta._FWD_BLOCKS_OVERRIDE = ta._Blocks(m, n, 4, 1)
    # dK/dV programs own n keys and step m queries; dQ programs own m queries and step n keys.
    ta._BWD_BLOCKS_OVERRIDE = ta._BwdBlocks(kv=n, kv_q=m, q=m, q_kv=n, warps=4, stages=1)
    try:
        assert_within_budget(args, {**kwargs, "activation": activation}, grads=True)
    finally:
        ta._FWD_BLOCKS_OVERRIDE = ta._BWD_BLOCKS_OVERRIDE = None


@pytest.mark.parametrize("splits", [(2, 1), (3, 2), (1, 4)], ids=["c2", "c3h2", "h4"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_key_splits(activation, mode, splits, monkeypatch):
    # Query tiles whose key range is cut into runs merged afterwards (the GPU does this when few tiles
    # would leave SMs idle): runs that are empty for short or cut-off rows, uneven run counts, the own
    # key in run 0 only, rows that see nothing in any run; outputs, statistics (via the gradients) alike.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_KEY_SPLITS_OVERRIDE", splits)
    args, kwargs = make_case([37, 150, 5, 0], [9, 20, 0, 4], cutoffs=True, requires_grad=True, **mode)
    assert_within_budget(args, {**kwargs, "activation": activation}, grads=True)


@pytest.mark.parametrize("group_programs", [2, 6, 128], ids=["groups-of-1", "partial-group", "one-group"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_history_order(activation, causal, group_programs, monkeypatch):
    # Position-major history tiles (taken when max_history_len is given): users in groups of
    # group_programs // heads (1, a last group of 1 real user out of 3, all 5); users with no history or
    # shorter than the bound (spare positions), a bound above the longest history. Every tile computes what
    # it computes in the flat map, so outputs are bitwise those of the flat map, and within budget.
    import gesr_kernels.target_attention as ta
    args, kwargs = make_case([37, 0, 70, 5, 64], [9, 3, 20, 0, 4], cutoffs=True)
    kwargs.update(activation=activation, history_causal=causal, silu_normalizer=80.0)
    flat = kernel_fn(*args, **kwargs)
    monkeypatch.setattr(ta, "_HISTORY_ORDER_OVERRIDE", group_programs)
    assert ta._history_order(176, 5, 2, 32, 80) is not None
    positional = kernel_fn(*args, **kwargs, max_history_len=80)
    for a, b in zip(flat, positional):
        assert torch.equal(a, b)
    assert_within_budget(args, {**kwargs, "max_history_len": 80}, grads=True)


@pytest.mark.parametrize("slots", [None, 2], ids=["rule", "two-slots"])
@pytest.mark.parametrize("mode", [{}, {"cross": True}], ids=["full", "cross"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_candidates_grouped_with_history(activation, causal, mode, slots, monkeypatch):
    # Position-major order with each group's candidate tiles first (taken when max_candidates fits one
    # candidate tile; "two-slots" forces two tiles per user, most of them spare): groups of 2 users, a partial
    # last group, a user without candidates, one without history. Bitwise the flat order's outputs (the same
    # tiles), and within budget.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_HISTORY_ORDER_OVERRIDE", 4)
    monkeypatch.setattr(ta, "_CANDIDATE_POSITIONS_OVERRIDE", slots)
    chosen = record_results(monkeypatch, ta, "_candidate_positions")
    args, kwargs = make_case([37, 0, 70, 5, 64], [9, 3, 16, 0, 4], cutoffs=True, **mode)
    kwargs.update(activation=activation, history_causal=causal, silu_normalizer=80.0, max_history_len=80)
    grouped = kernel_fn(*args, **kwargs, max_candidates=16)  # the interpreter's candidate tiles: 16 rows
    assert chosen == [slots or 1]
    monkeypatch.setattr(ta, "_CANDIDATE_POSITIONS_OVERRIDE", 0)
    for a, b in zip(kernel_fn(*args, **kwargs, max_candidates=16), grouped):
        assert torch.equal(a, b)
    monkeypatch.setattr(ta, "_CANDIDATE_POSITIONS_OVERRIDE", slots)
    assert_within_budget(args, {**kwargs, "max_candidates": 16}, grads=True)


def test_candidate_positions_choice():
    # One candidate tile per user in the position-major order when the caller's bound fits one tile.
    from gesr_kernels.target_attention import _candidate_positions
    assert _candidate_positions(16, 256 * 16, 16) == 1     # (256, 512, 16, 2, 64)
    assert _candidate_positions(64, 32 * 64, 64) == 1      # (32, 1024, 64, 4, 64)
    assert _candidate_positions(32, 32 * 33, 64) == 0      # jagged lists: two tiles for the longest
    assert _candidate_positions(16, 256 * 16, None) == 0   # no bound
    assert _candidate_positions(16, 0, 16) == 0            # no candidates


def test_history_order_choice():
    # (group users, positions) from host-known sizes only; None keeps the flat tile map.
    from gesr_kernels.target_attention import _history_order
    assert _history_order(32 * 1024, 32, 4, 64, 1024) == (16, 16)     # (32, 1024, 64, 4, 64): two groups
    assert _history_order(256 * 512, 256, 2, 64, 512) == (32, 8)      # (256, 512, 16, 2, 64): eight groups
    assert _history_order(8 * 3072, 8, 4, 128, 3072) == (8, 24)       # one group of all users
    assert _history_order(16 * 640, 16, 4, 64, 1024) == (16, 16)      # jagged, within twice the flat grid
    assert _history_order(20 * 640, 20, 4, 64, 1024) is None          # two groups would exceed it
    assert _history_order(8192, 1, 4, 128, 8192) is None              # one user: the flat map is that order
    assert _history_order(32 * 1024, 32, 4, 64, None) is None         # no bound: no sync to find one
    assert _history_order(32 * 100, 32, 4, 64, 8192) is None          # a loose bound: mostly spare programs
    assert _history_order(0, 4, 4, 64, 100) is None


def test_key_split_choice():
    # Cached mode on a 132-SM GPU. One user's 1024 candidates in 64-row tiles x 4 heads (serving, #4):
    # 64 programs run in 4 key runs (two waves); more programs or shorter histories keep fewer runs.
    from gesr_kernels.target_attention import _key_splits
    assert _key_splits(64, 8192, 132) == 4
    assert _key_splits(16, 8192, 132) == 8   # 1024-key runs at least
    assert _key_splits(16, 2048, 132) == 2
    assert _key_splits(128, 2048, 132) == 2
    assert _key_splits(64, 1024, 132) == 1
    assert _key_splits(133, 8192, 132) == 1
    # Half precision at d <= 64 (several programs per SM), histories of 2048+ keys: up to 4 programs per SM,
    # 512-key runs.
    assert _key_splits(64, 8192, 132, small_heads=True) == 8
    assert _key_splits(128, 2048, 132, small_heads=True) == 4
    assert _key_splits(32, 4096, 132, small_heads=True) == 8    # 512-key runs at least
    assert _key_splits(16, 8192, 132, small_heads=True) == 16
    assert _key_splits(64, 512, 132, small_heads=True) == 1
    assert _key_splits(265, 8192, 132, small_heads=True) == 1
    assert _key_splits(128, 1024, 132, small_heads=True) == 1    # short histories: the first limits
    assert _key_splits(32, 1536, 132, small_heads=True) == 1


def test_full_mode_tile_spreading_choice(monkeypatch):
    # Full mode on a 132-SM GPU, bf16, d = 128, 4 heads: 64-row tiles when they still fit in one wave.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "interpreting", lambda: False)  # the GPU tile choice
    bf16 = torch.bfloat16
    wide = lambda rows, users: ta._Blocks(ta._row_block(rows, users, 128), 64, 8, 3)  # noqa: E731 (GPU default)
    def choice(total_h, total_c, users):
        return ta._spread_full_blocks(wide(total_h, users), wide(total_c, users), total_h, total_c, users, 4,
                                      132, 128, 128, bf16)
    h, c = choice(1041, 560, 1)  # (9+1 + 5+1) x 4 = 64 programs of 128 rows -> (17+1 + 9+1) x 4 = 112
    assert (h.m, c.m) == (64, 64)
    h, c = choice(2048, 2048, 1)  # 64-row tiles would need 264 programs: keep 136 of 128 rows
    assert (h.m, c.m) == (128, 128)
    h, c = choice(2048, 512, 2)   # (32+2 + 8+2) x 4 = 176 > 132, but 80 programs of 128 rows: share 2.75
    assert (h.m, c.m) == (64, 64)
    h, c = choice(8192, 2048, 8)  # 8 users of 1024 history rows: 320 programs of 128 rows, share 0.69
    assert (h.m, c.m) == (128, 128)
    # One long history: the longest 128-row program would take 2.07 times the average work per SM.
    h, c = choice(4089, 2, 1)     # candidate tiles of 64 rows too (wgmma steps on the critical path)
    assert (h.m, c.m) == (64, 64) and h.warps == 4
    h, c = choice(4096, 512, 1)   # 1.65
    assert (h.m, c.m) == (64, 64)
    h, c = choice(8192, 64, 2)    # 1.0
    assert (h.m, c.m) == (128, 32)
    h, c = choice(8192, 1024, 1)  # 0.83
    assert (h.m, c.m) == (128, 128)


def test_forward_key_step_choice(monkeypatch):
    # Full mode on a 132-SM GPU, d = 64, 4 heads: 64-key steps for few programs or (softmax) long histories.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "interpreting", lambda: False)  # the GPU tile choice
    def keys(total_h, total_c, users, silu=False, d=64, dtype=torch.bfloat16):
        h, c = (ta._fwd_blocks(rows, users, d, d, dtype) for rows in (total_h, total_c))
        h, c = ta._fwd_key_steps(h, c, total_h, total_c, users, 4, 132, d, d, dtype, silu)
        assert h.n == c.n
        return h.n
    assert keys(4096, 64, 1) == keys(4096, 64, 1, silu=True) == 64            # 260 programs
    assert keys(4 * 1024, 4 * 256, 4) == keys(4 * 1024, 4 * 256, 4, True) == 64  # 320
    assert keys(8 * 1024, 8 * 256, 8, silu=True) == 64                       # 640 <= 6 x 132
    assert keys(8 * 2048, 8 * 64, 8) == 64 and keys(8 * 2048, 8 * 64, 8, silu=True) == 32  # 1056, history 2048
    assert keys(16 * 1024, 16 * 64, 16) == keys(16 * 1024, 16 * 64, 16, True) == 32      # 1088, history 1024
    assert keys(32 * 1024, 32 * 64, 32) == 32                                # the suite's (32, 1024, 64, 4, 64)
    assert keys(256 * 512, 256 * 16, 256) == 32
    assert keys(4096, 64, 1, d=128) == 64 and keys(4096, 64, 1, d=32) == 32  # d = 128 tiles are 64 keys already
    assert keys(4096, 64, 1, dtype=torch.float32) == 64                      # fp32 tiles: 64 keys at d = 64
    assert keys(20, 4, 1) == 32                                              # 64-row history tiles only


def test_backward_tile_choice(monkeypatch):
    # The GPU choice (the interpreter always takes small tiles), on a 132-SM GPU.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "interpreting", lambda: False)
    bf16, wide = torch.bfloat16, ta._BwdBlocks(128, 32, 128, 64, 8, 3)
    medium, narrow = ta._BwdBlocks(64, 32, 64, 64, 4, 3), ta._BwdBlocks(32, 64, 64, 32, 4, 3)
    paired = ta._BwdBlocks(64, 32, 64, 32, 4, 3)  # SiLU where softmax takes the wide tiles
    assert ta._bwd_blocks(128, 128, bf16, 8192, 1, 4, 132) == wide       # (1, 8192, 1024, 4, 128): 260 programs
    assert ta._bwd_blocks(128, 128, bf16, 8192, 1, 2, 132) == wide       # 130 programs: about one wave
    assert ta._bwd_blocks(128, 128, bf16, 3072, 1, 4, 132) == wide       # 100 programs: 3/4 of a wave
    assert ta._bwd_blocks(128, 128, bf16, 2560, 1, 4, 132) == medium     # 84 programs
    assert ta._bwd_blocks(128, 128, bf16, 2048, 1, 4, 132) == medium     # (1, 2048, 2048, 4, 128): 68 programs
    # ... unless the candidates are known: then the wide tiles with split dK/dV programs (_paired_wide_split).
    assert ta._bwd_blocks(128, 128, bf16, 2048, 1, 4, 132, total_candidates=2048) == wide
    assert ta._bwd_blocks(128, 128, bf16, 2048, 1, 4, 132, total_candidates=1024) == medium
    assert ta._bwd_blocks(128, 128, bf16, 16 * 1024, 16, 4, 132) == wide  # many users of 1024 rows
    assert ta._bwd_blocks(128, 128, bf16, 32 * 512, 32, 4, 132) == medium  # many, but short, histories
    assert ta._bwd_blocks(128, 128, bf16, 8192, 1, 4) == medium          # SM count unknown
    # SiLU: two 64-key programs per SM from 0.4 of a wave of wide programs, once histories are long; else the
    # narrow tiles. Never the paired split.
    assert ta._bwd_blocks(128, 128, bf16, 2048, 1, 4, 132, silu=True) == paired   # 64 programs
    assert ta._bwd_blocks(128, 128, bf16, 2048, 1, 4, 132, silu=True, total_candidates=2048) == paired
    assert ta._bwd_blocks(128, 128, bf16, 8192, 1, 4, 132, silu=True) == paired
    assert ta._bwd_blocks(128, 128, bf16, 1041, 1, 4, 132, silu=True) == narrow  # 36 programs
    assert ta._bwd_blocks(128, 128, bf16, 32 * 512, 32, 4, 132, silu=True) == narrow
    assert ta._bwd_blocks(128, 128, bf16, 8192, 1, 4, silu=True) == narrow
    assert ta._bwd_blocks(96, 128, torch.float16, 8192, 1, 4, 132) == wide
    assert ta._bwd_blocks(64, 64, bf16, 8192, 1, 4, 132) == medium
    assert ta._bwd_blocks(64, 64, bf16, 8192, 1, 4, 132, silu=True) == medium
    assert ta._bwd_blocks(128, 128, torch.float32, 8192, 1, 4, 132).warps == 4
    assert ta._bwd_blocks(256, 256, bf16, 8192, 1, 4, 132).kv == 32


def test_register_cap_choice():
    # Register caps (Triton's maxnreg) on a 132-SM GPU: more programs per SM for launches of many programs.
    import gesr_kernels.target_attention as ta
    bf16, medium = torch.bfloat16, ta._BwdBlocks(64, 32, 64, 64, 4, 3)
    # Backward, d <= 64: (256, 512, 16, 2, 64) has 9856 programs; (1, 2048, 2048, 4, 64) unsplit 384.
    assert ta._bwd_register_cap(medium, 9856, 132, False, 64, 64, bf16) == ta.BWD_REGISTER_CAP
    assert ta._bwd_register_cap(medium, 4 * 132, 132, False, 32, 32, torch.float16) == ta.BWD_REGISTER_CAP
    assert ta._bwd_register_cap(medium, 384, 132, False, 64, 64, bf16) is None     # 2.9 programs per SM
    assert ta._bwd_register_cap(medium, 9856, 132, True, 64, 64, bf16) is None     # split dK/dV programs
    assert ta._bwd_register_cap(medium, 9856, 0, False, 64, 64, bf16) is None      # SM count unknown
    assert ta._bwd_register_cap(medium, 9856, 132, False, 64, 64, torch.float32) is None
    assert ta._bwd_register_cap(medium, 9856, 132, False, 128, 128, bf16) is None
    assert ta._bwd_register_cap(medium._replace(stages=2), 9856, 132, False, 64, 64, bf16) is None
    # Forward, softmax, d in 33-64, 64x32 history tiles, candidate tiles under 64 rows, >= 20 programs per SM.
    history, small = ta._Blocks(64, 32, 4, 3), ta._Blocks(16, 32, 4, 3)
    cap = lambda h=history, c=small, programs=5120, d=64, dtype=bf16, silu=False: ta._fwd_register_cap(  # noqa: E731
        h, c, programs, 132, d, d, dtype, silu)
    assert cap() == ta.FWD_REGISTER_CAP                                  # (256, 512, 16, 2, 64)
    assert cap(programs=3328) == ta.FWD_REGISTER_CAP                     # (128, 768, 32, 2, 64): 25 per SM
    assert cap(programs=2176) is None                                    # jagged (32, 1024, 64, 4, 64): 16.5
    assert cap(c=small._replace(m=64)) is None                           # 64-row candidate tiles
    assert cap(silu=True) is None and cap(d=32) is None and cap(d=128) is None
    assert cap(dtype=torch.float32) is None and cap(h=history._replace(n=64)) is None
    assert ta._fwd_register_cap(history, small, 5120, 0, 64, 64, bf16, False) is None


@pytest.mark.parametrize("split_dkdv", [None, True], ids=["dkdv-default", "dkdv-split"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_merged_skip(activation, split_dkdv, monkeypatch):
    # Internal layout of compat.hstu_mha: history and candidate tensors are views of the same rows, the even
    # users are skipped, and candidate results land in history_out's rows. It must equal the plain call's
    # history results on history rows and candidate results on candidate rows (bitwise: the same tiles), and
    # its gradients those of the plain call with each output's cotangent kept on its own rows; also with
    # every key tile's dK/dV in two programs (both exit for a skipped user).
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_DKDV_SPLIT_OVERRIDE", split_dkdv)
    from gesr_kernels.compat import split_offsets
    from gesr_kernels.target_attention import _target_aware_attention
    from helpers import offsets_from_lengths
    lengths, targets = [37, 0, 75, 6, 20], [9, 0, 20, 6, 0]
    total, heads = sum(lengths), 2
    q, k, v = (torch.randn(total, heads, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    seq = offsets_from_lengths(lengths, device=DEVICE)
    history_offsets, candidate_offsets = split_offsets(seq, torch.tensor(targets, device=DEVICE))
    users = history_offsets.shape[0] - 1
    skip = (torch.arange(users, device=DEVICE) % 2 == 0).to(torch.int32)
    kwargs = dict(activation=activation, scale=None, silu_normalizer=None, history_causal=True,
                  candidate_history_lengths=torch.randint(0, 80, (total,), device=DEVICE), max_history_len=None,
                  max_candidates=None, validate=True)
    args = (q, k, v, history_offsets, q.view(q.shape), k.view(k.shape), v.view(v.shape), candidate_offsets)
    plain = _target_aware_attention(*args, **kwargs)
    merged, no_rows = _target_aware_attention(*args, **kwargs, merged_skip=skip)
    assert no_rows.shape == (0, heads, 16)
    is_candidate = torch.zeros(total, dtype=torch.bool, device=DEVICE)
    for user in range(1, users, 2):
        is_candidate[int(candidate_offsets[user]):int(candidate_offsets[user + 1])] = True
    assert int(is_candidate.sum()) == sum(targets)
    assert torch.equal(merged, torch.where(is_candidate[:, None, None], plain[1], plain[0]))
    cotangent = torch.randn_like(merged)
    keep = is_candidate[:, None, None]
    expected = torch.autograd.grad(plain, [q, k, v], [cotangent * ~keep, cotangent * keep])
    got = torch.autograd.grad(merged, [q, k, v], cotangent)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="merged_skip needs history and candidate queries over the same rows"):
        _target_aware_attention(None, *args[1:], **kwargs, merged_skip=skip)


def test_merged_skip_statistics_are_written(monkeypatch):
    # In merged mode (compat.hstu_mha) the forward writes no statistics for skipped users' rows, yet the
    # backward's row-statistics pass reads every row. With every fresh buffer poisoned with NaN, that pass
    # must still produce no NaN: the forward's statistics must not come from uninitialised memory.
    import gesr_kernels.target_attention as ta
    from gesr_kernels.compat import split_offsets
    from helpers import offsets_from_lengths
    new_empty = torch.Tensor.new_empty

    def poisoned_new_empty(self, *args, **kwargs):
        out = new_empty(self, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
    lengths, targets = [37, 0, 75, 6], [9, 0, 20, 6]
    total, heads = sum(lengths), 2
    q, k, v = (torch.randn(total, heads, 16, device=DEVICE) for _ in range(3))
    history_offsets, candidate_offsets = split_offsets(offsets_from_lengths(lengths, device=DEVICE),
                                                       torch.tensor(targets, device=DEVICE))
    users = history_offsets.shape[0] - 1
    skip = (torch.arange(users, device=DEVICE) % 2 == 0).to(torch.int32)
    out, _, history_lse, candidate_lse = ta._target_attention_fwd(
        q, k, v, history_offsets, q, k, v, candidate_offsets, None, "softmax", 0.25, 1.0, True, merged_skip=skip)
    assert not out.isnan().any()
    history_stats, candidate_stats = ta._backward_stats(out, torch.ones_like(out), history_lse, out,
                                                        torch.ones_like(out), candidate_lse)
    assert not history_stats.isnan().any() and not candidate_stats.isnan().any()


@pytest.mark.parametrize("heads", [1, 3])
def test_heads_and_single_user(heads):
    args, kwargs = make_case([17], [1], heads=heads, requires_grad=True)
    assert_within_budget(args, kwargs, grads=True)


@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_empty_histories_and_candidates(activation):
    # No history anywhere: softmax candidates see only themselves; cross mode sees nothing -> zeros.
    for cross in (False, True):
        args, kwargs = make_case([0, 0, 0], [2, 0, 3], cross=cross, requires_grad=True)
        assert_within_budget(args, {"activation": activation}, grads=True)
    out = kernel_fn(*make_case([0, 0], [2, 3], cross=True)[0], activation=activation)[1]
    assert out.shape == (5, 2, 16) and not out.any()
    # No candidates at all, and candidates that see no history through a zero cutoff.
    for cached in (False, True):
        args, kwargs = make_case([4, 6], [0, 0], cached=cached, requires_grad=True)
        assert_within_budget(args, {"activation": activation}, grads=True)
    args, _ = make_case([4, 6], [2, 3], cross=True)
    zero = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    assert not kernel_fn(*args, activation=activation, candidate_history_lengths=zero)[1].any()
    # Gradients when some candidates of a user see nothing (their softmax statistic is +inf) and others do.
    args, _ = make_case([4, 6], [2, 3], cross=True, requires_grad=True)
    cutoffs = torch.tensor([0, 3, 0, 6, 0], dtype=torch.int64, device=DEVICE)
    assert_within_budget(args, {"activation": activation, "candidate_history_lengths": cutoffs}, grads=True)


def test_int32_offsets_and_strided_inputs():
    history, candidates = [5, 40, 0], [3, 0, 6]
    args, kwargs = make_case(history, candidates, heads=2, cutoffs=True)
    hq, hk, hv, hoff, cq, ck, cv, coff = args
    # history_k: a transposed view; candidate_v: stride 0 over heads; history_q: every other column.
    hk = torch.randn(2, hk.shape[0], 16, device=DEVICE).transpose(0, 1).requires_grad_()
    cv = torch.randn(cv.shape[0], 1, 16, device=DEVICE).expand(-1, 2, -1).detach().requires_grad_()
    hq = torch.randn(hq.shape[0], 2, 32, device=DEVICE)[..., ::2].requires_grad_()
    args = [hq, hk, hv.requires_grad_(), hoff.int(), cq.requires_grad_(), ck.requires_grad_(), cv, coff.int()]
    kwargs["candidate_history_lengths"] = kwargs["candidate_history_lengths"].int()
    assert_within_budget(args, kwargs, grads=True)


@pytest.mark.parametrize("mode", MODES + [pytest.param({"fused": True}, id="fused")])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_tma_copies(activation, mode, monkeypatch):
    # On Hopper the unmasked loops copy their tiles through TMA descriptors of (rows, H * d) views
    # (_use_tma). Forced on in every role here: the same values reach the same arithmetic, so outputs and
    # gradients equal the pointer tiles' bit for bit. Two heads and d_qk != d_v check each box and the
    # head's column; lengths leave unmasked tiles next to masked ones for every kind of query. "fused":
    # history q, k, v are slices of one (rows, 3, H, d) projection (rows 3 * H * d apart).
    import gesr_kernels.target_attention as ta
    mode = dict(mode)
    fused = mode.pop("fused", False)
    args, kwargs = make_case([37, 70, 5, 0], [9, 40, 0, 4], heads=2, d_qk=32, d_v=32 if fused else 16,
                             cutoffs=False, requires_grad=True, **mode)
    if fused:
        qkv = torch.randn(args[1].shape[0], 3, 2, 32, device=DEVICE, requires_grad=True)
        args = (qkv[:, 0], qkv[:, 1], qkv[:, 2]) + tuple(args[3:])
        assert args[1].stride(0) == 3 * 2 * 32
    kwargs["activation"] = activation
    outs = _run(kernel_fn, args, kwargs)
    cotangents = [torch.randn_like(o) for o in outs]
    expected = _run(kernel_fn, args, kwargs, cotangents)
    made = record_results(monkeypatch, ta, "_tma_descriptors")
    monkeypatch.setattr(ta, "_TMA_OVERRIDE", dict(fwd=True, dkdv=True, dq=True))
    got = _run(kernel_fn, args, kwargs, cotangents)
    # Forward, dK/dV (no history queries in cached mode: no descriptors), dQ.
    assert [d is not None for d in made] == [True, not mode.get("cached"), True]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"tensor {i}"


@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_backward_as_two_launches(activation, monkeypatch):
    # The tuning hook _BWD_SPLIT_OVERRIDE runs the dK/dV programs and the dQ programs as two launches of
    # the same kernel (DKDV / DQ constexprs): with the same tiles every program does the same work, so the
    # gradients equal the one-launch gradients bit for bit; a None entry skips that launch.
    import gesr_kernels.target_attention as ta
    args, kwargs = make_case([37, 70, 0, 5], [9, 40, 3, 0], cutoffs=True, requires_grad=True)
    kwargs["activation"] = activation
    outs = _run(kernel_fn, args, kwargs)
    cotangents = [torch.randn_like(o) for o in outs]
    expected = _run(kernel_fn, args, kwargs, cotangents)
    blocks = ta._bwd_blocks(16, 16, torch.float32)
    monkeypatch.setattr(ta, "_BWD_SPLIT_OVERRIDE", (blocks, blocks))
    got = _run(kernel_fn, args, kwargs, cotangents)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"tensor {i}"
    # dK/dV alone: history k and v gradients as before (the other gradients are left unwritten).
    monkeypatch.setattr(ta, "_BWD_SPLIT_OVERRIDE", (blocks, None))
    got = _run(kernel_fn, args, kwargs, cotangents)
    assert torch.equal(got[3], expected[3]) and torch.equal(got[4], expected[4])


_CAUSAL_IDS = [(True, "causal"), (False, "full")]
_CUTS = [pytest.param(causal, False, None, id=f"history-candidates-{name}") for causal, name in _CAUSAL_IDS] + [
    pytest.param(causal, True, None, id=f"halves-{name}") for causal, name in _CAUSAL_IDS] + [
    pytest.param(True, True, (64, 16, 32, 32, 4, 1), id="halves-tall-key-tiles-causal")]


@pytest.mark.parametrize("causal,halves,tiles", _CUTS)
@pytest.mark.parametrize("mode", [pytest.param({}, id="full"), pytest.param({"cross": True}, id="cross")])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_split_dkdv_programs(activation, mode, causal, halves, tiles, monkeypatch):
    # Two dK/dV programs per key tile, the later one summing both partials (the GPU does this when one
    # program would stream a long history and a long candidate list), cut between the tile's history and
    # candidate rows or (halves) near the middle of its rows: users without candidates or history, cutoffs,
    # tails that are not tile multiples; halves cut within the history, within the candidates and (64-key
    # tiles with 16-row query steps: the first key tiles of users 0 and 4) within the causal diagonal. dQ
    # and the own key's gradients come from the same programs as without the split: bitwise equal.
    import gesr_kernels.target_attention as ta
    blocks = tiles and ta._BwdBlocks(*tiles)
    monkeypatch.setattr(ta, "_BWD_BLOCKS_OVERRIDE", blocks)
    monkeypatch.setattr(ta, "_SPLIT_HALVES_OVERRIDE", halves)
    args, kwargs = make_case([37, 70, 0, 5, 40], [9, 40, 3, 0, 20], cutoffs=True, requires_grad=True, **mode)
    kwargs.update(activation=activation, history_causal=causal)
    outs = _run(kernel_fn, args, kwargs)
    cotangents = [torch.randn_like(o) for o in outs]
    unsplit = _run(kernel_fn, args, kwargs, cotangents)
    counts = []
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: counts.append(zeros(*a, **k)) or counts[-1])
    monkeypatch.setattr(ta, "_DKDV_SPLIT_OVERRIDE", True)
    split = _run(kernel_fn, args, kwargs, cotangents)
    monkeypatch.undo()
    monkeypatch.setattr(ta, "_BWD_BLOCKS_OVERRIDE", blocks)
    monkeypatch.setattr(ta, "_SPLIT_HALVES_OVERRIDE", halves)
    # Both programs of every key tile that holds keys counted in (spare tiles of the map: none).
    (arrivals,) = [c for c in counts if c.dtype == torch.int32]
    assert arrivals.numel() and set(arrivals.tolist()) <= {0, 2} and 2 in arrivals.tolist()
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    names = ["history_out", "candidate_out"] + [f"grad {i}" for i in range(len(inputs))]
    k_grad, v_grad = 2 + 1, 2 + 2  # history k and v: the split ones
    for i, (a, b) in enumerate(zip(split, unsplit)):
        if i in (k_grad, v_grad):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=names[i])
        else:
            assert torch.equal(a, b), names[i]
    monkeypatch.setattr(ta, "_DKDV_SPLIT_OVERRIDE", True)
    assert_within_budget(args, kwargs, grads=True)


def test_dkdv_split_choice():
    # On a 132-SM GPU with the tiles the backward picks (see test_backward_tile_choice): split dK/dV
    # programs for one user's long candidate list at d <= 64 only.
    import gesr_kernels.target_attention as ta
    medium, bf16 = ta._BwdBlocks(64, 32, 64, 64, 4, 3), torch.bfloat16
    split = lambda h, c, users, heads, silu=False, d=64, dtype=bf16, sms=132: ta._split_dkdv(  # noqa: E731
        medium, h, c, users, heads, sms, d, d, dtype, silu)
    assert split(2048, 2048, 1, 4)                  # share 0.79
    assert not split(2048, 2048, 1, 4, silu=True)   # SiLU from 1.0
    assert split(1024, 1024, 1, 4, silu=True)       # 1.57
    assert not split(4096, 512, 1, 4)               # 0.53
    assert not split(4096, 4096, 2, 4)              # 0.39
    assert not split(32 * 1024, 32 * 64, 32, 4)     # (32, 1024, 64, 4, 64)
    assert not split(2048, 2048, 1, 4, d=128)       # d = 128: only with the wide tiles (see the next test)
    assert not split(2048, 2048, 1, 4, dtype=torch.float32)
    assert not split(2048, 2048, 1, 4, sms=0)       # SM count unknown
    assert not split(2048, 0, 1, 4)                 # no candidates


def test_split_halves_choice():
    # Halves only with the wide tiles of the paired split, when its split programs fill ~a wave (0.85 of it).
    import gesr_kernels.target_attention as ta
    bf16, wide = torch.bfloat16, ta.WIDE_BWD_BLOCKS
    halves = lambda h, c, heads, blocks=wide, d=128, silu=False, sms=132: ta._split_halves(  # noqa: E731
        blocks, h, c, 1, heads, sms, d, d, bf16, silu)
    assert halves(2048, 2048, 4) and halves(2048, 3072, 4)       # 128 split programs: 0.97 of a wave
    assert not halves(3072, 3072, 2) and not halves(2048, 2048, 2) and not halves(2048, 2048, 1)
    assert not halves(2048, 2048, 4, silu=True) and not halves(2048, 2048, 4, sms=0)
    assert not halves(2048, 2048, 4, blocks=ta._BwdBlocks(64, 32, 64, 32, 4, 3))
    assert not halves(2048, 1024, 4)                               # outside the paired split
    assert not halves(2048, 2048, 4, d=64)


def test_paired_wide_split_choice():
    # d in (64, 128], half-precision softmax, 132 SMs: the wide tiles with split dK/dV programs when users have
    # 1 to 1.5 times as many candidates as history rows, from 2048 history rows, and the split programs fit in one
    # wave (bench/RESULTS.md session 16).
    import gesr_kernels.target_attention as ta
    wide, medium, bf16 = ta._BwdBlocks(128, 32, 128, 64, 8, 3), ta._BwdBlocks(64, 32, 64, 64, 4, 3), torch.bfloat16
    paired = lambda h, c, users, heads, silu=False, d=128, dtype=bf16, sms=132: ta._paired_wide_split(  # noqa: E731
        h, c, users, heads, sms, d, d, dtype, silu)
    assert paired(2048, 2048, 1, 4)                  # the suite's (1, 2048, 2048, 4, 128): 128 split programs
    assert paired(2048, 3072, 1, 4) and paired(3072, 3072, 1, 2) and paired(2048, 2048, 1, 1)
    assert not paired(2048, 4096, 1, 2)              # twice the candidates
    assert not paired(3072, 2048, 1, 4)              # fewer candidates than history rows
    assert not paired(1024, 1024, 1, 4)              # short histories
    assert not paired(2048, 2048, 1, 8)              # 256 split programs: two waves
    assert not paired(4096, 4096, 2, 4)
    assert not paired(2048, 2048, 1, 4, silu=True)
    assert not paired(2048, 2048, 1, 4, d=64)        # d <= 64: _split_dkdv's own rule
    assert not paired(2048, 2048, 1, 4, dtype=torch.float32)
    assert not paired(2048, 2048, 1, 4, sms=0)
    # _split_dkdv follows, for the wide tiles only (an override of the tiles keeps them unsplit).
    assert ta._split_dkdv(wide, 2048, 2048, 1, 4, 132, 128, 128, bf16)
    assert not ta._split_dkdv(medium, 2048, 2048, 1, 4, 132, 128, 128, bf16)
    assert not ta._split_dkdv(wide, 2048, 2048, 1, 4, 132, 128, 128, bf16, silu=True)


def test_tma_descriptor_layouts():
    # Descriptors need power-of-two head dims, contiguous heads, 16-byte aligned base and row stride;
    # anything else keeps the pointer tiles (None).
    from gesr_kernels.target_attention import _tma_descriptors
    rows, heads, d = 5, 3, 32
    good = torch.randn(rows, heads, d)
    (desc,) = _tma_descriptors(16, good)
    assert list(desc.shape) == [rows, heads * d] and list(desc.block_shape) == [16, d]
    assert _tma_descriptors(16, good[:, :1]) is not None                          # one head: any head stride
    assert _tma_descriptors(16, good, None) is None                               # absent
    assert _tma_descriptors(16, good[:0]) is None                                 # empty
    assert _tma_descriptors(16, torch.randn(rows, heads, 48)) is None             # 48 is not a power of two
    assert _tma_descriptors(16, good.transpose(0, 1).contiguous().transpose(0, 1)) is None  # heads apart
    assert _tma_descriptors(16, torch.randn(rows * heads * d + 1)[1:].view(rows, heads, d)) is None  # base
    padded = torch.randn(rows, heads * d + 1).as_strided((rows, heads, d), (heads * d + 1, d, 1))
    assert _tma_descriptors(16, padded) is None                                   # row stride
    assert _tma_descriptors(16, good.double()) is None
    (fused,) = _tma_descriptors(16, torch.randn(rows, 3, heads, d)[:, 1])           # a slice of a fused projection
    assert list(fused.shape) == [rows, heads * d] and list(fused.strides) == [3 * heads * d, 1]
    # torch.compile traces the launcher with fake tensors, which have no address to check (their data_ptr
    # warns and reads 0): the storage offset decides there.
    import warnings
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = torch.empty(rows * heads * d + 8)
        assert _tma_descriptors(16, flat[:-8].view(rows, heads, d)) is not None
        assert _tma_descriptors(16, flat[1:-7].view(rows, heads, d)) is None     # 4 bytes past an aligned base


def test_tma_choice(monkeypatch):
    # The rule for a Hopper-class GPU (see _tma_rule for the measurements): the forward in half precision
    # above d = 64; the backward for SiLU only (the softmax backward gains less than its launch's host cost).
    from gesr_kernels.target_attention import _has_tma, _tma_rule
    has_tma = _has_tma.__wrapped__  # uncached
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, expected in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert has_tma("cuda:0") == expected
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports its gfx numbers through the same call
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    assert not has_tma("cuda:0")
    bf16, fp16 = torch.bfloat16, torch.float16
    for role in ("fwd", "dkdv", "dq"):
        assert _tma_rule(role, bf16, 128, 128, True)
        assert _tma_rule(role, fp16, 64, 256, True)
        assert not _tma_rule(role, bf16, 64, 64, True)                     # d = 64: slower
        assert not _tma_rule(role, torch.float32, 128, 128, True)
        assert _tma_rule(role, bf16, 128, 128, False) == (role == "fwd")   # softmax: forward only


def _flash_style_twin(args, kwargs, cotangents):
    """Softmax outputs and gradients (as ``_run`` lists them) computed densely per user in the input dtype
    the way the kernels compute them: the backward takes ``delta = rowsum(dO * O)`` (FlashAttention)
    where autograd takes ``sum_j p_j dp_j``. Full mode, default scale. On a row whose softmax is one-hot
    autograd's form cancels exactly, while dO.v and dO.O, two dot products rounded apart, leave a residual
    that the (large) keys then multiply into dq: the error of the kernels' algorithm in this dtype."""
    hq, hk, hv, hoff, cq, ck, cv, coff = args
    cutoffs = kwargs.get("candidate_history_lengths")
    scale = hq.shape[-1] ** -0.5
    with torch.no_grad():
        outs = [torch.empty_like(hv), torch.empty_like(cv)]
        grads = [torch.zeros_like(t) for t in (hq, hk, hv, cq, ck, cv)]
        for b in range(len(hoff) - 1):
            h, c = slice(int(hoff[b]), int(hoff[b + 1])), slice(int(coff[b]), int(coff[b + 1]))
            n_hist, n_cand = h.stop - h.start, c.stop - c.start
            q, k, v = (torch.cat([x[h], y[c]]).transpose(0, 1) for x, y in ((hq, cq), (hk, ck), (hv, cv)))
            d_out = torch.cat([cotangents[0][h], cotangents[1][c]]).transpose(0, 1)
            rows = torch.arange(n_hist + n_cand, device=q.device)
            seen = torch.where(rows < n_hist, rows + 1, n_hist)  # history: causal; candidates: all ...
            if cutoffs is not None:  # ... or their cutoff
                seen[n_hist:] = torch.minimum(cutoffs[c].to(seen), seen[n_hist:])
            visible = (rows[None, :] < seen[:, None]) & (rows[None, :] < n_hist) | torch.eye(
                len(rows), dtype=torch.bool, device=q.device) & (rows >= n_hist)[:, None]
            p = torch.softmax((scale * q @ k.transpose(1, 2)).masked_fill(~visible, float("-inf")), -1)
            out = p @ v
            dp = d_out @ v.transpose(1, 2)
            ds = p * (dp - (d_out * out).sum(-1, keepdim=True))
            dq, dk, dv = scale * ds @ k, scale * ds.transpose(1, 2) @ q, p.transpose(1, 2) @ d_out
            for dst, src in ((outs, (out, out)), (grads[0::3], (dq, dq)), (grads[1::3], (dk, dk)),
                             (grads[2::3], (dv, dv))):
                dst[0][h], dst[1][c] = src[0][:, :n_hist].transpose(0, 1), src[1][:, n_hist:].transpose(0, 1)
    return outs + grads


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-1e4) = 1 / (1 + inf) = 0
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_large_logits(activation):
    # |scale * q.k| reaches ~1e4: every output and gradient stays finite and within the budget. The
    # yardstick for softmax is the kernels' own algorithm in fp32 (_flash_style_twin); for SiLU the twin.
    args, kwargs = make_case([20, 7], [6, 4], spread=45.0, cutoffs=True, requires_grad=True)
    kwargs["activation"] = activation
    with torch.no_grad():
        logits = 0.25 * (args[0] * args[1]).sum(-1)
    assert logits.abs().max() > 3e3
    # fp32 rounds a logit L by L * 2^-24, which moves every softmax weight by that relative amount: the
    # rounding band grows with the logits (the kernel's base-2 logits add a rounding or two to the twin's).
    band = 4 * logits.abs().max().item() * 2.0 ** -24
    ref64 = _run(reference.target_aware_attention, [_to64(a) for a in args], kwargs)
    cotangents = [torch.randn_like(o).to(a.dtype) for o, a in zip(ref64, args[0::4])]
    ref64 = _run(reference.target_aware_attention, [_to64(a) for a in args], kwargs, cotangents)
    twin = (_flash_style_twin(args, kwargs, cotangents) if activation == "softmax"
            else _run(reference.target_aware_attention, args, kwargs, cotangents))
    kern = _run(kernel_fn, args, kwargs, cotangents)
    for i, (k, t, r) in enumerate(zip(kern, twin, ref64)):
        assert_max_error_within_budget(f"tensor {i}", k, t, r, band)


def test_flash_style_twin_is_the_kernels_algorithm():
    # The yardstick above must agree with the autograd twin in exact arithmetic (fp64, ordinary logits).
    args, kwargs = make_case([20, 7], [6, 4], cutoffs=True, requires_grad=True)
    args = [_to64(a) for a in args]
    cotangents = [torch.randn_like(o) for o in _run(reference.target_aware_attention, args, kwargs)]
    expected = _run(reference.target_aware_attention, args, kwargs, cotangents)
    for got, want in zip(_flash_style_twin(args, kwargs, cotangents), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_silu_normalizer_and_bounds():
    args, kwargs = make_case([12, 30], [4, 2], requires_grad=True)
    # An explicit normalizer, and the default taken from a given max_history_len instead of the data.
    assert_within_budget(args, {"activation": "silu", "silu_normalizer": 7.5}, grads=True)
    assert_within_budget(args, {"activation": "silu", "max_history_len": 64, "max_candidates": 9}, grads=True)
    wide = kernel_fn(*args, activation="silu", max_history_len=60)[1]
    default = kernel_fn(*args, activation="silu")[1]  # longest history 30
    torch.testing.assert_close(wide * 2, default)
    assert_within_budget(args, {"scale": 0.7, "validate": False}, grads=True)


def _gradcheck(args, kwargs):
    """fp64 gradcheck of the kernels with respect to every q/k/v of ``args`` that requires grad."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*inputs):
        full = list(args)
        for i, t in zip(tensors, inputs):
            full[i] = t
        return tuple(o for o in kernel_fn(*full, **kwargs) if o is not None)

    return torch.autograd.gradcheck(fn, [args[i] for i in tensors], fast_mode=True)


@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fp64(activation, mode):
    args, kwargs = make_case([3, 0, 2], [2, 1, 0], heads=1, dtype=torch.float64, cutoffs=True,
                             requires_grad=True, **mode)
    assert _gradcheck(args, {**kwargs, "activation": activation})


@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_gradcheck_fp64_key_splits(activation, monkeypatch):
    # Key runs merged in fp64 (workspace and merge follow the dtype): histories of several key tiles.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_KEY_SPLITS_OVERRIDE", (2, 3))
    args, kwargs = make_case([40, 0, 33], [2, 1, 0], heads=1, dtype=torch.float64, cutoffs=True,
                             requires_grad=True)
    assert _gradcheck(args, {**kwargs, "activation": activation})


# ------------------------------------------------------------------------------------------------
# Registered ops and torch.compile
# ------------------------------------------------------------------------------------------------
def _op_args(args, kwargs, activation, causal=True):
    from gesr_kernels.target_attention import validate_arguments
    resolved = validate_arguments(FN, *args, activation=activation, scale=None, silu_normalizer=None,
                                  history_causal=causal, candidate_history_lengths=None, max_history_len=None,
                                  max_candidates=None, validate=True)
    return (*args, kwargs.get("candidate_history_lengths"), activation, resolved.scale,
            resolved.silu_normalizer, causal)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_opcheck(activation, mode):
    args, kwargs = make_case([5, 0, 9], [3, 2, 0], cutoffs=True, **mode)
    fwd_args = _op_args(args, kwargs, activation)
    torch.library.opcheck(torch.ops.gesr.target_attention_fwd.default, fwd_args)
    history_out, candidate_out, history_lse, candidate_lse = torch.ops.gesr.target_attention_fwd(*fwd_args)
    d_history = None if mode.get("cached") else torch.randn_like(history_out)
    bwd_args = (*fwd_args[:9], history_out, candidate_out, history_lse, candidate_lse, d_history,
                torch.randn_like(candidate_out), *fwd_args[9:])
    torch.library.opcheck(torch.ops.gesr.target_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_torch_compile(activation, device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    args, kwargs = make_case([6, 0, 11], [2, 4, 1], cutoffs=True, requires_grad=True, device=device)
    kwargs.update(activation=activation, max_history_len=11, max_candidates=4)

    def loss(*inputs):
        history_out, candidate_out = kernel_fn(*inputs, **kwargs)
        return history_out.square().sum() + candidate_out.sin().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    expected = torch.autograd.grad(loss(*args), tensors)
    got = torch.autograd.grad(compiled(*args), tensors)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------------------
# GPU only: half precision at realistic shapes, determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d_qk,d_v", [(64, 64), (128, 128), (48, 96), (256, 256)])
def test_gpu_large_shapes(d_qk, d_v, mode, activation, dtype):
    history, candidates = random_lengths(6, 1100), random_lengths(6, 300)
    args, kwargs = make_case(history, candidates, heads=2, d_qk=d_qk, d_v=d_v, dtype=dtype, device="cuda",
                             cutoffs=True, requires_grad=True, **mode)
    kwargs.update(activation=activation, silu_normalizer=512.0 if activation == "silu" else None)
    band = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_within_budget(args, kwargs, grads=True, band=band)


@pytest.mark.gpu
@pytest.mark.parametrize("group_programs", [10, 128], ids=["groups", "default"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_history_order(d, activation, causal, group_programs, monkeypatch):
    # Position-major history tiles with the GPU tiles (64 or 128 rows), several groups of users, spare
    # positions, a user without history, a bound at the data and one above it: bitwise the flat map's
    # outputs, and within budget.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_HISTORY_ORDER_OVERRIDE", group_programs)
    history, candidates = [1100, 0, 700, 129, 1024, 64, 900, 333, 1, 1000], [9, 3, 20, 0, 4, 64, 1, 7, 2, 30]
    args, kwargs = make_case(history, candidates, heads=2, d_qk=d, d_v=d, dtype=torch.bfloat16, device="cuda",
                             cutoffs=True, requires_grad=True)
    kwargs.update(activation=activation, history_causal=causal,
                  silu_normalizer=1100.0 if activation == "silu" else None)
    total = sum(history)
    for rows in (64, 128):  # the position-major order is taken with either tile height
        assert ta._history_order(total, len(history), 2, rows, 1100) is not None
        assert ta._history_order(total, len(history), 2, rows, 1150) is not None
    flat = kernel_fn(*args, **kwargs)
    for bound in (1100, 1150):
        positional = kernel_fn(*args, **kwargs, max_history_len=bound)
        for a, b in zip(flat, positional):
            assert torch.equal(a, b)
    assert_within_budget(args, {**kwargs, "max_history_len": 1100}, grads=True, band=8e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_candidates_grouped_with_history(d, activation, monkeypatch):
    # The GPU tiles with each group's candidate tiles first (see _candidate_positions; checked through the
    # launcher's choice): bitwise the flat order's outputs, and within budget.
    import gesr_kernels.target_attention as ta
    chosen = record_results(monkeypatch, ta, "_candidate_positions")
    # One group of 10 users (2 heads): the position-major order is taken (see test_gpu_history_order).
    history, candidates = [1100, 0, 700, 129, 1024, 64, 900, 333, 1, 1000], [9, 3, 16, 0, 4, 16, 1, 7, 2, 16]
    args, kwargs = make_case(history, candidates, heads=2, d_qk=d, d_v=d, dtype=torch.bfloat16, device="cuda",
                             cutoffs=True, requires_grad=True)
    kwargs.update(activation=activation, silu_normalizer=1100.0 if activation == "silu" else None,
                  max_history_len=1100, max_candidates=16)
    grouped = kernel_fn(*args, **kwargs)
    assert 1 in chosen
    monkeypatch.setattr(ta, "_CANDIDATE_POSITIONS_OVERRIDE", 0)
    for a, b in zip(kernel_fn(*args, **kwargs), grouped):
        assert torch.equal(a, b)
    monkeypatch.setattr(ta, "_CANDIDATE_POSITIONS_OVERRIDE", None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_no_cutoffs(d, activation):
    # Without cutoffs every candidate tile sees whole key tiles: the unmasked loops of the GPU tiles.
    history, candidates = random_lengths(5, 1100), random_lengths(5, 300)
    args, kwargs = make_case(history, candidates, heads=2, d_qk=d, d_v=d, dtype=torch.bfloat16, device="cuda",
                             requires_grad=True)
    kwargs.update(activation=activation, silu_normalizer=512.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(32, 64, 64, 32, 4, 3), (64, 32, 64, 64, 4, 3), (64, 32, 64, 32, 4, 3),
                                   (128, 32, 128, 64, 8, 3), (128, 64, 128, 64, 8, 3)],
                         ids=["narrow", "medium", "medium32", "wide", "wide64"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_gpu_backward_tile_choices(monkeypatch, cutoffs, causal, activation, tiles):
    # Every d = 128 tile choice the rule or the tuning scripts take, on ragged users whose lengths are not
    # tile multiples (masked diagonal, ragged tails, cutoffs, a user without candidates).
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_BWD_BLOCKS_OVERRIDE", ta._BwdBlocks(*tiles))
    history, candidates = [1000, 77, 0, 513], [64, 0, 9, 130]
    args, kwargs = make_case(history, candidates, heads=2, d_qk=128, d_v=128, dtype=torch.bfloat16, device="cuda",
                             cutoffs=cutoffs, requires_grad=True)
    kwargs.update(activation=activation, history_causal=causal,
                  silu_normalizer=1000.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles,d", [((64, 32, 64, 64, 4, 3), 64), ((64, 32, 64, 64, 4, 3), 128),
                                     ((128, 32, 128, 64, 8, 3), 128)], ids=["d64", "medium", "wide"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_gpu_split_dkdv_programs(monkeypatch, cutoffs, causal, activation, tiles, d):
    # Two dK/dV programs per key tile that meet through an arrival count (see _dkdv_tile): gradients
    # within budget, and bitwise equal across runs whichever program of a pair arrives second.
    import gesr_kernels.target_attention as ta
    monkeypatch.setattr(ta, "_BWD_BLOCKS_OVERRIDE", ta._BwdBlocks(*tiles))
    monkeypatch.setattr(ta, "_DKDV_SPLIT_OVERRIDE", True)
    history, candidates = [1000, 77, 0, 513, 2048], [64, 0, 9, 130, 2048]
    args, kwargs = make_case(history, candidates, heads=2, d_qk=d, d_v=d, dtype=torch.bfloat16, device="cuda",
                             cutoffs=cutoffs, requires_grad=True)
    kwargs.update(activation=activation, history_causal=causal,
                  silu_normalizer=2048.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)
    assert_bitwise_repeatable(args, kwargs, repeats=3)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_gpu_long_single_history_forward_tiles(activation, monkeypatch):
    # One user's long history and a few candidates: the forward takes 64-row tiles (see
    # _spread_full_blocks; checked here through the launcher's choice), outputs and gradients within budget.
    import gesr_kernels.target_attention as ta
    chosen = record_results(monkeypatch, ta, "_spread_full_blocks")
    args, kwargs = make_case([4089], [2], heads=4, d_qk=128, d_v=128, dtype=torch.bfloat16, device="cuda",
                             cutoffs=True, requires_grad=True)
    kwargs.update(activation=activation, silu_normalizer=4096.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)
    assert chosen and all(h.m == 64 for h, _ in chosen)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_gpu_d64_forward_key_steps(cutoffs, causal, activation, monkeypatch):
    # Few users with long histories at d = 64 take 64-key forward steps (see _fwd_key_steps; checked here
    # through the launcher's choice): outputs and gradients within budget, ragged lengths included.
    import gesr_kernels.target_attention as ta
    chosen = record_results(monkeypatch, ta, "_fwd_key_steps")
    args, kwargs = make_case([3001, 1500, 0], [61, 3, 5], heads=4, d_qk=64, d_v=64, dtype=torch.bfloat16,
                             device="cuda", cutoffs=cutoffs, requires_grad=True)
    kwargs.update(activation=activation, history_causal=causal,
                  silu_normalizer=4096.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)
    assert chosen and all(h.n == 64 and c.n == 64 for h, c in chosen)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_gpu_register_caps(cutoffs, causal, activation, monkeypatch):
    # Many users with short ragged histories at d = 64 (bf16): the launches take register caps (the forward
    # for softmax only; see _fwd_register_cap, _bwd_register_cap; checked through the launchers' choices).
    # Outputs and gradients within budget, and bitwise those of the uncapped kernels.
    import gesr_kernels.target_attention as ta
    caps = {role: record_results(monkeypatch, ta, f"_{role}_register_cap") for role in ("fwd", "bwd")}
    history, candidates = random_lengths(220, 600), random_lengths(220, 30)
    args, kwargs = make_case(history, candidates, heads=4, d_qk=64, d_v=64, dtype=torch.bfloat16, device="cuda",
                             cutoffs=cutoffs, requires_grad=True)
    kwargs.update(activation=activation, history_causal=causal, max_history_len=600,
                  silu_normalizer=600.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)
    assert ta.BWD_REGISTER_CAP in caps["bwd"]
    assert (ta.FWD_REGISTER_CAP in caps["fwd"]) == (activation == "softmax")
    cotangents = [torch.randn(o.shape, device="cuda", dtype=o.dtype) for o in kernel_fn(*args, **kwargs)]
    capped = _run(kernel_fn, args, kwargs, cotangents)
    monkeypatch.setattr(ta, "_REGISTER_CAP_OVERRIDE", {"fwd": None, "bwd": None})
    for a, b in zip(capped, _run(kernel_fn, args, kwargs, cotangents)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_gpu_wide_backward_tiles(cutoffs, activation):
    # Long histories on enough heads take the wide dK/dV key tiles (128 keys, 8 warps): check that this
    # choice is made here, and its gradients.
    import gesr_kernels.target_attention as ta
    history, candidates = [8192, 5000, 6100], [64, 1, 37]
    blocks = ta._bwd_blocks(128, 128, torch.bfloat16, sum(history), 3, 2, ta._sm_count(torch.device("cuda")),
                            activation == "silu", sum(candidates))
    assert blocks == ((64, 32, 64, 32, 4, 3) if activation == "silu" else (128, 32, 128, 64, 8, 3))
    args, kwargs = make_case(history, candidates, heads=2, d_qk=128, d_v=128, dtype=torch.bfloat16, device="cuda",
                             cutoffs=cutoffs, requires_grad=True)
    kwargs.update(activation=activation, silu_normalizer=8192.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
@pytest.mark.parametrize("history,candidates,heads,halves", [([2100], [2300], 2, False), ([2048], [2200], 4, True)],
                         ids=["history-candidates", "halves"])
def test_gpu_paired_wide_split_backward(cutoffs, history, candidates, heads, halves):
    # One user with as many candidates as history rows, d = 128, softmax: the wide tiles with split dK/dV
    # programs (checked), cut between history and candidates or, when they fill ~a wave, in halves (checked),
    # gradients against the twin, and bitwise equal over repeated runs (the later of each key tile's two
    # programs sums both fp32 partials).
    import gesr_kernels.target_attention as ta
    sms = ta._sm_count(torch.device("cuda"))
    assert ta._paired_wide_split(history[0], candidates[0], 1, heads, sms, 128, 128, torch.bfloat16, False)
    assert ta._bwd_blocks(128, 128, torch.bfloat16, history[0], 1, heads, sms, False,
                          candidates[0]) == (128, 32, 128, 64, 8, 3)
    assert ta._split_halves(ta.WIDE_BWD_BLOCKS, history[0], candidates[0], 1, heads, sms, 128, 128, torch.bfloat16,
                            False) == halves
    args, kwargs = make_case(history, candidates, heads=heads, d_qk=128, d_v=128, dtype=torch.bfloat16,
                             device="cuda", cutoffs=cutoffs, requires_grad=True)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)
    assert_bitwise_repeatable(args, kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_gpu_backward_is_deterministic(activation):
    args, kwargs = make_case(random_lengths(8, 1500), random_lengths(8, 200), heads=4, d_qk=128, d_v=128,
                             dtype=torch.bfloat16, device="cuda", cutoffs=True, requires_grad=True)
    kwargs["activation"] = activation
    assert_bitwise_repeatable(args, kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_cached_long_history_splits_keys(d, activation, monkeypatch):
    # Serving: one user's candidates against a long cached history. Few tiles: the GPU's default choice
    # cuts their key range into runs (checked) and the merged result matches the twin.
    import gesr_kernels.target_attention as ta
    merges = []
    merge = ta._merge_splits
    monkeypatch.setattr(ta, "_merge_splits", lambda *a: merges.append(a[4]) or merge(*a))
    args, kwargs = make_case([6000], [300], heads=2, d_qk=d, d_v=d, dtype=torch.bfloat16, device="cuda",
                             cached=True, requires_grad=True)
    kwargs.update(activation=activation, silu_normalizer=6000.0 if activation == "silu" else None)
    assert_within_budget(args, kwargs, grads=True, band=8e-3)
    assert merges and merges[0] > 1


def test_cached_mode_spreads_few_candidate_tiles_over_the_device(monkeypatch):
    # Cached mode on a 132-SM GPU: 2048 candidates x 4 heads in 128-row tiles make 64 programs; 64-row
    # tiles make 128, and the height stops there (64 rows is the floor). A small device keeps the tile.
    from gesr_kernels import target_attention as ta
    monkeypatch.setattr(ta, "interpreting", lambda: False)  # the GPU's tile choices
    start = ta._fwd_blocks(2048, 1, 128, 128, torch.bfloat16)
    assert start.m == 128
    assert ta._spread_blocks(start, 2048, 1, 4, 132, 128, 128, torch.bfloat16).m == 64
    assert ta._spread_blocks(start, 2048, 1, 4, 1000, 128, 128, torch.bfloat16).m == 64
    assert ta._spread_blocks(start, 2048, 1, 4, 16, 128, 128, torch.bfloat16) == start


# ------------------------------------------------------------------------------------------------
# Without a GPU: compile the kernels for an H100 (sm_90) anyway. The interpreter forgives things the
# compiler rejects (e.g. reading a plain Python global); this catches them on CPU-only CI.
# ------------------------------------------------------------------------------------------------
_SM90_COMPILE = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
import bench.sass_report as sass_report
import gesr_kernels.target_attention as ta

def compile_for_h100(kernel, constexprs, dtype, blocks, boxes=None):
    # Arguments typed as torch.compile's inductor hands them to user kernels (the eager launch's typing is
    # what bench.sass_report compiles by default).
    sass_report.compile_for_h100(kernel, constexprs, blocks.warps, blocks.stages, boxes, dtype=dtype, inductor=True)

for dtype, torch_dtype, d in (("bf16", torch.bfloat16, 128), ("fp32", torch.float32, 48)):
    width = max(16, triton.next_power_of_2(d))
    even = dict(EVEN_DQK=width == d, EVEN_DV=width == d)
    fwd, bwd = ta._fwd_blocks(1 << 20, 1, d, d, torch_dtype), ta._bwd_blocks(d, d, torch_dtype)
    # The GPU takes TMA copies for half precision at d > 64 (_tma_rule): compile both ways there.
    for silu, tma in ((False, False), (True, False)) + (((False, True), (True, True)) if d > 64 else ()):
        flags = dict(HAS_LENGTHS=True, CAUSAL=True, HAS_SKIP=True, SILU=silu, IS_FP64=False, BLOCK_DQK=width,
                     BLOCK_DV=width, **even)
        compile_for_h100(ta._target_attention_fwd_kernel,
                         dict(flags, USE_TMA=tma, HAS_HISTORY=True, HAS_SELF=True, BLOCK_MH=fwd.m, BLOCK_MC=fwd.m,
                              BLOCK_N=fwd.n, POSITIONAL=silu, INTERLEAVED=silu),  # both tile orders, one each
                         dtype, fwd, tma and dict(k_desc=(fwd.n, width), v_desc=(fwd.n, width)))
        compile_for_h100(ta._target_attention_bwd_kernel,
                         dict(flags, DKDV=True, DQ=True, TMA_DKDV=tma, TMA_DQ=tma, HAS_HISTORY_Q=True, HAS_SELF=True,
                              SPLIT_DKDV=silu == tma, HALVES=silu == tma and not silu, BLOCK_KV=bwd.kv,
                              BLOCK_KV_Q=bwd.kv_q, BLOCK_Q=bwd.q, BLOCK_Q_KV=bwd.q_kv), dtype, bwd,
                         tma and dict(hq_desc=(bwd.kv_q, width), cq_desc=(bwd.kv_q, width), hdo_desc=(bwd.kv_q, width),
                                      cdo_desc=(bwd.kv_q, width), k_desc=(bwd.q_kv, width), v_desc=(bwd.q_kv, width)))
        compile_for_h100(ta._merge_splits_kernel, dict(SILU=silu, IS_FP64=False, EVEN_DV=even["EVEN_DV"],
                                                       BLOCK_M=64, BLOCK_DV=width), dtype, bwd)
    compile_for_h100(ta._target_attention_bwd_preprocess_kernel,
                     dict(IS_FP64=False, EVEN_DV=even["EVEN_DV"], BLOCK_M=64, BLOCK_DV=width), dtype, bwd)

# On the GPU an int argument equal to 1 (one user, one head, one candidate row, one tile...) arrives as a
# Python int, not a tensor: the kernels must compile that way too (the interpreter never specializes).
counts = lambda kernel: {n: 1 for n in kernel.arg_names if n.startswith("num_")}  # noqa: E731
flags = dict(HAS_LENGTHS=False, CAUSAL=True, HAS_SKIP=False, SILU=False, IS_FP64=False, BLOCK_DQK=128, BLOCK_DV=128,
             EVEN_DQK=True, EVEN_DV=True)
fwd, bwd = ta._fwd_blocks(1, 1, 128, 128, torch.bfloat16), ta._bwd_blocks(128, 128, torch.bfloat16)
compile_for_h100(ta._target_attention_fwd_kernel,
                 dict(flags, **counts(ta._target_attention_fwd_kernel), USE_TMA=False, HAS_HISTORY=True, HAS_SELF=True,
                      BLOCK_MH=fwd.m, BLOCK_MC=fwd.m, BLOCK_N=fwd.n, POSITIONAL=False, INTERLEAVED=False), "bf16",
                 fwd)
compile_for_h100(ta._target_attention_bwd_kernel,
                 dict(flags, **counts(ta._target_attention_bwd_kernel), DKDV=True, DQ=True, TMA_DKDV=False,
                      TMA_DQ=False, HAS_HISTORY_Q=True, HAS_SELF=True, SPLIT_DKDV=True, HALVES=True,
                      BLOCK_KV=bwd.kv, BLOCK_KV_Q=bwd.kv_q, BLOCK_Q=bwd.q, BLOCK_Q_KV=bwd.q_kv), "bf16", bwd)
print("compiled")
'''


def test_kernels_compile_for_h100_without_a_gpu():
    compile_for_h100_in_subprocess(_SM90_COMPILE)

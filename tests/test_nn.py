"""gesr_kernels.nn target-aware modules: backends agree, serving path, set_backend, argument checks."""

import pytest
import torch
from torch import nn

from conftest import DEVICE
from helpers import assert_backends_agree, offsets_from_lengths, record_results

import gesr_kernels
import reference
from gesr_kernels.nn import CrossAttention, HardMatchAttention, HistoryCache, HSTULayer, TargetAwareSelfAttention

EMBED, HEADS, QK, V = 32, 2, 16, 16


def make_inputs(history_lens, candidate_lens, *, embed=EMBED, dtype=torch.float32, cutoffs=False,
                device=DEVICE):
    """(history_x, history_offsets, candidate_x, candidate_offsets) and kwargs; fresh random values."""
    hx = torch.randn(sum(history_lens), embed, dtype=torch.float64).to(device, dtype)
    cx = torch.randn(sum(candidate_lens), embed, dtype=torch.float64).to(device, dtype)
    kwargs = {}
    if cutoffs:
        kwargs["candidate_history_lengths"] = torch.randint(0, max(history_lens) + 2, (cx.shape[0],),
                                                            device=device)
    return [hx, offsets_from_lengths(history_lens, device=device), cx,
            offsets_from_lengths(candidate_lens, device=device)], kwargs


def perturb(model):
    """Random LayerNorm affine parameters, so that the tests see them (they start at 1 and 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return model



# ------------------------------------------------------------------------------------------------
# Backends agree
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,normalizer,cutoffs", [("silu", None, False), ("silu", 40.0, True),
                                                           ("softmax", None, True)],
                         ids=["silu", "silu_normalizer_cutoffs", "softmax_cutoffs"])
def test_stack_backends_agree(activation, normalizer, cutoffs):
    model = perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, activation=activation,
                                             silu_normalizer=normalizer)).to(DEVICE)
    inputs, kwargs = make_inputs([9, 0, 37], [3, 2, 5], cutoffs=cutoffs)
    assert_backends_agree(model, inputs, kwargs)


def test_layer_unequal_head_dims_and_empty_candidates():
    model = perturb(HSTULayer(24, 3, 32, 16)).to(DEVICE)
    inputs, kwargs = make_inputs([5, 12], [0, 0], embed=24)
    assert_backends_agree(model, inputs, kwargs)
    inputs, kwargs = make_inputs([0, 0], [2, 3], embed=24)  # no history anywhere: candidates see themselves
    assert_backends_agree(model, inputs, kwargs)


def test_layer_is_the_documented_composition():
    layer = perturb(HSTULayer(EMBED, HEADS, QK, V, silu_normalizer=16.0, backend="reference")).to(DEVICE)
    hx, hoff, cx, coff = make_inputs([6, 4], [2, 3])[0]
    got = layer(hx, hoff, cx, coff)

    def project(x):
        y = nn.functional.layer_norm(x, (EMBED,), layer.input_norm.weight, layer.input_norm.bias)
        y = y @ layer.uvqk.weight.T + layer.uvqk.bias
        u, v, q, k = y[:, :32], y[:, 32:64], y[:, 64:96], y[:, 96:]
        return torch.nn.functional.silu(u), q.reshape(-1, 2, 16), k.reshape(-1, 2, 16), v.reshape(-1, 2, 16)

    (hu, hq, hk, hv), (cu, cq, ck, cv) = project(hx), project(cx)
    ha, ca = reference.target_aware_attention(hq, hk, hv, hoff, cq, ck, cv, coff, activation="silu",
                                              silu_normalizer=16.0)
    for x, u, a, y in ((hx, hu, ha, got[0]), (cx, cu, ca, got[1])):
        a = nn.functional.layer_norm(a.reshape(-1, 32), (32,), layer.attention_norm.weight,
                                     layer.attention_norm.bias)
        torch.testing.assert_close(y, x + (u * a) @ layer.output.weight.T + layer.output.bias)


def test_dropout_only_in_training():
    layer = HSTULayer(EMBED, HEADS, QK, V, dropout=0.5, backend="reference").to(DEVICE)
    inputs, _ = make_inputs([4], [3])
    layer.eval()
    first, second = layer(*inputs), layer(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    layer.train()
    assert not torch.equal(layer(*inputs)[1], first[1])


# ------------------------------------------------------------------------------------------------
# Parameters and state_dict do not depend on the backend
# ------------------------------------------------------------------------------------------------
def test_state_dict_identical_across_backends():
    states = []
    for backend in ("triton", "reference", "auto"):
        torch.manual_seed(3)
        states.append(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, backend=backend).state_dict())
    for other in states[1:]:
        assert list(other) == list(states[0])
        assert all(torch.equal(other[k], states[0][k]) for k in other)
    model = TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, backend="triton")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gesr_kernels.set_backend(model, "reference")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in after)
    TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, backend="reference").load_state_dict(after)


# ------------------------------------------------------------------------------------------------
# Serving: prefill once, score candidate batches on the cache
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_score_on_prefill_cache_equals_forward(backend):
    model = perturb(TargetAwareSelfAttention(3, EMBED, HEADS, QK, V, backend=backend)).to(DEVICE).eval()
    history_lens = [11, 0, 26]
    hx, hoff, _, _ = make_inputs(history_lens, [1, 1, 1])[0]
    with torch.no_grad():
        history_y, cache = model.prefill(hx, hoff)
        assert isinstance(cache, HistoryCache) and len(cache.keys) == len(cache.values) == 3
        assert cache.keys[0].shape == (37, HEADS, QK) and cache.values[2].shape == (37, HEADS, V)
        assert all(t.is_contiguous() for t in cache.keys + cache.values)  # not views of the projection
        # Two candidate batches on the same cache, the second with visible-history cutoffs.
        for candidate_lens, cutoffs in (([3, 2, 4], False), ([0, 5, 1], True)):
            (_, _, cx, coff), kwargs = make_inputs(history_lens, candidate_lens, cutoffs=cutoffs)
            full_history, full_candidates = model(hx, hoff, cx, coff, **kwargs)
            scored = model.score(cx, coff, cache, **kwargs)
            torch.testing.assert_close(scored, full_candidates, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(history_y, full_history, rtol=1e-5, atol=1e-5)


def test_score_is_differentiable_through_the_cache():
    model = perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, backend="triton")).to(DEVICE)
    (hx, hoff, cx, coff), _ = make_inputs([7, 13], [2, 3])
    hx.requires_grad_()
    history_y, cache = model.prefill(hx, hoff)
    loss = model.score(cx, coff, cache).square().sum()
    full = model(hx, hoff, cx, coff)[1].square().sum()
    g_cached = torch.autograd.grad(loss, [hx, *model.parameters()])
    g_full = torch.autograd.grad(full, [hx, *model.parameters()])
    for a, b in zip(g_cached, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_max_history_len_reaches_the_op(backend):
    # A bound equal to the longest history changes nothing (on the kernels it takes the position-major
    # history order, bitwise equal to the flat one); a looser bound is the SiLU divisor when the layer has
    # none, as for the op; a bound below the data is refused when validating, in every call.
    def stack(normalizer):
        torch.manual_seed(1)
        return perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, silu_normalizer=normalizer,
                                                backend=backend)).to(DEVICE).eval()
    model, model_50 = stack(None), stack(50.0)
    (hx, hoff, cx, coff), kwargs = make_inputs([9, 0, 37], [3, 2, 5], cutoffs=True)
    with torch.no_grad():
        plain = model(hx, hoff, cx, coff, **kwargs)
        for got, expected in ((model(hx, hoff, cx, coff, **kwargs, max_history_len=37), plain),
                              (model(hx, hoff, cx, coff, **kwargs, max_history_len=50),
                               model_50(hx, hoff, cx, coff, **kwargs))):
            for g, e in zip(got, expected):
                assert torch.equal(g, e)
        history_y, cache = model.prefill(hx, hoff, max_history_len=37)
        assert torch.equal(history_y, model.prefill(hx, hoff)[0])
        scored = model.score(cx, coff, model.prefill(hx, hoff, max_history_len=50)[1], **kwargs,
                             max_history_len=50)
        assert torch.equal(scored, model_50.score(cx, coff, model_50.prefill(hx, hoff)[1], **kwargs))
        for call in (lambda: model(hx, hoff, cx, coff, max_history_len=36),
                     lambda: model.prefill(hx, hoff, max_history_len=36),
                     lambda: model.score(cx, coff, cache, max_history_len=36)):
            with pytest.raises(ValueError, match="max_history_len must be >= the longest history"):
                call()
        cross = CrossAttention(EMBED, EMBED, HEADS, QK, backend=backend).to(DEVICE)
        assert torch.equal(cross(hx, hoff, cx, coff, max_history_len=40), cross(hx, hoff, cx, coff))
        with pytest.raises(ValueError, match="max_history_len must be >= the longest history"):
            cross(hx, hoff, cx, coff, max_history_len=36)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_max_candidates_reaches_the_op(backend, monkeypatch):
    # With max_history_len, a max_candidates that fits one candidate tile groups each user's candidate tiles
    # with its history tiles (kernels; bitwise the plain call's outputs); a bound below the data is refused
    # when validating, in forward and score, and by CrossAttention.
    import gesr_kernels.target_attention as ta
    chosen = record_results(monkeypatch, ta, "_candidate_positions")
    monkeypatch.setattr(ta, "_HISTORY_ORDER_OVERRIDE", 4)  # groups of 2 users at 2 heads
    torch.manual_seed(1)
    model = perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, silu_normalizer=40.0,
                                             backend=backend)).to(DEVICE).eval()
    (hx, hoff, cx, coff), kwargs = make_inputs([20, 3, 37, 30], [3, 2, 5, 1], cutoffs=True)
    with torch.no_grad():
        plain = model(hx, hoff, cx, coff, **kwargs)
        for g, e in zip(model(hx, hoff, cx, coff, **kwargs, max_history_len=37, max_candidates=5), plain):
            assert torch.equal(g, e)
        assert chosen == ([1, 1] if backend == "triton" else [])  # one call per layer
        cache = model.prefill(hx, hoff)[1]
        assert torch.equal(model.score(cx, coff, cache, **kwargs, max_candidates=5), model.score(cx, coff, cache,
                                                                                                  **kwargs))
        cross = CrossAttention(EMBED, EMBED, HEADS, QK, backend=backend).to(DEVICE)
        for call in (lambda: model(hx, hoff, cx, coff, max_history_len=37, max_candidates=4),
                     lambda: model.score(cx, coff, cache, max_candidates=4),
                     lambda: cross(hx, hoff, cx, coff, max_candidates=4)):
            with pytest.raises(ValueError, match="max_candidates must be >= the longest candidate list"):
                call()


# ------------------------------------------------------------------------------------------------
# set_backend on a nested model
# ------------------------------------------------------------------------------------------------
class _Ranker(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleDict({
            "attention": TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, backend="triton"),
            "extra": nn.Sequential(nn.Linear(EMBED, EMBED), HSTULayer(EMBED, HEADS, QK, V, backend="auto"),
                                   CrossAttention(EMBED, EMBED, HEADS, QK, backend="triton"))})
        self.hma = HardMatchAttention(2, 3, 4, [8], backend="triton")
        self.head = nn.Linear(EMBED, 1)

    def forward(self, *inputs):
        return self.head(self.towers["attention"](*inputs)[1])


def test_set_backend_nested_model():
    model = _Ranker().to(DEVICE)
    kinds = (TargetAwareSelfAttention, HSTULayer, HardMatchAttention, CrossAttention)
    gesr = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(gesr) == 6  # the stack, its two layers, the lone layer, cross attention, HMA
    inputs, _ = make_inputs([5, 8], [2, 1])
    expected = model(*inputs)
    assert gesr_kernels.set_backend(model, "reference") is model
    assert all(m.backend == "reference" for m in gesr)
    torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-5)
    gesr_kernels.set_backend(model, "auto")
    assert all(m.backend == "auto" for m in gesr)
    stack = model.towers["attention"]
    stack.backend = "triton"  # the stack's own switch reaches its layers
    assert all(layer.backend == "triton" for layer in stack.layers)
    with pytest.raises(ValueError, match="set_backend: backend must be one of"):
        gesr_kernels.set_backend(model, "cuda")
    with pytest.raises(TypeError, match="set_backend: model must be a torch.nn.Module"):
        gesr_kernels.set_backend([model], "triton")


# ------------------------------------------------------------------------------------------------
# torch.compile of the module (fullgraph needs a constant silu_normalizer)
# ------------------------------------------------------------------------------------------------
def _check_compiled(backend, device):
    torch._dynamo.reset()
    model = perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, silu_normalizer=32.0,
                                             backend="triton")).to(device)
    inputs, _ = make_inputs([6, 0, 11], [2, 4, 1], device=device)

    def loss(m, *args):
        history_y, candidate_y = m(*args)
        return history_y.square().sum() + candidate_y.sin().sum()

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    expected = torch.autograd.grad(loss(model, *inputs), list(model.parameters()))
    got = torch.autograd.grad(loss(compiled, *inputs), list(model.parameters()))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_aot_eager():
    _check_compiled("aot_eager", DEVICE)


@pytest.mark.gpu
def test_torch_compile_fullgraph_inductor_gpu():
    _check_compiled("inductor", "cuda")


def test_torch_compile_reference_backend_stays_eager_inside():
    # On the reference backend the twins run eagerly inside torch.compile: results equal eager ones, and
    # the captured graphs do not grow with the number of users (traced, the twins' per-user loops unroll).
    from torch._dynamo.utils import counters
    model = perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, silu_normalizer=32.0,
                                             backend="reference")).to(DEVICE)
    captured = []
    for lengths in ([6, 0, 11], [6, 0, 11, 3, 9, 5, 7, 2]):
        torch._dynamo.reset()
        counters.clear()
        inputs, _ = make_inputs(lengths, [2] * len(lengths))
        compiled = torch.compile(model, backend="aot_eager")
        expected = torch.cat(model(*inputs))
        torch.testing.assert_close(torch.cat(compiled(*inputs)), expected, rtol=0, atol=0)
        captured.append(counters["stats"]["calls_captured"])
    assert captured[0] == captured[1] > 0


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(embed_dim=0), ValueError, "embed_dim must be a positive int"),
    (dict(num_heads=2.0), ValueError, "num_heads must be a positive int"),
    (dict(qk_dim=8), ValueError, "qk_dim must be a multiple of 16 from 16 to 256"),
    (dict(v_dim=272), ValueError, "v_dim must be a multiple of 16 from 16 to 256"),
    (dict(activation="relu"), ValueError, "activation must be 'silu' or 'softmax'"),
    (dict(silu_normalizer="1"), TypeError, "silu_normalizer must be a float or None"),
    (dict(silu_normalizer=0.0), ValueError, "silu_normalizer must be finite and > 0"),
    (dict(dropout=1.0), ValueError, "dropout must be a float in [0, 1)"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
], ids=lambda x: "-".join(x) if isinstance(x, dict) else None)
def test_bad_constructor_arguments(kwargs, error, fragment):
    args = dict(embed_dim=EMBED, num_heads=HEADS, qk_dim=QK, v_dim=V)
    args.update(kwargs)
    with pytest.raises(error, match=None) as info:
        HSTULayer(args.pop("embed_dim"), args.pop("num_heads"), args.pop("qk_dim"), args.pop("v_dim"), **args)
    assert info.value.args[0].startswith("HSTULayer: ") and fragment in info.value.args[0], info.value.args[0]
    with pytest.raises(ValueError, match="TargetAwareSelfAttention: num_layers must be a positive int"):
        TargetAwareSelfAttention(0, EMBED, HEADS, QK, V)


def test_bad_call_arguments():
    model = TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, backend="triton").to(DEVICE)
    (hx, hoff, cx, coff), _ = make_inputs([4, 3], [2, 1])
    with pytest.raises(ValueError, match=r"HSTULayer: history_x must be \(rows, 32\), got shape \(7, 16\)"):
        model(hx[:, :16], hoff, cx, coff)
    with pytest.raises(ValueError, match=r"HSTULayer: candidate_x must be \(rows, 32\), got shape \(32,\)"):
        model(hx, hoff, cx[0], coff)
    with pytest.raises(TypeError, match="HSTULayer: candidate_x must be a float tensor"):
        model(hx, hoff, cx.long(), coff)
    with pytest.raises(TypeError, match="HSTULayer: history_x must be a torch.Tensor"):
        model.prefill(hx.tolist(), hoff)
    with pytest.raises(TypeError, match="HSTULayer: history_offsets must be a torch.Tensor"):
        model.prefill(hx, hoff.tolist())
    # Offsets and lengths are the op's checks.
    with pytest.raises(ValueError, match="target_aware_attention: candidate_offsets must end at the row count 3"):
        model(hx, hoff, cx, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="target_aware_attention: history_offsets must be 1-D with B\\+1 = 3"):
        model(hx, hoff[:2], cx, coff)
    _, cache = model.prefill(hx, hoff)
    with pytest.raises(TypeError, match="TargetAwareSelfAttention: cache must be the HistoryCache"):
        model.score(cx, coff, tuple(cache))
    with pytest.raises(ValueError, match="TargetAwareSelfAttention: cache must hold K/V for 2 layers, got 1 keys"):
        model.score(cx, coff, cache._replace(keys=cache.keys[:1]))
    with pytest.raises(ValueError, match="TargetAwareSelfAttention: backend must be one of"):
        model.backend = "gpu"


# ------------------------------------------------------------------------------------------------
# CrossAttention
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_cross_attention_backends_agree(cutoffs):
    model = CrossAttention(24, EMBED, 2, 16).to(DEVICE)
    (hx, hoff, _, _), _ = make_inputs([9, 0, 37], [1, 1, 1])
    cx = torch.randn(10, 24, device=DEVICE)
    coff = offsets_from_lengths([3, 2, 5], device=DEVICE)
    kwargs = {"candidate_history_lengths": torch.randint(0, 40, (10,), device=DEVICE)} if cutoffs else {}
    assert_backends_agree(model, [hx, hoff, cx, coff], kwargs)


def test_cross_attention_matches_dense_softmax():
    # Independent of the op: per user, torch's scaled_dot_product_attention over the user's history.
    model = CrossAttention(24, EMBED, 2, 16, backend="triton").to(DEVICE)
    history_lens, candidate_lens = [5, 0, 12], [2, 3, 4]
    (hx, hoff, _, _), _ = make_inputs(history_lens, [1, 1, 1])
    cx = torch.randn(9, 24, device=DEVICE)
    coff = offsets_from_lengths(candidate_lens, device=DEVICE)
    got = model(hx, hoff, cx, coff)
    q = model.q(cx).view(9, 2, 16)
    k, v = (t.reshape(-1, 2, 16) for t in model.kv(hx).chunk(2, dim=-1))
    parts = []
    for b in range(3):
        h0, h1, c0, c1 = hoff[b], hoff[b + 1], coff[b], coff[b + 1]
        if h1 == h0:  # nothing to attend to: zeros
            parts.append(torch.zeros(c1 - c0, 32, device=DEVICE))
            continue
        out = nn.functional.scaled_dot_product_attention(q[c0:c1].transpose(0, 1), k[h0:h1].transpose(0, 1),
                                                         v[h0:h1].transpose(0, 1))
        parts.append(out.transpose(0, 1).reshape(c1 - c0, 32))
    torch.testing.assert_close(got, model.output(torch.cat(parts)), rtol=1e-5, atol=1e-5)


def test_cross_attention_bad_arguments():
    with pytest.raises(ValueError, match="CrossAttention: head_dim must be a multiple of 16"):
        CrossAttention(8, 8, 2, 24)
    with pytest.raises(ValueError, match="CrossAttention: kv_dim must be a positive int"):
        CrossAttention(8, 0, 2, 16)
    with pytest.raises(ValueError, match="CrossAttention: backend must be one of"):
        CrossAttention(8, 8, 2, 16, backend="gpu")
    model = CrossAttention(8, 12, 2, 16)
    hoff, coff = torch.tensor([0, 3]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"CrossAttention: history_x must be \(rows, 12\), got shape \(3, 8\)"):
        model(torch.randn(3, 8), hoff, torch.randn(2, 8), coff)
    with pytest.raises(ValueError, match=r"CrossAttention: candidate_x must be \(rows, 8\)"):
        model(torch.randn(3, 12), hoff, torch.randn(2, 12), coff)


# ------------------------------------------------------------------------------------------------
# validate=False, and (GPU) CUDA-graph capture of score on a cache
# ------------------------------------------------------------------------------------------------
def test_validate_false_gives_the_same_results():
    model = perturb(TargetAwareSelfAttention(2, EMBED, HEADS, QK, V, silu_normalizer=20.0,
                                             backend="triton")).to(DEVICE).eval()
    (hx, hoff, cx, coff), kwargs = make_inputs([6, 13], [3, 2], cutoffs=True)
    with torch.no_grad():
        expected = model(hx, hoff, cx, coff, **kwargs)
        got = model(hx, hoff, cx, coff, **kwargs, validate=False)
        _, cache = model.prefill(hx, hoff, validate=False)
        scored = model.score(cx, coff, cache, **kwargs, validate=False)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    torch.testing.assert_close(scored, expected[1], rtol=1e-5, atol=1e-5)
    cross = CrossAttention(EMBED, EMBED, HEADS, QK, backend="triton").to(DEVICE)
    assert torch.equal(cross(hx, hoff, cx, coff), cross(hx, hoff, cx, coff, validate=False))


@pytest.mark.gpu
def test_gpu_score_is_cuda_graph_capturable():
    model = perturb(TargetAwareSelfAttention(2, 64, 2, 32, 32, silu_normalizer=256.0,
                                             backend="triton")).cuda().eval()
    (hx, hoff, cx, coff), _ = make_inputs([100, 0, 250], [30, 5, 64], embed=64, device="cuda")
    with torch.no_grad():
        _, cache = model.prefill(hx, hoff)
        static_x = cx.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
            for _ in range(2):
                model.score(static_x, coff, cache, validate=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model.score(static_x, coff, cache, validate=False)
        fresh = torch.randn_like(cx)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, model.score(fresh, coff, cache), rtol=1e-5, atol=1e-5)

"""gesr_kernels.nn MixtureOfAttention and MultiLogitGating: shapes, composition, backends agree, state_dict,
set_backend, argument checks."""

import pytest
import torch
from torch import nn

from conftest import DEVICE
from helpers import assert_backends_agree, offsets_from_lengths

import gesr_kernels
from gesr_kernels.nn import (CrossAttention, HardMatchAttention, HSTULayer, MixtureOfAttention, MultiLogitGating,
                             TargetAwareSelfAttention)

EMBED, HEADS, QK, V, PAIRS, MAX_COUNT, HMA_OUT = 32, 2, 16, 16, 2, 3, 8


def make_mixture(backend=None, *, layers=1, hma_backend="auto"):
    return MixtureOfAttention(
        HardMatchAttention(PAIRS, MAX_COUNT, 4, [12, HMA_OUT], backend=hma_backend),
        TargetAwareSelfAttention(layers, EMBED, HEADS, QK, V, silu_normalizer=16.0),
        CrossAttention(EMBED, EMBED, HEADS, QK), backend=backend)


class _Head(nn.Module):
    """Mixture -> gating, with a primary logit from a dot product of two linear towers."""

    def __init__(self, num_logits=3):
        super().__init__()
        self.mixture = make_mixture()
        self.gating = MultiLogitGating(self.mixture.out_dims, num_logits)
        self.user, self.item = nn.Linear(EMBED, 8), nn.Linear(EMBED, 8)

    def forward(self, history_ids, history_x, history_offsets, candidate_ids, candidate_x, candidate_offsets,
                **kwargs):
        mixed = self.mixture(history_ids, history_x, history_offsets, candidate_ids, candidate_x,
                             candidate_offsets, **kwargs)
        primary = (self.user(candidate_x) * self.item(candidate_x)).sum(-1)
        logit, secondary = self.gating(mixed, primary)
        return logit, secondary


def make_inputs(history_lens, candidate_lens, *, cutoffs=False):
    """[history_ids, history_x, history_offsets, candidate_ids, candidate_x, candidate_offsets], kwargs.
    Ids from a small range, so that hard matches (and capped counts) occur."""
    total_h, total_c = sum(history_lens), sum(candidate_lens)
    inputs = [torch.randint(0, 4, (total_h, PAIRS), device=DEVICE),
              torch.randn(total_h, EMBED, dtype=torch.float64).to(DEVICE, torch.float32),
              offsets_from_lengths(history_lens, device=DEVICE),
              torch.randint(0, 4, (total_c, PAIRS), device=DEVICE),
              torch.randn(total_c, EMBED, dtype=torch.float64).to(DEVICE, torch.float32),
              offsets_from_lengths(candidate_lens, device=DEVICE)]
    kwargs = {}
    if cutoffs:
        kwargs["candidate_history_lengths"] = torch.randint(0, max(history_lens) + 2, (total_c,), device=DEVICE)
    return inputs, kwargs



# ------------------------------------------------------------------------------------------------
# Shapes and the documented compositions
# ------------------------------------------------------------------------------------------------
def test_mixture_is_the_concatenation_of_its_branches():
    model = make_mixture("reference").to(DEVICE)
    assert model.out_dims == (HMA_OUT, EMBED, EMBED)
    (hid, hx, hoff, cid, cx, coff), kwargs = make_inputs([5, 0, 9], [2, 3, 1], cutoffs=True)
    got = model(hid, hx, hoff, cid, cx, coff, **kwargs)
    assert got.shape == (6, HMA_OUT + 2 * EMBED) and got.dtype == torch.float32
    lengths = kwargs["candidate_history_lengths"]
    expected = torch.cat([
        model.hard_match(hid, hoff, cid, coff, candidate_history_lengths=lengths),
        model.self_attention(hx, hoff, cx, coff, candidate_history_lengths=lengths)[1],
        model.cross_attention(hx, hoff, cx, coff, candidate_history_lengths=lengths)], dim=-1)
    assert torch.equal(got, expected)
    # max_history_len goes to both attention branches (a constant SiLU normalizer here: same numbers); a bound
    # below the data is refused.
    bounded = model(hid, hx, hoff, cid, cx, coff, **kwargs, max_history_len=12)
    assert torch.equal(bounded, torch.cat([
        expected[:, :HMA_OUT],
        model.self_attention(hx, hoff, cx, coff, candidate_history_lengths=lengths, max_history_len=12)[1],
        model.cross_attention(hx, hoff, cx, coff, candidate_history_lengths=lengths, max_history_len=12)], dim=-1))
    assert torch.equal(bounded, got)
    with pytest.raises(ValueError, match="max_history_len must be >= the longest history"):
        model(hid, hx, hoff, cid, cx, coff, **kwargs, max_history_len=8)
    # max_candidates likewise (an order hint for the kernels: same numbers).
    assert torch.equal(model(hid, hx, hoff, cid, cx, coff, **kwargs, max_history_len=12, max_candidates=3), got)
    with pytest.raises(ValueError, match="max_candidates must be >= the longest candidate list"):
        model(hid, hx, hoff, cid, cx, coff, **kwargs, max_candidates=2)
    # A single HSTULayer is accepted as the self attention; no candidates gives (0, width).
    single = MixtureOfAttention(HardMatchAttention(PAIRS, MAX_COUNT, 4, [HMA_OUT]), HSTULayer(EMBED, HEADS, QK, V),
                                CrossAttention(EMBED, EMBED, HEADS, QK), backend="reference").to(DEVICE)
    (hid, hx, hoff, cid, cx, coff), _ = make_inputs([4, 3], [0, 0])
    assert single(hid, hx, hoff, cid, cx, coff).shape == (0, HMA_OUT + 2 * EMBED)


def test_gating_is_the_documented_formula():
    gating = MultiLogitGating([3, 5, 4], 2).to(DEVICE)
    with torch.no_grad():
        gating.fusion_weight.copy_(torch.randn(3))
        gating.fusion_bias.fill_(0.7)
    parts = [torch.randn(7, d, device=DEVICE) for d in (3, 5, 4)]
    primary = torch.randn(7, device=DEVICE)
    logit, secondary = gating(parts, primary)
    assert logit.shape == (7,) and secondary.shape == (7, 2)
    e = torch.cat(parts, -1)
    g = torch.sigmoid(e @ gating.gate.weight.T + gating.gate.bias)
    s = (g * e) @ gating.logits.weight.T + gating.logits.bias
    w = gating.fusion_weight
    torch.testing.assert_close(secondary, s)
    torch.testing.assert_close(logit, w[0] * primary + s @ w[1:] + 0.7)
    concat_logit, concat_secondary = gating(e, primary)  # the concatenation is accepted as is
    assert torch.equal(concat_logit, logit) and torch.equal(concat_secondary, secondary)
    fresh = MultiLogitGating([3, 5], 4)
    assert torch.equal(fresh.fusion_weight, torch.tensor([1.0, 0.25, 0.25, 0.25, 0.25]))


# ------------------------------------------------------------------------------------------------
# Backends agree (outputs, parameter and input gradients)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cutoffs", [False, True], ids=["all", "cutoffs"])
def test_mixture_and_gating_backends_agree(cutoffs):
    model = _Head().to(DEVICE)
    with torch.no_grad():  # random LayerNorm affines so that their gradients are exercised
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    inputs, kwargs = make_inputs([6, 0, 13], [3, 2, 4], cutoffs=cutoffs)
    assert_backends_agree(model, inputs, kwargs)


# ------------------------------------------------------------------------------------------------
# state_dict and set_backend
# ------------------------------------------------------------------------------------------------
def test_state_dict_identical_across_backends_and_set_backend():
    states = []
    for backend in ("triton", "reference", "auto"):
        torch.manual_seed(5)
        head = _Head()
        gesr_kernels.set_backend(head, backend)
        states.append(head.state_dict())
    for other in states[1:]:
        assert list(other) == list(states[0])
        assert all(torch.equal(other[k], states[0][k]) for k in other)
    model = make_mixture(hma_backend="triton")
    assert model.backend is None  # branches disagree: hard match "triton", the others "auto"
    model.backend = "reference"
    assert model.backend == "reference"
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))
    head = _Head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert gesr_kernels.set_backend(head, "triton") is head
    kinds = (HardMatchAttention, HSTULayer, TargetAwareSelfAttention, CrossAttention, MixtureOfAttention,
             MultiLogitGating)
    gesr = [m for m in head.modules() if isinstance(m, kinds)]
    assert len(gesr) == 6 and all(m.backend == "triton" for m in gesr)
    after = head.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in after)
    assert make_mixture("triton").backend == "triton"


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------
def test_mixture_bad_arguments():
    hma = HardMatchAttention(PAIRS, MAX_COUNT, 4, [HMA_OUT])
    stack = TargetAwareSelfAttention(1, EMBED, HEADS, QK, V)
    cross = CrossAttention(EMBED, EMBED, HEADS, QK)
    with pytest.raises(TypeError, match="MixtureOfAttention: hard_match must be a HardMatchAttention, got Linear"):
        MixtureOfAttention(nn.Linear(2, 2), stack, cross)
    with pytest.raises(TypeError, match="self_attention must be a TargetAwareSelfAttention or HSTULayer"):
        MixtureOfAttention(hma, cross, cross)
    with pytest.raises(TypeError, match="MixtureOfAttention: cross_attention must be a CrossAttention"):
        MixtureOfAttention(hma, stack, stack)
    with pytest.raises(ValueError, match="MixtureOfAttention: cross_attention must have query_dim == kv_dim == "
                                         "the self attention's embed_dim 32, got query_dim 16 and kv_dim 32"):
        MixtureOfAttention(hma, stack, CrossAttention(16, EMBED, HEADS, QK))
    with pytest.raises(ValueError, match="MixtureOfAttention: backend must be one of"):
        MixtureOfAttention(hma, stack, cross, backend="cuda")
    model = MixtureOfAttention(hma, stack, cross, backend="reference").to(DEVICE)
    with pytest.raises(ValueError, match="MixtureOfAttention: backend must be one of"):
        model.backend = "gpu"
    (hid, hx, hoff, cid, cx, coff), _ = make_inputs([4, 3], [2, 1])
    with pytest.raises(ValueError, match=r"MixtureOfAttention: history_x must be \(rows, 32\), got shape \(7, 16\)"):
        model(hid, hx[:, :16], hoff, cid, cx, coff)
    with pytest.raises(TypeError, match="MixtureOfAttention: candidate_x must be a float tensor"):
        model(hid, hx, hoff, cid, cx.long(), coff)
    with pytest.raises(ValueError, match=r"MixtureOfAttention: candidate_ids must have one row per row of "
                                         r"candidate_x \(3\), got shape \(2, 2\)"):
        model(hid, hx, hoff, cid[:2], cx, coff)
    with pytest.raises(ValueError, match="history_offsets"):  # the ops' own checks still run
        model(hid, hx, hoff[:2], cid, cx, coff)


@pytest.mark.parametrize("args,error,fragment", [
    (([], 2), ValueError, "in_dims must be a non-empty list of positive ints"),
    (([4, 0], 2), ValueError, "in_dims must be a non-empty list of positive ints"),
    ((4, 2), ValueError, "in_dims must be a non-empty list of positive ints"),
    (([4], 0), ValueError, "num_logits must be a positive int"),
    (([4], True), ValueError, "num_logits must be a positive int"),
], ids=["empty", "zero_dim", "int_dims", "zero_logits", "bool_logits"])
def test_gating_bad_constructor_arguments(args, error, fragment):
    with pytest.raises(error) as info:
        MultiLogitGating(*args)
    assert info.value.args[0].startswith("MultiLogitGating: ") and fragment in info.value.args[0]
    with pytest.raises(ValueError, match="MultiLogitGating: backend must be one of"):
        MultiLogitGating([4], 2, backend="gpu")


def test_gating_bad_call_arguments():
    gating = MultiLogitGating([3, 5], 2)
    e3, e5, primary = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4)
    with pytest.raises(ValueError, match="MultiLogitGating: embeddings must hold 2 tensors, got 1"):
        gating([e3], primary)
    with pytest.raises(ValueError, match=r"MultiLogitGating: embeddings\[1\] must be \(rows, 5\), got shape \(4, 3\)"):
        gating([e3, e3], primary)
    with pytest.raises(ValueError, match=r"MultiLogitGating: embeddings must all have the same number of rows, "
                                         r"got \[3, 4\]"):
        gating([e3, e5[:3]], primary)
    with pytest.raises(ValueError, match=r"MultiLogitGating: embeddings must be \(rows, 8\), got shape \(4, 5\)"):
        gating(e5, primary)
    with pytest.raises(TypeError, match="MultiLogitGating: embeddings must be a torch.Tensor"):
        gating("e", primary)
    with pytest.raises(ValueError, match=r"MultiLogitGating: primary_logit must be \(4,\), got shape \(4, 1\)"):
        gating([e3, e5], primary[:, None])
    with pytest.raises(TypeError, match="MultiLogitGating: primary_logit must be a float tensor"):
        gating([e3, e5], primary.long())
    with pytest.raises(TypeError, match="MultiLogitGating: primary_logit must be a torch.Tensor"):
        gating([e3, e5], primary.tolist())

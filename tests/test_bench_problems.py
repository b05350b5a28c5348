"""The attention benchmark's problems (bench/target_attention.py): a problem's draw depends on its shape and
layout alone, not on the suite or on the problems drawn before it (a B = 1 jagged shape is one draw of its
lengths, so a suite-dependent draw made two runs of one shape incomparable)."""
import pytest
import torch

bta = pytest.importorskip("bench.target_attention")

SHAPE = (3, 64, 12, 2, 16)


def _draw(shape, layout):
    return bta.make_problem(shape, layout, "cpu", torch.float32)


def test_draw_does_not_depend_on_earlier_draws():
    alone = _draw(SHAPE, "jagged")
    _draw((2, 40, 8, 2, 32), "jagged")  # another problem drawn first, as in a longer suite
    _draw(SHAPE, "uniform")
    again = _draw(SHAPE, "jagged")
    assert (alone.hist_lens, alone.cand_lens) == (again.hist_lens, again.cand_lens)
    assert all(torch.equal(alone.t[name], again.t[name]) for name in alone.t)


def test_jagged_lengths_follow_the_layout():
    B, N, n = SHAPE[:3]
    p = _draw(SHAPE, "jagged")
    assert len(p.hist_lens) == len(p.cand_lens) == B
    assert all(N // 4 <= h <= N for h in p.hist_lens) and all(1 <= c <= n for c in p.cand_lens)
    assert p.t["hq"].shape[0] == sum(p.hist_lens) and p.t["cq"].shape[0] == sum(p.cand_lens)
    assert p.t["hoff"].tolist() == [0] + torch.tensor(p.hist_lens).cumsum(0).tolist()
    assert _draw(SHAPE, "uniform").hist_lens == [N] * B
    # Different shapes and layouts draw from different seeds.
    seed = lambda layout: bta.problem_generator(SHAPE, layout).initial_seed()  # noqa: E731
    assert seed("jagged") != seed("uniform")

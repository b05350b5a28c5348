"""examples/gesr_example.py: a few training steps on the reference backend lower the loss; AUC and data checks."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location("gesr_example", os.path.join(ROOT, "examples", "gesr_example.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def test_training_lowers_the_loss():
    history = example.train(20, batch_users=8, eval_users=64, seed=0, backend="reference", log_every=10,
                            verbose=False)
    losses = history["train_loss"]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    (_, loss0, auc0), *_, (_, loss1, auc1) = history["eval"]
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert auc1 > auc0 + 0.05, (auc0, auc1)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_auc_matches_pairwise_count_with_ties():
    scores = torch.randint(0, 6, (60,)).float()  # many ties
    labels = torch.rand(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert abs(example.auc(scores, labels.float()) - pairwise.item()) < 1e-12
    assert example.auc(torch.arange(4.0), torch.tensor([0.0, 0, 1, 1])) == 1.0


def test_labels_depend_on_hard_matches_and_affinity():
    data = example.SyntheticGESR(seed=1)
    batch = data.batch(128, torch.Generator().manual_seed(0))
    hoff, coff = batch["history_offsets"], batch["candidate_offsets"]
    assert hoff.shape == coff.shape == (129,) and batch["candidate_ids"].shape == (128 * 8, 2)
    assert int(hoff[-1]) == batch["history_ids"].shape[0]
    labels, match = batch["labels"], batch["match"]
    assert 0.3 < match.float().mean() < 0.8
    assert labels[match].mean() > labels[~match].mean() + 0.2
    # Affinity: among candidates without a hard match, clicked ones sit closer to their user's history.
    users = torch.searchsorted(coff[1:], torch.arange(len(labels)), right=True)
    history_user = torch.searchsorted(hoff[1:], torch.arange(int(hoff[-1])), right=True)
    mean_latent = torch.zeros(128, data.latent.shape[1]).index_add_(0, history_user,
                                                                   data.latent[batch["history_ids"][:, 0]])
    mean_latent /= (hoff[1:] - hoff[:-1]).unsqueeze(-1)
    affinity = (data.latent[batch["candidate_ids"][:, 0]] * mean_latent[users]).sum(-1)
    clicked = (labels == 1) & ~match
    assert affinity[clicked].mean() > affinity[(labels == 0) & ~match].mean() + 0.03


def _kernel_model(users: int, bound_candidates: bool = False):
    """(device, data, a batch of ``users`` users, the example model on the Triton backend; with
    ``bound_candidates`` the model gets the data's candidates per user as max_candidates)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    data = example.SyntheticGESR(seed=0)
    batch = example.to_device(data.batch(users, torch.Generator().manual_seed(0)), device)
    bound = data.candidates_per_user if bound_candidates else None
    model = example.GESRModel(data.num_items, data.num_categories, max_history=data.history_len[1],
                              max_candidates=bound, backend="triton").to(device)
    return device, data, batch, model


def test_compiled_model_matches_eager():
    # torch.compile(fullgraph=True) of the whole example model, forward and backward, on the kernels:
    # inductor on the GPU, aot_eager on the CPU (kernels through the interpreter). No graph breaks.
    device, _, batch, model = _kernel_model(4)
    params = list(model.parameters())
    loss, _ = example.loss_fn(model, batch)
    expected = torch.autograd.grad(loss, params, allow_unused=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    loss_compiled, _ = example.loss_fn(compiled, batch)
    got = torch.autograd.grad(loss_compiled, params, allow_unused=True)
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in got) == sum(e is not None for e in expected) > 0
    for e, g in zip(expected, got):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_max_candidates_bound_reaches_the_kernels():
    # The pipeline's candidates per user as max_candidates: the kernels group each user's candidate tiles with
    # its history tiles, an order, not a number: the mixture's outputs are bitwise those without the bound (the
    # mixture, not the whole model: the model's mean pooling uses index_add_, whose CUDA sums are not
    # deterministic). The model hands its bound to the op: a bound below the batch's lists is refused.
    _, data, batch, model = _kernel_model(3, bound_candidates=True)
    hx, cx = model.embed(batch["history_ids"]), model.embed(batch["candidate_ids"])
    args = (batch["history_ids"], hx, batch["history_offsets"], batch["candidate_ids"], cx,
            batch["candidate_offsets"])
    bounded = model.mixture(*args, max_history_len=model.max_history, max_candidates=model.max_candidates)
    unbounded = model.mixture(*args, max_history_len=model.max_history)
    assert torch.equal(bounded, unbounded)
    model.max_candidates = data.candidates_per_user - 1
    with pytest.raises(ValueError, match="max_candidates must be >= the longest candidate list"):
        model(batch)

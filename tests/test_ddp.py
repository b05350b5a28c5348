"""Two-process DistributedDataParallel (gloo, CPU) training step of the example GESR model (reference backend):
the averaged gradients and the parameters after one SGD step match a single process on the whole batch."""
import datetime
import importlib.util
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, USERS, LR = 2, 8, 0.5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _load_example():
    spec = importlib.util.spec_from_file_location("gesr_example", os.path.join(ROOT, "examples", "gesr_example.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup():
    """(example module, model, whole batch): identical in every process (fixed seeds)."""
    example = _load_example()
    data = example.SyntheticGESR(seed=3)
    torch.manual_seed(0)
    model = example.GESRModel(data.num_items, data.num_categories, max_history=data.history_len[1],
                              backend="reference")
    return example, model, data.batch(USERS, torch.Generator().manual_seed(4))


def _users(batch, start, stop):
    """The sub-batch of users [start, stop): rows sliced, offsets rebased to 0."""
    hoff, coff = batch["history_offsets"], batch["candidate_offsets"]
    h0, h1, c0, c1 = int(hoff[start]), int(hoff[stop]), int(coff[start]), int(coff[stop])
    return {"history_ids": batch["history_ids"][h0:h1], "history_offsets": hoff[start:stop + 1] - h0,
            "candidate_ids": batch["candidate_ids"][c0:c1], "candidate_offsets": coff[start:stop + 1] - c0,
            "labels": batch["labels"][c0:c1], "match": batch["match"][c0:c1]}


def _step(example, model, batch):
    """One SGD step; returns the gradients (before the step) and the parameters after it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    objective, _ = example.loss_fn(model, batch)
    optimizer.zero_grad()
    objective.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        example, model, batch = _setup()
        per_rank = USERS // WORLD  # every user has the same number of candidates: equal shards, mean of means
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        grads, params = _step(example, ddp, _users(batch, rank * per_rank, (rank + 1) * per_rank))
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_matches_single_process(tmp_path):
    example, model, batch = _setup()
    # Equal candidates per user: the mean of the per-rank mean losses is the whole batch's mean loss.
    assert len(set((batch["candidate_offsets"][1:] - batch["candidate_offsets"][:-1]).tolist())) == 1
    names = [n for n, _ in model.named_parameters()]
    grads, params = _step(example, model, batch)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got["grads"]) == len(grads)
        for name, g, e in zip(names, got["grads"], grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
        for name, p, e in zip(names, got["params"], params):
            torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} after the step: {m}")
    assert any(g.abs().max() > 0 for g in grads[:2])  # the embedding tables did receive gradients

"""A small Generative Early Stage Ranking (GESR) model trained on synthetic data.

    python examples/gesr_example.py --steps 200                  # CPU: reference backend, about a minute
    python examples/gesr_example.py --steps 200 --backend triton # kernels (on CPU: the Triton interpreter, slow)

Model (every candidate gets one logit):
    x            = item_embedding(item id) + category_embedding(category id)      history and candidate rows
    primary      = user_tower(mean of the user's history x) . item_tower(candidate x)      two towers
    mixture      = MixtureOfAttention(HardMatchAttention on (item, category) id pairs,
                                      TargetAwareSelfAttention, CrossAttention)
    logit, aux   = MultiLogitGating(mixture, primary)

Synthetic data: each item has a category and a hidden vector near its category's; each user prefers two
categories and has a history drawn mostly from them; half of a user's candidates are taken from the
history. The click probability of a candidate is sigmoid(2.5 * [its id is in the history] + 2 * affinity -
1.5), with affinity the hidden vector of the candidate dotted with the mean hidden vector of the history.
So labels depend on hard matches and on history-candidate affinity, both of which the mixture can see.

The script prints the training loss, the held-out loss and AUC (computed in torch), and the training
speed (steps/s) of both backends on a copy of the model. Without CUDA, ``--backend`` defaults to
"reference" and the Triton backend runs through the Triton interpreter (correct, but slow: its speed
figure says nothing about the GPU). With CUDA the default is "triton".
"""
import argparse
import copy
import os
import sys
import time
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

from torch import nn  # noqa: E402

import gesr_kernels  # noqa: E402
from gesr_kernels.nn import (CrossAttention, HardMatchAttention, MixtureOfAttention, MultiLogitGating,  # noqa: E402
                             TargetAwareSelfAttention)


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------
class SyntheticGESR:
    """Users, histories, candidates and click labels; every batch is drawn from ``generator``.

    A batch is a dict: ``history_ids`` (total_N, 2) and ``candidate_ids`` (total_n, 2) hold (item id,
    category id) per row; ``history_offsets`` / ``candidate_offsets`` (B+1,); ``labels`` (total_n,) in {0, 1};
    ``match`` (total_n,) whether the candidate's item is in its user's history.
    """

    def __init__(self, num_items: int = 1000, num_categories: int = 20, latent_dim: int = 8,
                 history_len=(8, 32), candidates_per_user: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_items, self.num_categories = num_items, num_categories
        self.history_len, self.candidates_per_user = history_len, candidates_per_user
        self.item_category = torch.randint(0, num_categories, (num_items,), generator=g)
        centers = torch.randn(num_categories, latent_dim, generator=g)
        latent = centers[self.item_category] + 0.5 * torch.randn(num_items, latent_dim, generator=g)
        self.latent = latent / latent.norm(dim=-1, keepdim=True)  # affinity = cosine, in [-1, 1]
        self.items_of = [torch.nonzero(self.item_category == c).flatten() for c in range(num_categories)]

    def _ids(self, items: torch.Tensor) -> torch.Tensor:
        return torch.stack([items, self.item_category[items]], dim=-1)

    def batch(self, num_users: int, generator: torch.Generator) -> dict:
        g, n = generator, self.candidates_per_user
        histories, candidates, labels, matches = [], [], [], []
        for _ in range(num_users):
            length = int(torch.randint(self.history_len[0], self.history_len[1] + 1, (), generator=g))
            liked = torch.randperm(self.num_categories, generator=g)[:2]
            pool = torch.cat([self.items_of[int(c)] for c in liked])
            from_liked = pool[torch.randint(0, len(pool), (length,), generator=g)]
            anywhere = torch.randint(0, self.num_items, (length,), generator=g)
            history = torch.where(torch.rand(length, generator=g) < 0.7, from_liked, anywhere)
            seen = history[torch.randint(0, length, (n // 2,), generator=g)]
            fresh = torch.where(torch.rand(n - n // 2, generator=g) < 0.5,
                                pool[torch.randint(0, len(pool), (n - n // 2,), generator=g)],
                                torch.randint(0, self.num_items, (n - n // 2,), generator=g))
            candidate = torch.cat([seen, fresh])
            match = (candidate[:, None] == history[None, :]).any(-1)
            affinity = self.latent[candidate] @ self.latent[history].mean(0)
            p = torch.sigmoid(2.5 * match.float() + 2.0 * affinity - 1.5)
            histories.append(history)
            candidates.append(candidate)
            labels.append((torch.rand(n, generator=g) < p).float())
            matches.append(match)

        def offsets(parts):
            return torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

        return {"history_ids": self._ids(torch.cat(histories)), "history_offsets": offsets(histories),
                "candidate_ids": self._ids(torch.cat(candidates)), "candidate_offsets": offsets(candidates),
                "labels": torch.cat(labels), "match": torch.cat(matches)}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def _rows_to_users(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """User index of every row of a jagged batch (no host sync): the last b with offsets[b] <= row."""
    return torch.searchsorted(offsets, torch.arange(rows, device=offsets.device), right=True) - 1


def _mlp(*widths) -> nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class GESRModel(nn.Module):
    """Two towers (primary logit) + mixture of attention + multi-logit gating; see the module docstring.
    ``forward(batch) -> (logit (total_n,), secondary logits (total_n, num_logits))``."""

    def __init__(self, num_items: int, num_categories: int, *, embed_dim: int = 32, tower_dim: int = 16,
                 num_heads: int = 2, head_dim: int = 16, max_count: int = 4, max_history: int = 32,
                 max_candidates: Optional[int] = None, num_logits: int = 4, backend: str = "auto"):
        super().__init__()
        self.max_history = max_history  # the pipeline's truncation length: a true bound on every history
        # The pipeline's candidates per user, when it fixes one (a true bound on every candidate list): the
        # kernels then group each user's candidate tiles with its history tiles. None: no bound given.
        self.max_candidates = max_candidates
        self.item_embedding = nn.Embedding(num_items, embed_dim)
        self.category_embedding = nn.Embedding(num_categories, embed_dim)
        for table in (self.item_embedding, self.category_embedding):
            nn.init.normal_(table.weight, std=embed_dim ** -0.5)
        self.user_tower = _mlp(embed_dim, 2 * tower_dim, tower_dim)
        self.item_tower = _mlp(embed_dim, 2 * tower_dim, tower_dim)
        self.mixture = MixtureOfAttention(
            HardMatchAttention(2, max_count, 8, [32, 16]),
            # A constant SiLU normaliser: batch-independent outputs, no host sync.
            TargetAwareSelfAttention(1, embed_dim, num_heads, head_dim, head_dim, silu_normalizer=float(max_history)),
            CrossAttention(embed_dim, embed_dim, num_heads, head_dim), backend=backend)
        self.gating = MultiLogitGating(self.mixture.out_dims, num_logits, backend=backend)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(ids[:, 0]) + self.category_embedding(ids[:, 1])

    def forward(self, batch: dict):
        hoff, coff = batch["history_offsets"], batch["candidate_offsets"]
        hx, cx = self.embed(batch["history_ids"]), self.embed(batch["candidate_ids"])
        num_users = hoff.shape[0] - 1
        history_user = _rows_to_users(hoff, hx.shape[0])
        pooled = hx.new_zeros(num_users, hx.shape[1]).index_add_(0, history_user, hx)
        pooled = pooled / (hoff[1:] - hoff[:-1]).clamp_min(1).unsqueeze(-1).to(hx.dtype)
        user = self.user_tower(pooled)[_rows_to_users(coff, cx.shape[0])]
        primary = (user * self.item_tower(cx)).sum(-1)
        # The bounds order the attention kernels' tiles (every user's longest history tiles first, candidate
        # tiles beside their user's history tiles) without a device-to-host sync.
        mixed = self.mixture(batch["history_ids"], hx, hoff, batch["candidate_ids"], cx, coff,
                             max_history_len=self.max_history, max_candidates=self.max_candidates)
        return self.gating(mixed, primary)


# ------------------------------------------------------------------------------------------------
# Training, metrics, speed
# ------------------------------------------------------------------------------------------------
def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC = P(score of a random positive > that of a random negative), ties counting one half
    (Mann-Whitney U with average ranks)."""
    scores, labels = scores.detach().double().flatten().cpu(), labels.flatten().cpu().bool()
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks[order] = average[inverse]
    return ((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)).item()


def loss_fn(model: nn.Module, batch: dict, aux_weight: float = 0.1):
    """(objective, BCE of the fused logit): the objective adds a small BCE on each secondary logit (they
    are logits too)."""
    logit, secondary = model(batch)
    bce = nn.functional.binary_cross_entropy_with_logits
    labels = batch["labels"]
    main = bce(logit, labels)
    return main + aux_weight * bce(secondary, labels[:, None].expand_as(secondary)), main


@torch.no_grad()
def evaluate(model: nn.Module, batch: dict):
    logit, _ = model(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(logit, batch["labels"]).item()
    return loss, auc(logit, batch["labels"])


def train(steps: int = 200, *, batch_users: int = 32, eval_users: int = 256, lr: float = 3e-3, seed: int = 0,
          backend: str = "reference", device: str = "cpu", log_every: int = 25, verbose: bool = True) -> dict:
    """Train a fresh model; returns {"model", "data", "train_loss": [...], "eval": [(step, loss, auc), ...]}; losses are
    the BCE of the fused logit (train: per step; eval: on a fixed held-out batch)."""
    torch.manual_seed(seed)
    data = SyntheticGESR(seed=seed)
    model = GESRModel(data.num_items, data.num_categories, max_history=data.history_len[1],
                      max_candidates=data.candidates_per_user, backend=backend).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_gen = torch.Generator().manual_seed(seed + 1)
    eval_batch = to_device(data.batch(eval_users, torch.Generator().manual_seed(seed + 2)), device)
    history = {"model": model, "data": data, "train_loss": [], "eval": []}

    def log_eval(step):
        model.eval()
        loss, area = evaluate(model, eval_batch)
        model.train()
        history["eval"].append((step, loss, area))
        if verbose:
            recent = history["train_loss"][-log_every:]
            train_part = f"train loss {sum(recent) / len(recent):.4f}  " if recent else " " * 19
            print(f"step {step:4d}  {train_part}eval loss {loss:.4f}  eval AUC {area:.4f}", flush=True)

    log_eval(0)
    for step in range(1, steps + 1):
        batch = to_device(data.batch(batch_users, train_gen), device)
        objective, loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        history["train_loss"].append(loss.item())
        if step % log_every == 0 or step == steps:
            log_eval(step)
    return history


def steps_per_second(model: nn.Module, batch: dict, backend: str, steps: int) -> float:
    """Training steps/s (forward, backward, Adam) of a copy of ``model`` switched to ``backend``, on one
    batch; on CUDA one untimed warm-up step first (Triton compilation)."""
    model = gesr_kernels.set_backend(copy.deepcopy(model), backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        objective, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()

    if batch["labels"].is_cuda:  # the interpreter compiles nothing: no warm-up needed on CPU
        step()
    sync = torch.cuda.synchronize if batch["labels"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--backend", choices=gesr_kernels._core.backend.BACKENDS,
                        default="triton" if cuda else "reference",
                        help="training backend (default: triton on CUDA, reference on CPU)")
    parser.add_argument("--batch-users", type=int, default=32, help="users per training batch (8 candidates each)")
    parser.add_argument("--eval-users", type=int, default=256, help="users in the held-out batch (8 candidates each)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-steps", type=int, default=None,
                        help="timed steps per backend for the speed report (default 20 on CUDA; on CPU 10 for "
                             "reference and 1 for the interpreted Triton backend); 0 skips the report")
    args = parser.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    print(f"device {device}, training backend {args.backend!r}, torch {torch.__version__}", flush=True)

    start = time.perf_counter()
    history = train(args.steps, batch_users=args.batch_users, eval_users=args.eval_users, lr=args.lr, seed=args.seed, backend=args.backend,
                    device=device)
    elapsed = time.perf_counter() - start
    (_, loss0, auc0), (_, loss1, auc1) = history["eval"][0], history["eval"][-1]
    print(f"trained {args.steps} steps in {elapsed:.1f} s: eval loss {loss0:.4f} -> {loss1:.4f}, "
          f"eval AUC {auc0:.4f} -> {auc1:.4f}", flush=True)

    if args.speed_steps != 0:
        batch = to_device(history["data"].batch(args.batch_users, torch.Generator().manual_seed(123)), device)
        for backend in ("reference", "triton"):
            steps = args.speed_steps or (20 if cuda else (10 if backend == "reference" else 1))
            rate = steps_per_second(history["model"], batch, backend, steps)
            note = "" if cuda or backend == "reference" else "  (Triton interpreter on CPU: not a GPU figure)"
            print(f"speed {backend:>9}: {rate:8.2f} training steps/s over {steps} steps, "
                  f"{args.batch_users} users x 8 candidates{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

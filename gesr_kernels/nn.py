"""nn.Modules built from the gesr_kernels ops."""
from typing import Optional, Sequence

import torch
from torch import nn

from ._core.backend import check_backend, use_triton
from .hard_match import hard_match_embedding


class HardMatchAttention(nn.Module):
    """Hard-match attention: capped match counts -> per-pair count embeddings -> concat -> MLP.

    Args:
        num_pairs: P, the number of (history feature, candidate feature) pairs.
        max_count: M, the cap on match counts; the table has P*(M+1) rows.
        embedding_dim: D, the width of each count embedding.
        mlp_dims: widths of the MLP layers; the first takes the P*D concatenation, ReLU between layers,
            none after the last. Output width is ``mlp_dims[-1]``.
        folded: compute the same function faster. Each pair's embedding takes only M+1 values, so the
            first MLP layer folds into per-pair tables ``E_p @ W1_p^T`` that are summed (``mode="sum"``):
            the (total_n, P*D) concat and the first GEMM disappear. Parameters and state_dict are the
            same as with ``folded=False``; the folded tables are rebuilt from them on every forward
            (P*(M+1)*D*mlp_dims[0] multiply-adds), so training updates both alike.
        backend: "triton" (kernels), "reference" (pure-PyTorch twins), or "auto" (kernels on CUDA
            inputs, twins elsewhere). Changes only speed, never the function.

    Forward:
        ``forward(history_ids, history_offsets, candidate_ids, candidate_offsets, *, pad_id=None,
        candidate_history_lengths=None)`` with the shapes of ``gesr_kernels.hard_match_embedding``;
        returns (total_n, mlp_dims[-1]) in the parameters' dtype.
    """

    def __init__(self, num_pairs: int, max_count: int, embedding_dim: int, mlp_dims: Sequence[int], *,
                 folded: bool = False, backend: str = "auto"):
        super().__init__()
        for name, value in (("num_pairs", num_pairs), ("max_count", max_count),
                            ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HardMatchAttention: {name} must be a positive int, got {value!r}")
        mlp_dims = list(mlp_dims)
        if not mlp_dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in mlp_dims):
            raise ValueError(f"HardMatchAttention: mlp_dims must be a non-empty list of positive ints, "
                             f"got {mlp_dims!r}")
        self.num_pairs, self.max_count, self.embedding_dim = num_pairs, max_count, embedding_dim
        self.folded = bool(folded)
        self.backend = check_backend("HardMatchAttention", backend)
        self.embedding = nn.Parameter(torch.empty(num_pairs * (max_count + 1), embedding_dim))
        nn.init.normal_(self.embedding, std=embedding_dim ** -0.5)
        widths = [num_pairs * embedding_dim] + mlp_dims
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def _embed(self):
        if use_triton(self.backend, self.embedding.device):
            return hard_match_embedding
        from reference.hard_match import hard_match_embedding as reference_embedding
        return reference_embedding

    def folded_table(self) -> torch.Tensor:
        """(P*(M+1), mlp_dims[0]): row p*(M+1)+c is ``E[p*(M+1)+c] @ W1[:, p*D:(p+1)*D]^T``."""
        first = self.mlp[0]
        table = self.embedding.view(self.num_pairs, self.max_count + 1, self.embedding_dim)
        w1 = first.weight.view(first.out_features, self.num_pairs, self.embedding_dim)
        return torch.einsum("pcd,hpd->pch", table, w1).reshape(-1, first.out_features)

    def forward(self, history_ids: torch.Tensor, history_offsets: torch.Tensor,
                candidate_ids: torch.Tensor, candidate_offsets: torch.Tensor, *,
                pad_id: Optional[int] = None,
                candidate_history_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        embed = self._embed()
        args = (history_ids, history_offsets, candidate_ids, candidate_offsets)
        kwargs = dict(pad_id=pad_id, candidate_history_lengths=candidate_history_lengths)
        if self.folded:
            x = embed(*args, self.folded_table(), self.max_count, mode="sum", **kwargs)
            x = x + self.mlp[0].bias
        else:
            x = embed(*args, self.embedding, self.max_count, mode="concat", **kwargs)
            x = self.mlp[0](x)
        for layer in self.mlp[1:]:
            x = layer(torch.relu(x))
        return x

    def extra_repr(self) -> str:
        return (f"num_pairs={self.num_pairs}, max_count={self.max_count}, "
                f"embedding_dim={self.embedding_dim}, folded={self.folded}, backend={self.backend!r}")

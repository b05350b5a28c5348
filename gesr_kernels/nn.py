"""nn.Modules built from the gesr_kernels ops."""
from typing import NamedTuple, Optional, Sequence, Tuple

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
        return _reference_embedding

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


# ------------------------------------------------------------------------------------------------
# Target-aware self attention (HSTU layers) and the backend switch
# ------------------------------------------------------------------------------------------------
def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _check_rows(owner: str, name: str, x, width: int) -> None:
    """``x`` is a (rows, width) float tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a float tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{owner}: {name} must be (rows, {width}), got shape {tuple(x.shape)}")


# The reference backend's ops run eagerly even inside torch.compile (one graph break per call). The
# references loop over users with the offsets on the host: traced, that loop unrolls into a graph that
# grows with the batch (~80 ops per user of the example model: minutes of compilation at B = 256) and
# recompiles for every new set of lengths. Left eager, a compiled model on the reference backend compiles
# everything else and computes exactly what the eager reference does.
@torch.compiler.disable
def _reference_attention(*args, **kwargs):
    from reference.target_attention import target_aware_attention
    return target_aware_attention(*args, **kwargs)


@torch.compiler.disable
def _reference_embedding(*args, **kwargs):
    from reference.hard_match import hard_match_embedding
    return hard_match_embedding(*args, **kwargs)


def _attention_op(backend: str, device: torch.device):
    """The target-aware attention function the backend selects for tensors on ``device``."""
    if use_triton(backend, device):
        from .target_attention import target_aware_attention
        return target_aware_attention
    return _reference_attention


class HSTULayer(nn.Module):
    """One HSTU layer over a jagged batch of ``[history ; candidates]``, with target-aware attention.

    For every row x (history and candidate rows alike, same weights):
        u, v, q, k = split(Linear(LayerNorm(x)))      one fused projection, per-head widths below
        u = SiLU(u)
        a = target_aware_attention(q, k, v)           history causal; a candidate sees its user's history
                                                      and itself, never another candidate
        y = x + Dropout(Linear(u * LayerNorm(a)))     LayerNorm over the H * v_dim concatenated heads

    Args:
        embed_dim: width of x and y.
        num_heads: H.
        qk_dim, v_dim: per-head widths of q/k and of v/u; multiples of 16 from 16 to 256 (the kernels').
        activation: "silu" (HSTU; out = sum_j silu(q.k / sqrt(qk_dim)) v_j / silu_normalizer) or "softmax".
        silu_normalizer: the SiLU divisor. None uses the op's default, the longest history in the batch,
            which makes a user's output depend on the batch and costs a device-to-host copy per call: pass
            a constant (e.g. the model's maximum history length) for batch-independent outputs and for
            torch.compile(fullgraph=True).
        dropout: probability of the dropout on the output projection, in [0, 1).
        backend: "triton" (kernels), "reference" (``reference.target_attention``), or "auto" (kernels on
            CUDA inputs, reference elsewhere). Changes only speed, never the function or the parameters.
            torch.compile(fullgraph=True) needs the kernels (the reference loops over users on the host;
            under torch.compile it runs eagerly, a graph break).

    Forward:
        ``forward(history_x, history_offsets, candidate_x, candidate_offsets, *,
        candidate_history_lengths=None) -> (history_y, candidate_y)``: x is (total_N, embed_dim) and
        (total_n, embed_dim), offsets (B+1,) as for ``target_aware_attention``, and so is
        ``candidate_history_lengths`` (candidate c sees only its user's first so-many history rows).
        History outputs never depend on candidates. Every call (``forward``, ``prefill``, ``score``) takes
        ``validate=True``, passed to the op: ``validate=False`` skips its checks that read tensor data,
        and with a constant ``silu_normalizer`` (or softmax) the layer then makes no device-to-host copy
        (e.g. for CUDA-graph capture of ``score``).
        Every call also takes ``max_history_len=None``, passed to the op: a host-side upper bound on the
        longest history in the batch (e.g. the pipeline's truncation length). With it the kernels launch
        every user's longest history tiles first (a 1-25% faster forward for batches of several users), and
        with ``silu_normalizer=None`` it is the SiLU divisor instead of the longest history (no
        device-to-host copy, as for the op). It must be a true bound: ``validate=True`` checks it; with
        ``validate=False`` a smaller value leaves history rows past it uncomputed. ``forward`` and ``score``
        also take ``max_candidates=None``, the op's bound on the longest candidate list: in ``forward`` with
        ``max_history_len``, a bound that fits one candidate tile lets the kernels run each group of users'
        candidate tiles next to its history tiles (see ``target_aware_attention``); the same caveat holds.
    Serving: ``prefill`` returns the history outputs and this layer's history K/V; ``score`` computes
    candidate outputs from them (the op's cached mode), equal to ``forward``'s to rounding.
    """

    def __init__(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int, *, activation: str = "silu",
                 silu_normalizer: Optional[float] = None, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("qk_dim", qk_dim),
                            ("v_dim", v_dim)):
            _check_positive_int(owner, name, value)
        for name, value in (("qk_dim", qk_dim), ("v_dim", v_dim)):
            if value % 16 or value > 256:
                raise ValueError(f"{owner}: {name} must be a multiple of 16 from 16 to 256 (per head), got {value}")
        if activation not in ("silu", "softmax"):
            raise ValueError(f"{owner}: activation must be 'silu' or 'softmax', got {activation!r}")
        if silu_normalizer is not None:
            if isinstance(silu_normalizer, bool) or not isinstance(silu_normalizer, (int, float)):
                raise TypeError(f"{owner}: silu_normalizer must be a float or None, "
                                f"got {type(silu_normalizer).__name__}")
            if not 0 < float(silu_normalizer) < float("inf"):
                raise ValueError(f"{owner}: silu_normalizer must be finite and > 0, got {silu_normalizer}")
            silu_normalizer = float(silu_normalizer)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{owner}: dropout must be a float in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.qk_dim, self.v_dim = embed_dim, num_heads, qk_dim, v_dim
        self.activation, self.silu_normalizer = activation, silu_normalizer
        self.backend = check_backend(owner, backend)
        self.input_norm = nn.LayerNorm(embed_dim)
        self.uvqk = nn.Linear(embed_dim, num_heads * (2 * v_dim + 2 * qk_dim))
        self.attention_norm = nn.LayerNorm(num_heads * v_dim)
        self.output = nn.Linear(num_heads * v_dim, embed_dim)
        self.dropout = nn.Dropout(float(dropout))

    def _project(self, x: torch.Tensor):
        """(SiLU(u) (rows, H*v_dim), q, k (rows, H, qk_dim), v (rows, H, v_dim)); q, k, v are strided views
        of the fused projection (the kernels take any strides)."""
        rows, heads = x.shape[0], self.num_heads
        uv, qk = heads * self.v_dim, heads * self.qk_dim
        u, v, q, k = torch.split(self.uvqk(self.input_norm(x)), [uv, uv, qk, qk], dim=-1)
        return (nn.functional.silu(u), q.view(rows, heads, self.qk_dim), k.view(rows, heads, self.qk_dim),
                v.view(rows, heads, self.v_dim))

    def _finish(self, x: torch.Tensor, u: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        a = self.attention_norm(attention.reshape(attention.shape[0], self.num_heads * self.v_dim))
        return x + self.dropout(self.output(u * a))

    def _attend(self, *args, candidate_history_lengths=None, max_history_len=None, max_candidates=None,
                validate=True):
        op = _attention_op(self.backend, args[1].device)
        return op(*args, activation=self.activation, silu_normalizer=self.silu_normalizer,
                  candidate_history_lengths=candidate_history_lengths, max_history_len=max_history_len,
                  max_candidates=max_candidates, validate=validate)

    def forward(self, history_x: torch.Tensor, history_offsets: torch.Tensor, candidate_x: torch.Tensor,
                candidate_offsets: torch.Tensor, *, candidate_history_lengths: Optional[torch.Tensor] = None,
                max_history_len: Optional[int] = None, max_candidates: Optional[int] = None,
                validate: bool = True):
        owner = type(self).__name__
        _check_rows(owner, "history_x", history_x, self.embed_dim)
        _check_rows(owner, "candidate_x", candidate_x, self.embed_dim)
        hu, hq, hk, hv = self._project(history_x)
        cu, cq, ck, cv = self._project(candidate_x)
        history_a, candidate_a = self._attend(hq, hk, hv, history_offsets, cq, ck, cv, candidate_offsets,
                                              candidate_history_lengths=candidate_history_lengths,
                                              max_history_len=max_history_len, max_candidates=max_candidates,
                                              validate=validate)
        return self._finish(history_x, hu, history_a), self._finish(candidate_x, cu, candidate_a)

    def prefill(self, history_x: torch.Tensor, history_offsets: torch.Tensor, *,
                max_history_len: Optional[int] = None, validate: bool = True):
        """History outputs and this layer's history (K, V): ``(history_y, (k, v))``, k (total_N, H, qk_dim),
        v (total_N, H, v_dim). Equal to ``forward``'s history outputs, which never depend on candidates.
        K and V are returned as dense copies: views would keep the whole fused projection (u and q too)
        alive for as long as the cache lives."""
        owner = type(self).__name__
        _check_rows(owner, "history_x", history_x, self.embed_dim)
        if not isinstance(history_offsets, torch.Tensor):
            raise TypeError(f"{owner}: history_offsets must be a torch.Tensor, got {type(history_offsets).__name__}")
        u, q, k, v = self._project(history_x)
        no_candidates = torch.zeros_like(history_offsets)
        attention, _ = self._attend(q, k, v, history_offsets, q[:0], k[:0], v[:0], no_candidates,
                                    max_history_len=max_history_len, validate=validate)
        return self._finish(history_x, u, attention), (k.contiguous(), v.contiguous())

    def score(self, candidate_x: torch.Tensor, candidate_offsets: torch.Tensor, history_k: torch.Tensor,
              history_v: torch.Tensor, history_offsets: torch.Tensor, *,
              candidate_history_lengths: Optional[torch.Tensor] = None, max_history_len: Optional[int] = None,
              max_candidates: Optional[int] = None, validate: bool = True) -> torch.Tensor:
        """Candidate outputs from cached history K/V (``prefill``): the op's cached mode, candidate rows only."""
        _check_rows(type(self).__name__, "candidate_x", candidate_x, self.embed_dim)
        u, q, k, v = self._project(candidate_x)
        _, attention = self._attend(None, history_k, history_v, history_offsets, q, k, v, candidate_offsets,
                                    candidate_history_lengths=candidate_history_lengths,
                                    max_history_len=max_history_len, max_candidates=max_candidates,
                                    validate=validate)
        return self._finish(candidate_x, u, attention)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, "
                f"v_dim={self.v_dim}, activation={self.activation!r}, silu_normalizer={self.silu_normalizer}, "
                f"backend={self.backend!r}")


class HistoryCache(NamedTuple):
    """What ``TargetAwareSelfAttention.score`` needs from ``prefill``: the history offsets and every layer's
    history K (total_N, H, qk_dim) and V (total_N, H, v_dim). A tuple of tensors: it can be kept across
    candidate batches, moved with ``torch.utils._pytree``, or passed into torch.compile'd code."""
    history_offsets: torch.Tensor
    keys: Tuple[torch.Tensor, ...]
    values: Tuple[torch.Tensor, ...]


class TargetAwareSelfAttention(nn.Module):
    """A stack of ``num_layers`` ``HSTULayer``s (same arguments for each), with a serving path.

    ``forward(history_x, history_offsets, candidate_x, candidate_offsets, *, candidate_history_lengths=None)``
    returns ``(history_y, candidate_y)`` after the last layer. ``forward``, ``prefill`` and ``score`` also
    take ``max_history_len`` and ``validate``, ``forward`` and ``score`` ``max_candidates``, given to every
    layer (see ``HSTULayer``).

    Serving (M-FALCON style): ``prefill(history_x, history_offsets)`` runs the history through every layer
    once and returns ``(history_y, cache)``, the cache holding every layer's history K/V
    (``HistoryCache``). ``score(candidate_x, candidate_offsets, cache, *, candidate_history_lengths=None)``
    then computes only candidate rows, layer by layer, against the cached K/V, and returns candidate
    outputs equal (to rounding) to ``forward``'s; call it any number of times on one cache. The cache is
    not detached: under ``torch.no_grad()`` it holds no graph; with gradients enabled, ``score`` is
    differentiable through it.

    ``backend`` (property): setting it sets every layer's.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int, *,
                 activation: str = "silu", silu_normalizer: Optional[float] = None, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        _check_positive_int(type(self).__name__, "num_layers", num_layers)
        self.layers = nn.ModuleList(
            HSTULayer(embed_dim, num_heads, qk_dim, v_dim, activation=activation, silu_normalizer=silu_normalizer,
                      dropout=dropout, backend=backend) for _ in range(num_layers))
        self.embed_dim = embed_dim

    @property
    def backend(self) -> str:
        return self.layers[0].backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(type(self).__name__, value)
        for layer in self.layers:
            layer.backend = value

    def forward(self, history_x: torch.Tensor, history_offsets: torch.Tensor, candidate_x: torch.Tensor,
                candidate_offsets: torch.Tensor, *, candidate_history_lengths: Optional[torch.Tensor] = None,
                max_history_len: Optional[int] = None, max_candidates: Optional[int] = None,
                validate: bool = True):
        for layer in self.layers:
            history_x, candidate_x = layer(history_x, history_offsets, candidate_x, candidate_offsets,
                                           candidate_history_lengths=candidate_history_lengths,
                                           max_history_len=max_history_len, max_candidates=max_candidates,
                                           validate=validate)
        return history_x, candidate_x

    def prefill(self, history_x: torch.Tensor, history_offsets: torch.Tensor, *,
                max_history_len: Optional[int] = None, validate: bool = True):
        keys, values = [], []
        for layer in self.layers:
            history_x, (k, v) = layer.prefill(history_x, history_offsets, max_history_len=max_history_len,
                                              validate=validate)
            keys.append(k)
            values.append(v)
        return history_x, HistoryCache(history_offsets, tuple(keys), tuple(values))

    def score(self, candidate_x: torch.Tensor, candidate_offsets: torch.Tensor, cache: HistoryCache, *,
              candidate_history_lengths: Optional[torch.Tensor] = None, max_history_len: Optional[int] = None,
              max_candidates: Optional[int] = None, validate: bool = True) -> torch.Tensor:
        owner = type(self).__name__
        if not isinstance(cache, HistoryCache):
            raise TypeError(f"{owner}: cache must be the HistoryCache returned by prefill, "
                            f"got {type(cache).__name__}")
        if len(cache.keys) != len(self.layers) or len(cache.values) != len(self.layers):
            raise ValueError(f"{owner}: cache must hold K/V for {len(self.layers)} layers, got "
                             f"{len(cache.keys)} keys and {len(cache.values)} values")
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            candidate_x = layer.score(candidate_x, candidate_offsets, k, v, cache.history_offsets,
                                      candidate_history_lengths=candidate_history_lengths,
                                      max_history_len=max_history_len, max_candidates=max_candidates,
                                      validate=validate)
        return candidate_x

    def extra_repr(self) -> str:
        return f"num_layers={len(self.layers)}, backend={self.backend!r}"


class CrossAttention(nn.Module):
    """Multi-head softmax cross attention: each candidate attends to its user's history (the op's cross
    mode: no self term, no history output, no candidate-to-candidate attention).

        q = Linear(candidate_x), (k, v) = split(Linear(history_x))      one fused K/V projection
        y = Linear(concat_heads(softmax(q.k / sqrt(head_dim)) v))

    Args:
        query_dim: width of candidate_x and of the output.
        kv_dim: width of history_x.
        num_heads: H.
        head_dim: per-head width of q, k, v; a multiple of 16 from 16 to 256.
        backend: as for ``HSTULayer``.

    ``forward(history_x, history_offsets, candidate_x, candidate_offsets, *, candidate_history_lengths=None)``
    takes history_x (total_N, kv_dim), candidate_x (total_n, query_dim) and the offsets/lengths of
    ``target_aware_attention``; returns (total_n, query_dim). A candidate that sees no history (an empty
    history or a zero cutoff) gets a zero attention result, i.e. the output projection's bias.
    ``validate``, ``max_history_len`` and ``max_candidates`` go to the op as for ``HSTULayer``. Here (softmax,
    no history outputs) the bounds change neither numbers nor speed; they are accepted, and checked when
    validating, so that ``MixtureOfAttention`` can pass one set of arguments to every branch.
    """

    def __init__(self, query_dim: int, kv_dim: int, num_heads: int, head_dim: int, *, backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        for name, value in (("query_dim", query_dim), ("kv_dim", kv_dim), ("num_heads", num_heads),
                            ("head_dim", head_dim)):
            _check_positive_int(owner, name, value)
        if head_dim % 16 or head_dim > 256:
            raise ValueError(f"{owner}: head_dim must be a multiple of 16 from 16 to 256, got {head_dim}")
        self.query_dim, self.kv_dim, self.num_heads, self.head_dim = query_dim, kv_dim, num_heads, head_dim
        self.backend = check_backend(owner, backend)
        self.q = nn.Linear(query_dim, num_heads * head_dim)
        self.kv = nn.Linear(kv_dim, 2 * num_heads * head_dim)
        self.output = nn.Linear(num_heads * head_dim, query_dim)

    def forward(self, history_x: torch.Tensor, history_offsets: torch.Tensor, candidate_x: torch.Tensor,
                candidate_offsets: torch.Tensor, *,
                candidate_history_lengths: Optional[torch.Tensor] = None, max_history_len: Optional[int] = None,
                max_candidates: Optional[int] = None, validate: bool = True) -> torch.Tensor:
        owner = type(self).__name__
        _check_rows(owner, "history_x", history_x, self.kv_dim)
        _check_rows(owner, "candidate_x", candidate_x, self.query_dim)
        heads, width = self.num_heads, self.head_dim
        q = self.q(candidate_x).view(candidate_x.shape[0], heads, width)
        k, v = (t.view(history_x.shape[0], heads, width) for t in self.kv(history_x).chunk(2, dim=-1))
        op = _attention_op(self.backend, q.device)
        _, attention = op(None, k, v, history_offsets, q, None, None, candidate_offsets, activation="softmax",
                          candidate_history_lengths=candidate_history_lengths, max_history_len=max_history_len,
                          max_candidates=max_candidates, validate=validate)
        return self.output(attention.reshape(candidate_x.shape[0], heads * width))

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, kv_dim={self.kv_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, backend={self.backend!r}")


_GESR_MODULES = (HardMatchAttention, HSTULayer, TargetAwareSelfAttention, CrossAttention)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every gesr_kernels module inside ``model`` (itself included) to ``backend`` ("triton",
    "reference" or "auto"), in place; returns ``model``. Parameters, buffers and state_dict are untouched:
    only which implementation runs changes."""
    check_backend("set_backend", backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_backend: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, _GESR_MODULES):
            module.backend = backend
    return model


# ------------------------------------------------------------------------------------------------
# GESR composition: mixture of attention and multi-logit gating
# ------------------------------------------------------------------------------------------------
class MixtureOfAttention(nn.Module):
    """GESR's mixture of attention: hard-match attention, target-aware self attention and cross attention
    run side by side for every candidate; their candidate embeddings are concatenated.

        h = hard_match(history_ids, candidate_ids)                        (total_n, hma_dim)
        _, s = self_attention(history_x, candidate_x)                     (total_n, embed_dim)
        c = cross_attention(history_x, candidate_x)                       (total_n, query_dim)
        y = concat([h, s, c], dim=-1)                                     (total_n, sum(out_dims))

    The three branches are independent (none reads another's output) and see the same jagged batch.

    Args:
        hard_match: a ``HardMatchAttention``; ``hma_dim = mlp_dims[-1]``.
        self_attention: a ``TargetAwareSelfAttention`` (or a single ``HSTULayer``) of width ``embed_dim``.
        cross_attention: a ``CrossAttention`` with ``query_dim == kv_dim == embed_dim`` (it reads the same
            history_x and candidate_x as the self attention).
        backend: None keeps the sub-modules' own backends; "triton", "reference" or "auto" sets all three.

    ``backend`` (property): the sub-modules' backend when all three agree, else None; setting it (directly
    or through ``gesr_kernels.set_backend``) sets all three. ``out_dims`` is ``(hma_dim, embed_dim,
    query_dim)``, the ``in_dims`` to give ``MultiLogitGating``.

    Forward:
        ``forward(history_ids, history_x, history_offsets, candidate_ids, candidate_x, candidate_offsets, *,
        pad_id=None, candidate_history_lengths=None, max_history_len=None, max_candidates=None, validate=True)``:
        ids (total_N, P)
        / (total_n, P) as for ``HardMatchAttention``; x (total_N, embed_dim) / (total_n, embed_dim); offsets
        (B+1,) shared by ids and x; ``candidate_history_lengths`` (total_n,) applies to all three branches.
        ``validate``, ``max_history_len`` and ``max_candidates`` (see ``HSTULayer``) go to the attention branches
        (``HardMatchAttention`` always validates). Returns (total_n, sum(out_dims)).
    """

    def __init__(self, hard_match: "HardMatchAttention", self_attention: nn.Module,
                 cross_attention: "CrossAttention", *, backend: Optional[str] = None):
        super().__init__()
        owner = type(self).__name__
        for name, value, kinds in (("hard_match", hard_match, (HardMatchAttention,)),
                                   ("self_attention", self_attention, (TargetAwareSelfAttention, HSTULayer)),
                                   ("cross_attention", cross_attention, (CrossAttention,))):
            if not isinstance(value, kinds):
                expected = " or ".join(k.__name__ for k in kinds)
                raise TypeError(f"{owner}: {name} must be a {expected}, got {type(value).__name__}")
        embed_dim = self_attention.embed_dim
        if cross_attention.query_dim != embed_dim or cross_attention.kv_dim != embed_dim:
            raise ValueError(f"{owner}: cross_attention must have query_dim == kv_dim == the self attention's "
                             f"embed_dim {embed_dim}, got query_dim {cross_attention.query_dim} and kv_dim "
                             f"{cross_attention.kv_dim}")
        self.hard_match, self.self_attention, self.cross_attention = hard_match, self_attention, cross_attention
        self.embed_dim = embed_dim
        self.out_dims = (hard_match.mlp[-1].out_features, embed_dim, cross_attention.query_dim)
        if backend is not None:
            self.backend = backend

    def _branches(self):
        return (self.hard_match, self.self_attention, self.cross_attention)

    @property
    def backend(self) -> Optional[str]:
        backends = {branch.backend for branch in self._branches()}
        return backends.pop() if len(backends) == 1 else None

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(type(self).__name__, value)
        for branch in self._branches():
            branch.backend = value

    def forward(self, history_ids: torch.Tensor, history_x: torch.Tensor, history_offsets: torch.Tensor,
                candidate_ids: torch.Tensor, candidate_x: torch.Tensor, candidate_offsets: torch.Tensor, *,
                pad_id: Optional[int] = None, candidate_history_lengths: Optional[torch.Tensor] = None,
                max_history_len: Optional[int] = None, max_candidates: Optional[int] = None,
                validate: bool = True) -> torch.Tensor:
        owner = type(self).__name__
        _check_rows(owner, "history_x", history_x, self.embed_dim)
        _check_rows(owner, "candidate_x", candidate_x, self.embed_dim)
        for name, ids, x in (("history_ids", history_ids, history_x), ("candidate_ids", candidate_ids, candidate_x)):
            if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[0] != x.shape[0]:
                raise ValueError(f"{owner}: {name} must have one row per row of "
                                 f"{name.replace('ids', 'x')} ({x.shape[0]}), got shape {tuple(ids.shape)}")
        lengths = dict(candidate_history_lengths=candidate_history_lengths)
        hard = self.hard_match(history_ids, history_offsets, candidate_ids, candidate_offsets, pad_id=pad_id,
                               **lengths)
        options = dict(lengths, max_history_len=max_history_len, max_candidates=max_candidates, validate=validate)
        _, own = self.self_attention(history_x, history_offsets, candidate_x, candidate_offsets, **options)
        cross = self.cross_attention(history_x, history_offsets, candidate_x, candidate_offsets, **options)
        return torch.cat([hard, own, cross], dim=-1)

    def extra_repr(self) -> str:
        return f"out_dims={self.out_dims}, backend={self.backend!r}"


class MultiLogitGating(nn.Module):
    """GESR's multi-logit gating (MLPG): gate the mixture embeddings, derive several secondary logits from
    them, and fuse those with the primary (two-tower dot-product) logit.

    With e = concat(e_1, ..., e_K) (total_n, D), D = sum(in_dims), and S = num_logits:

        g     = sigmoid(e @ W_g^T + b_g)              (total_n, D)   one gate per element; each embedding's
                                                                     gates read all K embeddings
        s     = (g * e) @ W_s^T + b_s                 (total_n, S)   secondary logits
        logit = w_0 * primary + sum_j w_j * s_j + c   (total_n,)     fused logit

    ``W_g, b_g`` is ``self.gate`` (Linear(D, D)), ``W_s, b_s`` is ``self.logits`` (Linear(D, S)), ``w`` is
    ``self.fusion_weight`` (S+1,), initialised to (1, 1/S, ..., 1/S), and ``c`` is ``self.fusion_bias``
    (initialised to 0). The gates start near 0.5 (W_g small), so training starts close to
    ``primary + mean(s)``.

    Args:
        in_dims: widths of the K mixture embeddings (e.g. ``MixtureOfAttention.out_dims``).
        num_logits: S, the number of secondary logits.
        backend: accepted so that every gesr module takes one (and ``set_backend`` can set it); this module
            is a few dense GEMMs and elementwise ops in PyTorch, identical under every backend.

    Forward:
        ``forward(embeddings, primary_logit) -> (logit, secondary_logits)``: ``embeddings`` is either the
        concatenation (total_n, D) or a sequence of K tensors (total_n, in_dims[k]); ``primary_logit`` is
        (total_n,). Returns the fused logit (total_n,) and the secondary logits (total_n, S) (e.g. for
        auxiliary losses).
    """

    def __init__(self, in_dims: Sequence[int], num_logits: int, *, backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        in_dims = list(in_dims) if isinstance(in_dims, (list, tuple)) else in_dims
        if not isinstance(in_dims, list) or not in_dims or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in in_dims):
            raise ValueError(f"{owner}: in_dims must be a non-empty list of positive ints, got {in_dims!r}")
        _check_positive_int(owner, "num_logits", num_logits)
        self.in_dims, self.num_logits = tuple(in_dims), num_logits
        self.backend = check_backend(owner, backend)
        width = sum(in_dims)
        self.gate = nn.Linear(width, width)
        self.logits = nn.Linear(width, num_logits)
        with torch.no_grad():
            self.gate.weight.mul_(0.1)
            self.gate.bias.zero_()
        self.fusion_weight = nn.Parameter(torch.cat([torch.ones(1), torch.full((num_logits,), 1.0 / num_logits)]))
        self.fusion_bias = nn.Parameter(torch.zeros(()))

    def forward(self, embeddings, primary_logit: torch.Tensor):
        owner = type(self).__name__
        width = sum(self.in_dims)
        if isinstance(embeddings, (list, tuple)):
            if len(embeddings) != len(self.in_dims):
                raise ValueError(f"{owner}: embeddings must hold {len(self.in_dims)} tensors, got {len(embeddings)}")
            for k, (e, d) in enumerate(zip(embeddings, self.in_dims)):
                _check_rows(owner, f"embeddings[{k}]", e, d)
            rows = {e.shape[0] for e in embeddings}
            if len(rows) != 1:
                raise ValueError(f"{owner}: embeddings must all have the same number of rows, got {sorted(rows)}")
            embeddings = torch.cat(list(embeddings), dim=-1)
        else:
            _check_rows(owner, "embeddings", embeddings, width)
        if not isinstance(primary_logit, torch.Tensor):
            raise TypeError(f"{owner}: primary_logit must be a torch.Tensor, got {type(primary_logit).__name__}")
        if not primary_logit.is_floating_point():
            raise TypeError(f"{owner}: primary_logit must be a float tensor, got {primary_logit.dtype}")
        if primary_logit.shape != (embeddings.shape[0],):
            raise ValueError(f"{owner}: primary_logit must be ({embeddings.shape[0]},), got shape "
                             f"{tuple(primary_logit.shape)}")
        gated = torch.sigmoid(self.gate(embeddings)) * embeddings
        secondary = self.logits(gated)
        logit = (self.fusion_weight[0] * primary_logit + secondary @ self.fusion_weight[1:]) + self.fusion_bias
        return logit, secondary

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, num_logits={self.num_logits}, backend={self.backend!r}"


# set_backend reaches the new modules too (MixtureOfAttention's setter also sets its branches).
_GESR_MODULES = _GESR_MODULES + (MixtureOfAttention, MultiLogitGating)

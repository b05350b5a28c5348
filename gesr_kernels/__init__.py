"""gesr_kernels: fused Triton kernels for Generative Early Stage Ranking (GESR).

Public API:
    hard_match_count, hard_match_embedding   -- hard-match attention (HMA) ops
    target_aware_attention                   -- HSTU-style attention over [history ; candidates]
    nn.HardMatchAttention                    -- counts -> embedding -> MLP module
    nn.HSTULayer, nn.TargetAwareSelfAttention -- HSTU layers over [history ; candidates], prefill/score
    nn.CrossAttention                        -- candidates attend to their user's history (softmax)
    nn.MixtureOfAttention, nn.MultiLogitGating -- GESR's mixture of attention and multi-logit gating (MLPG)
    set_backend(model, backend)              -- switch every gesr module in a model (triton/reference/auto)
    compat.hstu_mha                          -- HSTU's jagged attention call, on the target-aware kernels
"""
__version__ = "0.1.0"

from .hard_match import hard_match_count, hard_match_embedding  # noqa: E402
from .target_attention import target_aware_attention  # noqa: E402
from . import compat, nn  # noqa: E402
from .nn import set_backend  # noqa: E402

__all__ = ["hard_match_count", "hard_match_embedding", "target_aware_attention", "set_backend", "compat", "nn",
           "__version__"]

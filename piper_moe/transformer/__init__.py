"""The trainable model: a decoder-only MoE transformer sized by a ``ModelSpec``, built as
pipeline stages (``Stage``) whose MoE blocks are ``piper_moe.layer.MoELayer``.

    from piper_moe.resource_model.spec import load_model
    from piper_moe.transformer import Stage, cross_entropy
    spec = load_model("tiny-moe")
    model = Stage(spec, range(spec.num_layers), first=True, last=True)   # the whole model
    logits = model(tokens)                          # tokens int64 [b, s] -> [b, s, vocab]
    loss_sum, n = cross_entropy(logits, targets)
    loss = loss_sum / n + model.aux_loss()

Importing this package imports torch (``piper_moe`` itself stays light).
"""

from .blocks import Attention, DenseFFN, MLAttention, RMSNorm, apply_rope, rope_tables
from .stage import (
    Block,
    Stage,
    cross_entropy,
    extra_shared_ffn,
    flops_per_token,
    moe_config,
)

__all__ = [
    "Attention",
    "Block",
    "DenseFFN",
    "MLAttention",
    "RMSNorm",
    "Stage",
    "apply_rope",
    "cross_entropy",
    "extra_shared_ffn",
    "flops_per_token",
    "moe_config",
    "rope_tables",
]

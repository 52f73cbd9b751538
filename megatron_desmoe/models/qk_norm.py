"""Full-width query/key RMSNorm (OLMoE), plugged into Megatron's attention through the spec.

OLMoE normalises the whole q projection (num_heads * head_dim values) and the whole k
projection (num_kv_heads * head_dim) with one RMSNorm each, before splitting into heads.
Megatron's qk_layernorm normalises each head separately (weight of size head_dim), which is
a different function. This module is what SelfAttention builds as q_layernorm / k_layernorm:
it receives this rank's heads [s, b, heads, head_dim], takes the mean square over all of
them (under tensor parallelism the squared sums are all-reduced across the TP group, with
an all-reduce backward so gradients stay exact) and holds this rank's slice of the full
weight (TP-sharded on dim 0, which matches Megatron's contiguous head split).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint  # noqa: E402

HEAD_KINDS = ("query", "key")


class FullWidthQKRMSNorm(torch.nn.Module):
    """RMSNorm over all query (or key) heads together; weight split across TP ranks."""

    def __init__(self, hidden_size: int, config, eps: float = 1e-5, heads: str = "query"):
        super().__init__()
        if heads not in HEAD_KINDS:
            raise ValueError(f"heads must be one of {HEAD_KINDS}, got {heads!r}")
        num_heads = config.num_attention_heads if heads == "query" else config.num_query_groups
        self.full_width = num_heads * hidden_size  # hidden_size: per-head width from SelfAttention
        self.tp_size = config.tensor_model_parallel_size
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(self.full_width // self.tp_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        shape = heads.shape  # [s, b, local heads, head_dim]
        flat = heads.reshape(*shape[:-2], -1).float()
        square_sum = flat.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            square_sum = differentiable_all_reduce(
                square_sum, group=parallel_state.get_tensor_model_parallel_group())
        normed = flat * torch.rsqrt(square_sum / self.full_width + self.eps)
        return (self.weight * normed.to(heads.dtype)).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, tp={self.tp_size}, eps={self.eps}"


def with_full_width_qk_norm(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """The block spec with every self-attention's q/k layernorm made full-width."""
    layers = [_full_width_layer(spec) for spec in block.layer_specs]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=block.layer_norm)


def _full_width_layer(spec: ModuleSpec) -> ModuleSpec:
    attention = spec.submodules.self_attention
    attn_sub = replace(
        attention.submodules,
        q_layernorm=partial(FullWidthQKRMSNorm, heads="query"),
        k_layernorm=partial(FullWidthQKRMSNorm, heads="key"),
    )
    new_attention = ModuleSpec(module=attention.module, params=attention.params, submodules=attn_sub)
    submodules = replace(spec.submodules, self_attention=new_attention)
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)

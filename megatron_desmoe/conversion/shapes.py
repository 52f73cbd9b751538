"""Full (unsharded) shape of every canonical Megatron tensor, from the model config alone.

Both converters check tensors against this before reading data: HF -> Megatron pushes meta
tensors of the HF header shapes through the transforms, Megatron -> HF compares checkpoint
metadata. The tests compare this table with the shapes of real Megatron models.
"""

from __future__ import annotations

import re
from typing import Callable

from megatron_desmoe.models.presets import MoEModelConfig

_LAYER = re.compile(r"^decoder\.layers\.\d+\.")
_EXPERT = re.compile(r"local_experts\.\d+\.")


def _q_width(m: MoEModelConfig) -> int:
    return m.num_attention_heads * (m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim)


def _q_norm(m: MoEModelConfig) -> tuple[int, ...]:
    if m.mla is not None:
        return (m.mla.q_lora_rank,)
    return (m.num_attention_heads * m.head_dim,) if m.qk_layernorm_full_width else (m.head_dim,)


def _k_norm(m: MoEModelConfig) -> tuple[int, ...]:
    return (m.num_query_groups * m.head_dim,) if m.qk_layernorm_full_width else (m.head_dim,)


def _qkv_rows(m: MoEModelConfig) -> int:
    return (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim


def _attention_out(m: MoEModelConfig) -> int:
    return m.num_attention_heads * (m.mla.v_head_dim if m.mla else m.head_dim)


_SHAPES: dict[str, Callable[[MoEModelConfig], tuple[int, ...]]] = {
    "embedding.word_embeddings.weight": lambda m: (m.vocab_size, m.hidden_size),
    "output_layer.weight": lambda m: (m.vocab_size, m.hidden_size),
    "decoder.final_layernorm.weight": lambda m: (m.hidden_size,),
    "input_layernorm.weight": lambda m: (m.hidden_size,),
    "pre_mlp_layernorm.weight": lambda m: (m.hidden_size,),
    "self_attention.linear_proj.weight": lambda m: (m.hidden_size, _attention_out(m)),
    "self_attention.linear_qkv.weight": lambda m: (_qkv_rows(m), m.hidden_size),
    "self_attention.linear_qkv.bias": lambda m: (_qkv_rows(m),),
    "self_attention.q_layernorm.weight": _q_norm,
    "self_attention.k_layernorm.weight": _k_norm,
    "self_attention.linear_q_proj.weight": lambda m: (_q_width(m), m.hidden_size),
    "self_attention.linear_q_down_proj.weight": lambda m: (m.mla.q_lora_rank, m.hidden_size),
    "self_attention.linear_q_up_proj.weight": lambda m: (_q_width(m), m.mla.q_lora_rank),
    "self_attention.linear_kv_down_proj.weight":
        lambda m: (m.mla.kv_lora_rank + m.mla.qk_pos_emb_head_dim, m.hidden_size),
    "self_attention.kv_layernorm.weight": lambda m: (m.mla.kv_lora_rank,),
    "self_attention.linear_kv_up_proj.weight":
        lambda m: (m.num_attention_heads * (m.mla.qk_head_dim + m.mla.v_head_dim), m.mla.kv_lora_rank),
    "mlp.linear_fc1.weight": lambda m: (2 * m.ffn_hidden_size, m.hidden_size),
    "mlp.linear_fc2.weight": lambda m: (m.hidden_size, m.ffn_hidden_size),
    "mlp.router.weight": lambda m: (m.num_experts, m.hidden_size),
    "mlp.experts.local_experts.{E}.linear_fc1.weight": lambda m: (2 * m.moe_ffn_hidden_size, m.hidden_size),
    "mlp.experts.local_experts.{E}.linear_fc2.weight": lambda m: (m.hidden_size, m.moe_ffn_hidden_size),
    "mlp.shared_experts.linear_fc1.weight": lambda m: (2 * m.shared_expert_hidden_size, m.hidden_size),
    "mlp.shared_experts.linear_fc2.weight": lambda m: (m.hidden_size, m.shared_expert_hidden_size),
    "mlp.shared_experts.gate_weight": lambda m: (1, m.hidden_size),
}


def expected_shape(name: str, model: MoEModelConfig) -> tuple[int, ...]:
    """Full shape of the canonical Megatron tensor `name` (KeyError if the table lacks it)."""
    key = _EXPERT.sub("local_experts.{E}.", _LAYER.sub("", name))
    return tuple(_SHAPES[key](model))

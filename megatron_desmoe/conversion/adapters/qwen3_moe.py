"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA with per-head q/k RMSNorm (Megatron's qk_layernorm),
explicit head_dim, routed experts only, renormalised top-k (norm_topk_prob)."""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from megatron_desmoe.conversion.adapters.base import (
    FamilyAdapter, common_fields, common_hf_kwargs, common_rules, default_rope, dense_mlp_rules,
    dense_prefix, gqa_rules, head_dim, moe_rules, plain_rope_theta, require,
)
from megatron_desmoe.conversion.mapping import Rule
from megatron_desmoe.models.presets import MoEModelConfig


class Qwen3MoeAdapter(FamilyAdapter):
    family = "qwen3_moe"
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    FIXED = dict(
        shared_expert_hidden_size=None, shared_expert_gate=False, score_function="softmax",
        topk_scaling_factor=None, qk_layernorm=True, qk_layernorm_full_width=False,
        add_qkv_bias=False, mla=None, rope_scaling=None,
    )

    def rules(self, model: MoEModelConfig) -> list[Rule]:
        return (common_rules(model) + gqa_rules(qk_norm=True) + dense_mlp_rules()
                + moe_rules("mlp", "gate_proj", "up_proj", "down_proj"))

    def model_config(self, hf, name: str) -> MoEModelConfig:
        require(hf, "attention_bias", (False, None), "Megatron's linear_proj here has no bias")
        require(hf, "use_sliding_window", (False, None), "Megatron's GQA here attends to the whole sequence")
        return MoEModelConfig(
            **common_fields(hf, name, self.family), **self.FIXED, kv_channels=head_dim(hf),
            ffn_hidden_size=hf.intermediate_size, moe_ffn_hidden_size=hf.moe_intermediate_size,
            num_experts=hf.num_experts, rope_theta=plain_rope_theta(hf),
            first_k_dense=dense_prefix(hf, hf.num_hidden_layers), norm_topk_prob=bool(hf.norm_topk_prob),
        )

    def hf_config(self, model: MoEModelConfig) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(
            **common_hf_kwargs(model, self.architecture), head_dim=model.head_dim,
            intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
            num_experts=model.num_experts, decoder_sparse_step=1,
            mlp_only_layers=list(range(model.first_k_dense)), norm_topk_prob=model.norm_topk_prob,
            attention_bias=False, use_sliding_window=False, rope_parameters=default_rope(model),
        )

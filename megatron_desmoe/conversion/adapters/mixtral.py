"""Mixtral (MixtralForCausalLM): GQA, 8 routed experts top-2 with renormalised top-k, no
shared expert. HF stores experts as block_sparse_moe.experts.{E}.w1 (gate) / w3 (up) / w2."""

from __future__ import annotations

from transformers import MixtralConfig

from megatron_desmoe.conversion.adapters.base import (
    FamilyAdapter, common_fields, common_hf_kwargs, common_rules, default_rope, gqa_rules,
    head_dim, moe_rules, plain_rope_theta, require,
)
from megatron_desmoe.conversion.mapping import Rule
from megatron_desmoe.models.presets import MoEModelConfig


class MixtralAdapter(FamilyAdapter):
    family = "mixtral"
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    FIXED = dict(
        first_k_dense=0, shared_expert_hidden_size=None, shared_expert_gate=False,
        score_function="softmax", norm_topk_prob=True, topk_scaling_factor=None,
        qk_layernorm=False, qk_layernorm_full_width=False, add_qkv_bias=False, mla=None,
        rope_scaling=None,
    )

    def rules(self, model: MoEModelConfig) -> list[Rule]:
        return common_rules(model) + gqa_rules() + moe_rules("block_sparse_moe", "w1", "w3", "w2")

    def model_config(self, hf, name: str) -> MoEModelConfig:
        require(hf, "sliding_window", None, "Megatron's GQA here attends to the whole sequence")
        return MoEModelConfig(
            **common_fields(hf, name, self.family), **self.FIXED, kv_channels=head_dim(hf),
            ffn_hidden_size=hf.intermediate_size, moe_ffn_hidden_size=hf.intermediate_size,
            num_experts=hf.num_local_experts, rope_theta=plain_rope_theta(hf),
        )

    def hf_config(self, model: MoEModelConfig) -> MixtralConfig:
        return MixtralConfig(
            **common_hf_kwargs(model, self.architecture), head_dim=model.head_dim,
            intermediate_size=model.moe_ffn_hidden_size, num_local_experts=model.num_experts,
            rope_parameters=default_rope(model), sliding_window=None,
        )

"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM): GQA with q/k/v bias, routed experts with
softmax-then-top-k (optionally renormalised), one shared expert whose output is scaled by
sigmoid(shared_expert_gate(x)) — Megatron's moe_shared_expert_gate."""

from __future__ import annotations

from transformers import Qwen2MoeConfig

from megatron_desmoe.conversion.adapters.base import (
    FamilyAdapter, common_fields, common_hf_kwargs, common_rules, default_rope, dense_mlp_rules,
    dense_prefix, gqa_rules, head_dim, moe_rules, plain_rope_theta, require, shared_expert_rules,
)
from megatron_desmoe.conversion.mapping import Rule
from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import MoEModelConfig


class Qwen2MoeAdapter(FamilyAdapter):
    family = "qwen2_moe"
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    FIXED = dict(
        shared_expert_gate=True, score_function="softmax", topk_scaling_factor=None,
        qk_layernorm=False, qk_layernorm_full_width=False, mla=None, rope_scaling=None,
    )

    def rules(self, model: MoEModelConfig) -> list[Rule]:
        return (common_rules(model) + gqa_rules(qkv_bias=model.add_qkv_bias) + dense_mlp_rules()
                + moe_rules("mlp", "gate_proj", "up_proj", "down_proj")
                + shared_expert_rules("shared_expert", gate="shared_expert_gate"))

    def check_representable(self, model: MoEModelConfig) -> None:
        super().check_representable(model)
        if not model.shared_expert_hidden_size:
            raise ConfigError("shared_expert_hidden_size", "Qwen2-MoE always has a shared expert",
                              "set shared_expert_hidden_size or export to another family")

    def model_config(self, hf, name: str) -> MoEModelConfig:
        require(hf, "use_sliding_window", (False, None), "Megatron's GQA here attends to the whole sequence")
        if not hf.shared_expert_intermediate_size:
            raise ConfigError("config.json:shared_expert_intermediate_size", "is 0",
                              "Qwen2-MoE checkpoints carry a shared expert; check the config")
        return MoEModelConfig(
            **common_fields(hf, name, self.family), **self.FIXED, kv_channels=head_dim(hf),
            ffn_hidden_size=hf.intermediate_size, moe_ffn_hidden_size=hf.moe_intermediate_size,
            num_experts=hf.num_experts, rope_theta=plain_rope_theta(hf),
            shared_expert_hidden_size=hf.shared_expert_intermediate_size,
            first_k_dense=dense_prefix(hf, hf.num_hidden_layers),
            norm_topk_prob=bool(hf.norm_topk_prob), add_qkv_bias=bool(hf.qkv_bias),
        )

    def hf_config(self, model: MoEModelConfig) -> Qwen2MoeConfig:
        return Qwen2MoeConfig(
            **common_hf_kwargs(model, self.architecture), head_dim=model.head_dim,
            intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
            num_experts=model.num_experts, shared_expert_intermediate_size=model.shared_expert_hidden_size,
            decoder_sparse_step=1, mlp_only_layers=list(range(model.first_k_dense)),
            norm_topk_prob=model.norm_topk_prob, qkv_bias=model.add_qkv_bias,
            use_sliding_window=False, rope_parameters=default_rope(model),
        )

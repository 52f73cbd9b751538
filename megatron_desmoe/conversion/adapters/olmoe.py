"""OLMoE (OlmoeForCausalLM): GQA whose q/k RMSNorm spans the whole projection (q: hidden_size
wide, k: num_kv_heads * head_dim) rather than each head — represented in Megatron by
`megatron_desmoe.models.qk_norm.FullWidthQKRMSNorm` (MoEModelConfig.qk_layernorm_full_width);
routed experts only, softmax-then-top-k without renormalisation."""

from __future__ import annotations

from transformers import OlmoeConfig

from megatron_desmoe.conversion.adapters.base import (
    FamilyAdapter, common_fields, common_hf_kwargs, common_rules, default_rope, gqa_rules,
    moe_rules, plain_rope_theta, require,
)
from megatron_desmoe.conversion.mapping import Rule
from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import MoEModelConfig


class OlmoeAdapter(FamilyAdapter):
    family = "olmoe"
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    FIXED = dict(
        first_k_dense=0, shared_expert_hidden_size=None, shared_expert_gate=False,
        score_function="softmax", topk_scaling_factor=None, qk_layernorm=True,
        qk_layernorm_full_width=True, add_qkv_bias=False, mla=None, rope_scaling=None,
    )

    def rules(self, model: MoEModelConfig) -> list[Rule]:
        return common_rules(model) + gqa_rules(qk_norm=True) + moe_rules("mlp", "gate_proj", "up_proj", "down_proj")

    def check_representable(self, model: MoEModelConfig) -> None:
        super().check_representable(model)
        if model.head_dim * model.num_attention_heads != model.hidden_size:
            # HF OLMoE sizes k_norm as (hidden_size // heads) * kv_heads.
            raise ConfigError("kv_channels", f"OLMoE needs head_dim * heads == hidden_size, got "
                              f"{model.head_dim} * {model.num_attention_heads}", "use hidden_size // heads")

    def model_config(self, hf, name: str) -> MoEModelConfig:
        require(hf, "clip_qkv", None, "Megatron has no q/k/v clipping")
        require(hf, "attention_bias", (False, None), "Megatron's linear_proj here has no bias")
        return MoEModelConfig(
            **common_fields(hf, name, self.family), **self.FIXED,
            kv_channels=hf.hidden_size // hf.num_attention_heads,
            ffn_hidden_size=hf.intermediate_size, moe_ffn_hidden_size=hf.intermediate_size,
            num_experts=hf.num_experts, rope_theta=plain_rope_theta(hf),
            norm_topk_prob=bool(hf.norm_topk_prob),
        )

    def hf_config(self, model: MoEModelConfig) -> OlmoeConfig:
        return OlmoeConfig(
            **common_hf_kwargs(model, self.architecture), intermediate_size=model.moe_ffn_hidden_size,
            num_experts=model.num_experts, norm_topk_prob=model.norm_topk_prob, clip_qkv=None,
            attention_bias=False, rope_parameters=default_rope(model),
        )

"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM): multi-latent attention with YaRN, leading
dense layers (first_k_dense_replace), shared experts, softmax-over-all-experts then top-k
scaled by routed_scaling_factor (norm_topk_prob is ignored by the V2 model code).

RoPE layout: HF rotates q_pe/k_pe as interleaved pairs (x0,x1),(x2,x3)... (complex view);
Megatron's MLA de-interleaves those same pairs before rotate-half. Both rotate the same pairs
by the same frequencies and only the order of the rotated dims differs, identically for q and
k, so q·k is unchanged: the weights copy over as they are (checked numerically in the tests).
"""

from __future__ import annotations

from transformers import DeepseekV2Config

from megatron_desmoe.conversion.adapters.base import (
    FamilyAdapter, common_fields, common_hf_kwargs, common_rules, dense_mlp_rules,
    moe_rules, require, rope_parameters, shared_expert_rules,
)
from megatron_desmoe.conversion.mapping import Rule
from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import MLAConfig, MoEModelConfig, RopeScaling

_M = "decoder.layers.{L}.self_attention."
_H = "model.layers.{L}.self_attn."

MLA_RULES = [
    Rule(_M + "linear_kv_down_proj.weight", (_H + "kv_a_proj_with_mqa.weight",)),
    Rule(_M + "kv_layernorm.weight", (_H + "kv_a_layernorm.weight",)),
    Rule(_M + "linear_kv_up_proj.weight", (_H + "kv_b_proj.weight",)),
]
Q_DIRECT_RULES = [Rule(_M + "linear_q_proj.weight", (_H + "q_proj.weight",))]  # q_lora_rank None
Q_LORA_RULES = [
    Rule(_M + "linear_q_down_proj.weight", (_H + "q_a_proj.weight",)),
    Rule(_M + "q_layernorm.weight", (_H + "q_a_layernorm.weight",)),
    Rule(_M + "linear_q_up_proj.weight", (_H + "q_b_proj.weight",)),
]
_YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim")


class DeepseekV2Adapter(FamilyAdapter):
    family = "deepseek_v2"
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    FIXED = dict(
        shared_expert_gate=False, score_function="softmax", norm_topk_prob=False,
        qk_layernorm=False, qk_layernorm_full_width=False, add_qkv_bias=False,
    )
    NEVER = dict(expert_bias=False)  # group-limited routing exists in V2

    def rules(self, model: MoEModelConfig) -> list[Rule]:
        q_rules = Q_DIRECT_RULES if model.mla.q_lora_rank is None else Q_LORA_RULES
        rules = common_rules(model) + q_rules + MLA_RULES + dense_mlp_rules()
        rules += moe_rules("mlp", "gate_proj", "up_proj", "down_proj")
        if model.shared_expert_hidden_size:
            rules += shared_expert_rules("shared_experts")
        return rules

    def check_representable(self, model: MoEModelConfig) -> None:
        super().check_representable(model)
        if model.mla is None:
            raise ConfigError("mla", "DeepSeek-V2 uses multi-latent attention", "set mla")
        if model.shared_expert_hidden_size and model.shared_expert_hidden_size % model.moe_ffn_hidden_size:
            raise ConfigError("shared_expert_hidden_size", "must be a multiple of moe_ffn_hidden_size "
                              "(HF stores n_shared_experts)", "use n * moe_ffn_hidden_size")
        if model.num_groups and model.topk // model.group_topk != 1:
            raise ConfigError("group_topk", "HF DeepSeek-V2 ranks groups by their best expert, "
                              "Megatron by the sum of the top topk // group_topk", "use group_topk == topk")

    def model_config(self, hf, name: str) -> MoEModelConfig:
        require(hf, "attention_bias", (False, None), "Megatron's MLA linears here have no bias")
        require(hf, "mlp_bias", (False, None), "Megatron's MLPs here have no bias")
        require(hf, "topk_method", ("greedy", "group_limited_greedy"), "other top-k methods are V3's")
        fields = common_fields(hf, name, self.family)
        fields.update(**self.FIXED, **_group_routing(hf))
        fields["aux_loss_coeff"] = float(getattr(hf, "aux_loss_alpha", 0.0) or 0.0)  # V2's own name
        return MoEModelConfig(
            **fields, kv_channels=None, ffn_hidden_size=hf.intermediate_size,
            moe_ffn_hidden_size=hf.moe_intermediate_size, num_experts=hf.n_routed_experts,
            rope_theta=float(rope_parameters(hf).get("rope_theta", 10000.0)),
            rope_scaling=_yarn(hf), first_k_dense=hf.first_k_dense_replace,
            shared_expert_hidden_size=(hf.n_shared_experts * hf.moe_intermediate_size
                                       if hf.n_shared_experts else None),
            topk_scaling_factor=float(hf.routed_scaling_factor),
            mla=MLAConfig(q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
                          qk_head_dim=hf.qk_nope_head_dim, qk_pos_emb_head_dim=hf.qk_rope_head_dim,
                          v_head_dim=hf.v_head_dim),
        )

    def hf_config(self, model: MoEModelConfig) -> DeepseekV2Config:
        mla = model.mla
        rope = {"rope_type": "default", "rope_theta": model.rope_theta}
        if model.rope_scaling is not None:
            rope = dict(rope, rope_type="yarn",
                        **{f: getattr(model.rope_scaling, f) for f in _YARN_FIELDS})
        shared = (model.shared_expert_hidden_size or 0) // model.moe_ffn_hidden_size
        return DeepseekV2Config(
            **common_hf_kwargs(model, self.architecture, aux_loss=False),
            intermediate_size=model.ffn_hidden_size,
            moe_intermediate_size=model.moe_ffn_hidden_size, n_routed_experts=model.num_experts,
            n_shared_experts=shared, first_k_dense_replace=model.first_k_dense,
            routed_scaling_factor=model.topk_scaling_factor or 1.0,
            topk_method="group_limited_greedy" if model.num_groups else "greedy",
            n_group=model.num_groups, topk_group=model.group_topk, norm_topk_prob=False,
            q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_head_dim, qk_rope_head_dim=mla.qk_pos_emb_head_dim,
            v_head_dim=mla.v_head_dim, rope_parameters=rope, attention_bias=False,
            aux_loss_alpha=model.aux_loss_coeff,
        )


def _yarn(hf):
    params = rope_parameters(hf)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ConfigError("config.json:rope_parameters.rope_type", f"{rope_type!r} is not supported "
                          "for DeepSeek-V2 (Megatron's MLA implements YaRN)", "use 'yarn' or 'default'")
    defaults = RopeScaling(factor=1.0, original_max_position_embeddings=hf.max_position_embeddings)
    values = {f: params.get(f) for f in _YARN_FIELDS if params.get(f) is not None}
    return RopeScaling(**{**{f: getattr(defaults, f) for f in _YARN_FIELDS}, **values})


def _group_routing(hf) -> dict:
    """Group-limited routing. HF V2 ranks groups by their best expert; Megatron by the sum of
    the top (topk // group_topk) experts: the same rule only when that quotient is 1."""
    if hf.topk_method != "group_limited_greedy" or not hf.n_group or hf.n_group == 1:
        return dict(num_groups=None, group_topk=None)
    if hf.num_experts_per_tok // hf.topk_group != 1:
        raise ConfigError(
            "config.json:topk_group", f"group_limited_greedy with top-{hf.num_experts_per_tok} "
            f"over {hf.topk_group} groups: HF ranks groups by their best expert score, "
            "Megatron-Core by the sum of the top (topk // group_topk) scores, which differ here",
            "convert a checkpoint with topk_group == num_experts_per_tok (or n_group 1)")
    return dict(num_groups=hf.n_group, group_topk=hf.topk_group)

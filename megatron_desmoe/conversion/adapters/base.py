"""What every family adapter shares: the adapter interface, rule tables reused across
families, and helpers that read a Hugging Face config strictly.

A family adapter is one class per HF architecture holding
  * `rules(model)`: the declarative Megatron <- HF tensor table,
  * `model_config(hf_config)`: HF config -> `MoEModelConfig`,
  * `hf_config(model)`: `MoEModelConfig` -> HF config,
  * `FIXED`: the MoEModelConfig fields the HF architecture hard-wires; a model config that
    disagrees cannot be exported to this family (checked by `check_representable`).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_desmoe.conversion.mapping import Rule, StateDictAdapter
from megatron_desmoe.conversion.transforms import COPY, GATE_UP, InterleavedQKV
from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import MoEModelConfig

# Fields no HF family here represents: keep them off on every import.
_NEVER = dict(expert_bias=False, num_groups=None, group_topk=None)


class FamilyAdapter:
    family: str = ""  # MoEModelConfig.family
    model_type: str = ""  # HF config.model_type
    architecture: str = ""  # HF class written into config.json "architectures"
    FIXED: dict[str, Any] = {}
    NEVER: dict[str, Any] = _NEVER  # fields this HF architecture has no place for

    # ------------------------------------------------------------------ interface
    def rules(self, model: MoEModelConfig) -> list[Rule]:
        raise NotImplementedError

    def model_config(self, hf, name: str) -> MoEModelConfig:
        raise NotImplementedError

    def hf_config(self, model: MoEModelConfig):
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def transforms(self, model: MoEModelConfig) -> dict:
        qkv = InterleavedQKV(model.num_attention_heads, model.num_query_groups, model.head_dim)
        return {"copy": COPY, "gate_up": GATE_UP, "qkv": qkv}

    def state_dict_adapter(self, model: MoEModelConfig) -> StateDictAdapter:
        self.check_representable(model)
        return StateDictAdapter(self.rules(model), model, self.transforms(model))

    def check_representable(self, model: MoEModelConfig) -> None:
        if model.family != self.family:
            raise ConfigError("family", f"model family {model.family!r} given to the "
                              f"{self.family} adapter", f"use the {model.family} adapter")
        for field_name, value in {**self.NEVER, **self.FIXED}.items():
            if getattr(model, field_name) != value:
                raise ConfigError(
                    field_name, f"{getattr(model, field_name)!r} cannot be represented by "
                    f"Hugging Face {self.architecture} (it hard-wires {value!r})",
                    f"set {field_name}={value!r} or export to another family")


# ---------------------------------------------------------------------- rule tables
# Names: Megatron canonical <- HF. {L}: layer, {E}: routed expert.
_M = "decoder.layers.{L}."
_H = "model.layers.{L}."


def common_rules(model: MoEModelConfig) -> list[Rule]:
    """Embeddings, final norm, output layer, the two per-layer norms, attention output."""
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), scope="model"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), scope="model"),
        Rule(_M + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
        Rule(_M + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
        Rule(_M + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
    ]
    if not model.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), scope="model"))
    return rules


def gqa_rules(qkv_bias: bool = False, qk_norm: bool = False) -> list[Rule]:
    """Grouped-query attention: q/k/v fused and interleaved per group; optional bias, q/k norm."""
    a = _H + "self_attn."
    rules = [Rule(_M + "self_attention.linear_qkv.weight",
                  (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "qkv")]
    if qkv_bias:
        rules.append(Rule(_M + "self_attention.linear_qkv.bias",
                          (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "qkv"))
    if qk_norm:
        rules += [Rule(_M + "self_attention.q_layernorm.weight", (a + "q_norm.weight",)),
                  Rule(_M + "self_attention.k_layernorm.weight", (a + "k_norm.weight",))]
    return rules


def dense_mlp_rules() -> list[Rule]:
    """The SwiGLU MLP of non-MoE layers."""
    m = _H + "mlp."
    return [
        Rule(_M + "mlp.linear_fc1.weight", (m + "gate_proj.weight", m + "up_proj.weight"),
             "gate_up", scope="dense"),
        Rule(_M + "mlp.linear_fc2.weight", (m + "down_proj.weight",), scope="dense"),
    ]


def moe_rules(block: str, gate: str, up: str, down: str) -> list[Rule]:
    """Router and routed experts; `block` is the HF MoE module name, the rest expert linears."""
    b = _H + block + "."
    e = b + "experts.{E}."
    x = _M + "mlp.experts.local_experts.{E}."
    return [
        Rule(_M + "mlp.router.weight", (b + "gate.weight",), scope="moe"),
        Rule(x + "linear_fc1.weight", (e + gate + ".weight", e + up + ".weight"), "gate_up", scope="expert"),
        Rule(x + "linear_fc2.weight", (e + down + ".weight",), scope="expert"),
    ]


def shared_expert_rules(module: str, gate: Optional[str] = None) -> list[Rule]:
    """Shared expert MLP (HF `mlp.<module>`), and its sigmoid output gate when given."""
    s = _H + "mlp." + module + "."
    m = _M + "mlp.shared_experts."
    rules = [
        Rule(m + "linear_fc1.weight", (s + "gate_proj.weight", s + "up_proj.weight"), "gate_up", scope="moe"),
        Rule(m + "linear_fc2.weight", (s + "down_proj.weight",), scope="moe"),
    ]
    if gate:
        rules.append(Rule(m + "gate_weight", (_H + "mlp." + gate + ".weight",), scope="moe"))
    return rules


# ---------------------------------------------------------------------- config helpers
def require(hf, attribute: str, allowed, why: str) -> None:
    """Refuse an HF config value Megatron-Core (or this converter) cannot represent."""
    value = getattr(hf, attribute, None)
    allowed_values = allowed if isinstance(allowed, tuple) else (allowed,)
    if value not in allowed_values:
        raise ConfigError(f"config.json:{attribute}", f"{value!r} is not supported ({why})",
                          f"use a checkpoint with {attribute} in {list(allowed_values)}")


def rope_parameters(hf) -> dict:
    params = getattr(hf, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" not in params and hasattr(hf, "rope_theta"):
        params = dict(params, rope_theta=hf.rope_theta)
    return dict(params)


def plain_rope_theta(hf) -> float:
    """rope_theta of a config without rotary scaling (GQA families)."""
    params = rope_parameters(hf)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError("config.json:rope_parameters.rope_type",
                          f"{rope_type!r} rotary scaling is not supported for {hf.model_type}",
                          "use a checkpoint with plain RoPE (rope_type 'default')")
    return float(params.get("rope_theta", 10000.0))


def dense_prefix(hf, num_layers: int) -> int:
    """first_k_dense from Qwen's mlp_only_layers / decoder_sparse_step (only a leading run)."""
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    dense = sorted(getattr(hf, "mlp_only_layers", None) or [])
    if step != 1:
        raise ConfigError("config.json:decoder_sparse_step", f"{step} interleaves dense and MoE "
                          "layers; the model config holds only leading dense layers",
                          "use decoder_sparse_step=1")
    if dense != list(range(len(dense))) or len(dense) >= num_layers:
        raise ConfigError("config.json:mlp_only_layers", f"{dense} is not a leading run of layers",
                          "only mlp_only_layers=[0, 1, ..., k-1] (k < num_hidden_layers) converts")
    return len(dense)


def head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def common_fields(hf, name: str, family: str) -> dict:
    """MoEModelConfig fields read the same way from every family's HF config."""
    require(hf, "hidden_act", "silu", "Megatron's SwiGLU here uses SiLU")
    return dict(
        name=name, family=family, num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        vocab_size=hf.vocab_size, max_position_embeddings=hf.max_position_embeddings,
        norm_epsilon=float(hf.rms_norm_eps), tie_word_embeddings=bool(hf.tie_word_embeddings),
        topk=hf.num_experts_per_tok, aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
        hf_reference=getattr(hf, "_name_or_path", "") or "", **_NEVER,
    )


def common_hf_kwargs(model: MoEModelConfig, architecture: str, aux_loss: bool = True) -> dict:
    """HF config kwargs shared by every family (router_aux_loss_coef where the family has it)."""
    extra = dict(router_aux_loss_coef=model.aux_loss_coeff) if aux_loss else {}
    return dict(**extra,
        architectures=[architecture], vocab_size=model.vocab_size, hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon, tie_word_embeddings=model.tie_word_embeddings,
        num_experts_per_tok=model.topk, hidden_act="silu",
    )


def default_rope(model: MoEModelConfig) -> dict:
    return {"rope_type": "default", "rope_theta": model.rope_theta}

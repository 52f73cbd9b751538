"""Typed model presets for the MoE families DES-MoE users fine-tune.

A preset describes the architecture only (no parallelism, no precision): the published size
of each family and a tiny size with the same structure that trains on a CPU. `MoEModelConfig`
is turned into a Megatron `TransformerConfig` by `megatron_desmoe.models.builder`.

Published figures (total parameters, from the model cards / papers) are kept next to each
real-size preset; tests check the analytic parameter count against them without allocating.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_desmoe.errors import ConfigError

FAMILIES = ("deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-latent attention dimensions (DeepSeek-V2)."""

    q_lora_rank: Optional[int]  # None: queries are projected directly (DeepSeek-V2-Lite)
    kv_lora_rank: int  # width of the compressed key/value latent
    qk_head_dim: int  # per-head query/key width without rotary part ("nope")
    qk_pos_emb_head_dim: int  # per-head rotary width, shared by all heads for keys
    v_head_dim: int  # per-head value width


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rotary scaling (DeepSeek-V2). None on a preset means plain RoPE."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class MoEModelConfig:
    """Architecture of a decoder-only MoE language model."""

    name: str  # preset name, e.g. "mixtral-tiny"
    family: str  # one of FAMILIES; selects the Hugging Face adapter
    num_layers: int  # decoder layers
    hidden_size: int  # model width
    num_attention_heads: int  # query heads
    num_query_groups: int  # key/value heads (GQA); == heads for MHA
    kv_channels: Optional[int]  # per-head width; None -> hidden_size // heads
    ffn_hidden_size: int  # width of dense MLP layers (first_k_dense layers)
    moe_ffn_hidden_size: int  # width of one routed expert
    num_experts: int  # routed experts per MoE layer
    topk: int  # experts chosen per token
    vocab_size: int  # tokenizer vocabulary
    max_position_embeddings: int  # longest supported sequence
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: Optional[RopeScaling] = None  # YaRN for DeepSeek-V2
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    shared_expert_hidden_size: Optional[int] = None  # total width of shared experts, or None
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert output
    first_k_dense: int = 0  # leading layers with a dense MLP instead of MoE (DeepSeek)
    score_function: str = "softmax"  # router score: "softmax" or "sigmoid"
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    topk_scaling_factor: Optional[float] = None  # DeepSeek routed_scaling_factor
    num_groups: Optional[int] = None  # group-limited routing: expert groups (DeepSeek)
    group_topk: Optional[int] = None  # group-limited routing: groups kept per token
    expert_bias: bool = False  # aux-loss-free load balancing bias (DeepSeek-V3 style)
    qk_layernorm: bool = False  # per-head RMSNorm on queries and keys (Qwen3)
    qk_layernorm_full_width: bool = False  # OLMoE: the q/k RMSNorm spans all heads at once
    add_qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    tie_word_embeddings: bool = False  # share input embedding and output layer
    mla: Optional[MLAConfig] = None  # multi-latent attention, or None for GQA/MHA
    aux_loss_coeff: float = 0.0  # load-balancing loss weight used when fine-tuning
    published_total_params: Optional[float] = None  # model card figure, for the real size
    hf_reference: str = ""  # Hugging Face model id the real size mirrors

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per layer (Megatron's moe_layer_freq list)."""
        return [0 if i < self.first_k_dense else 1 for i in range(self.num_layers)]

    def replace(self, **changes) -> "MoEModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(
                sorted(unknown)[0], "is not a model config field",
                f"use one of {[f.name for f in dataclasses.fields(self)]}",
            )
        return dataclasses.replace(self, **changes)

    def validate(self) -> "MoEModelConfig":
        """Architecture checks that need no parallel layout."""
        if self.family not in FAMILIES:
            raise ConfigError("family", f"unknown family {self.family!r}", f"use one of {FAMILIES}")
        if self.topk < 1 or self.topk > self.num_experts:
            raise ConfigError(
                "topk", f"top-k {self.topk} must be in [1, num_experts={self.num_experts}]",
                f"set topk to at most {self.num_experts}",
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                "num_query_groups",
                f"{self.num_attention_heads} heads are not divisible by {self.num_query_groups} groups",
                "use a divisor of num_attention_heads",
            )
        if self.first_k_dense >= self.num_layers:
            raise ConfigError("first_k_dense", "leaves no MoE layer", f"use < {self.num_layers}")
        if self.score_function not in ("softmax", "sigmoid"):
            raise ConfigError("score_function", f"{self.score_function!r}", "use softmax or sigmoid")
        if (self.num_groups is None) != (self.group_topk is None):
            raise ConfigError("group_topk", "num_groups and group_topk go together", "set both or neither")
        if self.num_groups and self.num_experts % self.num_groups:
            raise ConfigError("num_groups", "must divide num_experts", "pick a divisor of num_experts")
        return self


def count_parameters(cfg: MoEModelConfig) -> int:
    """Total parameters from the architecture alone (no allocation)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    embeddings = v * h * (1 if cfg.tie_word_embeddings else 2)
    total = embeddings + h  # + final norm
    for layer in range(cfg.num_layers):
        total += 2 * h  # input and pre-MLP norms
        total += _attention_params(cfg)
        if cfg.moe_layer_pattern[layer]:
            total += _moe_params(cfg)
        else:
            total += 3 * h * cfg.ffn_hidden_size
    return total


def count_active_parameters(cfg: MoEModelConfig) -> int:
    """Parameters touched by one token (top-k routed experts + shared), embeddings included."""
    idle_experts = cfg.num_experts - cfg.topk
    moe_layers = sum(cfg.moe_layer_pattern)
    return count_parameters(cfg) - moe_layers * idle_experts * 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size


def _attention_params(cfg: MoEModelConfig) -> int:
    h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    if cfg.mla is None:
        kv = 2 * cfg.num_query_groups * d
        params = h * (n * d + kv) + n * d * h
        if cfg.add_qkv_bias:
            params += n * d + kv
        if cfg.qk_layernorm_full_width:
            params += n * d + cfg.num_query_groups * d
        elif cfg.qk_layernorm:
            params += 2 * d
        return params
    m = cfg.mla
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = h * n * q_head
    else:
        q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * q_head
    kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank
    kv += m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)
    return q + kv + n * m.v_head_dim * h


def _moe_params(cfg: MoEModelConfig) -> int:
    h = cfg.hidden_size
    params = cfg.num_experts * h + cfg.num_experts * 3 * h * cfg.moe_ffn_hidden_size
    if cfg.shared_expert_hidden_size:
        params += 3 * h * cfg.shared_expert_hidden_size
        if cfg.shared_expert_gate:
            params += h
    return params


# ----------------------------------------------------------------------------- presets
# Real sizes mirror the Hugging Face configs named in hf_reference.

_DEEPSEEK_V2_LITE = MoEModelConfig(
    name="deepseek-v2-lite", family="deepseek_v2", num_layers=27, hidden_size=2048,
    num_attention_heads=16, num_query_groups=16, kv_channels=None, ffn_hidden_size=10944,
    moe_ffn_hidden_size=1408, num_experts=64, topk=6, vocab_size=102400,
    max_position_embeddings=163840, rope_theta=10000.0,
    rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096,
                             beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
    shared_expert_hidden_size=2 * 1408, first_k_dense=1, norm_topk_prob=False,
    topk_scaling_factor=1.0,
    mla=MLAConfig(q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                  v_head_dim=128),
    aux_loss_coeff=0.001, published_total_params=15.7e9, hf_reference="deepseek-ai/DeepSeek-V2-Lite",
)

_MIXTRAL_8X7B = MoEModelConfig(
    name="mixtral-8x7b", family="mixtral", num_layers=32, hidden_size=4096,
    num_attention_heads=32, num_query_groups=8, kv_channels=128, ffn_hidden_size=14336,
    moe_ffn_hidden_size=14336, num_experts=8, topk=2, vocab_size=32000,
    max_position_embeddings=32768, rope_theta=1e6, norm_epsilon=1e-5, norm_topk_prob=True,
    aux_loss_coeff=0.02, published_total_params=46.7e9, hf_reference="mistralai/Mixtral-8x7B-v0.1",
)

_QWEN2_MOE_A2_7B = MoEModelConfig(
    name="qwen2-moe-a2.7b", family="qwen2_moe", num_layers=24, hidden_size=2048,
    num_attention_heads=16, num_query_groups=16, kv_channels=128, ffn_hidden_size=5632,
    moe_ffn_hidden_size=1408, num_experts=60, topk=4, vocab_size=151936,
    max_position_embeddings=8192, rope_theta=1e6, shared_expert_hidden_size=5632,
    shared_expert_gate=True, add_qkv_bias=True, norm_topk_prob=False, aux_loss_coeff=0.001,
    published_total_params=14.3e9, hf_reference="Qwen/Qwen1.5-MoE-A2.7B",
)

_QWEN3_30B_A3B = MoEModelConfig(
    name="qwen3-30b-a3b", family="qwen3_moe", num_layers=48, hidden_size=2048,
    num_attention_heads=32, num_query_groups=4, kv_channels=128, ffn_hidden_size=6144,
    moe_ffn_hidden_size=768, num_experts=128, topk=8, vocab_size=151936,
    max_position_embeddings=40960, rope_theta=1e6, qk_layernorm=True, norm_topk_prob=True,
    aux_loss_coeff=0.001, published_total_params=30.5e9, hf_reference="Qwen/Qwen3-30B-A3B",
)

_OLMOE_1B_7B = MoEModelConfig(
    name="olmoe-1b-7b", family="olmoe", num_layers=16, hidden_size=2048,
    num_attention_heads=16, num_query_groups=16, kv_channels=128, ffn_hidden_size=1024,
    moe_ffn_hidden_size=1024, num_experts=64, topk=8, vocab_size=50304,
    max_position_embeddings=4096, rope_theta=10000.0, norm_epsilon=1e-5, qk_layernorm=True,
    qk_layernorm_full_width=True,
    norm_topk_prob=False, aux_loss_coeff=0.01, published_total_params=6.92e9,
    hf_reference="allenai/OLMoE-1B-7B-0924",
)


def _tiny(real: MoEModelConfig, **changes) -> MoEModelConfig:
    """Same structure as `real` at a size that trains in milliseconds per step on a CPU."""
    base = dict(
        name=real.name.split("-")[0] + "-tiny", num_layers=2, hidden_size=64,
        num_attention_heads=4, num_query_groups=min(real.num_query_groups, 4)
        if real.num_query_groups == real.num_attention_heads else 2,
        kv_channels=16, ffn_hidden_size=128, moe_ffn_hidden_size=32, num_experts=8,
        topk=min(real.topk, 2), vocab_size=512, max_position_embeddings=256,
        published_total_params=None,
    )
    base.update(changes)
    return real.replace(**base)


PRESETS: dict[str, MoEModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _DEEPSEEK_V2_LITE,
        _MIXTRAL_8X7B,
        _QWEN2_MOE_A2_7B,
        _QWEN3_30B_A3B,
        _OLMOE_1B_7B,
        _tiny(_DEEPSEEK_V2_LITE, name="deepseek-v2-tiny", num_layers=3, first_k_dense=1,
              shared_expert_hidden_size=64, kv_channels=None,
              rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64,
                                       mscale=0.707, mscale_all_dim=0.707),
              mla=MLAConfig(q_lora_rank=None, kv_lora_rank=32, qk_head_dim=16,
                            qk_pos_emb_head_dim=8, v_head_dim=16)),
        _tiny(_MIXTRAL_8X7B, name="mixtral-tiny", num_experts=4, moe_ffn_hidden_size=128),
        _tiny(_QWEN2_MOE_A2_7B, name="qwen2-moe-tiny", shared_expert_hidden_size=64),
        _tiny(_QWEN3_30B_A3B, name="qwen3-moe-tiny"),
        _tiny(_OLMOE_1B_7B, name="olmoe-tiny"),
    )
}


def get_preset(name: str, **overrides) -> MoEModelConfig:
    """A preset by name, with field overrides, validated."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}", f"use one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides).validate() if overrides else PRESETS[name].validate()

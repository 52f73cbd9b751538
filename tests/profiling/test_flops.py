"""Model FLOPs formula against hand computations and against Megatron-LM's formula."""

import pytest

from megatron_desmoe.models.presets import (
    PRESETS,
    MLAConfig,
    MoEModelConfig,
    count_active_parameters,
    get_preset,
)
from megatron_desmoe.profiling.flops import forward_flops, training_step_flops


def _small_gqa() -> MoEModelConfig:
    return MoEModelConfig(
        name="hand", family="mixtral", num_layers=2, hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, ffn_hidden_size=128, moe_ffn_hidden_size=32,
        num_experts=8, topk=2, vocab_size=100, max_position_embeddings=64,
    )


def test_gqa_moe_forward_flops_match_hand_computation():
    model, s = _small_gqa(), 8
    flops = forward_flops(model, s)
    # per token per layer: q 64x64, k and v 64x32 each, out 64x64 -> 2 * 12288 MACs
    assert flops.attention_projections == 2 * 8 * (2 * (64 * 64 + 64 * 32 + 64 * 32) + 2 * 64 * 64)
    # causal scores and context: 2 GEMMs x 2 FLOPs x 4 heads x 16 x (8 x 8 / 2) per layer
    assert flops.attention_scores == 2 * (2 * 2 * 4 * 16 * 8 * 8 // 2)
    assert flops.router == 2 * 8 * 2 * 64 * 8
    # top-2 experts, 3 GEMMs of 64x32 each (gate, up, down)
    assert flops.routed_experts == 2 * 8 * 2 * (3 * 2 * 64 * 32)
    assert flops.shared_experts == 0 and flops.dense_mlp == 0
    assert flops.logits == 8 * 2 * 64 * 100
    total = 393216 + 16384 + 16384 + 393216 + 102400
    assert flops.total == total
    assert training_step_flops(model, s, global_batch_sequences=3) == 3 * 3 * total


def test_mla_dense_and_shared_experts_match_hand_computation():
    model = MoEModelConfig(
        name="hand-mla", family="deepseek_v2", num_layers=3, hidden_size=32,
        num_attention_heads=2, num_query_groups=2, kv_channels=None, ffn_hidden_size=96,
        moe_ffn_hidden_size=16, num_experts=4, topk=2, vocab_size=50,
        max_position_embeddings=64, shared_expert_hidden_size=24, first_k_dense=1,
        mla=MLAConfig(q_lora_rank=None, kv_lora_rank=8, qk_head_dim=12, qk_pos_emb_head_dim=4,
                      v_head_dim=10),
    )
    s = 4
    flops = forward_flops(model, s)
    q = 2 * 32 * 2 * (12 + 4)            # no q LoRA: h -> heads x (nope + rope)
    kv_down = 2 * 32 * (8 + 4)            # h -> latent + shared rope key
    kv_up = 2 * 8 * 2 * (12 + 10)         # latent -> heads x (nope key + value)
    out = 2 * 2 * 10 * 32
    assert flops.attention_projections == 3 * s * (q + kv_down + kv_up + out)
    # scores use the 16-wide q/k head, context the 10-wide value head
    assert flops.attention_scores == 3 * (2 * 2 * 16 * s * s // 2 + 2 * 2 * 10 * s * s // 2)
    assert flops.dense_mlp == 1 * s * 6 * 32 * 96
    assert flops.routed_experts == 2 * s * 2 * 6 * 32 * 16
    assert flops.shared_experts == 2 * s * 6 * 32 * 24
    assert flops.router == 2 * s * 2 * 32 * 4
    assert flops.logits == s * 2 * 32 * 50

    lora = model.replace(mla=MLAConfig(q_lora_rank=6, kv_lora_rank=8, qk_head_dim=12,
                                       qk_pos_emb_head_dim=4, v_head_dim=10))
    q_lora = 2 * (32 * 6 + 6 * 2 * 16)
    assert forward_flops(lora, s).attention_projections == 3 * s * (q_lora + kv_down + kv_up + out)


def test_shared_expert_gate_is_counted():
    model = get_preset("qwen2-moe-tiny")
    s = 16
    h, shared = model.hidden_size, model.shared_expert_hidden_size
    assert forward_flops(model, s).shared_experts == model.num_layers * s * (6 * h * shared + 2 * h)


def _megatron_lm_flops(model: MoEModelConfig, batch: int, s: int) -> float:
    """Megatron-LM training.num_floating_point_operations (GQA branch, causal ratio 0.5),
    transcribed independently of the code under test."""
    h, L, n = model.hidden_size, model.num_layers, model.num_attention_heads
    g, kv = model.num_query_groups, model.head_dim
    moe_layers = sum(model.moe_layer_pattern)
    dense_layers = L - moe_layers
    glu = 3 / 2
    shared = model.shared_expert_hidden_size or 0
    query_ratio = kv * n / h
    attn = 12 * L * h * h * ((1 + g / n + s / h * 0.5) * query_ratio)
    mlp = 12 * L * h * (model.ffn_hidden_size * glu * dense_layers / L
                        + model.moe_ffn_hidden_size * model.topk * glu * moe_layers / L
                        + shared * glu * moe_layers / L)
    logits = 3 * 2 * h * model.vocab_size
    return batch * s * (mlp + attn + logits)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "qwen2-moe-a2.7b"])
def test_equals_megatron_lm_formula_plus_router(name):
    model, s, batch = PRESETS[name], 4096, 2
    flops = forward_flops(model, s)
    gate = 2 * model.hidden_size * s * sum(model.moe_layer_pattern) if model.shared_expert_gate else 0
    ours_without_router = 3 * batch * (flops.total - flops.router - gate)
    assert ours_without_router == pytest.approx(_megatron_lm_flops(model, batch, s), rel=1e-12)
    assert flops.router / flops.total < 5e-3  # what the router term adds


def _vector_params(model: MoEModelConfig) -> int:
    """Parameters that are no GEMM weight: norms and biases (not in the FLOPs count)."""
    h, n, g, d = (model.hidden_size, model.num_attention_heads, model.num_query_groups,
                  model.head_dim)
    per_layer = 2 * h  # input and pre-MLP RMSNorm
    if model.mla is not None:
        per_layer += model.mla.kv_lora_rank + (model.mla.q_lora_rank or 0)
    elif model.qk_layernorm_full_width:
        per_layer += n * d + g * d
    elif model.qk_layernorm:
        per_layer += 2 * d
    if model.add_qkv_bias:
        per_layer += n * d + 2 * g * d
    return model.num_layers * per_layer + h  # + final norm


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gemm_flops_are_twice_the_active_weights(name):
    """Independent cross-check against presets.count_active_parameters: without the
    attention-score GEMMs every forward FLOP is a use of an active weight, so per token it
    is exactly 2 x (active parameters - input embedding - norms and biases)."""
    model = PRESETS[name]
    s = 128
    flops = forward_flops(model, s)
    per_token = (flops.total - flops.attention_scores) // s
    weights = count_active_parameters(model) - _vector_params(model)
    if not model.tie_word_embeddings:
        weights -= model.vocab_size * model.hidden_size  # the input embedding is a lookup
    assert per_token == 2 * weights


def test_adapter_flops():
    from megatron_desmoe.profiling.flops import adapter_forward_flops

    model = get_preset("deepseek-v2-tiny")  # 3 layers, the first dense
    assert adapter_forward_flops(model, 256, 16) == 2 * 16 * 2 * (64 * 256 + 256 * 8)

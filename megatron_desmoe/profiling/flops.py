"""Model FLOPs of one training step, from the architecture alone.

Counted per GEMM, 2 FLOPs per multiply-accumulate, for the *active* path of every token:

  per layer, attention (GQA/MHA)
      q, k, v projections     2 * h * (n*d + 2*g*d)
      output projection       2 * n*d * h
  per layer, attention (MLA, DeepSeek-V2)
      q projection            2 * h * n*(d_nope + d_rope)              (no q LoRA)
                              2 * (h*r_q + r_q * n*(d_nope + d_rope))  (q LoRA rank r_q)
      kv down projection      2 * h * (r_kv + d_rope)
      kv up projection        2 * r_kv * n*(d_nope + d_v)
      output projection       2 * n*d_v * h
  per layer, core attention, causal: a query sees on average s/2 keys (Megatron-LM's
  convention), so per sequence
      scores  Q K^T           2 * n * d_qk * s^2 / 2
      context P V             2 * n * d_v  * s^2 / 2
  per MoE layer
      router gate             2 * h * E
      routed experts (top-k)  k * 2 * 3 * h * f_moe       (SwiGLU: gate, up, down GEMMs)
      shared experts          2 * 3 * h * f_shared  (+ 2 * h for Qwen2-MoE's sigmoid gate)
  per dense layer (first_k_dense)
      dense MLP               2 * 3 * h * f
  once
      logits                  2 * h * V

Idle experts cost nothing: only the top-k routed experts a token visits are counted.
Training step = 3 x forward (backward = 2 x forward: data and weight gradients), times the
sequences of the global batch. Norms, softmax, activations, rotary embeddings and the
DES-MoE adapter/distillation are not counted (they are the same "model FLOPs" either way;
the DES-MoE extras are overhead and show up as a longer step). Differences from Megatron-LM's
`num_floating_point_operations`: the router gate GEMM and the Qwen2-MoE shared-expert gate
are counted here (0.008% of the total for Mixtral-8x7B, at most 0.33% for the real
presets, for Qwen3-30B-A3B's 128 experts), MLA norms are not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_desmoe.models.presets import MoEModelConfig

BACKWARD_MULTIPLIER = 3  # forward + backward (data gradient + weight gradient)


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one sequence of `seq_len` tokens, by component (integers)."""

    attention_projections: int
    attention_scores: int  # Q K^T and P V, causal
    router: int
    routed_experts: int
    shared_experts: int
    dense_mlp: int
    logits: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def attention_projection_flops_per_token(model: MoEModelConfig) -> int:
    h, n = model.hidden_size, model.num_attention_heads
    if model.mla is None:
        d, g = model.head_dim, model.num_query_groups
        return 2 * h * (n * d + 2 * g * d) + 2 * n * d * h
    m = model.mla
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = 2 * h * n * q_head
    else:
        q = 2 * (h * m.q_lora_rank + m.q_lora_rank * n * q_head)
    kv_down = 2 * h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)
    kv_up = 2 * m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)
    out = 2 * n * m.v_head_dim * h
    return q + kv_down + kv_up + out


def attention_score_flops_per_sequence(model: MoEModelConfig, seq_len: int) -> int:
    """Q K^T plus P V of one layer, causal (half the s x s score matrix)."""
    n = model.num_attention_heads
    if model.mla is None:
        d_qk = d_v = model.head_dim
    else:
        d_qk = model.mla.qk_head_dim + model.mla.qk_pos_emb_head_dim
        d_v = model.mla.v_head_dim
    # 2 FLOPs/MAC * n * d * s^2 / 2 (causal) = n * d * s^2, for each of the two GEMMs
    return n * d_qk * seq_len * seq_len + n * d_v * seq_len * seq_len


def forward_flops(model: MoEModelConfig, seq_len: int) -> ForwardFlops:
    """Forward FLOPs of the whole model for one sequence of `seq_len` tokens."""
    h, s = model.hidden_size, seq_len
    moe_layers = sum(model.moe_layer_pattern)
    dense_layers = model.num_layers - moe_layers
    shared = 0
    if model.shared_expert_hidden_size:
        shared = 2 * 3 * h * model.shared_expert_hidden_size
        if model.shared_expert_gate:
            shared += 2 * h
    return ForwardFlops(
        attention_projections=model.num_layers * s * attention_projection_flops_per_token(model),
        attention_scores=model.num_layers * attention_score_flops_per_sequence(model, s),
        router=moe_layers * s * 2 * h * model.num_experts,
        routed_experts=moe_layers * s * model.topk * 2 * 3 * h * model.moe_ffn_hidden_size,
        shared_experts=moe_layers * s * shared,
        dense_mlp=dense_layers * s * 2 * 3 * h * model.ffn_hidden_size,
        logits=s * 2 * h * model.vocab_size,
    )


def training_step_flops(model: MoEModelConfig, seq_len: int, global_batch_sequences: int) -> int:
    """Model FLOPs of one optimizer step over `global_batch_sequences` sequences (all ranks)."""
    return BACKWARD_MULTIPLIER * forward_flops(model, seq_len).total * global_batch_sequences


def adapter_forward_flops(model: MoEModelConfig, adapter_width: int, seq_len: int) -> int:
    """Forward FLOPs of DES-MoE's router adapters for one sequence (not model FLOPs: the
    adapter is method overhead; it runs in fp32). Per token and MoE layer:
    2 * (h * a + a * E) for the two adapter GEMMs of width a."""
    per_token = 2 * (model.hidden_size * adapter_width + adapter_width * model.num_experts)
    return sum(model.moe_layer_pattern) * seq_len * per_token

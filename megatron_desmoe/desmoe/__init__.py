"""DES-MoE's mechanisms in plain PyTorch (no Megatron, no torch.distributed).

One module per mechanism of the paper, readable beside it (docs/method.md):
  config        DESMoEConfig: every knob, validated
  distillation  adaptive router's KL distillation towards the frozen gate, lambda schedule
  affinity      expert-domain affinity A_hat and its mask M, per MoE layer
  isolation     per-token gradient isolation of expert weights (sign protocol, reference MLP)
  phases        three-phase schedule; trainable parameter groups per method and phase
  esft          ESFT-Token / ESFT-Gate baselines (expert scores and selection)
"""

from megatron_desmoe.desmoe.affinity import (
    AffinityState,
    affinity_mask,
    count_domain_expert_tokens,
    count_domain_tokens,
)
from megatron_desmoe.desmoe.config import METHODS, PARAM_GROUPS, DESMoEConfig
from megatron_desmoe.desmoe.distillation import DistillationSchedule, routing_distillation_loss
from megatron_desmoe.desmoe.esft import (
    ESFTScoreAccumulator,
    average_gate_score,
    select_experts,
    select_experts_per_layer,
    token_selection_ratio,
)
from megatron_desmoe.desmoe.isolation import (
    allowed_routes,
    decode_allowed,
    encode_allowed,
    expert_forward_reference,
    isolated_expert_forward,
)
from megatron_desmoe.desmoe.phases import (
    Phase,
    isolation_active,
    kd_active,
    phase_at,
    progress,
    trainable_expert_group,
    trainable_groups,
)

__all__ = [
    "AffinityState", "affinity_mask", "count_domain_expert_tokens", "count_domain_tokens",
    "METHODS", "PARAM_GROUPS", "DESMoEConfig",
    "DistillationSchedule", "routing_distillation_loss",
    "ESFTScoreAccumulator", "average_gate_score", "select_experts", "select_experts_per_layer",
    "token_selection_ratio",
    "allowed_routes", "decode_allowed", "encode_allowed", "expert_forward_reference",
    "isolated_expert_forward",
    "Phase", "isolation_active", "kd_active", "phase_at", "progress", "trainable_expert_group",
    "trainable_groups",
]

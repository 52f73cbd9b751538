"""Mechanism 1 (second half): routing distillation towards the frozen pretrained gate.

The adapted router's logits are the frozen gate's logits plus the adapter's output. To keep
the pretrained routing knowledge while the adapter learns, DES-MoE adds

    L_KD = tau^2 * mean_t KL( softmax(z_frozen_t / tau) || softmax(z_adapted_t / tau) )

weighted by lambda(progress), high early and 0 at the end of training.

* Direction KL(frozen || adapted): the frozen gate is the teacher, as in Hinton et al.'s
  distillation; this "forward" KL penalises the adapter most for dropping experts the
  pretrained gate relied on (mass-covering), which is what protects general ability.
* tau^2: the gradient of the tempered KL with respect to the adapted logits is
  (q - p) / tau, and for soft targets q - p itself scales like 1 / tau, so the gradient
  shrinks like 1 / tau^2. Multiplying by tau^2 (Hinton et al. 2015) keeps the gradient
  magnitude independent of tau, so lambda means the same thing for every temperature.
* The frozen logits are a constant target: they are detached here, whatever the caller
  passes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_desmoe.desmoe.config import KD_SCHEDULES
from megatron_desmoe.errors import ConfigError


def routing_distillation_loss(adapted_logits: torch.Tensor, frozen_logits: torch.Tensor,
                              temperature: float,
                              valid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """tau^2 * mean over valid tokens of KL(softmax(frozen/tau) || softmax(adapted/tau)).

    adapted_logits, frozen_logits: [T, E]. valid_mask: [T] bool (False = padding), or None
    for all tokens. Computed in fp32 at least (fp64 stays fp64) with log_softmax, so it is
    stable for large logits. Returns a scalar; 0 (still attached to the graph) when no
    token is valid.
    """
    if adapted_logits.shape != frozen_logits.shape or adapted_logits.dim() != 2:
        raise ValueError(f"expected two [tokens, experts] tensors, got "
                         f"{tuple(adapted_logits.shape)} and {tuple(frozen_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(adapted_logits.dtype, torch.float32)
    log_q = torch.log_softmax(adapted_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(frozen_logits.detach().to(dtype) / temperature, dim=-1)
    p = log_p.exp()
    # p * (log p - log q), with 0 * log 0 = 0 for experts the teacher gives no mass.
    per_expert = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    per_token = per_expert.sum(dim=-1)
    if valid_mask is None:
        mean_kl = per_token.mean()
    else:
        weights = valid_mask.to(dtype)
        mean_kl = (per_token * weights).sum() / weights.sum().clamp_min(1.0)
    return mean_kl * (temperature ** 2)


class DistillationSchedule:
    """lambda(progress): the weight of the distillation loss over training.

    progress in [0, 1] (see phases.progress). With p' = min(progress / end_progress, 1):
      cosine:   initial * 0.5 * (1 + cos(pi * p'))   smooth, flat at both ends
      linear:   initial * (1 - p')
      constant: initial while progress <= end_progress, then 0
    cosine and linear reach exactly 0 at end_progress; all three are 0 after it.
    """

    def __init__(self, kind: str = "cosine", initial_weight: float = 1.0,
                 end_progress: float = 1.0):
        if kind not in KD_SCHEDULES:
            raise ConfigError("kd_schedule", f"unknown schedule {kind!r}",
                              f"use one of {list(KD_SCHEDULES)}")
        if not initial_weight >= 0:
            raise ConfigError("kd_initial_weight", f"must be >= 0, got {initial_weight}",
                              "use e.g. 1.0")
        if not 0 < end_progress <= 1:
            raise ConfigError("kd_end_progress", f"must lie in (0, 1], got {end_progress}",
                              "use e.g. 1.0")
        self.kind = kind
        self.initial_weight = float(initial_weight)
        self.end_progress = float(end_progress)

    def weight(self, progress: float) -> float:
        if not 0 <= progress <= 1:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        if self.kind == "constant":
            return self.initial_weight if progress <= self.end_progress else 0.0
        fraction = min(progress / self.end_progress, 1.0)
        if self.kind == "linear":
            return self.initial_weight * (1.0 - fraction)
        if fraction >= 1.0:  # cos(pi) + 1 is ~1e-16, not 0
            return 0.0
        return self.initial_weight * 0.5 * (1.0 + math.cos(math.pi * fraction))

    def __repr__(self) -> str:
        return (f"DistillationSchedule({self.kind!r}, initial_weight={self.initial_weight}, "
                f"end_progress={self.end_progress})")

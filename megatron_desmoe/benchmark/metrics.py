"""The benchmark's numbers, as pure functions of recorded losses and times.

Definitions (docs/benchmark.md):

* forgetting F = L_general(after) - L_general(before): the change of the validation loss on
  the general text, which no method fine-tunes on. Reported signed; the ratios use
  max(F, 0) (a method that improves on general text has forgotten nothing, not "negative
  forgetting").
* running mean of the training loss: trailing mean over the last `window` steps.
* target loss of one (N, seed): the running mean of full fine-tuning's training loss at its
  last step x (1 + margin). Full fine-tuning reaches it by construction.
* steps to target: the first step (1-based) at which a run's running mean is <= target;
  time to target: the summed wall-clock of the training steps up to it (model build,
  ESFT expert selection and evaluation excluded). None when never reached.
* headline ratios (the paper's three claims), at the largest N:
  forgetting reduction = 1 - F+_desmoe / F+_full,
  domain quality = mean over domains of L_desmoe,d / min over baselines L_b,d (<= 1:
  DES-MoE matches or beats the best baseline on average),
  time-to-target reduction = 1 - T_desmoe / T_full.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


def forgetting(before: dict, after: dict, domain: str = "general") -> float:
    return float(after[domain]) - float(before[domain])


def clipped(value: float) -> float:
    return max(0.0, float(value))


def running_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def target_loss(full_losses: Sequence[float], window: int, margin: float) -> float:
    return running_mean(full_losses, window)[-1] * (1.0 + margin)


def steps_to_target(losses: Sequence[float], target: float, window: int) -> Optional[int]:
    for i, value in enumerate(running_mean(losses, window)):
        if value <= target:
            return i + 1
    return None


def time_to_target(step_times: Sequence[float], steps: Optional[int]) -> Optional[float]:
    return None if steps is None else float(sum(step_times[:steps]))


def mean_std(values: Sequence[Optional[float]]) -> dict:
    """Mean and sample standard deviation (0 for one value) of the non-missing values."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return {"mean": None, "std": None, "n": 0, "missing": len(values)}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present),
            "missing": len(values) - len(present)}


def reduction(method_value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """1 - method / reference; None when undefined (missing values or reference <= 0)."""
    if method_value is None or reference is None or reference <= 0:
        return None
    return 1.0 - method_value / reference


def domain_quality_ratio(method_losses: dict, baseline_losses: dict[str, dict],
                         domains: Sequence[str]) -> float:
    """Mean over `domains` of the method's loss over the best (lowest) baseline loss."""
    ratios = [method_losses[d] / min(b[d] for b in baseline_losses.values()) for d in domains]
    return statistics.fmean(ratios)

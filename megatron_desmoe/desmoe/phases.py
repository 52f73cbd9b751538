"""Mechanism 3: the three-phase schedule, and what each method trains in each phase.

Steps are 0-based optimizer-step indices, 0 .. total_steps - 1 (the index of the step
being taken, as in `for step in range(total_steps)`). The progress of step s is

    progress(s) = (s + 1) / T        the fraction of training done once step s is taken

so the first step has progress 1/T and the last exactly 1. With t = s + 1 (1-based) and
boundaries (b1, b2), inclusive as in the paper's "t <= 0.2 T":

    warm-up        t <= b1 T
    stabilisation  b1 T < t <= b2 T
    consolidation  t > b2 T

Boundaries are compared as exact decimals (0.7 means 7/10), so with T = 10 steps 0..6 are
warm-up or stabilisation and step 7 is consolidation, with no floating-point surprises.
"""

from __future__ import annotations

import enum
from fractions import Fraction
from typing import Sequence

from megatron_desmoe.desmoe.config import EXPERT_GROUPS, PARAM_GROUPS, DESMoEConfig


class Phase(enum.Enum):
    WARMUP = "warmup"
    STABILIZATION = "stabilization"
    CONSOLIDATION = "consolidation"


def _check_step(step: int, total_steps: int) -> None:
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step must lie in [0, total_steps) with total_steps >= 1, got "
                         f"step={step}, total_steps={total_steps}")


def progress(step: int, total_steps: int) -> float:
    """(step + 1) / total_steps for the 0-based step being taken: in (0, 1]."""
    _check_step(step, total_steps)
    return (step + 1) / total_steps


def _done_by(steps_done: int, total_steps: int, boundary: float) -> bool:
    """steps_done <= boundary * total_steps, exactly (boundary read as its decimal)."""
    return Fraction(steps_done, total_steps) <= Fraction(repr(float(boundary)))


def phase_at(step: int, total_steps: int,
             boundaries: Sequence[float] = (0.2, 0.7)) -> Phase:
    """Phase of the 0-based `step` (see the module docstring for the exact rule)."""
    _check_step(step, total_steps)
    first, second = boundaries
    if _done_by(step + 1, total_steps, first):
        return Phase.WARMUP
    if _done_by(step + 1, total_steps, second):
        return Phase.STABILIZATION
    return Phase.CONSOLIDATION


# ---------------------------------------------------------------------- presets
_ALL_PHASES = tuple(Phase)
_FULL_FINE_TUNING = frozenset(
    group for group in PARAM_GROUPS
    if group not in ("router_adapter", "associated_experts", "selected_experts")
)
METHOD_PRESETS: dict[str, dict[Phase, frozenset[str]]] = {
    # Paper: warm-up trains router and experts while affinity is collected; stabilisation
    # the router and each domain's experts; consolidation those experts only. Shared
    # experts, attention, embeddings, norms, LM head and the pretrained gate stay frozen to
    # protect general ability (our default; every set is configurable).
    "desmoe": {
        Phase.WARMUP: frozenset({"router_adapter", "routed_experts"}),
        Phase.STABILIZATION: frozenset({"router_adapter", "associated_experts"}),
        Phase.CONSOLIDATION: frozenset({"associated_experts"}),
    },
    "full": {phase: _FULL_FINE_TUNING for phase in _ALL_PHASES},
    # ESFT: only the selected experts train, router and everything else frozen.
    "esft_token": {phase: frozenset({"selected_experts"}) for phase in _ALL_PHASES},
    "esft_gate": {phase: frozenset({"selected_experts"}) for phase in _ALL_PHASES},
}
ISOLATION_PRESETS: dict[str, frozenset[Phase]] = {
    "desmoe": frozenset({Phase.STABILIZATION, Phase.CONSOLIDATION}),
    "full": frozenset(),
    "esft_token": frozenset(),
    "esft_gate": frozenset(),
}


def trainable_groups(config: DESMoEConfig, phase: Phase) -> frozenset[str]:
    """Parameter groups (config.PARAM_GROUPS names) trained in `phase`."""
    override = getattr(config, f"{phase.value}_trainable")
    if override is not None:
        return frozenset(override)
    return METHOD_PRESETS[config.method][phase]


def trainable_expert_group(config: DESMoEConfig, phase: Phase) -> str | None:
    """The broadest routed-expert group trained in `phase` ("routed_experts" >
    "associated_experts" > "selected_experts"), or None when no routed expert trains."""
    groups = trainable_groups(config, phase)
    return next((group for group in EXPERT_GROUPS if group in groups), None)


def isolation_active(config: DESMoEConfig, phase: Phase) -> bool:
    """Whether expert weight gradients are restricted to allowed routes in `phase`."""
    if config.isolation_phases is not None:
        return phase.value in config.isolation_phases
    return phase in ISOLATION_PRESETS[config.method]


def kd_active(config: DESMoEConfig, phase: Phase) -> bool:
    """Whether the routing distillation loss is computed in `phase`: only with an adapter
    (DES-MoE) and only while the adapter trains. A frozen adapter has nothing to learn from
    the KD term; its gradient would only leak into the layers below through the router
    input."""
    return config.uses_adapter and "router_adapter" in trainable_groups(config, phase)

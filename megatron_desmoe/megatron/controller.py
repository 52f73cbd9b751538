"""DESMoEController: drives the three phases inside a Megatron training loop.

Per step it tells every DES-MoE router and expert block what is active (distillation weight,
affinity collection, isolation), decides which parameters the optimizer must skip (frozen
by the phase, or experts reached by no allowed token), refreshes the affinity every
T_update steps (counts all-reduced over the ranks that see different tokens), and exposes
the affinity for checkpoints and plots.

Typical loop:
    build_training_model(..., trainable=ever_trainable(config))  # frozen: no optimizer state
    for step in range(start, total):
        controller.begin_step(step)
        ... forward/backward (micro-batches under domain_ids_context) ...
        skip = controller.params_to_skip()
        optimizer_step_skipping(optimizer, skip)
        controller.end_step(step)
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_desmoe.desmoe.config import DESMoEConfig
from megatron_desmoe.desmoe.distillation import DistillationSchedule
from megatron_desmoe.desmoe.phases import (
    Phase,
    isolation_active,
    kd_active,
    phase_at,
    progress,
    trainable_groups,
)
from megatron_desmoe.megatron.experts import DESMoESequentialMLP
from megatron_desmoe.megatron.router import DESMoERouter

logger = logging.getLogger(__name__)

ALL_PHASES = (Phase.WARMUP, Phase.STABILIZATION, Phase.CONSOLIDATION)


def parameter_group(name: str) -> str:
    """Which trainable-set group a Megatron GPT parameter belongs to (by its name)."""
    if ".router.adapter." in name:
        return "router_adapter"
    if ".router." in name:
        return "router_gate"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".self_attention." in name:
        return "attention"
    if "embedding." in name:
        return "embeddings"
    if "output_layer." in name:
        return "output_layer"
    if "layernorm" in name or "final_norm" in name:
        return "norms"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"parameter {name!r} belongs to no DES-MoE parameter group")


def ever_trainable(config: DESMoEConfig):
    """`(name, param) -> bool`: whether any phase of `config` trains the parameter. The rest
    is frozen before DDP wrapping, so it gets no gradient buffer and no optimizer state
    (engine.build_training_model's `trainable=` argument)."""
    groups = set().union(*(trainable_groups(config, phase) for phase in ALL_PHASES))
    if groups & {"routed_experts", "associated_experts", "selected_experts"}:
        groups.add("routed_experts")

    def trainable(name: str, param=None) -> bool:
        return parameter_group(name) in groups

    return trainable


class DESMoEController:
    def __init__(self, model_chunks: Iterable[torch.nn.Module], config: DESMoEConfig,
                 total_steps: int, esft_selected: Optional[dict[int, torch.Tensor]] = None):
        self.config = config
        self.total_steps = total_steps
        self.model_chunks = list(model_chunks)
        self.routers = _modules_of(self.model_chunks, DESMoERouter)
        self.expert_blocks = _modules_of(self.model_chunks, DESMoESequentialMLP)
        self.kd_schedule = DistillationSchedule(config.kd_schedule, config.kd_initial_weight,
                                                config.kd_end_progress)
        self.esft_selected = esft_selected or {}
        self.phase: Optional[Phase] = None
        self.kd_weight = 0.0

    # ------------------------------------------------------------------ set-up
    def named_parameters(self):
        for chunk in self.model_chunks:
            yield from chunk.named_parameters()

    def freeze_never_trainable(self) -> list[str]:
        """requires_grad=False for parameters no phase trains (use before DDP wrapping)."""
        trainable = ever_trainable(self.config)
        frozen = [name for name, param in self.named_parameters() if not trainable(name)]
        for name, param in self.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        return frozen

    # ------------------------------------------------------------------ per step
    def begin_step(self, step: int) -> Phase:
        phase = phase_at(step, self.total_steps, self.config.phase_boundaries)
        if phase != self.phase:
            logger.info("DES-MoE phase %s begins at step %d", phase.name.lower(), step)
        self.phase = phase
        self.kd_weight = (self.kd_schedule.weight(progress(step, self.total_steps))
                          if kd_active(self.config, phase) else 0.0)
        isolate = isolation_active(self.config, phase)
        router_trains = bool({"router_adapter", "router_gate"} & trainable_groups(self.config, phase))
        for router in self.routers:
            router.kd_weight = self.kd_weight
            router.isolation_active = isolate
            router.frozen_expert_bias = not router_trains  # read by finalize_model_grads
        for block in self.expert_blocks:
            block.isolation_active = isolate
            block.reset_allowed_tokens()
        return phase

    def params_to_skip(self) -> set[torch.nn.Parameter]:
        """Parameters the optimizer must leave untouched this step."""
        groups = trainable_groups(self.config, self.phase)
        skip = {param for name, param in self.named_parameters()
                if param.requires_grad and not _group_trains(parameter_group(name), groups)}
        for block, layer_mask in self._expert_trainability(groups):
            for expert, trains in zip(block.local_experts, layer_mask.tolist()):
                if not trains:
                    skip.update(expert.parameters())
        return skip

    def refresh_due(self, step: int) -> bool:
        """Every `affinity_update_interval` steps, and always at the end of warm-up so that
        stabilisation starts from a mask built on warm-up's routing (an interval longer
        than warm-up would otherwise leave the all-True initial mask in force)."""
        if (step + 1) % self.config.affinity_update_interval == 0:
            return True
        warmup_ends = (self.phase == Phase.WARMUP and step + 1 < self.total_steps and
                       phase_at(step + 1, self.total_steps, self.config.phase_boundaries)
                       != Phase.WARMUP)
        return warmup_ends

    def end_step(self, step: int) -> bool:
        """Refresh the affinity when due (see refresh_due). True if refreshed."""
        if not self.refresh_due(step):
            return False
        for router in self.routers:
            counts, tokens = router.affinity.window_counts()
            counts, tokens = counts.clone(), tokens.clone()
            group = router.tp_dp_cp_group
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.all_reduce(counts, group=group)
                dist.all_reduce(tokens, group=group)
            router.affinity.refresh(counts, tokens)
        return True

    # ------------------------------------------------------------------ experts
    def _expert_trainability(self, groups: frozenset) -> list[tuple[DESMoESequentialMLP, torch.Tensor]]:
        """Per expert block: which local experts may move this step."""
        result = []
        isolate = isolation_active(self.config, self.phase)
        for block, router in zip(self.expert_blocks, self._routers_of_blocks()):
            local = _local_expert_ids(block)
            if "routed_experts" in groups:
                trains = torch.ones(len(local), dtype=torch.bool)
            elif "associated_experts" in groups:
                trains = router.affinity.mask.any(dim=0)[local].cpu()
            elif "selected_experts" in groups:
                selected = self.esft_selected.get(router.layer_number)
                trains = (selected[local].cpu() if selected is not None
                          else torch.zeros(len(local), dtype=torch.bool))
            else:
                trains = torch.zeros(len(local), dtype=torch.bool)
            if isolate:
                trains &= _reached_by_allowed_tokens(block)
            result.append((block, trains))
        return result

    def _routers_of_blocks(self) -> list[DESMoERouter]:
        """The router of the same MoE layer as each expert block (same module order)."""
        if len(self.routers) != len(self.expert_blocks):
            raise RuntimeError("every DES-MoE layer needs both a DESMoERouter and DES-MoE experts")
        return self.routers

    # ------------------------------------------------------------------ state
    def affinity_by_layer(self) -> dict[int, dict]:
        """{global layer number: AffinityState.state_dict()} for this pipeline stage."""
        return {router.layer_number: router.affinity.state_dict() for router in self.routers}

    def load_affinity_by_layer(self, states: dict[int, dict]) -> None:
        """Restore affinity; the saved window counts are global sums, so one rank per reduce
        group keeps them and the others start from zero (sums stay exact)."""
        for router in self.routers:
            router.affinity.load_state_dict(states[router.layer_number])
            group = router.tp_dp_cp_group
            if dist.is_initialized() and dist.get_rank(group) != 0:
                router.affinity.counts.zero_()
                router.affinity.tokens.zero_()

    def gather_affinity_windows(self) -> None:
        """Before a checkpoint: sum the open window over the ranks that see different
        tokens and keep the sum on one rank, so the saved window is the global one."""
        for router in self.routers:
            group = router.tp_dp_cp_group
            if not (dist.is_initialized() and dist.get_world_size(group) > 1):
                continue
            counts, tokens = router.affinity.window_counts()
            dist.all_reduce(counts, group=group)
            dist.all_reduce(tokens, group=group)
            if dist.get_rank(group) != 0:
                counts.zero_()
                tokens.zero_()


def _group_trains(group: str, groups: frozenset) -> bool:
    if group == "routed_experts":  # decided per expert in _expert_trainability
        return True
    return group in groups


def _reached_by_allowed_tokens(block: DESMoESequentialMLP) -> torch.Tensor:
    counts = block.allowed_tokens.clone()
    group = block.dp_group  # replicas of the same experts (expert data parallel)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return (counts > 0).cpu()


def _local_expert_ids(block: DESMoESequentialMLP) -> torch.Tensor:
    first = block.ep_group.rank() * block.num_local_experts
    return torch.arange(first, first + block.num_local_experts)


def _modules_of(model_chunks, cls) -> list:
    return [module for chunk in model_chunks for module in chunk.modules() if isinstance(module, cls)]

"""DESMoERouter: Megatron's TopKRouter plus the adaptive router, distillation, affinity
statistics and the per-route "allowed" bit for gradient isolation.

Plugged in through the layer spec (`megatron_desmoe.megatron.spec.desmoe_moe_classes`).
The pretrained gate keeps its stock name `router.weight` (frozen) so existing checkpoints
load unchanged; the adapter lives under `router.adapter.*`. Everything the stock router
does (softmax/sigmoid scores, group-limited top-k, expert bias, aux and z losses, top-k
scaling) runs unchanged on the adapted logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402

from megatron_desmoe.desmoe.affinity import AffinityState  # noqa: E402
from megatron_desmoe.desmoe.config import DESMoEConfig  # noqa: E402
from megatron_desmoe.desmoe.distillation import routing_distillation_loss  # noqa: E402
from megatron_desmoe.desmoe.isolation import allowed_routes, encode_allowed  # noqa: E402
from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.megatron.domain_context import current_domain_ids, token_domains  # noqa: E402


class RouterAdapter(torch.nn.Module):
    """hidden -> adapter_hidden -> experts, SiLU; last layer zero-initialised so that the
    adapted router starts exactly at the pretrained routing."""

    def __init__(self, hidden_size: int, adapter_hidden_size: int, num_experts: int,
                 init_method, sequence_parallel: bool):
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden_size, adapter_hidden_size, bias=False)
        self.fc2 = torch.nn.Linear(adapter_hidden_size, num_experts, bias=False)
        with torch.no_grad():
            init_method(self.fc1.weight)
            self.fc2.weight.zero_()
        for param in self.parameters():
            # Replicated across TP like router.weight: with sequence parallelism each TP
            # rank sees different tokens, so finalize_model_grads must sum these grads.
            param.sequence_parallel = sequence_parallel

    def forward(self, hidden_fp32: torch.Tensor) -> torch.Tensor:
        weight1 = self.fc1.weight.to(torch.float32)
        weight2 = self.fc2.weight.to(torch.float32)
        return F.linear(F.silu(F.linear(hidden_fp32, weight1)), weight2)


class DESMoERouter(TopKRouter):
    """TopKRouter with the DES-MoE mechanisms. Runtime switches are set per step by
    `DESMoEController`: kd_weight, collect_affinity, isolation_active."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 desmoe: DESMoEConfig):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.desmoe = desmoe
        self.adapter: Optional[RouterAdapter] = None
        if desmoe.uses_adapter:
            self.adapter = RouterAdapter(
                config.hidden_size, desmoe.adapter_width(config.hidden_size),
                config.num_moe_experts, config.init_method, config.sequence_parallel,
            )
        self.affinity = AffinityState(desmoe.num_domains, config.num_moe_experts,
                                      phi=desmoe.phi, momentum=desmoe.affinity_momentum)
        self.kd_weight = 0.0
        self.collect_affinity = True
        self.isolation_active = False
        self._frozen_logits: Optional[torch.Tensor] = None

    @torch.no_grad()
    def reset_adapter_parameters(self, seed: int) -> None:
        """Initialise the adapter from (seed, global layer number) alone, so every parallel
        layout starts from the same adapter (module-construction RNG order differs with EP/PP)."""
        if self.adapter is None:
            return
        generator = torch.Generator().manual_seed(seed * 1000 + int(self.layer_number))
        weight = self.adapter.fc1.weight
        values = torch.empty(weight.shape, dtype=torch.float32).normal_(
            0.0, self.config.init_method_std, generator=generator)
        weight.copy_(values.to(weight.device, weight.dtype))
        self.adapter.fc2.weight.zero_()

    # ---------------------------------------------------------------- logits
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        frozen_logits = super().gating(input)
        if self.adapter is None:
            return frozen_logits
        self._frozen_logits = frozen_logits.detach()
        return frozen_logits + self.adapter(input.to(torch.float32))

    # ---------------------------------------------------------------- routing
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_len = logits.shape[0]
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        training_pass = self.training and torch.is_grad_enabled()
        if training_pass and self.adapter is not None and self.kd_weight > 0:
            probs = self._attach_distillation(probs, logits)
        self._frozen_logits = None
        domains = self._token_domains(seq_len)
        if training_pass and self.collect_affinity and domains is not None:
            self.affinity.accumulate(routing_map, domains)
        if self.isolation_active and training_pass:
            if domains is None:
                raise ConfigError(
                    "domain_ids", "gradient isolation is on but the batch carries no domain ids",
                    "feed batches with 'domain_ids' (the blend's dataset ids) through "
                    "domain_ids_context",
                )
            allowed = allowed_routes(domains, self.affinity.mask.to(domains.device))
            probs = encode_allowed(probs, allowed)
        return probs, routing_map

    def _token_domains(self, seq_len: int) -> Optional[torch.Tensor]:
        domain_ids = current_domain_ids()
        if domain_ids is None:
            return None
        return token_domains(domain_ids.to(self.weight.device), seq_len)

    def _attach_distillation(self, probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        adapted = logits.view(-1, self.config.num_moe_experts)
        frozen = self._frozen_logits.view(-1, self.config.num_moe_experts)
        kd_loss = routing_distillation_loss(adapted, frozen, self.desmoe.kd_temperature)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        get_moe_metrics_tracker().record(
            "desmoe_kd_loss", kd_loss.detach(), self.layer_number, num_layers,
            reduce_group=self.tp_cp_group, needs_dp_avg=True,
        )
        # Enters backward like Megatron's load-balancing loss: attached to probs, scaled by
        # the schedule's loss scale (1 / num_microbatches).
        return MoEAuxLossAutoScaler.apply(probs, self.kd_weight * kd_loss)

"""DES-MoE classes for the layer spec, and the checks that a Megatron config supports them."""

from __future__ import annotations

from functools import partial

from megatron_desmoe.desmoe.config import DESMoEConfig
from megatron_desmoe.errors import ConfigError
from megatron_desmoe.megatron.domain_context import validate_recompute
from megatron_desmoe.megatron.experts import DESMoESequentialMLP
from megatron_desmoe.megatron.router import DESMoERouter
from megatron_desmoe.models.spec import MoEClasses


def desmoe_moe_classes(desmoe: DESMoEConfig) -> MoEClasses:
    """MoE classes for every method: the same router/experts, the method decides what is on
    (the baselines use no adapter and no isolation, but still record affinity for plots)."""
    return MoEClasses(router=partial(DESMoERouter, desmoe=desmoe), experts=DESMoESequentialMLP)


def validate_megatron_config(config, desmoe: DESMoEConfig) -> None:
    """Refuse Megatron settings DES-MoE cannot honour, before the model is built."""
    desmoe.validate()
    if config.moe_token_dispatcher_type == "flex":
        raise ConfigError(
            "moe_token_dispatcher_type", "the flex (DeepEP/HybridEP) dispatcher fuses "
            "permutation and communication and drops the per-route sign bit that carries "
            "DES-MoE's gradient-isolation mask", "use 'alltoall' or 'allgather'",
        )
    if config.moe_grouped_gemm:
        raise ConfigError(
            "moe_grouped_gemm", "grouped-GEMM experts keep all experts in one weight, so one "
            "expert's gradient cannot be isolated per token", "set moe_grouped_gemm=False "
            "(SequentialMLP experts; TE linears still apply on GPU)",
        )
    if config.context_parallel_size > 1:
        raise ConfigError("context_parallel_size", "domain ids are not split across context "
                          "parallel ranks yet", "use context_parallel_size=1")
    validate_recompute(config)

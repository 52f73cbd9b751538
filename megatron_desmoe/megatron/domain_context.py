"""The channel that carries each sample's domain id to every MoE router.

Megatron's GPTModel.forward has no argument that reaches the router, so the forward step
publishes the micro-batch's domain ids in a context around the model call. Every pipeline
stage and TP rank runs its own forward step with the same batch, so every router sees them.
The router keeps what it needs for backward inside the autograd graph (the allowed bits
travel in the sign of the routing probabilities), so backward needs no context.

Activation recompute of MoE layers would rerun the router in backward, outside the context;
`validate_recompute` refuses that configuration.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from megatron_desmoe.errors import ConfigError

_current: list[Optional[torch.Tensor]] = [None]


@contextlib.contextmanager
def domain_ids_context(domain_ids: Optional[torch.Tensor], num_domains: int) -> Iterator[None]:
    """Publish per-sample domain ids [micro_batch] for the routers during one forward."""
    if domain_ids is not None:
        check_domain_ids(domain_ids, num_domains)
    previous = _current[0]
    _current[0] = domain_ids
    try:
        yield
    finally:
        _current[0] = previous


def current_domain_ids() -> Optional[torch.Tensor]:
    return _current[0]


def check_domain_ids(domain_ids: torch.Tensor, num_domains: int) -> None:
    if domain_ids.dim() != 1:
        raise ConfigError("domain_ids", f"expected one id per sample, got shape "
                          f"{tuple(domain_ids.shape)}", "pass a [micro_batch] integer tensor")
    if domain_ids.numel() and (int(domain_ids.min()) < 0 or int(domain_ids.max()) >= num_domains):
        raise ConfigError(
            "domain_ids", f"ids must lie in [0, {num_domains}), got "
            f"[{int(domain_ids.min())}, {int(domain_ids.max())}]",
            "check the blend's domain order or DESMoEConfig.num_domains",
        )


def token_domains(domain_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Domain of every router token. Router tokens are [seq, batch] flattened seq-major."""
    return domain_ids.to(torch.long).view(1, -1).expand(seq_len, -1).reshape(-1)


def validate_recompute(config) -> None:
    """Refuse activation recompute that would rerun routers outside the domain context."""
    if config.recompute_granularity == "full":
        raise ConfigError(
            "recompute_granularity", "full-layer recompute reruns DES-MoE routers in backward, "
            "where the micro-batch's domain ids are no longer published",
            "use selective recompute without the 'moe' module (e.g. recompute_modules=['core_attn', 'moe_act'])",
        )
    if config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or []):
        raise ConfigError(
            "recompute_modules", "recomputing the 'moe' module reruns DES-MoE routers in backward",
            "drop 'moe' from recompute_modules ('moe_act' is fine)",
        )

"""Router inputs of a Megatron checkpoint on calibration tokens, for fitting stock gates.

The model is built at TP=EP=PP=1 in this process with `CalibrationRouter` in every MoE layer
(plugged through the layer spec): it routes with the adapted logits, as the fine-tuned model
does, and records its inputs. Memory: the whole model plus tokens x hidden x MoE layers floats.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402

from megatron_desmoe.conversion.router_export import AdaptedLogitsFn  # noqa: E402
from megatron_desmoe.models.builder import ParallelConfig, build_gpt_model, transformer_config  # noqa: E402
from megatron_desmoe.models.presets import MoEModelConfig  # noqa: E402
from megatron_desmoe.models.spec import MoEClasses  # noqa: E402
from megatron_desmoe.parallel import init_model_parallel  # noqa: E402


class CalibrationRouter(TopKRouter):
    """TopKRouter that routes with given adapted logits and keeps its inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapted_logits: AdaptedLogitsFn | None = None
        self.captured: list[torch.Tensor] = []

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        hidden = input.reshape(-1, input.shape[-1]).float()
        self.captured.append(hidden.detach().clone())
        logits = self.adapted_logits(self.layer_number - 1, hidden)  # layer_number is 1-based
        return logits.float().reshape(*input.shape[:-1], -1)


def collect_router_inputs(megatron_dir: Path, model: MoEModelConfig, adapted_logits: AdaptedLogitsFn,
                          tokens: torch.Tensor, batch_size: int, dtype: str = "fp32") -> dict[int, torch.Tensor]:
    """{layer: router inputs [tokens, hidden]} from running the checkpoint on `tokens`."""
    init_model_parallel(ParallelConfig())
    config = transformer_config(model, dtype=dtype)
    gpt = build_gpt_model(model, config, moe_classes=MoEClasses(router=CalibrationRouter))
    gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), str(megatron_dir)))
    routers = [m for m in gpt.modules() if isinstance(m, CalibrationRouter)]
    for router in routers:
        router.adapted_logits = adapted_logits
    gpt.eval()
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            positions = torch.arange(batch.shape[1]).expand_as(batch)
            gpt(batch, positions, None)
    return {router.layer_number - 1: torch.cat(router.captured) for router in routers}

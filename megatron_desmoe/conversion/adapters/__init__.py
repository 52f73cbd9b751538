"""One state-dict adapter per Hugging Face MoE family."""

from __future__ import annotations

from megatron_desmoe.conversion.adapters.base import FamilyAdapter
from megatron_desmoe.conversion.adapters.deepseek_v2 import DeepseekV2Adapter
from megatron_desmoe.conversion.adapters.mixtral import MixtralAdapter
from megatron_desmoe.conversion.adapters.olmoe import OlmoeAdapter
from megatron_desmoe.conversion.adapters.qwen2_moe import Qwen2MoeAdapter
from megatron_desmoe.conversion.adapters.qwen3_moe import Qwen3MoeAdapter
from megatron_desmoe.errors import ConfigError

ADAPTERS: dict[str, FamilyAdapter] = {
    adapter.family: adapter
    for adapter in (DeepseekV2Adapter(), MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter(),
                    OlmoeAdapter())
}
_BY_MODEL_TYPE = {adapter.model_type: adapter for adapter in ADAPTERS.values()}


def adapter_for_family(family: str) -> FamilyAdapter:
    if family not in ADAPTERS:
        raise ConfigError("family", f"no Hugging Face adapter for {family!r}", f"use one of {sorted(ADAPTERS)}")
    return ADAPTERS[family]


def adapter_for_model_type(model_type: str) -> FamilyAdapter:
    """The adapter for an HF config.json `model_type` (raises naming the supported ones)."""
    if model_type not in _BY_MODEL_TYPE:
        raise ConfigError("config.json:model_type", f"unknown architecture {model_type!r}",
                          f"convert one of {sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for_family", "adapter_for_model_type"]

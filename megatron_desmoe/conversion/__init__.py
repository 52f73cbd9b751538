"""Checkpoint conversion between Hugging Face and Megatron-Core (docs/conversion.md).

Public names load on first use, so `desmoe-convert --help` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ADAPTERS": "adapters", "adapter_for_family": "adapters", "adapter_for_model_type": "adapters",
    "CheckpointError": "errors",
    "MODEL_JSON": "model_json", "load_model_json": "model_json", "save_model_json": "model_json",
    "Agreement": "router_fit", "fit_linear_gate": "router_fit", "topk_agreement": "router_fit",
    "CalibrationSettings": "router_export", "AdaptedLogitsFn": "router_export",
    "convert_hf_to_megatron": "hf_to_megatron", "hf_model_config": "hf_to_megatron",
    "convert_megatron_to_hf": "megatron_to_hf",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

"""`desmoe_model.json`: the MoEModelConfig stored beside a Megatron checkpoint.

The trainer and the Megatron -> HF converter read the architecture from here; the checkpoint
itself holds only tensors. Extra keys record where the checkpoint came from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import MLAConfig, MoEModelConfig, RopeScaling

MODEL_JSON = "desmoe_model.json"
FORMAT_VERSION = 1
_NESTED = {"mla": MLAConfig, "rope_scaling": RopeScaling}


def model_to_dict(model: MoEModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(model)


def model_from_dict(data: dict[str, Any]) -> MoEModelConfig:
    known = {f.name for f in dataclasses.fields(MoEModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{MODEL_JSON}:{unknown[0]}", "is not a MoEModelConfig field",
                          "remove it or update megatron_desmoe")
    values = dict(data)
    for key, cls in _NESTED.items():
        if values.get(key) is not None:
            values[key] = cls(**values[key])
    return MoEModelConfig(**values).validate()


def save_model_json(directory: Path, model: MoEModelConfig, **provenance) -> Path:
    path = Path(directory) / MODEL_JSON
    payload = {"format_version": FORMAT_VERSION, "model": model_to_dict(model), **provenance}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def load_model_json(directory: Path) -> tuple[MoEModelConfig, dict[str, Any]]:
    """(model config, provenance) stored beside a Megatron checkpoint."""
    path = Path(directory) / MODEL_JSON
    if not path.exists():
        raise ConfigError("megatron_dir", f"{path} is missing",
                          "convert with desmoe-convert hf-to-megatron, or write the file with "
                          "megatron_desmoe.conversion.save_model_json")
    payload = json.loads(path.read_text())
    if payload.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{MODEL_JSON}:format_version", f"{payload.get('format_version')!r}",
                          f"expected {FORMAT_VERSION}")
    provenance = {k: v for k, v in payload.items() if k not in ("format_version", "model")}
    return model_from_dict(payload["model"]), provenance

"""Megatron-Core distributed checkpoint (any layout it was saved at) -> sharded HF safetensors.

Streaming, one process: the checkpoint's metadata lists every tensor with its full shape; the
converter then requests the full tensors of one decoder layer at a time from
`dist_checkpointing.load` (which reassembles them from whatever TP/EP/PP shards were saved),
converts them to HF names/layouts and hands them to a writer that flushes a safetensors shard
whenever `max_shard_size` would be exceeded. Peak memory is about one layer plus one output
shard, not the model (the DES-MoE gate fit is the exception: it runs the whole model).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402

from megatron_desmoe.conversion.adapters import adapter_for_family  # noqa: E402
from megatron_desmoe.conversion.checks import check_megatron_shape  # noqa: E402
from megatron_desmoe.conversion.errors import CheckpointError  # noqa: E402
from megatron_desmoe.conversion.hf_io import ShardedSafetensorsWriter, parse_size  # noqa: E402
from megatron_desmoe.conversion.hf_to_megatron import HF_ASSETS  # noqa: E402
from megatron_desmoe.conversion.mapping import StateDictAdapter, canonical_name, layer_of  # noqa: E402
from megatron_desmoe.conversion.model_json import load_model_json  # noqa: E402
from megatron_desmoe.conversion.progress import ConversionStats, bar  # noqa: E402
from megatron_desmoe.conversion.router_export import (  # noqa: E402
    DEFAULT_ROUTER_EXPORT, ROUTER_EXPORT_MODES, AdaptedLogitsFn, CalibrationSettings,
    adapters_by_layer, agreement_table, calibration_tokens, fit_router_gates, is_adapter_key,
    mlp_adapted_logits, router_weight_name, write_router_sidecar,
)
from megatron_desmoe.conversion.staging import StagedOutput, check_target  # noqa: E402
from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.models.builder import DTYPES  # noqa: E402
from megatron_desmoe.parallel import init_distributed  # noqa: E402

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class ExportPlan:
    """Which checkpoint tensors feed which canonical names, in HF writing order."""

    sources: dict[str, tuple[str, Optional[int]]] = field(default_factory=dict)  # name -> (key, expert)
    groups: list[list[str]] = field(default_factory=list)  # canonical names per loading group
    adapter_keys: list[str] = field(default_factory=list)  # DES-MoE router adapter tensors
    ignored_keys: list[str] = field(default_factory=list)  # non-model state (optimizer, ...)


def tensors_metadata(megatron_dir: Path) -> dict:
    try:
        return dict(dist_checkpointing.load_tensors_metadata(str(megatron_dir)))
    except Exception as err:  # Megatron raises CheckpointingException, or OSError/KeyError
        raise CheckpointError(str(megatron_dir), f"not a readable Megatron distributed checkpoint ({err})",
                              "point to the directory dist_checkpointing.save wrote") from err


def plan_export(metadata: dict, sda: StateDictAdapter) -> ExportPlan:
    """Check names and shapes of every checkpoint tensor; order them layer by layer."""
    plan = ExportPlan()
    for key, info in metadata.items():
        if is_adapter_key(key):
            plan.adapter_keys.append(key)
        elif not key.startswith(_MODEL_PREFIXES):
            plan.ignored_keys.append(key)
        else:
            _plan_key(plan, key, tuple(info.global_shape), sda)
    missing = sorted(sda.mcore_names() - set(plan.sources))
    if missing:
        raise CheckpointError(missing[0], f"missing from the Megatron checkpoint ({len(missing)} tensors "
                              "missing)", "use the desmoe_model.json written with this checkpoint")
    by_layer: dict[Optional[int], list[str]] = {}
    for mapping in sda.mappings:
        by_layer.setdefault(mapping.layer, []).append(mapping.mcore)
    head = [n for n in by_layer.get(None, []) if n.startswith("embedding")]
    tail = [n for n in by_layer.get(None, []) if not n.startswith("embedding")]
    plan.groups = [head] + [by_layer[layer] for layer in sorted(k for k in by_layer if k is not None)] + [tail]
    return plan


def _plan_key(plan: ExportPlan, key: str, shape: tuple[int, ...], sda: StateDictAdapter) -> None:
    stacked = "mlp.experts.experts." in key
    experts = range(shape[0]) if stacked else [None]
    for expert in experts:
        name = canonical_name(key, expert)
        if name not in sda.by_mcore:
            raise CheckpointError(key, f"is not part of a {sda.model.family} model as desmoe_model.json "
                                  "describes it", "use the desmoe_model.json written with this checkpoint")
        check_megatron_shape(name, shape[1:] if stacked else shape, sda, key)
        plan.sources[name] = (key, expert)


def load_full_tensors(megatron_dir: Path, keys: list[str], metadata: dict) -> dict[str, torch.Tensor]:
    """Full tensors for `keys`, reassembled by dist_checkpointing from any saved layout."""
    request = {
        key: ShardedTensor.from_rank_offsets(
            key, torch.empty(tuple(metadata[key].global_shape), dtype=metadata[key].dtype))
        for key in keys
    }
    return dist_checkpointing.load(request, str(megatron_dir), validate_access_integrity=False)


def convert_megatron_to_hf(
    megatron_dir: Path,
    out_dir: Path,
    *,
    max_shard_size: str = "5GB",
    dtype: Optional[str] = None,
    router_export: str = DEFAULT_ROUTER_EXPORT,
    calibration: CalibrationSettings = CalibrationSettings(),
    adapted_logits: Optional[AdaptedLogitsFn] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionStats:
    """Write `out_dir` as an HF checkpoint that AutoModelForCausalLM.from_pretrained loads."""
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    check_target(out_dir, overwrite)
    _check_options(router_export, dtype)
    max_bytes = parse_size(max_shard_size)
    model, sda, metadata, plan = _validated_checkpoint(megatron_dir)
    out_dtype = DTYPES[dtype] if dtype else _weights_dtype(metadata)
    stats = ConversionStats("megatron->hf")
    if plan.ignored_keys:
        stats.notes.append(f"skipped {len(plan.ignored_keys)} non-model entries (e.g. {plan.ignored_keys[0]})")
    router_state, fitted, fits = _router_state(megatron_dir, metadata, plan, model, router_export,
                                               calibration, adapted_logits, progress)
    with StagedOutput(out_dir, overwrite) as staging:
        writer = ShardedSafetensorsWriter(staging, max_bytes)
        for names in bar(plan.groups, len(plan.groups), "megatron->hf (layers)", progress):
            _export_group(names, plan, megatron_dir, metadata, sda, fitted, writer, out_dtype, stats)
        writer.close()
        _write_configs(staging, megatron_dir, adapter_for_family(model.family), model, out_dtype)
        if router_state:
            write_router_sidecar(staging, router_state, dict(
                mode=router_export, hf_gate="fitted" if fitted else "frozen pretrained gate",
                agreement=[fit.as_dict() for fit in fits]))
    stats.finish()
    if progress:
        print(stats.summary(), flush=True)
    return stats


def _check_options(router_export: str, dtype: Optional[str]) -> None:
    if router_export not in ROUTER_EXPORT_MODES:
        raise ConfigError("router_export", f"unknown mode {router_export!r}", f"use one of {ROUTER_EXPORT_MODES}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {dtype!r}", f"use one of {sorted(DTYPES)}")


def _validated_checkpoint(megatron_dir: Path):
    """(model config, adapter, checkpoint metadata, export plan), all names and shapes checked."""
    model, _ = load_model_json(megatron_dir)
    sda = adapter_for_family(model.family).state_dict_adapter(model)
    if init_distributed()[1] > 1:
        raise ConfigError("world_size", "megatron-to-hf runs as one process (it reads any layout)",
                          "run it without torchrun")
    metadata = tensors_metadata(megatron_dir)
    return model, sda, metadata, plan_export(metadata, sda)


def _export_group(names, plan, megatron_dir, metadata, sda, fitted, writer, out_dtype, stats) -> None:
    keys = sorted({plan.sources[name][0] for name in names})
    loaded = load_full_tensors(megatron_dir, keys, metadata)
    for name in names:
        key, expert = plan.sources[name]
        tensor = loaded[key] if expert is None else loaded[key][expert]
        layer = layer_of(name)
        if fitted is not None and layer in fitted and name == router_weight_name(layer):
            tensor = fitted[layer].to(tensor.dtype)
        mapping = sda.by_mcore[name]
        for hf_name, hf_tensor in zip(mapping.hf, mapping.transform.to_hf(tensor)):
            hf_tensor = hf_tensor.to(out_dtype) if hf_tensor.is_floating_point() else hf_tensor
            writer.add(hf_name, hf_tensor)
            stats.count(hf_tensor.numel() * hf_tensor.element_size())


def _weights_dtype(metadata: dict) -> torch.dtype:
    """The floating dtype holding most bytes. Megatron's local norms stay fp32 under bf16, so
    HF output uses this one dtype throughout (bf16 -> fp32 -> bf16 is lossless)."""
    totals: dict[torch.dtype, int] = {}
    for key, info in metadata.items():
        if key.startswith(_MODEL_PREFIXES) and info.dtype.is_floating_point:
            numel = 1
            for size in info.global_shape:
                numel *= size
            totals[info.dtype] = totals.get(info.dtype, 0) + numel * info.dtype.itemsize
    return max(totals, key=totals.get) if totals else torch.float32


def _router_state(megatron_dir, metadata, plan, model, mode, calibration, adapted_logits, progress):
    """(exact router tensors for the side file, fitted gates or None, per-layer fits)."""
    if not plan.adapter_keys:
        return None, None, []
    adapter_tensors = load_full_tensors(megatron_dir, plan.adapter_keys, metadata)
    adapters = adapters_by_layer(adapter_tensors)
    gate_keys = [plan.sources[router_weight_name(layer)][0] for layer in sorted(adapters)]
    frozen_by_key = load_full_tensors(megatron_dir, gate_keys, metadata)
    frozen = {layer: frozen_by_key[key] for layer, key in zip(sorted(adapters), gate_keys)}
    state = {**adapter_tensors, **{router_weight_name(layer): gate for layer, gate in frozen.items()}}
    if mode == "keep":
        return state, None, []
    from megatron_desmoe.conversion.calibration import collect_router_inputs

    logits_fn = adapted_logits or mlp_adapted_logits(frozen, adapters)
    tokens = calibration_tokens(calibration, model.vocab_size)
    hidden = collect_router_inputs(megatron_dir, model, logits_fn, tokens, calibration.batch_size)
    fitted, fits = fit_router_gates(hidden, logits_fn, frozen, model.topk, calibration)
    if progress:
        print("DES-MoE router -> linear gate, top-k agreement with the adapted router:\n"
              + agreement_table(fits), flush=True)
    return state, fitted, fits


def _write_configs(staging: Path, megatron_dir: Path, adapter, model, weights_dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    assets = megatron_dir / HF_ASSETS
    hf_config = adapter.hf_config(model)
    source_config = assets / "config.json"
    if source_config.exists():  # keep the source's special token ids
        source = json.loads(source_config.read_text())
        for name in _TOKEN_FIELDS:
            if name in source:
                setattr(hf_config, name, source[name])
    hf_config.dtype = weights_dtype
    hf_config.save_pretrained(str(staging))
    if (assets / "generation_config.json").exists():
        shutil.copy2(assets / "generation_config.json", staging / "generation_config.json")
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(staging))
    if assets.is_dir():
        for path in assets.iterdir():
            if path.is_file() and path.name not in ("config.json", "generation_config.json"):
                shutil.copy2(path, staging / path.name)

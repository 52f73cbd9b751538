"""Hugging Face safetensors -> Megatron-Core distributed checkpoint, at any TP/EP/PP layout.

Run under torchrun (or as one process). Every rank builds its own stage of the Megatron model
at the requested layout, walks that stage's sharded state dict (global keys, offsets and
shapes of exactly the slices this rank owns), reads only the HF tensors those slices come
from, copies the slices in, and all ranks write one `dist_checkpointing` checkpoint that any
later layout can load.

Memory per rank: this rank's share of the model plus the HF tensors of one Megatron tensor.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory  # noqa: E402
from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402

from megatron_desmoe.conversion.adapters import adapter_for_model_type  # noqa: E402
from megatron_desmoe.conversion.checks import check_hf_names, check_hf_shapes  # noqa: E402
from megatron_desmoe.conversion.errors import CheckpointError  # noqa: E402
from megatron_desmoe.conversion.hf_io import HFCheckpointReader  # noqa: E402
from megatron_desmoe.conversion.mapping import StateDictAdapter, canonical_name, layer_of  # noqa: E402
from megatron_desmoe.conversion.model_json import save_model_json  # noqa: E402
from megatron_desmoe.conversion.progress import ConversionStats, bar  # noqa: E402
from megatron_desmoe.conversion.router_export import (  # noqa: E402
    ROUTER_SIDECAR_JSON, adapters_by_layer, check_router_sidecar, read_router_sidecar, router_weight_name,
)
from megatron_desmoe.conversion.staging import StagedOutput, check_target  # noqa: E402
from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.models.builder import (  # noqa: E402
    DTYPES, ParallelConfig, build_gpt_model, transformer_config, validate_layout,
)
from megatron_desmoe.models.presets import MoEModelConfig  # noqa: E402
from megatron_desmoe.parallel import init_distributed, init_model_parallel, is_rank0  # noqa: E402

HF_ASSETS = "hf_assets"  # non-weight files of the source checkpoint (config, tokenizer, ...)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_ASSET_MAX_BYTES = 200 * 2**20
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_hf_config(hf_dir: Path):
    """(family adapter, transformers config) of an HF checkpoint directory; no weights read."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConfigError("hf_dir", f"{path} is missing", "point to a Hugging Face model directory")
    adapter = adapter_for_model_type(json.loads(path.read_text()).get("model_type"))
    try:
        hf_config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except ValueError as err:
        raise ConfigError("config.json", f"transformers rejects it ({err})", "fix config.json") from err
    return adapter, hf_config


def hf_model_config(hf_dir: Path, name: Optional[str] = None) -> MoEModelConfig:
    """MoEModelConfig of an HF checkpoint (validated)."""
    adapter, hf_config = read_hf_config(hf_dir)
    return adapter.model_config(hf_config, name or Path(hf_dir).name).validate()


def convert_hf_to_megatron(
    hf_dir: Path,
    out_dir: Path,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    use_router_sidecar: bool = True,
    progress: bool = True,
    seed: int = 1234,
) -> ConversionStats:
    """Convert `hf_dir` into a Megatron dist checkpoint at `out_dir`; returns this rank's stats."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_target(out_dir, overwrite)
    model, sda, reader, sidecar = _validated_inputs(hf_dir, parallel, use_router_sidecar)
    dtype_name = _dtype_name(dtype, reader)
    stats = ConversionStats("hf->megatron")
    try:
        sharded = _filled_model_state(model, sda, reader, sidecar, parallel, dtype_name, seed, stats,
                                      progress and is_rank0())
    finally:
        reader.close()
    with StagedOutput(out_dir, overwrite) as staging:
        with synchronous_write_queue():
            dist_checkpointing.save(sharded, str(staging))
        if is_rank0():
            save_model_json(staging, model, source=str(hf_dir.absolute()), dtype=dtype_name,
                            saved_layout=dataclasses.asdict(parallel),
                            world_size=torch.distributed.get_world_size())
            _copy_assets(hf_dir, staging / HF_ASSETS)
    stats.finish()
    if progress and is_rank0():
        print(stats.summary(), flush=True)
    return stats


def _validated_inputs(hf_dir: Path, parallel: ParallelConfig, use_router_sidecar: bool):
    """Config, layout, tensor names and shapes checked (every rank, identically) before any
    weight is read: (model config, state-dict adapter, reader, router side file or None)."""
    adapter, hf_config = read_hf_config(hf_dir)
    model = adapter.model_config(hf_config, hf_dir.name).validate()
    _, world_size = init_distributed()
    # TP > 1 needs sequence parallelism for training; weights and checkpoint do not depend on it.
    validate_layout(model, dataclasses.replace(
        parallel, sequence_parallel=parallel.sequence_parallel or parallel.tensor_parallel > 1), world_size)
    sda = adapter.state_dict_adapter(model)
    reader = HFCheckpointReader(hf_dir)
    check_hf_names(sda, reader.tensors)
    check_hf_shapes(sda, reader.tensors)
    sidecar = read_router_sidecar(hf_dir) if use_router_sidecar else None
    if sidecar is not None:
        check_router_sidecar(sidecar, model)
    return model, sda, reader, sidecar


def _filled_model_state(model, sda, reader, sidecar, parallel, dtype_name, seed, stats, show):
    """This rank's model at the target layout, filled from HF; returns its sharded state dict.

    Built without sequence parallelism (activations only) and without random initialisation
    (every tensor is overwritten; `_fill` fails on any it cannot fill)."""
    build_parallel = dataclasses.replace(parallel, sequence_parallel=False)
    init_model_parallel(build_parallel, seed)
    config = transformer_config(model, build_parallel, dtype=dtype_name, pipeline_dtype=DTYPES[dtype_name],
                                perform_initialization=False)
    sharded = build_gpt_model(model, config, seed=seed).sharded_state_dict()
    _fill(sharded, sda, reader, sidecar, stats, show)
    if sidecar:
        _add_router_adapters(sharded, sidecar)
    return sharded


@contextmanager
def synchronous_write_queue():
    """dist_checkpointing's writer reports results through a queue that it creates, once per
    process, in a spawned multiprocessing Manager (~2 s on a CPU) because async saves write
    from another process. This save is synchronous, in this process: a plain queue does the
    same job. The previous (unset) state is restored afterwards for any later async save."""
    previous = filesystem_async._results_queue
    if previous is None:
        filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        if previous is None:
            filesystem_async._results_queue = None


def _dtype_name(dtype: str, reader: HFCheckpointReader) -> str:
    if dtype == "auto":
        found = reader.dominant_dtype()
        if found not in _DTYPE_NAMES:
            raise ConfigError("dtype", f"checkpoint dtype {found} has no Megatron equivalent", "pass --dtype")
        return _DTYPE_NAMES[found]
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {dtype!r}", f"use auto or one of {sorted(DTYPES)}")
    return dtype


# ---------------------------------------------------------------------- filling
def sharded_tensors(sharded_state_dict) -> list[ShardedTensor]:
    """This rank's ShardedTensors, factories expanded (their data are views of the params)."""
    found = []
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensorFactory):
            found += [v for v in nested_values(value.build()) if isinstance(v, ShardedTensor)]
        elif isinstance(value, ShardedTensor):
            found.append(value)
    return sorted(found, key=_reading_order)


def _reading_order(tensor: ShardedTensor):
    layer = layer_of(tensor.key)
    return (-1 if tensor.key.startswith("embedding") else (layer if layer is not None else 10**9),
            tensor.key, tensor.global_offset)


def _fill(sharded, sda: StateDictAdapter, reader: HFCheckpointReader, sidecar, stats, show) -> None:
    """Copy every local slice from the HF tensors it comes from."""
    tensors = sharded_tensors(sharded)
    cached_name, cached = None, None
    with torch.no_grad():
        for target in bar(tensors, len(tensors), "hf->megatron", show):
            if target.flattened_range is not None:
                raise CheckpointError(target.key, "is flattened (optimizer state?)", "convert model weights only")
            expert = target.global_offset[0] if target.prepend_axis_num else None
            name = canonical_name(target.key, expert)
            if name != cached_name:
                cached_name, cached = name, _full_tensor(name, sda, reader, sidecar, stats)
            target.data.copy_(cached[_local_slice(target)])


def _full_tensor(name: str, sda: StateDictAdapter, reader, sidecar, stats) -> torch.Tensor:
    if sidecar is not None and name in sidecar:  # exact DES-MoE frozen gate
        return sidecar[name]
    mapping = sda.by_mcore.get(name)
    if mapping is None:
        raise CheckpointError(name, "the Megatron model has this tensor but the "
                              f"{sda.model.family} adapter gives it no HF source", "report this as a bug")
    sources = []
    for hf_name in mapping.hf:
        tensor = reader.read(hf_name)
        stats.count(tensor.numel() * tensor.element_size())
        sources.append(tensor)
    return mapping.transform.to_mcore(sources)


def _local_slice(target: ShardedTensor) -> tuple[slice, ...]:
    offsets = target.global_offset[target.prepend_axis_num:]
    return tuple(slice(start, start + size) for start, size in zip(offsets, target.local_shape))


def _add_router_adapters(sharded: dict, sidecar: dict) -> None:
    """DES-MoE adapter tensors, replicated like the router weight of their layer."""
    routers = {t.key: t for t in sharded_tensors(sharded) if t.key.endswith(".mlp.router.weight")}
    for layer, params in sorted(adapters_by_layer(sidecar).items()):
        router = routers.get(router_weight_name(layer))
        if router is None:  # the layer lives on another pipeline stage
            continue
        for suffix, tensor in params.items():
            key = f"decoder.layers.{layer}.mlp.router.adapter.{suffix}"
            sharded[key] = ShardedTensor.from_rank_offsets(
                key, tensor.to(router.data.dtype).clone(), replica_id=router.replica_id)


def _copy_assets(hf_dir: Path, assets: Path) -> None:
    """Tokenizer, config and generation files travel with the checkpoint for the way back."""
    assets.mkdir()
    for path in sorted(Path(hf_dir).iterdir()):
        if (path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES)
                and not path.name.endswith(".index.json") and path.name != ROUTER_SIDECAR_JSON
                and path.stat().st_size <= _ASSET_MAX_BYTES):
            shutil.copy2(path, assets / path.name)

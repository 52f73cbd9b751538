"""Checkpoints in Megatron's distributed format, with DES-MoE state, written atomically.

Layout:  <save>/iter_0000100/   one Megatron dist checkpoint (torch_dist)
         <save>/latest_checkpointed_iteration.txt   written last, atomically
A checkpoint is first written to <save>/.tmp_iter_0000100 and renamed once every rank has
finished, so an interrupted or failed save (out of disk included) leaves the previous
checkpoint and the "latest" pointer untouched.

Contents: model (sharded: loadable at another TP/EP/PP layout), optimizer (fully
reshardable format), LR scheduler, step, consumed samples per data-parallel rank, RNG
states, DES-MoE affinity per layer, ESFT selections, and a description of the model and
domains that is checked on load (a different shape or domain count is refused before
anything is overwritten).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402

from megatron_desmoe.errors import ConfigError  # noqa: E402

LATEST = "latest_checkpointed_iteration.txt"
# Keys without "chained_i." prefixes: expert-parallel layouts chain a second optimizer for
# expert parameters, so prefixed keys would not match across EP sizes.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                       "chained_optim_avoid_prefix": True}


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def latest_iteration(load_dir: str | Path) -> Optional[int]:
    tracker = Path(load_dir) / LATEST
    if not tracker.is_file():
        return None
    return int(tracker.read_text().strip())


def _is_global_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _replica_within_stage() -> tuple[int, int]:
    """0 for exactly one rank of each pipeline stage (TP rank 0 of DP rank 0)."""
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _per_rank_object(key: str, data: Any) -> ShardedObject:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ShardedObject(key, data, (world,), (rank,), replica_id=0)


def _sharded_state(model_chunks, optimizer, controller, extra_per_rank: dict,
                   for_loading: bool) -> dict:
    model_state = _unwrapped(model_chunks).sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=for_loading, metadata=_OPTIMIZER_METADATA)
    if controller is not None:
        for layer, affinity in controller.affinity_by_layer().items():
            state[f"desmoe_affinity_layer_{layer}"] = ShardedObject(
                f"desmoe.affinity.layer_{layer}", affinity, (1,), (0,),
                replica_id=_replica_within_stage())
    for key, value in extra_per_rank.items():
        state[key] = _per_rank_object(key, value)
    return state


def save_checkpoint(save_dir: str | Path, step: int, model_chunks, optimizer, *,
                    controller=None, lr_scheduler=None, common: Optional[dict] = None,
                    per_rank: Optional[dict] = None) -> Path:
    """Write iteration `step` atomically. `common` is identical on every rank (step, data
    position, descriptions); `per_rank` differs per rank (RNG states)."""
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, step)
    staging = save_dir / f".tmp_{final.name}"
    if _is_global_rank0():
        save_dir.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    _barrier()
    if controller is not None:
        controller.gather_affinity_windows()
    state = _sharded_state(model_chunks, optimizer, controller, per_rank or {}, for_loading=False)
    state["common"] = dict(common or {}, step=step, layout=_layout())
    if lr_scheduler is not None:
        state["common"]["lr_scheduler"] = lr_scheduler.state_dict()
    try:
        dist_checkpointing.save(state, str(staging))
    except OSError as error:
        _discard(staging)
        raise OSError(f"saving checkpoint {final} failed ({error}); the previous checkpoint "
                      f"is intact. Free disk space under {save_dir} or choose another --save") from error
    _barrier()
    if _is_global_rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tracker_tmp = save_dir / (LATEST + ".tmp")
        tracker_tmp.write_text(str(step))
        os.replace(tracker_tmp, save_dir / LATEST)
    _barrier()
    return final


def _discard(staging: Path) -> None:
    _barrier()
    if _is_global_rank0() and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def read_common(load_dir: str | Path, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, common state) of the latest (or given) checkpoint, read without a model."""
    if step is None:
        step = latest_iteration(load_dir)
    if step is None:
        raise ConfigError("load", f"no checkpoint in {load_dir} ({LATEST} missing)",
                          "point --load at a directory written by --save, or drop --load")
    path = iteration_dir(load_dir, step)
    if not path.is_dir():
        raise ConfigError("load", f"{path} is missing although {LATEST} names it",
                          "restore the directory or fix the tracker file")
    common = dist_checkpointing.load_common_state_dict(str(path))
    return step, common["common"]


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "ep": parallel_state.get_expert_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def check_compatible(saved: dict, expected: dict) -> None:
    """Refuse a checkpoint whose model or domains differ from this run's."""
    for key in ("model", "num_domains", "domain_names", "method", "tokenizer"):
        if key in expected and key in saved and saved[key] != expected[key]:
            raise ConfigError(
                "load", f"checkpoint {key} {saved[key]!r} differs from this run's {expected[key]!r}",
                "resume with the same model preset, domains and method, or start a new --save dir",
            )


def load_checkpoint(load_dir: str | Path, model_chunks, optimizer, *, controller=None,
                    lr_scheduler=None, expected: Optional[dict] = None,
                    per_rank_keys: tuple[str, ...] = (), step: Optional[int] = None) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the common state (and the
    per-rank objects under their keys when the world size is unchanged)."""
    step, common = read_common(load_dir, step)
    check_compatible(common, expected or {})
    world_changed = common.get("world_size") != (dist.get_world_size() if dist.is_initialized() else 1)
    keys = () if world_changed else per_rank_keys
    template = _sharded_state(model_chunks, optimizer, controller,
                              {key: None for key in keys}, for_loading=True)
    try:
        loaded = dist_checkpointing.load(template, str(iteration_dir(load_dir, step)))
        _unwrapped(model_chunks).load_state_dict(loaded["model"])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    except (KeyError, ValueError, RuntimeError) as error:
        if optimizer is None or common.get("layout") == _layout():
            raise
        raise ConfigError(
            "load", f"the optimizer state saved at layout {common.get('layout')} cannot be "
            f"resharded to {_layout()} ({type(error).__name__})",
            "pass --no-load-optim (model, DES-MoE state and step are still restored), resume "
            "at the saved layout, or use --use-distributed-optimizer for both runs") from error
    if controller is not None:
        controller.load_affinity_by_layer(
            {int(k.rsplit("_", 1)[1]): v for k, v in loaded.items()
             if k.startswith("desmoe_affinity_layer_")})
    if lr_scheduler is not None and "lr_scheduler" in common:
        lr_scheduler.load_state_dict(common["lr_scheduler"])
    result = dict(common)
    result.update({key: loaded[key] for key in keys})
    return result


def load_model_weights(load_dir: str | Path, model_chunks) -> None:
    """Model weights only (a converted base model or another run's result), any layout.
    Parameters the checkpoint lacks (the DES-MoE router adapter) keep their initialisation."""
    path = Path(load_dir)
    step = latest_iteration(path)
    if step is not None:
        path = iteration_dir(path, step)
    if not (path / "metadata.json").is_file():
        raise ConfigError("pretrained", f"{load_dir} holds no Megatron dist checkpoint",
                          "convert the base model with desmoe-convert or give a --save dir")
    model_state = _unwrapped(model_chunks).sharded_state_dict()
    saved_keys = _checkpoint_keys(path)
    wanted = {k: v for k, v in model_state.items() if _sharded_key(v) in saved_keys}
    if not any(not k.endswith("_extra_state") for k in wanted):
        raise ConfigError("pretrained", f"{load_dir} shares no tensor with this model",
                          "check the preset matches the converted model")
    loaded = dist_checkpointing.load({"model": wanted}, str(path))
    missing, _ = _unwrapped(model_chunks).load_state_dict(loaded["model"], strict=False)
    unexpected_missing = [k for k in missing if ".router.adapter." not in k and "_extra_state" not in k]
    if unexpected_missing:
        raise ConfigError("pretrained", f"checkpoint lacks {unexpected_missing[0]} "
                          f"(+{len(unexpected_missing) - 1} more)", "check the model preset")


def _unwrapped(model_chunks):
    """The GPT model inside DDP / Float16Module wrappers (state-dict keys without prefixes)."""
    from megatron_desmoe.training.engine import unwrap_model

    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    return unwrap_model(model_chunks[0])


def _sharded_key(value) -> Optional[str]:
    return getattr(value, "key", None)


def _checkpoint_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    return set(metadata.state_dict_metadata)

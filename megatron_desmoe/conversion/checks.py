"""Validation of checkpoint contents against the model config, before any data is read.

Every problem raises `CheckpointError` naming the tensor, so users see which file or config
field disagrees instead of a reshape error deep inside a conversion.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from megatron_desmoe.conversion.errors import CheckpointError
from megatron_desmoe.conversion.hf_io import TensorInfo
from megatron_desmoe.conversion.mapping import StateDictAdapter
from megatron_desmoe.conversion.shapes import expected_shape

# HF tensors that carry no weights (buffers some older checkpoints saved).
IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")
_FIX_CONFIG = "the weights do not match config.json: check the config (layers, experts, widths) " \
              "or re-download the checkpoint"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{len(names)} in all: {shown}{', ...' if len(names) > 5 else ''}"


def check_hf_names(sda: StateDictAdapter, available: Iterable[str]) -> None:
    available = set(available)
    missing = sorted(sda.hf_names() - available)
    if missing:
        raise CheckpointError(missing[0], f"missing from the checkpoint ({_listing(missing)})", _FIX_CONFIG)
    ignored = {"lm_head.weight"} if sda.model.tie_word_embeddings else set()  # a tied copy
    unexpected = sorted(n for n in available - sda.hf_names() - ignored if not IGNORED_HF.search(n))
    if unexpected:
        raise CheckpointError(unexpected[0], "is in the checkpoint but the model config has no place "
                              f"for it (unexpected tensors: {_listing(unexpected)})", _FIX_CONFIG)


def check_hf_shapes(sda: StateDictAdapter, infos: dict[str, TensorInfo]) -> None:
    """Each HF tensor's header shape against the shape the config implies for it."""
    for mapping in sda.mappings:
        full = expected_shape(mapping.mcore, sda.model)
        wanted = mapping.transform.to_hf(torch.empty(full, device="meta"))
        for name, tensor in zip(mapping.hf, wanted):
            actual = tuple(infos[name].shape)
            if actual != tuple(tensor.shape):
                raise CheckpointError(
                    name, f"shape {list(actual)} does not match the config, which needs "
                    f"{list(tensor.shape)} (for Megatron {mapping.mcore} {list(full)})", _FIX_CONFIG)


def check_megatron_shape(name: str, shape: tuple[int, ...], sda: StateDictAdapter, key: str) -> None:
    expected = expected_shape(name, sda.model)
    if tuple(shape) != expected:
        raise CheckpointError(key, f"shape {list(shape)} (as {name}) does not match desmoe_model.json, "
                              f"which needs {list(expected)}", "use the desmoe_model.json written with "
                              "this checkpoint")

"""Tensor layout transforms between Hugging Face and Megatron-Core weights.

Each transform turns the HF tensors of one mapping row into the one full (unsharded)
Megatron tensor and back. They use only shape operations, so they also run on meta tensors:
the converters use that to check every shape before reading any data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns its memory (safetensors refuses tensors sharing storage)."""
    return tensor.clone(memory_format=torch.contiguous_format)


class Copy:
    """One HF tensor is the Megatron tensor."""

    name = "copy"

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return hf[0]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


class GateUp:
    """SwiGLU: HF gate_proj and up_proj stacked on the output dim into Megatron linear_fc1.

    Megatron's full fc1 is [gate; up] (its sharded checkpoint stores the TP slices of each half
    under the same key at the offsets of this layout), so TP slicing needs no reordering here.
    """

    name = "gate_up"

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [_fresh(half) for half in torch.chunk(tensor, 2, dim=0)]


@dataclass(frozen=True)
class InterleavedQKV:
    """q, k, v projections (weights or biases) into Megatron's fused linear_qkv.

    Megatron groups rows per key/value head: [q heads of group 0, k0, v0, q heads of group 1,
    k1, v1, ...], so that a contiguous TP slice holds whole groups.
    """

    num_heads: int
    num_groups: int
    head_dim: int
    name: str = "qkv"

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = hf
        rest = q.shape[1:]
        g = self.num_groups
        parts = [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        rest = tensor.shape[1:]
        g, d = self.num_groups, self.head_dim
        q_rows = self.num_heads // g * d
        grouped = tensor.reshape(g, q_rows + 2 * d, *rest)
        q, k, v = torch.split(grouped, [q_rows, d, d], dim=1)
        return [_fresh(part).reshape(-1, *rest) for part in (q, k, v)]


COPY = Copy()
GATE_UP = GateUp()

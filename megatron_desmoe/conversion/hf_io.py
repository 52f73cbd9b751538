"""Reading and writing Hugging Face safetensors checkpoints tensor by tensor.

Reading: headers are parsed first (names, dtypes, shapes and byte ranges of every tensor, no
data), which is enough to validate a checkpoint completely, truncation included. Tensors are
then read one at a time through `safe_open` (memory-mapped). Only one shard file is open at a
time: its mapped pages count as resident memory, so a finished shard is closed before the
next is opened and peak memory stays near one shard, not the checkpoint.

Writing: tensors are buffered until the next one would overflow `max_shard_bytes`, then the
buffer is written as one shard; the index names every tensor's shard, as transformers expects.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_desmoe.conversion.errors import CheckpointError
from megatron_desmoe.errors import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_OPEN_FILES = 1  # mapped pages of an open shard count as resident memory


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file; raises CheckpointError if it is cut short."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _truncated(path, "the 8-byte header length is missing")
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > file_size:
            raise _truncated(path, f"the header declares {header_size} bytes, the file has {file_size - 8}")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError as err:
            raise CheckpointError(str(path), f"unreadable safetensors header ({err})",
                                  "re-download or re-save this file") from err
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_size
    infos = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if end > data_size:
            raise _truncated(path, f"tensor {name!r} ends at byte {end} of the data section, "
                                   f"which holds only {data_size} bytes")
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(name, f"dtype {entry['dtype']} is not supported", "use fp32/bf16/fp16")
        infos[name] = TensorInfo(path.name, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return infos


def _truncated(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(str(path), f"truncated safetensors file: {detail}",
                           "re-download or re-copy this shard")


class HFCheckpointReader:
    """Names, shapes and lazily read tensors of a (possibly sharded) HF safetensors checkpoint."""

    def __init__(self, directory: Path, extra_files: tuple[str, ...] = ()):
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        for file_name in self._weight_files():
            self.tensors.update(read_header(self.directory / file_name))
        self._check_index()
        for file_name in extra_files:  # side files, e.g. the DES-MoE router tensors
            self.tensors.update(read_header(self.directory / file_name))
        self._handles: OrderedDict[str, object] = OrderedDict()

    def _weight_files(self) -> list[str]:
        index = self.directory / INDEX_NAME
        if index.exists():
            self._weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(self._weight_map.values()))
            for file_name in files:
                if not (self.directory / file_name).exists():
                    tensor = next(k for k, v in self._weight_map.items() if v == file_name)
                    raise CheckpointError(file_name, f"listed in {INDEX_NAME} (e.g. for {tensor!r}) "
                                          "but missing", "copy the complete checkpoint")
            return files
        self._weight_map = None
        if (self.directory / SINGLE_NAME).exists():
            return [SINGLE_NAME]
        if any(self.directory.glob("*.bin")):
            raise ConfigError("hf_dir", "only PyTorch .bin weights found",
                              "re-save with save_pretrained(..., safe_serialization=True)")
        raise ConfigError("hf_dir", f"no {SINGLE_NAME} or {INDEX_NAME} in {self.directory}",
                          "point to a Hugging Face checkpoint directory")

    def _check_index(self) -> None:
        if self._weight_map is None:
            return
        for name, file_name in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file != file_name:
                raise CheckpointError(name, f"{INDEX_NAME} places it in {file_name}, which does "
                                      "not hold it", "re-create the index or re-download")

    def dominant_dtype(self) -> torch.dtype:
        """The floating dtype holding most bytes (the checkpoint's precision)."""
        totals: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        return max(totals, key=totals.get) if totals else torch.float32

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self._handle(info.file).get_tensor(name)

    def _handle(self, file_name: str):
        if file_name in self._handles:
            self._handles.move_to_end(file_name)
            return self._handles[file_name]
        if len(self._handles) >= _OPEN_FILES:
            _, oldest = self._handles.popitem(last=False)
            oldest.__exit__(None, None, None)
        handle = safe_open(str(self.directory / file_name), framework="pt")
        self._handles[file_name] = handle.__enter__()
        return self._handles[file_name]

    def close(self) -> None:
        while self._handles:
            _, handle = self._handles.popitem()
            handle.__exit__(None, None, None)


class ShardedSafetensorsWriter:
    """Writes tensors into shards of at most `max_shard_bytes` plus the HF index."""

    def __init__(self, directory: Path, max_shard_bytes: int, prefix: str = "model"):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self._shard_path(len(self._shards), None)
        save_file(self._pending, str(path), metadata={"format": "pt"})
        readable_by_all(path)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _shard_path(self, index: int, count: Optional[int]) -> Path:
        suffix = f"-of-{count:05d}" if count else ".partial"
        return self.directory / f"{self.prefix}-{index + 1:05d}{suffix}.safetensors"

    def close(self) -> Path:
        """Flush, give shards their final `-0000i-of-0000n` names, write the index."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for index, names in enumerate(self._shards):
            final = self._shard_path(index, count)
            os.replace(self._shard_path(index, None), final)
            weight_map.update({name: final.name for name in names})
        index_path = self.directory / (INDEX_NAME if self.prefix == "model" else f"{self.prefix}.safetensors.index.json")
        index_path.write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
        return index_path


def readable_by_all(path: Path) -> None:
    """safetensors creates files owner-only (0600); checkpoints are shared with serving users."""
    os.chmod(path, 0o644)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (the HF max_shard_size convention)."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ConfigError("max_shard_size", f"cannot read {text!r}", "write e.g. 5GB, 500MB or 2GiB")
    number, unit = match.groups()
    unit = (unit or "").upper().rstrip("B") if (unit or "").upper() != "B" else "B"
    size = int(float(number) * _UNITS[unit])
    if size <= 0:
        raise ConfigError("max_shard_size", "must be positive", "write e.g. 5GB")
    return size

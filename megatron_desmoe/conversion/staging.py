"""Output directories that appear complete or not at all.

Everything is written into a hidden staging directory beside the target
(`.<name>.partial`, the same path on every rank) and renamed onto the target at the end, so a
failed or interrupted conversion never leaves a half-written target behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_desmoe.errors import ConfigError


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing target unless overwrite; call before any work."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConfigError("out", f"{target} already exists", "pass --overwrite or choose a new directory")
    if target.exists() and not target.is_dir():
        raise ConfigError("out", f"{target} is a file", "choose a directory path")


class StagedOutput:
    """with StagedOutput(target, overwrite) as staging: write into `staging`; renamed on success."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.staging = self.target.parent / f".{self.target.name}.partial"

    def __enter__(self) -> Path:
        check_target(self.target, self.overwrite)
        if _rank0():
            shutil.rmtree(self.staging, ignore_errors=True)  # left by an interrupted run
            self.staging.mkdir(parents=True)
        _barrier()
        return self.staging

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            _barrier()  # every rank has finished writing
            if _rank0():
                self._commit()
            _barrier()
        elif _rank0():
            shutil.rmtree(self.staging, ignore_errors=True)
        return False

    def _commit(self) -> None:
        old = self.target.parent / f".{self.target.name}.old"
        if self.target.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
        self.staging.rename(self.target)
        shutil.rmtree(old, ignore_errors=True)

"""Fixtures for the conversion tests: tiny random HF checkpoints of every family (built with
transformers' own classes) and their Megatron conversions, each made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from conversion_models import save_hf_model


@pytest.fixture(scope="session")
def world():
    """A process group of one (dist_checkpointing and Megatron need one)."""
    from megatron_desmoe.parallel import init_distributed

    return init_distributed()


class _Zoo:
    """family -> checkpoint directory, created on first use."""

    def __init__(self, root: Path, make):
        self.root, self.make, self.paths = root, make, {}

    def __getitem__(self, family: str) -> Path:
        if family not in self.paths:
            self.paths[family] = self.make(family, self.root / family)
        return self.paths[family]


@pytest.fixture(scope="session")
def hf_zoo(tmp_path_factory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("hf"), lambda family, path: save_hf_model(family, path))


@pytest.fixture(scope="session")
def megatron_zoo(tmp_path_factory, hf_zoo, world) -> _Zoo:
    from megatron_desmoe.conversion import convert_hf_to_megatron

    def convert(family: str, path: Path) -> Path:
        convert_hf_to_megatron(hf_zoo[family], path, progress=False)
        return path

    return _Zoo(tmp_path_factory.mktemp("megatron"), convert)


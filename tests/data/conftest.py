"""Fixtures of the data tests: one small SentencePiece model per session, the real corpus."""

from __future__ import annotations

import pytest

from data_fixtures import train_small_tokenizer
from megatron_desmoe.settings import domain_data_dir


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """Path of a small (600-piece) SentencePiece model trained on synthetic multi-script text."""
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer") / "small.model")


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model):
    from megatron_desmoe.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(sp_model)


@pytest.fixture(scope="session")
def corpus_dir():
    path = domain_data_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"the shared multi-domain corpus is absent ({path}; set DESMOE_DATA_DIR)")
    return path

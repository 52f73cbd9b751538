"""Megatron datasets over the blend: domain labels, loss masks over packed spans, selection, ranks."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import socket
from collections import Counter

import numpy as np
import pytest
import torch

from data_fixtures import read_documents
from megatron_desmoe.data.blend import load_blend
from megatron_desmoe.data.dataset import DomainGPTDataset, build_domain_datasets, sample_domain_ids
from megatron_desmoe.data.errors import DataError, TokenizerMismatchError
from megatron_desmoe.data.preprocess import PreprocessOptions, preprocess
from megatron_desmoe.data.tokenizer import TokenizerSpec
from megatron_desmoe.errors import ConfigError
from synthetic_domains import make_domains

SEQ = 48
NAMES = ["general", "math", "law", "translation"]


@pytest.fixture(scope="module")
def blend_dir(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("blend")
    sources, _ = make_domains(root / "inputs", count=40, names=NAMES)
    preprocess(sources, PreprocessOptions(output=root / "out", tokenizer=TokenizerSpec("sentencepiece", str(sp_model)),
                                          valid_fraction=0.2, progress=False))
    return root / "out"


@pytest.fixture(scope="module")
def stored(blend_dir):
    """Per domain and split: documents and masks as stored, read with Megatron's IndexedDataset."""
    blend = load_blend(blend_dir)
    return {(d.name, split): (read_documents(files.text_prefix), read_documents(files.loss_mask_prefix))
            for d in blend.domains for split, files in (("train", d.train), ("valid", d.valid))}


def _locate(piece, documents, masks):
    """Masks of every stored document span equal to `piece` (tokens), as lists."""
    found = []
    for doc, mask in zip(documents, masks):
        for start in np.flatnonzero(doc == piece[0]):
            if start + len(piece) <= len(doc) and np.array_equal(doc[start:start + len(piece)], piece):
                found.append(mask[start:start + len(piece)].tolist())
    return found


def _check_sample(sample, documents, masks, eos_id):
    """Every EOS-delimited piece of the sample lies in one of `documents`, and the sample's loss
    mask over the piece's label positions is that document span's stored mask."""
    window = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
    # window_mask[i]: the loss weight of predicting window[i]; window[0] is never predicted.
    window_mask = [None] + sample["loss_mask"].tolist()
    start = 0
    for piece in np.split(window, np.flatnonzero(window == eos_id) + 1):
        if len(piece) == 0:
            continue
        actual = window_mask[start:start + len(piece)]
        candidates = _locate(piece, documents, masks)
        assert candidates, f"piece {piece[:8]}... is in no document of the sample's domain"
        assert any(all(a is None or a == c for a, c in zip(actual, candidate)) for candidate in candidates), (
            f"loss mask {actual} matches no stored mask of the piece: {candidates}")
        start += len(piece)


def test_every_training_sample_comes_from_its_labelled_domain(blend_dir, stored, sp_tokenizer):
    datasets = build_domain_datasets(blend_dir, SEQ, sp_tokenizer, train_samples=120, seed=3)
    assert datasets.domain_names == NAMES
    ids = sample_domain_ids(datasets.train)
    assert len(ids) == len(datasets.train) >= 120
    assert set(ids.tolist()) == set(range(len(NAMES)))
    for index in range(len(datasets.train)):
        sample = datasets.train[index]
        assert sample["domain_id"] == ids[index] == sample["dataset_id"]
        documents, masks = stored[(NAMES[sample["domain_id"]], "train")]
        _check_sample(sample, documents, masks, sp_tokenizer.eos_id)
        assert sample["tokens"].shape == (SEQ,) and sample["position_ids"].tolist() == list(range(SEQ))


def test_blend_weights_set_the_mixture(blend_dir, sp_tokenizer):
    blend = load_blend(blend_dir)
    datasets = build_domain_datasets(blend_dir, SEQ, sp_tokenizer, train_samples=400, seed=1)
    counts = np.bincount(sample_domain_ids(datasets.train), minlength=len(NAMES))
    weights = np.array([d.weight for d in blend.domains])
    assert np.allclose(counts / counts.sum(), weights / weights.sum(), atol=0.01)


def test_domain_subset_keeps_blend_ids_and_weight_override(blend_dir, stored, sp_tokenizer):
    datasets = build_domain_datasets(blend_dir, SEQ, sp_tokenizer.fingerprint(), train_samples=200,
                                     valid_samples=5, domains=["translation", "math"],
                                     weights={"math": 1.0, "translation": 3.0})
    counts = Counter(sample_domain_ids(datasets.train).tolist())
    assert set(counts) == {1, 3}  # the blend's ids of math and translation
    assert 2.7 < counts[3] / counts[1] < 3.3
    assert sorted(datasets.valid) == ["math", "translation"]
    for index in range(0, len(datasets.train), 7):
        sample = datasets.train[index]
        _check_sample(sample, *stored[(NAMES[sample["domain_id"]], "train")], sp_tokenizer.eos_id)


def test_single_domain_training_set(blend_dir, sp_tokenizer):
    datasets = build_domain_datasets(blend_dir, SEQ, sp_tokenizer, train_samples=10, domains=["law"])
    assert isinstance(datasets.train, DomainGPTDataset)
    assert set(sample_domain_ids(datasets.train).tolist()) == {2}
    assert datasets.train[0]["domain_id"] == 2


def test_full_validation_covers_every_validation_token(blend_dir, stored, sp_tokenizer):
    datasets = build_domain_datasets(blend_dir, SEQ, sp_tokenizer, train_samples=20)
    assert sorted(datasets.valid) == sorted(NAMES)
    for name, dataset in datasets.valid.items():
        documents, masks = stored[(name, "valid")]
        answer_tokens = sum(int(m.sum()) for m in masks)
        total = 0
        for index in range(len(dataset)):
            sample = dataset[index]
            assert sample["domain_id"] == NAMES.index(name)
            real = sample["labels"] != 0  # padding labels read as 0 (never a real token here)
            _check_sample({k: v[real] if torch.is_tensor(v) else v for k, v in sample.items()},
                          documents, masks, sp_tokenizer.eos_id)
            total += int(sample["loss_mask"].sum())
        first_is_answer = 1  # the epoch's first token is never a label; for plain text it is an answer
        assert answer_tokens - first_is_answer <= total <= answer_tokens


def test_tokenizer_mismatch_is_refused(blend_dir):
    with pytest.raises(TokenizerMismatchError, match="tokenized with"):
        build_domain_datasets(blend_dir, SEQ, "sentencepiece-sha256:" + "0" * 64, train_samples=10)


def test_selection_and_size_errors(blend_dir, sp_tokenizer):
    for kwargs, match in (({"domains": ["poetry"]}, "poetry"), ({"domains": []}, "empty"),
                          ({"weights": {"math": 0.0}}, "not positive"),
                          ({"domains": ["law"], "weights": {"math": 1.0}}, "not among"),
                          ({"train_samples": 0}, "train_samples")):
        arguments = {"train_samples": 10, **kwargs}
        with pytest.raises(ConfigError, match=match):
            build_domain_datasets(blend_dir, SEQ, sp_tokenizer, **arguments)


def test_blend_errors_name_the_problem(tmp_path, blend_dir):
    copy = tmp_path / "copy"
    shutil.copytree(blend_dir, copy, ignore=shutil.ignore_patterns("cache"))
    original = (copy / "blend.json").read_text()
    blend = json.loads(original)
    blend["domains"][1]["domain_id"] = 5
    (copy / "blend.json").write_text(json.dumps(blend))
    with pytest.raises(DataError, match="domain_id 5"):
        load_blend(copy)
    (copy / "blend.json").write_text(original)
    assert load_blend(copy).names == NAMES
    (copy / "math" / "train_loss_mask_document.idx").unlink()
    with pytest.raises(DataError, match=r"domain 'math' \(train\) needs .*math/train_loss_mask_document\.idx"):
        load_blend(copy / "blend.json")
    with pytest.raises(ConfigError, match="no blend file"):
        load_blend(tmp_path / "absent.json")


# --------------------------------------------------------------------------- two ranks


def _rank_main(rank, port, blend_dir, cache_dir, fingerprint, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        datasets = build_domain_datasets(blend_dir, SEQ, fingerprint, train_samples=60, cache_dir=cache_dir)
        digest = hashlib.sha256()
        for index in range(len(datasets.train)):
            sample = datasets.train[index]
            digest.update(sample["tokens"].numpy().tobytes() + sample["loss_mask"].numpy().tobytes())
            digest.update(bytes([sample["domain_id"]]))
        results.put((rank, digest.hexdigest()))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_build_identical_datasets(blend_dir, tmp_path, sp_tokenizer):
    # spawn, not fork: forking a process whose gloo world is already up (earlier tests in the
    # same session) crashes the children
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [context.Process(target=_rank_main, args=(rank, port, blend_dir, tmp_path / "cache",
                                                          sp_tokenizer.fingerprint(), results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    digests = dict(results.get(timeout=5) for _ in processes)
    single = build_domain_datasets(blend_dir, SEQ, sp_tokenizer, train_samples=60, cache_dir=tmp_path / "cache")
    digest = hashlib.sha256()
    for index in range(len(single.train)):
        sample = single.train[index]
        digest.update(sample["tokens"].numpy().tobytes() + sample["loss_mask"].numpy().tobytes())
        digest.update(bytes([sample["domain_id"]]))
    assert digests[0] == digests[1] == digest.hexdigest()
    assert any(p.name.endswith("shuffle_index.npy") for p in (tmp_path / "cache").iterdir())

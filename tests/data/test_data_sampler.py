"""Micro-batch sampling: Megatron's sharding in mixed mode, one domain per micro-batch, resuming."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from megatron_desmoe.data.sampler import MicroBatchSampler, build_data_loader, collate
from megatron_desmoe.errors import ConfigError


def megatron_pretraining_batches(total, consumed, micro_batch_size, rank, size):
    """Megatron-LM's MegatronPretrainingSampler.__iter__ (drop_last=True), written out."""
    batch, out = [], []
    for index in range(consumed, total):
        batch.append(index)
        if len(batch) == micro_batch_size * size:
            out.append(batch[rank * micro_batch_size:(rank + 1) * micro_batch_size])
            batch = []
    return out


@pytest.mark.parametrize("total, mbs, size, consumed", [(100, 3, 2, 0), (100, 3, 2, 30), (57, 2, 4, 8), (10, 1, 1, 3)])
def test_mixed_mode_is_megatrons_pretraining_sampler(total, mbs, size, consumed):
    for rank in range(size):
        sampler = MicroBatchSampler(total, mbs, rank, size, consumed_samples=consumed)
        batches = list(sampler)
        assert batches == megatron_pretraining_batches(total, consumed, mbs, rank, size)
        assert len(sampler) == len(batches)


def _domains(counts, seed=0):
    labels = np.concatenate([np.full(n, d) for d, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def test_domain_pure_micro_batches_hold_one_domain_and_keep_the_blend_share():
    domains = _domains([300, 120, 45])
    mbs, size = 4, 2
    per_rank = [list(MicroBatchSampler(len(domains), mbs, rank, size, mode="domain_pure",
                                       sample_domains=domains, seed=5)) for rank in range(size)]
    assert len(per_rank[0]) == len(per_rank[1])
    batches = [batch for rank_batches in per_rank for batch in rank_batches]
    assert all(len(set(domains[batch].tolist())) == 1 for batch in batches)
    used = [index for batch in batches for index in batch]
    assert len(used) == len(set(used))  # no sample twice
    by_domain = Counter(int(domains[batch[0]]) for batch in batches)
    total_batches = (300 // mbs + 120 // mbs + 45 // mbs) // size * size
    assert sum(by_domain.values()) == total_batches
    assert abs(by_domain[0] - 75 * total_batches / 116) <= 3  # 300/4 of 116 micro-batches
    # In some global step the two ranks train different domains.
    assert any(domains[a[0]] != domains[b[0]] for a, b in zip(*per_rank))


def test_domain_pure_order_within_a_domain_follows_the_dataset():
    domains = _domains([40, 40])
    batches = list(MicroBatchSampler(len(domains), 5, mode="domain_pure", sample_domains=domains, seed=1))
    for domain in (0, 1):
        mine = [index for batch in batches if domains[batch[0]] == domain for index in batch]
        assert mine == np.flatnonzero(domains == domain).tolist()


def test_domain_pure_is_seeded():
    domains = _domains([60, 60, 60])
    make = lambda seed: list(MicroBatchSampler(len(domains), 3, mode="domain_pure", sample_domains=domains, seed=seed))
    assert make(7) == make(7)
    assert make(7) != make(8)


@pytest.mark.parametrize("mode", ["mixed", "domain_pure"])
def test_resuming_continues_the_same_sequence(mode):
    domains = _domains([200, 90, 30])
    mbs, size, steps_done = 2, 3, 7
    for rank in range(size):
        make = lambda consumed: list(MicroBatchSampler(len(domains), mbs, rank, size, consumed_samples=consumed,
                                                       mode=mode, sample_domains=domains, seed=3))
        assert make(steps_done * mbs * size) == make(0)[steps_done:]


def test_sampler_errors():
    with pytest.raises(ConfigError, match="mode"):
        MicroBatchSampler(10, 2, mode="round_robin")
    with pytest.raises(ConfigError, match="consumed_samples"):
        MicroBatchSampler(10, 4, consumed_samples=6)
    with pytest.raises(ConfigError, match="rank"):
        MicroBatchSampler(10, 2, data_parallel_rank=2, data_parallel_size=2)
    with pytest.raises(ConfigError, match="sample_domains"):
        MicroBatchSampler(10, 2, mode="domain_pure")


def _sample(seq, domain):
    return {"tokens": torch.arange(seq), "labels": torch.arange(1, seq + 1), "loss_mask": torch.ones(seq),
            "position_ids": torch.arange(seq), "domain_id": domain, "dataset_id": np.int16(domain)}


def test_collate_shapes_and_types():
    batch = collate([_sample(6, 2), _sample(6, 0)])
    assert batch["tokens"].shape == (2, 6) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["domain_ids"].tolist() == [2, 0] and batch["domain_ids"].dtype == torch.int64


def test_data_loader_yields_domain_pure_batches():
    domains = _domains([12, 8])
    dataset = [_sample(4, int(d)) for d in domains]
    sampler = MicroBatchSampler(len(dataset), 4, mode="domain_pure", sample_domains=domains, seed=0)
    batches = list(build_data_loader(dataset, sampler))
    assert len(batches) == 5
    assert all(len(set(b["domain_ids"].tolist())) == 1 for b in batches)

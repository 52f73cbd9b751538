"""Micro-batches for the trainer: which samples each data-parallel rank reads, resumable.

Both modes number the run's micro-batches j = 0, 1, 2, ... (each `micro_batch_size` sample
indices of the training dataset). A global step takes `data_parallel_size` consecutive
micro-batches per accumulation slot and rank r reads the r-th of them, so after
`consumed_samples` (counted over all ranks) rank r continues at j = consumed/mbs + r, then
+dp each time. All ranks yield the same number of micro-batches.

* `mixed`: micro-batch j holds samples [j*mbs, (j+1)*mbs) of the blended dataset, so the
  domains are mixed inside a micro-batch as the blend interleaves them. This is exactly
  Megatron's MegatronPretrainingSampler.
* `domain_pure`: every micro-batch holds one domain. The samples of domain d (in the blended
  dataset's order) are cut into floor(n_d / mbs) micro-batches (the last n_d mod mbs samples
  are left out); the sequence of micro-batch domains is a permutation, drawn with `seed`, of
  all those micro-batches, so over the run each domain gets its blend share, in random order.
  The micro-batches of one global step, on different ranks or accumulation slots, can
  therefore be of different domains. The schedule depends only on the dataset, mbs and the
  seed, so resuming from consumed_samples continues it exactly.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_desmoe.errors import ConfigError

MODES = ("mixed", "domain_pure")


class MicroBatchSampler(torch.utils.data.Sampler):
    """A batch sampler: yields this rank's micro-batches as lists of dataset indices."""

    def __init__(self, total_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, consumed_samples: int = 0, mode: str = "mixed",
                 sample_domains: Optional[Sequence[int]] = None, seed: int = 0):
        _check(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size,
               consumed_samples, mode, sample_domains)
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.mode = mode
        # mixed: row j is computed on the fly; domain_pure: the shuffled table of rows.
        self.table = None if mode == "mixed" else domain_pure_table(
            np.asarray(sample_domains), micro_batch_size, seed)
        self.num_micro_batches = (total_samples // micro_batch_size if self.table is None
                                  else len(self.table))

    def micro_batch(self, j: int) -> list[int]:
        """Sample indices of the run's j-th micro-batch (all ranks agree on it)."""
        if self.table is None:
            return list(range(j * self.micro_batch_size, (j + 1) * self.micro_batch_size))
        return self.table[j].tolist()

    def _first_and_count(self) -> tuple[int, int]:
        first = self.consumed_samples // self.micro_batch_size
        groups = max(0, (self.num_micro_batches - first) // self.data_parallel_size)
        return first + self.data_parallel_rank, groups

    def __iter__(self) -> Iterator[list[int]]:
        start, count = self._first_and_count()
        for step in range(count):
            yield self.micro_batch(start + step * self.data_parallel_size)

    def __len__(self) -> int:
        return self._first_and_count()[1]


def domain_pure_table(sample_domains: np.ndarray, micro_batch_size: int, seed: int) -> np.ndarray:
    """[num_micro_batches, micro_batch_size] sample indices, one domain per row.

    Which domain each row has is a seeded permutation of all the domains' rows; the k-th row
    of domain d is its k-th chunk of samples in dataset order.
    """
    chunks = {}
    for domain in np.unique(sample_domains):
        indices = np.flatnonzero(sample_domains == domain)
        usable = len(indices) // micro_batch_size * micro_batch_size
        chunks[domain] = indices[:usable].reshape(-1, micro_batch_size)
    labels = np.concatenate([np.full(len(rows), domain) for domain, rows in chunks.items()] or [np.zeros(0)])
    labels = np.random.default_rng(seed).permutation(labels)
    table = np.zeros((len(labels), micro_batch_size), dtype=np.int64)
    for domain, rows in chunks.items():
        table[labels == domain] = rows
    return table


def _check(total_samples, micro_batch_size, rank, size, consumed, mode, sample_domains) -> None:
    if mode not in MODES:
        raise ConfigError("batching mode", f"'{mode}' is not a mode", f"use one of {', '.join(MODES)}")
    if micro_batch_size < 1:
        raise ConfigError("micro_batch_size", f"{micro_batch_size} < 1", "use 1 or more")
    if size < 1 or not 0 <= rank < size:
        raise ConfigError("data_parallel_rank", f"rank {rank} of {size}", "use 0 <= rank < size")
    if consumed < 0 or consumed % micro_batch_size:
        raise ConfigError("consumed_samples", f"{consumed} is not a multiple of the micro-batch "
                          f"size {micro_batch_size}", "resume from a step boundary")
    if mode == "domain_pure" and (sample_domains is None or len(sample_domains) != total_samples):
        raise ConfigError("sample_domains", "domain_pure batching needs the domain of every sample",
                          "pass sample_domains=sample_domain_ids(train_dataset)")


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into {tokens, labels, position_ids: int64 [b, s], loss_mask: float [b, s],
    domain_ids: int64 [b]}."""
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]).long(),
        "labels": torch.stack([s["labels"] for s in samples]).long(),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
        "position_ids": torch.stack([s["position_ids"] for s in samples]).long(),
        "domain_ids": torch.tensor([int(s["domain_id"]) for s in samples], dtype=torch.int64),
    }


def build_data_loader(dataset, sampler: MicroBatchSampler, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader yielding collated micro-batches in the sampler's order."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)

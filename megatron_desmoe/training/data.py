"""The trainer's view of the data: micro-batch iterators, per-domain losses, domain ids.

Domain ids: the blend numbers every domain it holds (general text included); the model's
DES-MoE layers number only the fine-tuning domains, 0..D-1 in the order the run lists them.
Batches are remapped here, so the affinity matrix has one row per fine-tuned domain.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import parallel_state  # noqa: E402

from megatron_desmoe.data.blend import load_blend  # noqa: E402
from megatron_desmoe.data.dataset import build_domain_datasets, sample_domain_ids  # noqa: E402
from megatron_desmoe.data.sampler import MicroBatchSampler, build_data_loader  # noqa: E402
from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.megatron.domain_context import domain_ids_context  # noqa: E402
from megatron_desmoe.training.engine import gpt_forward_step  # noqa: E402


def fine_tuning_domains(config) -> list[str]:
    blend = load_blend(config.data_blend)
    names = list(config.domains) if config.domains else blend.names
    for name in names:
        blend.domain(name)  # ConfigError naming the valid domains
    if len(set(names)) != len(names):
        raise ConfigError("domains", f"{names} repeats a domain", "list each domain once")
    return names


def blend_vocab_size(config) -> int:
    return int(load_blend(config.data_blend).tokenizer["vocab_size"])


class DomainData:
    def __init__(self, config, domain_names: list[str], world_size: int):
        self.config = config
        self.blend = load_blend(config.data_blend)
        self.domain_names = domain_names
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.remap = torch.full((len(self.blend.names),), -1, dtype=torch.long)
        for index, name in enumerate(domain_names):
            self.remap[self.blend.domain(name).domain_id] = index
        fingerprint = _run_tokenizer_fingerprint(config) or self.blend.tokenizer["fingerprint"]
        # the same validation samples whatever the layout: eval_iters micro-batches in total
        valid_samples = config.eval_iters * config.micro_batch_size
        weights = (dict(zip(domain_names, config.domain_weights))
                   if config.domain_weights else None)
        built = build_domain_datasets(
            self.blend.path, config.seq_length, fingerprint,
            train_samples=config.train_iters * config.global_batch_size,
            valid_samples=valid_samples, seed=config.seed, domains=domain_names, weights=weights)
        self.train = built.train
        self.valid = dict(built.valid)
        others = [name for name in self.blend.names
                  if name not in domain_names and self.blend.domain(name).valid is not None]
        if others:  # evaluation-only domains (the general text that measures forgetting)
            extra = build_domain_datasets(
                self.blend.path, config.seq_length, fingerprint, train_samples=1,
                valid_samples=valid_samples, seed=config.seed, domains=others)
            self.valid.update(extra.valid)
        self._sums = torch.zeros(len(domain_names), 2, dtype=torch.float64)

    # ------------------------------------------------------------------ iterators
    def _iterator(self, dataset, consumed: int, mode: str) -> Iterator[dict]:
        sampler = MicroBatchSampler(
            len(dataset), self.config.micro_batch_size, self.dp_rank, self.dp_size,
            consumed_samples=consumed, mode=mode, seed=self.config.seed,
            sample_domains=sample_domain_ids(dataset) if mode == "domain_pure" else None)
        for batch in build_data_loader(dataset, sampler):
            batch["domain_ids"] = self.remap[batch["domain_ids"]]
            yield batch

    def train_iterator(self, consumed_samples: int) -> Iterator[dict]:
        mode = "domain_pure" if self.config.domain_pure_batches else "mixed"
        return self._iterator(self.train, consumed_samples, mode)

    def validation_domains(self) -> list[str]:
        return [name for name in self.blend.names if name in self.valid]

    def validation_iterator(self, name: str) -> Iterator[dict]:
        for batch in self._iterator(self.valid[name], 0, "mixed"):
            batch.pop("domain_ids")  # evaluation needs no domain ids (and general has none)
            yield batch

    def esft_sample_microbatches(self) -> int:
        """A few micro-batches per domain, at most what the training mixture holds."""
        wanted = max(2, self.config.eval_iters) * len(self.domain_names)
        available = len(self.train) // (self.config.micro_batch_size * self.dp_size)
        return max(1, min(wanted, available))

    def esft_sample_iterator(self) -> Iterator[dict]:
        """A sample of the training mixture for ESFT's expert relevance scores."""
        return self._iterator(self.train, 0, "mixed")

    # ------------------------------------------------------------------ forward step
    def forward_step(self, num_domains: Optional[int]):
        def context(batch):
            domain_ids = batch.get("domain_ids")
            if domain_ids is None or num_domains is None:
                return domain_ids_context(None, 1)
            return domain_ids_context(domain_ids, num_domains)

        def step(data_iterator, model):
            batch_holder = {}

            def remembering_iterator():
                batch = next(data_iterator)
                batch_holder["batch"] = batch
                return batch

            output, loss_func = gpt_forward_step(_OneShot(remembering_iterator), model,
                                                 forward_context=context)
            domain_ids = batch_holder["batch"].get("domain_ids")
            return output, partial(self._loss_with_domains, loss_func,
                                   batch_holder["batch"]["loss_mask"], domain_ids)

        return step

    def _loss_with_domains(self, loss_func, loss_mask, domain_ids, output_tensor):
        result = loss_func(output_tensor)
        if domain_ids is not None:
            with torch.no_grad():
                per_sample = (output_tensor.float() * loss_mask.float()).sum(dim=1).double().cpu()
                tokens = loss_mask.float().sum(dim=1).double().cpu()
                ids = domain_ids.cpu()
                valid = ids >= 0
                self._sums[:, 0].index_add_(0, ids[valid], per_sample[valid])
                self._sums[:, 1].index_add_(0, ids[valid], tokens[valid])
        return result

    def take_domain_losses(self) -> dict[str, float]:
        """Mean token loss per fine-tuning domain since the last call (collective: call on
        every rank). Domains without tokens in the window are left out."""
        sums = self._sums.clone()
        self._sums.zero_()
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(sums, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return {name: float(sums[i, 0] / sums[i, 1])
                for i, name in enumerate(self.domain_names) if sums[i, 1] > 0}


def _run_tokenizer_fingerprint(config) -> Optional[str]:
    """Fingerprint of the tokenizer the run was configured with, if any (checked against
    the one recorded in blend.json by build_domain_datasets)."""
    if not (config.tokenizer_model or config.hf_tokenizer):
        return None
    from megatron_desmoe.data.tokenizer import load_tokenizer, tokenizer_spec

    return load_tokenizer(tokenizer_spec(config.tokenizer_model, config.hf_tokenizer)).fingerprint()


class _OneShot:
    """An iterator whose next() calls a function (to see the batch the step consumes)."""

    def __init__(self, fetch):
        self.fetch = fetch

    def __iter__(self):
        return self

    def __next__(self):
        return self.fetch()


def build_domain_data(config, domain_names: list[str], world_size: int) -> DomainData:
    return DomainData(config, domain_names, world_size)

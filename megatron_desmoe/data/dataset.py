"""Megatron-Core datasets over the preprocessed domains, with per-token loss masks and domain ids.

`DomainGPTDataset` is Megatron's GPTDataset (document/sample/shuffle indices, packing of
documents into fixed-length samples, index caching, rank-0-first building) plus two things:

* the loss mask is read from the parallel loss-mask indexed dataset over exactly the same
  document spans as the tokens (Megatron's own span walk is reused, see `_answer_mask`);
  padding reads as 0;
* every sample carries `domain_id`, the domain's position in blend.json.

`build_domain_datasets` mixes the domains with BlendedMegatronDatasetBuilder + BlendedDataset.
Samples are dicts {tokens, labels, loss_mask, position_ids, domain_id} (+ `dataset_id` from
BlendedDataset: the position among the *selected* domains, equal to domain_id when all are
used). Use `domain_id`.
"""

from __future__ import annotations

import logging
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from megatron_desmoe.compat import ensure_megatron_importable
from megatron_desmoe.data.blend import Blend, DomainEntry, load_blend
from megatron_desmoe.data.errors import DataError
from megatron_desmoe.data.tokenizer import Tokenizer, check_tokenizer_matches
from megatron_desmoe.errors import ConfigError

ensure_megatron_importable()

from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402

logger = logging.getLogger(__name__)


class BlendTokenizer(MegatronTokenizerBase):
    """The tokenizer facts GPTDatasetConfig needs (vocab_size, eod, pad, unique_identifiers),
    taken from blend.json. The data is already tokenized, so it never encodes text.

    unique_identifiers holds the fingerprint, so Megatron's index cache is keyed by tokenizer
    content, not by a path.
    """

    def __init__(self, tokenizer_info: Mapping):
        super().__init__(path=tokenizer_info["fingerprint"], config={})
        self.info = dict(tokenizer_info)

    def tokenize(self, text):
        raise NotImplementedError("the data is pre-tokenized; use megatron_desmoe.data.tokenizer")

    def detokenize(self, ids):
        raise NotImplementedError("the data is pre-tokenized; use megatron_desmoe.data.tokenizer")

    def vocab(self):
        raise NotImplementedError("blend.json records the vocabulary size, not the vocabulary")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("see megatron_desmoe.data.templates")

    @property
    def vocab_size(self) -> int:
        return int(self.info["vocab_size"])

    @property
    def eod(self) -> int:
        return int(self.info["eos_id"])

    eos = eod

    @property
    def pad(self) -> int:
        pad = self.info.get("pad_id")
        return -1 if pad is None else int(pad)  # -1: Megatron's "no pad token" id

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__, fingerprint=self.info["fingerprint"])


@dataclass
class DomainGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus, per text prefix, its loss-mask prefix and its domain id."""

    loss_mask_prefixes: Optional[Mapping[str, str]] = None
    domain_ids: Optional[Mapping[str, int]] = None


class DomainGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: str, indexed_indices: np.ndarray,
                 num_samples: Optional[int], index_split, config: DomainGPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.domain_id = int(config.domain_ids[dataset_path])
        self.loss_mask_dataset = IndexedDataset(config.loss_mask_prefixes[dataset_path],
                                                mmap=config.mmap_bin_files)
        _check_parallel(indexed_dataset, self.loss_mask_dataset, dataset_path)

    def __getitem__(self, idx: Optional[int]) -> dict:
        sample = super().__getitem__(idx)
        answer = self._answer_mask(0 if idx is None else idx)
        if self.config.add_extra_token_to_sequence:
            label_is_answer = answer[1:]
        else:
            label_is_answer = torch.cat([answer[1:], answer.new_zeros(1)])
        # The answer mask replaces GPTDataset's loss mask instead of multiplying it: 0.19.2
        # caches that mask and then zeroes padded labels in place, so after one padded
        # (last validation) sample its cached mask is wrong for every later sample. Padding
        # reads as 0 in the answer mask anyway; idx None is Megatron's all-masked filler.
        sample["loss_mask"] = label_is_answer if idx is not None else torch.zeros_like(label_is_answer)
        sample["domain_id"] = self.domain_id
        return sample

    def _answer_mask(self, idx: int) -> torch.Tensor:
        """The loss-mask entries of sample idx's tokens (padding reads as 0).

        GPTDataset's span walk is reused on a view whose low-level dataset is the loss-mask
        dataset, so tokens and mask come from the very same (document, offset, length) spans.
        """
        view = types.SimpleNamespace(
            shuffle_index=self.shuffle_index, sample_index=self.sample_index,
            document_index=self.document_index, dataset=self.loss_mask_dataset,
            config=self.config, _pad_token_id=0)
        mask, _, _ = GPTDataset._query_document_sample_shuffle_indices(view, idx)
        return torch.from_numpy(mask).float()


def _check_parallel(tokens: IndexedDataset, masks: IndexedDataset, prefix: str) -> None:
    if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
        raise DataError(f"{prefix}: the loss-mask dataset does not match the token dataset "
                        f"document by document. Fix: rerun desmoe-preprocess")


# --------------------------------------------------------------------------- building


class DomainDatasets(NamedTuple):
    train: torch.utils.data.Dataset  # BlendedDataset (or one DomainGPTDataset for one domain)
    valid: dict  # domain name -> DomainGPTDataset, selected domains with validation data
    domain_names: list  # every domain of the blend; index = domain_id (num_domains = len)


def build_domain_datasets(
    blend_path: Union[str, Path],
    seq_length: int,
    tokenizer: Union[Tokenizer, str],
    train_samples: int,
    valid_samples: Optional[int] = None,
    seed: int = 1234,
    domains: Optional[Sequence[str]] = None,
    weights: Optional[Mapping[str, float]] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    num_builder_threads: int = 1,
) -> DomainDatasets:
    """Training mixture and per-domain validation sets from blend.json.

    tokenizer: the training tokenizer or its fingerprint; refused if the data was tokenized
    with another. train_samples: samples of the mixture. valid_samples: per domain, None for
    one full pass. domains: a subset of the blend's names (ids stay those of the blend).
    weights: name -> weight, overriding blend.json's. Call on every rank: with
    torch.distributed initialised, Megatron builds the index caches on rank 0 first, then
    the other ranks read them (cache_dir must be shared; default <blend dir>/cache).
    """
    blend = load_blend(blend_path)
    check_tokenizer_matches(blend, tokenizer)
    _check_sizes(seq_length, train_samples, valid_samples)
    selected = _select_domains(blend, domains)
    train_weights = _train_weights(selected, weights or {}, blend)
    config = _dataset_config(blend, selected, train_weights, seq_length, seed,
                             valid_samples, cache_dir, num_builder_threads)
    builder = BlendedMegatronDatasetBuilder(DomainGPTDataset, [train_samples, valid_samples, None],
                                            is_built_on_rank or (lambda: True), config)
    train, valid, _ = builder.build()
    return DomainDatasets(train, _valid_by_name(valid, selected), blend.names)


def _check_sizes(seq_length: int, train_samples: int, valid_samples: Optional[int]) -> None:
    if seq_length < 1:
        raise ConfigError("seq_length", f"{seq_length} < 1", "use a positive sequence length")
    if train_samples is None or train_samples < 1:
        raise ConfigError("train_samples", f"{train_samples} is not a positive count",
                          "pass the number of training samples (iterations x global batch)")
    if valid_samples is not None and valid_samples < 1:
        raise ConfigError("valid_samples", f"{valid_samples} < 1", "pass a positive count or None")


def _select_domains(blend: Blend, names: Optional[Sequence[str]]) -> list[DomainEntry]:
    if names is None:
        return list(blend.domains)
    if not names:
        raise ConfigError("domains", "an empty selection", f"choose among {blend.names}")
    wanted = set(names)
    for name in wanted:
        blend.domain(name)  # raises ConfigError naming the valid names
    return [domain for domain in blend.domains if domain.name in wanted]  # blend order


def _train_weights(selected: list[DomainEntry], overrides: Mapping[str, float], blend: Blend) -> list[float]:
    chosen = {domain.name for domain in selected}
    for name, weight in overrides.items():
        if name not in chosen:
            raise ConfigError("weights", f"names '{name}', which is not among the selected domains "
                              f"{sorted(chosen)}", "weight only the domains being trained")
        if not float(weight) > 0:
            raise ConfigError("weights", f"weight {weight} of '{name}' is not positive", "use a weight > 0")
    return [float(overrides.get(domain.name, domain.weight)) for domain in selected]


def _dataset_config(blend: Blend, selected: list[DomainEntry], train_weights: list[float], seq_length: int,
                    seed: int, valid_samples: Optional[int], cache_dir, num_builder_threads: int):
    with_valid = [domain for domain in selected if domain.valid is not None]
    files = [domain.train for domain in selected] + [domain.valid for domain in with_valid]
    ids = [domain.domain_id for domain in selected] + [domain.domain_id for domain in with_valid]
    return DomainGPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[
            ([domain.train.text_prefix for domain in selected], train_weights),
            ([domain.valid.text_prefix for domain in with_valid], None) if with_valid else None,
            None,
        ],
        multiple_validation_sets=True,
        full_validation=valid_samples is None,
        path_to_cache=str(cache_dir or blend.path.parent / "cache"),
        num_dataset_builder_threads=num_builder_threads,
        tokenizer=BlendTokenizer(blend.tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,  # EOS closes every answer and is trained on (loss-mask file has 1)
        create_attention_mask=False,  # the model builds its causal mask
        drop_last_partial_validation_sequence=False,  # evaluate every validation token
        loss_mask_prefixes={f.text_prefix: f.loss_mask_prefix for f in files},
        domain_ids={f.text_prefix: domain_id for f, domain_id in zip(files, ids)},
    )


def _valid_by_name(valid, selected: list[DomainEntry]) -> dict:
    with_valid = [domain.name for domain in selected if domain.valid is not None]
    if valid is None:
        return {}
    datasets = valid if isinstance(valid, list) else [valid]
    return dict(zip(with_valid, datasets))


def sample_domain_ids(dataset) -> np.ndarray:
    """domain_id of every sample of a training dataset, without reading any tokens."""
    if isinstance(dataset, BlendedDataset):
        ids_by_position = np.array([d.domain_id for d in dataset.datasets], dtype=np.int64)
        return ids_by_position[np.asarray(dataset.dataset_index, dtype=np.int64)]
    if isinstance(dataset, DomainGPTDataset):
        return np.full(len(dataset), dataset.domain_id, dtype=np.int64)
    raise TypeError(f"expected a BlendedDataset or DomainGPTDataset, got {type(dataset).__name__}")

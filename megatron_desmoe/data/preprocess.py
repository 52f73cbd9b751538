"""Tokenize every domain into Megatron indexed datasets (.bin/.idx) plus per-token loss masks.

Output layout (DIR = --output):

    DIR/blend.json                                  domains, weights, counts, tokenizer
    DIR/<domain>/train_text_document.{bin,idx}      token ids, one entry per document
    DIR/<domain>/train_loss_mask_document.{bin,idx} uint8, one per token: 1 = answer or EOS
    DIR/<domain>/valid_...                          the same for the validation split

Documents are stored one by one; packing into sequences happens in the dataset (dataset.py).
Records are encoded by a multiprocessing Pool over fixed-size chunks with `imap`, which keeps
input order, so the files do not depend on the number of workers. Everything is written into
a temporary directory beside DIR and renamed at the end: an error leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from megatron_desmoe.data.blend import blend_document, write_blend
from megatron_desmoe.data.errors import DataError, RecordError
from megatron_desmoe.data.formats import RecordFormat, parse_payload, record_location, record_segments
from megatron_desmoe.data.sources import ON_ERROR_CHOICES, DomainSource, ResolvedSource, check_sources, resolve_source
from megatron_desmoe.data.templates import render_pieces
from megatron_desmoe.data.tokenizer import Tokenizer, TokenizerSpec, load_tokenizer
from megatron_desmoe.errors import ConfigError

SPLITS = ("train", "valid")
TEXT_SUFFIX, MASK_SUFFIX = "text_document", "loss_mask_document"
MAX_SKIP_EXAMPLES = 5


@dataclass
class PreprocessOptions:
    output: Path
    tokenizer: TokenizerSpec
    workers: int = 1
    valid_fraction: float = 0.05
    seed: int = 1234
    on_error: str = "stop"  # or "skip"
    overwrite: bool = False
    max_documents: Optional[int] = None  # per domain, the first N records (quick runs)
    chunk_size: int = 256  # records per work item; fixed so output never depends on workers
    progress: bool = True

    def check(self) -> None:
        if self.workers < 1:
            raise ConfigError("workers", f"{self.workers} < 1", "use 1 or more")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("valid_fraction", f"{self.valid_fraction} is outside [0, 1)", "use e.g. 0.05")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ConfigError("on_error", f"'{self.on_error}' is not a choice", "use stop or skip")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError("max_documents", f"{self.max_documents} < 1", "use a positive count or omit it")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size", f"{self.chunk_size} < 1", "use e.g. 256")


@dataclass
class Timings:
    """Seconds spent, summed over processes: where preprocessing time goes."""

    wall: float = 0.0  # the whole call: checks, imports, format detection, encoding, writing
    work: float = 0.0  # wall time of encoding and writing only (what the rates are over)
    encode: float = 0.0  # inside the tokenizer's encode (workers)
    worker_python: float = 0.0  # our code in workers: JSON, formats, template, arrays
    main_python: float = 0.0  # our code in the main process: splitting, writing files


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    answer_tokens: int = 0


@dataclass
class DomainReport:
    name: str
    source: ResolvedSource
    records: int = 0
    splits: dict[str, SplitStats] = field(default_factory=lambda: {s: SplitStats() for s in SPLITS})
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class PreprocessReport:
    output: Path
    domains: list[DomainReport]
    timings: Timings

    @property
    def documents(self) -> int:
        return sum(s.documents for d in self.domains for s in d.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for d in self.domains for s in d.splits.values())

    @property
    def skipped(self) -> int:
        return sum(sum(d.skipped.values()) for d in self.domains)

    def summary(self) -> str:
        work = max(self.timings.work, 1e-9)
        lines = [f"{d.name}: {d.splits['train'].documents} train / {d.splits['valid'].documents} valid "
                 f"documents, {sum(s.tokens for s in d.splits.values())} tokens"
                 + (f", skipped {dict(d.skipped)} e.g. {d.skipped_examples[0]}" if d.skipped else "")
                 for d in self.domains]
        lines.append(f"total: {self.documents} documents, {self.tokens} tokens, {self.skipped} records "
                     f"skipped; encoding took {self.timings.work:.2f} s "
                     f"({self.timings.wall:.2f} s in all): {self.documents / work:,.0f} documents/s, "
                     f"{self.tokens / work:,.0f} tokens/s")
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def preprocess(sources: list[DomainSource], options: PreprocessOptions) -> PreprocessReport:
    """Check everything, encode every domain into a temporary directory, then move it into place."""
    started = time.perf_counter()
    options.check()
    check_sources(sources)
    output = Path(options.output)
    _check_output(output, options.overwrite, sources)
    tokenizer = load_tokenizer(options.tokenizer)
    resolved = [resolve_source(source, options.on_error) for source in sources]
    builder_class, token_dtype = _indexed_dataset_builder(tokenizer.vocab_size)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    timings = Timings()
    try:
        work_started = time.perf_counter()
        with _encoder_pool(options) as encode_chunks:
            reports = [_process_domain(source, _SplitWriters(staging / source.name, builder_class, token_dtype),
                                       encode_chunks, options, timings)
                       for source in resolved]
        write_blend(staging / "blend.json", blend_document(reports, tokenizer, options))
        timings.work = time.perf_counter() - work_started
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    timings.wall = time.perf_counter() - started
    return PreprocessReport(output, reports, timings)


def _check_output(output: Path, overwrite: bool, sources: list[DomainSource]) -> None:
    if output.exists() and not overwrite:
        raise ConfigError("output", f"{output} exists", "choose a new directory or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise ConfigError("output", f"{output} is a file", "choose a directory path")
    resolved = output.resolve()
    for source in sources:
        if resolved == source.path.resolve() or resolved in source.path.resolve().parents:
            raise ConfigError("output", f"{output} would replace the input {source.path}",
                              "write the output somewhere else")


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename staging to output; an existing output (--overwrite) is swapped out, then deleted."""
    previous = None
    if output.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.rename(output, previous / "data")
    try:
        os.rename(staging, output)
    except BaseException:
        if previous is not None:
            os.rename(previous / "data", output)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


# --------------------------------------------------------------------------- per domain


def _indexed_dataset_builder(vocab_size: int):
    """Megatron's IndexedDatasetBuilder and the token dtype it reads back for this vocabulary."""
    from megatron_desmoe.compat import ensure_megatron_importable

    ensure_megatron_importable()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    return IndexedDatasetBuilder, DType.optimal_dtype(vocab_size)


def _process_domain(source: ResolvedSource, writers: "_SplitWriters", encode_chunks,
                    options: PreprocessOptions, timings: Timings) -> DomainReport:
    report = DomainReport(source.name, source)
    num_records = min(source.num_records, options.max_documents or source.num_records)
    is_valid = validation_mask(source.name, num_records, options.valid_fraction, options.seed)
    progress = _progress(num_records, source.name, options.progress)
    try:
        for chunk in encode_chunks(_chunks(source, num_records, options.chunk_size)):
            timings.encode += chunk.encode_seconds
            timings.worker_python += chunk.total_seconds - chunk.encode_seconds
            started = time.perf_counter()
            _record_errors(chunk, report, options.on_error)
            writers.add(chunk, is_valid, report)
            report.records += chunk.num_records
            progress.update(chunk.num_records)
            timings.main_python += time.perf_counter() - started
        writers.finalize()
    finally:
        writers.close()
        progress.close()
    if report.splits["train"].documents == 0:
        raise DataError(f"{source.source.path}: no usable documents for domain '{source.name}' "
                        f"(read {report.records} records, skipped {sum(report.skipped.values())})")
    return report


def validation_mask(domain: str, num_records: int, fraction: float, seed: int) -> np.ndarray:
    """valid[i] for record ordinal i: a seeded hash of (domain, i) below `fraction`.

    A record's split depends only on the seed, the domain name and its position, not on the
    other records or on --max-documents. With fraction > 0 and at least two records, the
    record with the smallest hash is moved to validation if none fell there (small domains
    still get a validation set) and the largest to training if all did.
    """
    draws = np.array([_unit_hash(seed, domain, i) for i in range(num_records)], dtype=np.float64)
    valid = draws < fraction
    if fraction > 0 and num_records >= 2:
        if not valid.any():
            valid[np.argmin(draws)] = True
        if valid.all():
            valid[np.argmax(draws)] = False
    return valid


def _unit_hash(seed: int, domain: str, ordinal: int) -> float:
    digest = hashlib.blake2b(f"{seed}/{domain}/{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _record_errors(chunk: "EncodedChunk", report: DomainReport, on_error: str) -> None:
    for location, problem, reason in chunk.errors:
        if on_error == "stop":
            raise DataError(f"{location}: {problem}. Fix: correct the record, or pass --on-error skip "
                            f"to skip bad records (they are counted and reported)")
        report.skipped[reason] += 1
        if len(report.skipped_examples) < MAX_SKIP_EXAMPLES:
            report.skipped_examples.append(f"{location}: {problem}")


class _SplitWriters:
    """Four IndexedDatasetBuilders (train/valid x text/loss mask), opened on first use."""

    def __init__(self, directory: Path, builder_class, token_dtype):
        self._builder_class = builder_class
        self.directory = directory
        self.token_dtype = token_dtype
        self.builders: dict[tuple[str, str], Any] = {}

    def prefix(self, split: str, kind: str) -> Path:
        return self.directory / f"{split}_{kind}"

    def _builder(self, split: str, kind: str):
        key = (split, kind)
        if key not in self.builders:
            self.directory.mkdir(parents=True, exist_ok=True)
            dtype = self.token_dtype if kind == TEXT_SUFFIX else np.uint8
            self.builders[key] = self._builder_class(f"{self.prefix(split, kind)}.bin", dtype=dtype)
        return self.builders[key]

    def add(self, chunk: "EncodedChunk", is_valid: np.ndarray, report: DomainReport) -> None:
        ends = np.cumsum(chunk.lengths)
        for ordinal, end, length in zip(chunk.ordinals.tolist(), ends.tolist(), chunk.lengths.tolist()):
            split = "valid" if is_valid[ordinal] else "train"
            tokens, mask = chunk.tokens[end - length:end], chunk.masks[end - length:end]
            self._builder(split, TEXT_SUFFIX).add_document(tokens, [length])
            self._builder(split, MASK_SUFFIX).add_document(mask, [length])
            stats = report.splits[split]
            stats.documents += 1
            stats.tokens += length
            stats.answer_tokens += int(mask.sum())

    def finalize(self) -> None:
        for (split, kind), builder in self.builders.items():
            builder.finalize(f"{self.prefix(split, kind)}.idx")

    def close(self) -> None:
        for builder in self.builders.values():
            builder.data_file.close()


def _progress(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="doc", disable=not enabled, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- encoding (workers)


@dataclass(frozen=True)
class Chunk:
    path: str
    container: str
    record_format: RecordFormat
    items: list  # (ordinal, position, payload)


@dataclass
class EncodedChunk:
    num_records: int
    ordinals: np.ndarray  # int64 [documents]: record ordinal of each encoded document
    lengths: np.ndarray  # int64 [documents]
    tokens: np.ndarray  # int64 [sum(lengths)], EOS closes every document
    masks: np.ndarray  # uint8 [sum(lengths)]
    errors: list  # (location, problem, reason) of records that could not be encoded
    encode_seconds: float
    total_seconds: float


def _chunks(source: ResolvedSource, num_records: int, chunk_size: int) -> Iterator[Chunk]:
    from megatron_desmoe.data.formats import iter_raw_records

    records = itertools.islice(iter_raw_records(source.source.path, source.container), num_records)
    while items := list(itertools.islice(records, chunk_size)):
        yield Chunk(str(source.source.path), source.container, source.record_format, items)


_worker_tokenizer: list[Optional[Tokenizer]] = [None]


def _init_worker(spec: TokenizerSpec) -> None:
    _worker_tokenizer[0] = load_tokenizer(spec)


class _encoder_pool:
    """Context manager giving `encode_chunks(iterable) -> iterator`, in order, 1 or N processes."""

    def __init__(self, options: PreprocessOptions):
        self.options = options
        self.pool = None

    def __enter__(self):
        if self.options.workers == 1:
            _init_worker(self.options.tokenizer)
            return lambda chunks: map(encode_chunk, chunks)
        # fork: workers inherit the imported modules instead of re-importing Megatron.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        self.pool = context.Pool(self.options.workers, _init_worker, (self.options.tokenizer,))
        return lambda chunks: self.pool.imap(encode_chunk, chunks)

    def __exit__(self, *exc_info):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _worker_tokenizer[0] = None
        return False


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    """Parse, template and tokenize the records of one chunk (runs in a worker)."""
    started = time.perf_counter()
    tokenizer = _worker_tokenizer[0]
    documents, errors = [], []
    for ordinal, position, payload in chunk.items:
        location = record_location(chunk.path, chunk.container, position)
        try:
            record = parse_payload(payload, chunk.container, location)
            documents.append((ordinal, render_pieces(record_segments(record, chunk.record_format, location))))
        except RecordError as error:
            errors.append((error.location, error.problem, error.reason))
    texts = [text for _, pieces in documents for text, _ in pieces]
    encode_started = time.perf_counter()
    piece_ids = tokenizer.encode_batch(texts) if texts else []
    encode_seconds = time.perf_counter() - encode_started
    flags = [is_answer for _, pieces in documents for _, is_answer in pieces]
    pieces_per_document = [len(pieces) for _, pieces in documents]
    tokens, masks, lengths = assemble_documents(piece_ids, flags, pieces_per_document, tokenizer.eos_id)
    return EncodedChunk(len(chunk.items), np.array([o for o, _ in documents], dtype=np.int64), lengths,
                        tokens, masks, errors, encode_seconds, time.perf_counter() - started)


def assemble_documents(piece_ids: list, flags: list, pieces_per_document: list, eos_id: int):
    """Concatenate piece token ids per document, append EOS; mask = piece flag, 1 for EOS."""
    piece_lengths = np.fromiter(map(len, piece_ids), dtype=np.int64, count=len(piece_ids))
    flat = np.fromiter(itertools.chain.from_iterable(piece_ids), dtype=np.int64,
                       count=int(piece_lengths.sum()))
    flat_mask = np.repeat(np.asarray(flags, dtype=np.uint8), piece_lengths)
    document_of_piece = np.repeat(np.arange(len(pieces_per_document)), pieces_per_document)
    body_lengths = np.bincount(document_of_piece, weights=piece_lengths,
                               minlength=len(pieces_per_document)).astype(np.int64)
    eos_at = np.cumsum(body_lengths)  # insert positions in `flat`: the end of each document
    tokens = np.insert(flat, eos_at, eos_id)
    masks = np.insert(flat_mask, eos_at, 1).astype(np.uint8)
    return tokens, masks, body_lengths + 1

#!/usr/bin/env python
"""Preprocessing throughput on a whole multi-domain corpus, with 1 and N workers.

    python benchmarks/preprocess_throughput.py /path/to/domains [--tokenizer-model tok.model]
        [--workers 1,2]

Every sub-folder of the corpus holding one .txt/.json/.jsonl file is a domain. Without
--tokenizer-model a SentencePiece model (default options) is trained first, into a temporary
directory. For each worker count it prints documents/s and tokens/s over the encoding phase,
and where the CPU time went: inside the tokenizer's encode versus our own Python (reading,
formats, template, arrays in the workers; splitting and writing in the main process). A
final line times the tokenizer alone on the same pieces: the bound the pipeline can reach.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from megatron_desmoe.data.preprocess import PreprocessOptions, preprocess
from megatron_desmoe.data.sources import DomainSource, iter_source_segments, resolve_source
from megatron_desmoe.data.templates import render_pieces, render_text
from megatron_desmoe.data.tokenizer import (
    SentencePieceOptions, TokenizerSpec, load_tokenizer, train_sentencepiece, write_tokenizer_model,
)

DATA_SUFFIXES = {".txt", ".json", ".jsonl"}


def discover_domains(corpus: Path) -> list[DomainSource]:
    sources = []
    for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
        files = [f for f in sorted(folder.iterdir()) if f.suffix in DATA_SUFFIXES]
        if len(files) == 1:
            sources.append(DomainSource(folder.name, files[0]))
    if not sources:
        raise SystemExit(f"no domain folders with one data file under {corpus}")
    return sources


def train_tokenizer(sources: list[DomainSource], directory: Path) -> Path:
    started = time.perf_counter()
    resolved = [resolve_source(source) for source in sources]
    texts = (render_text(segments) for source in resolved for segments in iter_source_segments(source))
    options = SentencePieceOptions()
    path = write_tokenizer_model(train_sentencepiece(texts, options), directory / "bench.model", options, {})
    print(f"trained a {options.model_type} tokenizer ({options.vocab_size} pieces) in "
          f"{time.perf_counter() - started:.1f} s")
    return path


def run_preprocess(sources, tokenizer: TokenizerSpec, workers: int, output: Path) -> None:
    report = preprocess(sources, PreprocessOptions(output=output, tokenizer=tokenizer, workers=workers,
                                                   overwrite=True, progress=False))
    t = report.timings
    cpu = t.encode + t.worker_python + t.main_python
    print(f"workers={workers}: {report.documents} documents, {report.tokens} tokens in {t.work:.2f} s "
          f"-> {report.documents / t.work:,.0f} documents/s, {report.tokens / t.work:,.0f} tokens/s "
          f"(whole call incl. checks and imports: {t.wall:.2f} s)")
    print(f"  CPU time: tokenizer encode {t.encode:.2f} s ({t.encode / cpu:.0%}), our Python in "
          f"workers {t.worker_python:.2f} s ({t.worker_python / cpu:.0%}), main process "
          f"{t.main_python:.2f} s ({t.main_python / cpu:.0%})")


def encode_only(sources, tokenizer: TokenizerSpec) -> None:
    """The tokenizer alone on the same text pieces, in one process: the throughput bound."""
    texts = [text for source in (resolve_source(s) for s in sources)
             for segments in iter_source_segments(source) for text, _ in render_pieces(segments)]
    encoder = load_tokenizer(tokenizer)
    started = time.perf_counter()
    tokens = sum(len(ids) for ids in encoder.encode_batch(texts))
    seconds = time.perf_counter() - started
    print(f"tokenizer alone, 1 process: {tokens:,} tokens in {seconds:.2f} s -> {tokens / seconds:,.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="folder with one sub-folder per domain")
    parser.add_argument("--tokenizer-model", type=Path, help="SentencePiece model (default: train one)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} (other processes share the cores)")
    sources = discover_domains(args.corpus)
    with tempfile.TemporaryDirectory(prefix="desmoe-bench-") as scratch:
        scratch = Path(scratch)
        model = args.tokenizer_model or train_tokenizer(sources, scratch)
        spec = TokenizerSpec("sentencepiece", str(model))
        for workers in (int(w) for w in args.workers.split(",")):
            run_preprocess(sources, spec, workers, scratch / f"out-{workers}")
        encode_only(sources, spec)


if __name__ == "__main__":
    main()

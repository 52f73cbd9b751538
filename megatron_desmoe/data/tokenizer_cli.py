"""desmoe-train-tokenizer: train a SentencePiece model on the user's domain files.

    desmoe-train-tokenizer --input general=wikitext2.txt --input law=law.jsonl \\
        --output tok/domains.model --vocab-size 8000

The training text is every record rendered with the project's template (templates.py), so
the template words are in the vocabulary. Writes OUTPUT (.model) and a .json sidecar with the
options and the input files. The same inputs and options give a byte-identical model.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_desmoe.data.cli import add_source_arguments, setting, sources_from_args
from megatron_desmoe.data.errors import DataError
from megatron_desmoe.data.sources import ResolvedSource, check_sources, iter_source_segments, resolve_source
from megatron_desmoe.data.templates import render_text
from megatron_desmoe.data.tokenizer import (
    SentencePieceOptions, check_model_output, train_sentencepiece, write_tokenizer_model,
)
from megatron_desmoe.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    defaults = SentencePieceOptions()
    parser = argparse.ArgumentParser(prog="desmoe-train-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--output", type=Path, help="the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default=defaults.model_type)
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    parser.add_argument("--threads", type=int, default=defaults.num_threads,
                        help="SentencePiece threads; part of what determines the model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model")
    return parser


def training_texts(resolved: list[ResolvedSource], max_documents: Optional[int], on_error: str,
                   skipped: Counter) -> Iterator[str]:
    for source in resolved:
        for segments in iter_source_segments(source, max_documents, on_error, skipped):
            yield render_text(segments)


def run(argv: Optional[Sequence[str]] = None) -> tuple[Path, Counter]:
    """Train and write the model; returns its path and the skipped records by reason."""
    args = build_parser().parse_args(argv)
    sources, settings = sources_from_args(args)
    output = args.output or settings.get("tokenizer_model")
    if output is None:
        raise ConfigError("--output", "no output path", "pass --output FILE.model")
    options = SentencePieceOptions(vocab_size=args.vocab_size, model_type=args.model_type,
                                   character_coverage=args.character_coverage, num_threads=args.threads)
    options.check()
    check_model_output(Path(output), args.overwrite)
    check_sources(sources)
    on_error, max_documents = setting(args, settings, "on_error"), setting(args, settings, "max_documents")
    resolved = [resolve_source(source, on_error) for source in sources]
    skipped: Counter = Counter()
    model = train_sentencepiece(training_texts(resolved, max_documents, on_error, skipped), options)
    provenance = {"inputs": [{"name": r.name, "path": str(r.source.path), "format": r.record_format.name}
                             for r in resolved],
                  "max_documents": max_documents, "skipped": dict(sorted(skipped.items()))}
    return write_tokenizer_model(model, Path(output), options, provenance, overwrite=args.overwrite), skipped


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        path, skipped = run(argv)
    except (ConfigError, DataError) as error:
        print(f"desmoe-train-tokenizer: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    if skipped:
        print(f"skipped {sum(skipped.values())} bad records: {dict(skipped)}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

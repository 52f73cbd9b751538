"""desmoe-preprocess: tokenize one dataset per domain into Megatron indexed datasets + blend.json.

    desmoe-preprocess --input math=gsm8k.jsonl --input code=codealpaca.json \\
        --tokenizer-model tok/domains.model --output data/indexed --workers 2

    desmoe-preprocess --config domains.yaml --output data/indexed --hf-tokenizer hf_dir/

Per-domain overrides: --format NAME=FORMAT, --fields NAME:canonical=source,..., --weight
NAME=W. A YAML config lists the domains (see megatron_desmoe/data/sources.py) and may set the
other options; flags given on the command line win. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from megatron_desmoe.data.errors import DataError
from megatron_desmoe.data.formats import FORMATS
from megatron_desmoe.data.sources import (
    ON_ERROR_CHOICES, DomainSource, load_yaml_config, parse_keyed_flags, sources_from_flags,
)
from megatron_desmoe.errors import ConfigError

# Built-in defaults of the options a YAML config may also set.
DEFAULTS = {"workers": 1, "valid_fraction": 0.05, "seed": 1234, "on_error": "stop",
            "max_documents": None, "output": None, "tokenizer_model": None, "hf_tokenizer": None}


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("domains (give --input flags or --config)")
    group.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                       help="one domain's file (repeatable; the order is the domain id order)")
    group.add_argument("--config", type=Path, help="YAML file listing the domains (and options)")
    group.add_argument("--format", action="append", default=[], metavar="NAME=FORMAT",
                       help=f"force a domain's format, one of {', '.join(FORMATS)} (default: detect)")
    group.add_argument("--fields", action="append", default=[], metavar="NAME:CANONICAL=SOURCE,...",
                       help="map a domain's field names, e.g. math:question=problem,answer=solution")
    group.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                       help="a domain's blend weight (all domains or none; default: token counts)")
    group.add_argument("--max-documents", type=int, help="read only the first N records per domain")
    group.add_argument("--on-error", choices=ON_ERROR_CHOICES,
                       help="bad records: stop at the first (default) or skip and count them")


def sources_from_args(args: argparse.Namespace) -> tuple[list[DomainSource], dict]:
    """The domains and the YAML settings (empty without --config)."""
    if args.config and (args.input or args.format or args.fields or args.weight):
        raise ConfigError("--config", "given together with --input/--format/--fields/--weight",
                          "describe the domains either on the command line or in the YAML file")
    if args.config:
        return load_yaml_config(args.config)
    sources = sources_from_flags(args.input, parse_keyed_flags("--format", args.format, "="),
                                 parse_keyed_flags("--fields", args.fields, ":"),
                                 parse_keyed_flags("--weight", args.weight, "="))
    return sources, {}


def setting(args: argparse.Namespace, settings: dict, name: str):
    """Command-line flag, else YAML setting, else built-in default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return settings.get(name, DEFAULTS.get(name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desmoe-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--output", type=Path, help="output directory (must not exist)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer-model", help="SentencePiece .model (desmoe-train-tokenizer)")
    tokenizer.add_argument("--hf-tokenizer", help="local Hugging Face tokenizer directory")
    parser.add_argument("--workers", type=int, help="encoding processes (default 1)")
    parser.add_argument("--valid-fraction", type=float, help="validation share per domain (default 0.05)")
    parser.add_argument("--seed", type=int, help="seed of the train/validation split (default 1234)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(argv: Optional[Sequence[str]] = None):
    """Parse, preprocess and return the report (raises ConfigError / DataError)."""
    from megatron_desmoe.data.preprocess import PreprocessOptions, preprocess
    from megatron_desmoe.data.tokenizer import tokenizer_spec

    args = build_parser().parse_args(argv)
    sources, settings = sources_from_args(args)
    output = setting(args, settings, "output")
    if output is None:
        raise ConfigError("--output", "no output directory", "pass --output DIR")
    model, hf_dir = setting(args, settings, "tokenizer_model"), setting(args, settings, "hf_tokenizer")
    if args.tokenizer_model or args.hf_tokenizer:  # a flag replaces the YAML's tokenizer entirely
        model, hf_dir = args.tokenizer_model, args.hf_tokenizer
    options = PreprocessOptions(
        output=Path(output), tokenizer=tokenizer_spec(model, hf_dir),
        workers=int(setting(args, settings, "workers")),
        valid_fraction=float(setting(args, settings, "valid_fraction")),
        seed=int(setting(args, settings, "seed")), on_error=setting(args, settings, "on_error"),
        overwrite=args.overwrite, max_documents=setting(args, settings, "max_documents"),
        progress=not args.quiet)
    return preprocess(sources, options)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Megatron-Core's import warns about optional GPU packages; they do not matter here.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex", category=UserWarning)
    try:
        report = run(argv)
    except (ConfigError, DataError) as error:
        print(f"desmoe-preprocess: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

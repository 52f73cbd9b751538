"""The user's domain sources: from `--input NAME=PATH` flags or a YAML file, checked up front.

YAML layout (paths relative to the YAML file; every key but name/path optional):

    domains:
      - name: math
        path: math/gsm8k.jsonl
        format: qa                                  # else detected from the first record
        fields: {question: problem, answer: solution}   # or "question=problem,answer=solution"
        weight: 2.0                                 # all domains or none
    # optional defaults for the command line options (flags given explicitly win):
    output: out/indexed
    tokenizer_model: tok/domains.model
    workers: 2

Relative paths (domains, output, tokenizer_model, hf_tokenizer) are relative to the YAML file.
The domain order (flags or YAML) is the domain id order.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from megatron_desmoe.data.errors import DataError, RecordError
from megatron_desmoe.data.formats import (
    FORMAT_FIELDS, RecordFormat, check_fields_fit_format, check_format_name, detect_container,
    detect_format, iter_raw_records, parse_field_map, parse_payload, record_location,
    record_segments,
)
from megatron_desmoe.errors import ConfigError

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ON_ERROR_CHOICES = ("stop", "skip")
PATH_SETTINGS = {"output", "tokenizer_model", "hf_tokenizer"}  # YAML paths, relative to the file


@dataclass(frozen=True)
class DomainSource:
    """One domain as the user described it."""

    name: str
    path: Path
    format: Optional[str] = None
    fields: Mapping[str, str] = field(default_factory=dict)
    weight: Optional[float] = None


@dataclass(frozen=True)
class ResolvedSource:
    """A source whose file was opened and whose format is known (before any tokenizing)."""

    source: DomainSource
    container: str
    record_format: RecordFormat
    num_records: int

    @property
    def name(self) -> str:
        return self.source.name


# --------------------------------------------------------------------------- parsing


def parse_input_flag(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError("--input", f"cannot read '{text}'", "write --input NAME=PATH, e.g. math=gsm8k.jsonl")
    return name, path


def parse_keyed_flags(flag: str, values: Iterable[str], separator: str) -> dict[str, str]:
    """['math=qa'] -> {'math': 'qa'} for --format / --weight; separator ':' for --fields."""
    parsed = {}
    for value in values or []:
        name, sep, rest = value.partition(separator)
        if not sep or not name or not rest:
            raise ConfigError(flag, f"cannot read '{value}'", f"write {flag} NAME{separator}VALUE")
        parsed[name] = rest
    return parsed


def sources_from_flags(inputs: Iterable[str], formats: Mapping[str, str] = (),
                       fields: Mapping[str, str] = (), weights: Mapping[str, str] = ()) -> list[DomainSource]:
    sources = []
    for text in inputs:
        name, path = parse_input_flag(text)
        sources.append(DomainSource(name, Path(path), (formats or {}).get(name),
                                    parse_field_map((fields or {}).get(name)),
                                    _weight((weights or {}).get(name), name)))
    _check_keys_name_sources(sources, {"--format": formats, "--fields": fields, "--weight": weights})
    return sources


def load_yaml_config(path: Path) -> tuple[list[DomainSource], dict]:
    """Domains and the remaining top-level settings of a YAML config file."""
    import yaml

    if not path.is_file():
        raise ConfigError("--config", f"no file {path}", "pass the path of a YAML config")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError("--config", f"{path} is not valid YAML ({error})", "fix the YAML syntax") from None
    if not isinstance(document, dict) or not isinstance(document.get("domains"), list):
        raise ConfigError("domains", f"{path} has no 'domains:' list", "list the domains under 'domains:'")
    sources = [_source_from_yaml(entry, index, path.parent) for index, entry in enumerate(document["domains"])]
    settings = {key: value for key, value in document.items() if key != "domains"}
    for key in PATH_SETTINGS & set(settings):
        settings[key] = str(_relative_to(Path(str(settings[key])), path.parent))
    return sources, settings


def _relative_to(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _source_from_yaml(entry: Any, index: int, base: Path) -> DomainSource:
    if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
        raise ConfigError(f"domains[{index}]", "each domain needs 'name' and 'path'",
                          "write e.g. {name: math, path: math/gsm8k.jsonl}")
    unknown = set(entry) - {"name", "path", "format", "fields", "weight"}
    if unknown:
        raise ConfigError(f"domains[{index}]", f"unknown keys {sorted(unknown)}",
                          "use name, path, format, fields, weight")
    return DomainSource(str(entry["name"]), _relative_to(Path(str(entry["path"])), base),
                        entry.get("format"), parse_field_map(entry.get("fields")),
                        _weight(entry.get("weight"), str(entry["name"])))


def _weight(value: Any, name: str) -> Optional[float]:
    if value is None:
        return None
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not weight > 0 or weight == float("inf"):
        raise ConfigError(f"weight of {name}", f"'{value}' is not a positive number", "use e.g. 1.0")
    return weight


def _check_keys_name_sources(sources: list[DomainSource], keyed: Mapping[str, Mapping]) -> None:
    names = {source.name for source in sources}
    for flag, values in keyed.items():
        for name in values or {}:
            if name not in names:
                raise ConfigError(flag, f"names domain '{name}', which no --input defines",
                                  f"use one of {sorted(names)}")


# --------------------------------------------------------------------------- checking


def check_sources(sources: list[DomainSource]) -> None:
    """Names, duplicates, weights all-or-none, files present and non-empty."""
    if not sources:
        raise ConfigError("inputs", "no domains given", "pass --input NAME=PATH (repeatable) or --config FILE")
    seen = set()
    for source in sources:
        if not _NAME_PATTERN.match(source.name):
            raise ConfigError("domain name", f"'{source.name}' cannot name a directory",
                              "use letters, digits, '_', '-', '.'")
        if source.name in seen:
            raise ConfigError("domain name", f"'{source.name}' is given twice", "give each domain once")
        seen.add(source.name)
        if source.format is not None:
            check_format_name(source.format)
            check_fields_fit_format(source.fields, source.format)
        if not source.path.is_file():
            raise ConfigError(f"path of {source.name}", f"no file {source.path}", "check the path")
        if source.path.stat().st_size == 0:
            raise DataError(f"{source.path}: empty file (domain '{source.name}')")
    weighted = [source.weight is not None for source in sources]
    if any(weighted) and not all(weighted):
        raise ConfigError("weight", "some domains have a weight and others not",
                          "give every domain a weight, or none (weights then follow token counts)")


def resolve_source(source: DomainSource, on_error: str = "stop") -> ResolvedSource:
    """Open the file, count its records and fix the format from the first usable record."""
    container = detect_container(source.path)
    num_records, first = 0, None
    for _, position, payload in iter_raw_records(source.path, container):
        num_records += 1
        if first is not None:
            continue
        location = record_location(source.path, container, position)
        try:
            first = (parse_payload(payload, container, location), location)
        except RecordError:
            if on_error == "stop":
                raise
    if num_records == 0:
        raise DataError(f"{source.path}: no records (the file holds only blank lines)")
    if first is None:
        raise DataError(f"{source.path}: no record could be read (all {num_records} are malformed)")
    record, location = first
    name = source.format or detect_format(record, source.fields, location)
    check_fields_fit_format(source.fields, name)
    record_format = RecordFormat(name, dict(source.fields))
    try:
        record_segments(record, record_format, location)
    except RecordError as error:
        if on_error == "stop" or error.reason == "missing field":
            raise  # a first record without the format's fields means a wrong format or mapping
    return ResolvedSource(source, container, record_format, num_records)


def canonical_fields(format_name: str) -> tuple[str, ...]:
    required, optional = FORMAT_FIELDS[format_name]
    return required + optional


def iter_source_segments(resolved: ResolvedSource, max_documents: Optional[int] = None,
                         on_error: str = "stop", skipped: Optional[Counter] = None) -> Iterator[list]:
    """Segments of each record, in order (what tokenizer training reads); bad records raise
    RecordError, or with on_error='skip' are counted in `skipped` by reason."""
    path, container = resolved.source.path, resolved.container
    records = itertools.islice(iter_raw_records(path, container), max_documents)
    for _, position, payload in records:
        location = record_location(path, container, position)
        try:
            yield record_segments(parse_payload(payload, container, location), resolved.record_format, location)
        except RecordError as error:
            if on_error == "stop":
                raise
            if skipped is not None:
                skipped[error.reason] += 1

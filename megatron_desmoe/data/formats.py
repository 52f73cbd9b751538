"""Reading user datasets: containers (JSON array, JSONL, plain text), record formats, field mapping.

A record becomes a list of `Segment(prompt, answer)`; the template (templates.py) turns the
segments into text pieces, and only answer pieces are trained on.

Formats and their canonical fields (a field mapping renames them, canonical=source):

    plain           text                       whole record is an answer (loss everywhere)
    chat            messages, role, content,   every `assistant` turn is an answer; the turns
                    assistant (role value)     before it (user, system, ...) are its prompt
    alpaca          instruction, input, output prompt = instruction [+ blank line + input];
                    (output also read from `response`)
    qa              question, answer
    prompt_answers  prompt, answers            answers: a list, or a string holding a Python
                                               list literal ("['...']"); the first is used

Example mappings: `question=problem,answer=solution`, or for ShareGPT files
`messages=conversations,role=from,content=value,assistant=gpt`.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from megatron_desmoe.data.errors import DataError, RecordError
from megatron_desmoe.errors import ConfigError

# Canonical fields per format: (required, optional). Detection tries the formats in this order.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ("role", "content", "assistant")),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_answers": (("prompt", "answers"), ()),
    "qa": (("question", "answer"), ()),
    "plain": (("text",), ()),
}
FORMATS = tuple(FORMAT_FIELDS)

# Source names tried for a canonical field when the mapping does not name one.
DEFAULT_SOURCE_NAMES: dict[str, tuple[str, ...]] = {"output": ("output", "response")}
# Sub-fields of chat messages and the assistant role value, when not mapped.
CHAT_DEFAULTS = {"role": "role", "content": "content", "assistant": "assistant"}

CONTAINERS = ("jsonl", "json_array", "text")
_TEXT_SUFFIXES = {".txt", ".text", ".md"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass(frozen=True)
class Segment:
    """One prompt/answer exchange. prompt None: raw text with no template (plain format)."""

    prompt: Optional[str]
    answer: str


@dataclass(frozen=True)
class RecordFormat:
    """How to read the records of one source: format name and field mapping canonical->source."""

    name: str
    fields: Mapping[str, str] = field(default_factory=dict)

    def source_names(self, canonical: str) -> tuple[str, ...]:
        if canonical in self.fields:
            return (self.fields[canonical],)
        return DEFAULT_SOURCE_NAMES.get(canonical, (canonical,))


# --------------------------------------------------------------------------- field mapping


def parse_field_map(spec: Any) -> dict[str, str]:
    """'question=problem,answer=solution' (CLI) or a mapping (YAML) -> {canonical: source}."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    elif isinstance(spec, str):
        pairs = []
        for item in spec.split(","):
            canonical, sep, source = item.partition("=")
            if not sep or not canonical.strip() or not source.strip():
                raise ConfigError("fields", f"cannot read mapping item '{item}' in '{spec}'",
                                  "write canonical=source pairs, e.g. question=problem,answer=solution")
            pairs.append((canonical.strip(), source.strip()))
    else:
        raise ConfigError("fields", f"expected a mapping or 'a=b,c=d' text, got {type(spec).__name__}",
                          "e.g. question=problem,answer=solution")
    known = sorted({name for req, opt in FORMAT_FIELDS.values() for name in req + opt})
    for canonical, _ in pairs:
        if canonical not in known:
            raise ConfigError("fields", f"unknown canonical field '{canonical}'",
                              f"map one of {', '.join(known)} to your field name")
    return dict(pairs)


def check_fields_fit_format(fields: Mapping[str, str], format_name: str) -> None:
    required, optional = FORMAT_FIELDS[format_name]
    for canonical in fields:
        if canonical not in required + optional:
            raise ConfigError("fields", f"field '{canonical}' does not belong to format "
                              f"'{format_name}'", f"map only {', '.join(required + optional)}")


def check_format_name(name: str) -> str:
    if name not in FORMAT_FIELDS:
        raise ConfigError("format", f"unknown format '{name}'", f"use one of {', '.join(FORMATS)}")
    return name


# --------------------------------------------------------------------------- containers


def detect_container(path: Path) -> str:
    """jsonl, json_array or text, from the suffix, else from the first non-blank character."""
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return "text"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    first = _first_non_blank_char(path)
    if first == "[":
        return "json_array"
    if first == "{":
        return "jsonl"
    if suffix == ".json":
        raise DataError(f"{path}: a .json file must hold a JSON array or one JSON object per line")
    return "text"


def _first_non_blank_char(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as stream:
        while chunk := stream.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def iter_raw_records(path: Path, container: str) -> Iterator[tuple[int, int, Any]]:
    """Yield (ordinal, position, payload) for every non-blank record.

    ordinal counts records from 0 (it seeds the train/valid split); position is the 1-based
    line (JSONL, text) or the 0-based array index (JSON array) used in error messages. JSONL
    payloads are unparsed lines (workers parse them); others are dicts.
    """
    try:
        if container == "json_array":
            yield from enumerate_array(path)
            return
        with open(path, encoding="utf-8") as stream:
            ordinal = 0
            for line_number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                payload = line if container == "jsonl" else {"text": line.strip()}
                yield ordinal, line_number, payload
                ordinal += 1
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None


def enumerate_array(path: Path) -> Iterator[tuple[int, int, Any]]:
    with open(path, encoding="utf-8") as stream:
        try:
            records = json.load(stream)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column "
                            f"{error.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records, got a JSON "
                        f"{type(records).__name__}")
    for index, record in enumerate(records):
        yield index, index, record


def record_location(path, container: str, position: int) -> str:
    """'file:line' (JSONL, text) or 'file record i' (JSON array), for error messages."""
    return f"{path} record {position}" if container == "json_array" else f"{path}:{position}"


def parse_payload(payload: Any, container: str, location: str) -> dict:
    """The record dict for a raw payload; RecordError for malformed JSON or a non-object."""
    if container == "jsonl":
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as error:
            raise RecordError(location, f"malformed JSON line ({error.msg} at column "
                              f"{error.colno})", reason="malformed JSON") from None
    if not isinstance(payload, dict):
        raise RecordError(location, f"expected a JSON object, got {type(payload).__name__}",
                          reason="not an object")
    return payload


# --------------------------------------------------------------------------- formats


def detect_format(record: Mapping[str, Any], fields: Mapping[str, str], location: str) -> str:
    """The first format whose required fields (after mapping) the record holds."""
    for name, (required, _) in FORMAT_FIELDS.items():
        candidate = RecordFormat(name, fields)
        if all(_find_name(record, candidate, canonical) for canonical in required):
            return name
    described = "; ".join(f"{name}: {', '.join(req)}" for name, (req, _) in FORMAT_FIELDS.items())
    raise DataError(
        f"{location}: cannot tell the format of a record with fields "
        f"{sorted(record)} (formats and their fields: {described}). Fix: name the format "
        f"(--format NAME=FORMAT or `format:` in YAML) and map your field names "
        f"(--fields NAME:question=problem,answer=solution or `fields:` in YAML)")


def record_segments(record: Mapping[str, Any], fmt: RecordFormat, location: str) -> list[Segment]:
    """Segments of one record; RecordError naming the field when one is missing or not text."""
    return _CONVERTERS[fmt.name](record, fmt, location)


def _find_name(record: Mapping[str, Any], fmt: RecordFormat, canonical: str) -> Optional[str]:
    for name in fmt.source_names(canonical):
        if name in record:
            return name
    return None


def _get(record: Mapping[str, Any], fmt: RecordFormat, canonical: str, location: str,
         required: bool = True) -> Any:
    name = _find_name(record, fmt, canonical)
    if name is not None:
        return record[name]
    if not required:
        return None
    wanted = " or ".join(f"'{n}'" for n in fmt.source_names(canonical))
    raise RecordError(location, f"missing field {wanted} ({fmt.name} format, canonical field "
                      f"'{canonical}'); the record has fields {sorted(record)}",
                      reason="missing field")


def _text(value: Any, name: str, location: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RecordError(location, f"field '{name}' must be text, got {type(value).__name__}",
                      reason="field not text")


def _plain(record, fmt, location):
    return [Segment(None, _text(_get(record, fmt, "text", location), "text", location))]


def _qa(record, fmt, location):
    question = _text(_get(record, fmt, "question", location), "question", location)
    return [Segment(question, _text(_get(record, fmt, "answer", location), "answer", location))]


def _alpaca(record, fmt, location):
    prompt = _text(_get(record, fmt, "instruction", location), "instruction", location)
    extra = _get(record, fmt, "input", location, required=False)
    if extra:
        prompt = f"{prompt}\n\n{_text(extra, 'input', location)}"
    return [Segment(prompt, _text(_get(record, fmt, "output", location), "output", location))]


def _prompt_answers(record, fmt, location):
    prompt = _text(_get(record, fmt, "prompt", location), "prompt", location)
    return [Segment(prompt, first_answer(_get(record, fmt, "answers", location), location))]


def first_answer(answers: Any, location: str) -> str:
    """First answer of a list, or of a string holding a Python list literal; else the string."""
    if isinstance(answers, str):
        try:
            parsed = ast.literal_eval(answers)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return answers
        if isinstance(parsed, str):
            return parsed
        if not isinstance(parsed, (list, tuple)):
            return answers
        answers = list(parsed)
    if isinstance(answers, list):
        if not answers:
            raise RecordError(location, "field 'answers' is an empty list", reason="empty answers")
        return _text(answers[0], "answers[0]", location)
    return _text(answers, "answers", location)


def _chat(record, fmt, location):
    messages = _get(record, fmt, "messages", location)
    if not isinstance(messages, list):
        raise RecordError(location, f"field '{_find_name(record, fmt, 'messages')}' must be a list "
                          f"of messages, got {type(messages).__name__}", reason="field not a list")
    role_key, content_key, assistant = (fmt.fields.get(k, CHAT_DEFAULTS[k])
                                        for k in ("role", "content", "assistant"))
    segments, prompt_parts = [], []
    for turn, message in enumerate(messages):
        where = f"{location} message {turn}"
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise RecordError(where, f"a message needs fields '{role_key}' and '{content_key}'",
                              reason="missing field")
        content = _text(message[content_key], content_key, where)
        if message[role_key] == assistant:
            segments.append(Segment("\n".join(prompt_parts), content))
            prompt_parts = []
        else:
            prompt_parts.append(content)
    if not segments:
        raise RecordError(location, f"no message with {role_key} '{assistant}' (nothing to learn)",
                          reason="no assistant turn")
    return segments


_CONVERTERS = {"plain": _plain, "qa": _qa, "alpaca": _alpaca,
               "prompt_answers": _prompt_answers, "chat": _chat}

"""blend.json: what preprocessing produced and how training mixes it.

    {
      "format": "desmoe-blend", "version": 1,
      "template": "user-assistant-v1",
      "tokenizer": {"kind", "fingerprint", "vocab_size", "eos_id", "pad_id"},
      "token_dtype": "uint16",
      "split": {"valid_fraction": 0.05, "seed": 1234},
      "weights": "train_tokens" | "user",
      "domains": [
        {"name": "math", "domain_id": 0, "weight": 812345.0,
         "train": {"text_prefix": "math/train_text_document",
                   "loss_mask_prefix": "math/train_loss_mask_document",
                   "documents": 7100, "tokens": 812345, "answer_tokens": 401234},
         "valid": {...same...} or null,
         "records": 7473, "skipped": {"malformed JSON": 0, ...},
         "source": {"path": "...", "container": "jsonl", "format": "qa", "fields": {}}}
      ]
    }

Prefixes are relative to the blend file. domain_id is the domain's position in the list (the
order the domains were given to preprocessing) and is what the model receives per sample.
Default weights are the training token counts, so a pass over the blend is a pass over every
domain (no domain repeated more than another); --weight / YAML `weight:` override them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_desmoe.data.errors import DataError
from megatron_desmoe.data.templates import TEMPLATE_NAME
from megatron_desmoe.errors import ConfigError

BLEND_FORMAT, BLEND_VERSION = "desmoe-blend", 1
BLEND_FILE = "blend.json"


@dataclass(frozen=True)
class SplitFiles:
    text_prefix: str  # absolute path prefix of the token .bin/.idx
    loss_mask_prefix: str  # absolute path prefix of the loss-mask .bin/.idx
    documents: int
    tokens: int
    answer_tokens: int


@dataclass(frozen=True)
class DomainEntry:
    name: str
    domain_id: int
    weight: float
    train: SplitFiles
    valid: Optional[SplitFiles]


@dataclass(frozen=True)
class Blend:
    path: Path
    tokenizer: dict
    domains: list[DomainEntry]
    raw: dict

    @property
    def names(self) -> list[str]:
        return [domain.name for domain in self.domains]

    def domain(self, name: str) -> DomainEntry:
        for domain in self.domains:
            if domain.name == name:
                return domain
        raise ConfigError("domains", f"'{name}' is not in {self.path}", f"use one of {self.names}")


# --------------------------------------------------------------------------- writing


def blend_document(reports, tokenizer, options) -> dict:
    """The blend.json content for the domain reports of one preprocessing run."""
    user_weights = reports[0].source.source.weight is not None
    return {
        "format": BLEND_FORMAT,
        "version": BLEND_VERSION,
        "template": TEMPLATE_NAME,
        "tokenizer": tokenizer.describe(),
        "token_dtype": _token_dtype_name(tokenizer.vocab_size),
        "split": {"valid_fraction": options.valid_fraction, "seed": options.seed},
        "weights": "user" if user_weights else "train_tokens",
        "domains": [_domain_document(index, report, user_weights) for index, report in enumerate(reports)],
    }


def _domain_document(domain_id: int, report, user_weights: bool) -> dict:
    source = report.source
    train = report.splits["train"]
    return {
        "name": report.name,
        "domain_id": domain_id,
        "weight": float(source.source.weight if user_weights else train.tokens),
        "train": _split_document(report.name, "train", train),
        "valid": _split_document(report.name, "valid", report.splits["valid"]),
        "records": report.records,
        "skipped": dict(sorted(report.skipped.items())),
        "source": {"path": str(source.source.path), "container": source.container,
                   "format": source.record_format.name, "fields": dict(source.record_format.fields)},
    }


def _split_document(name: str, split: str, stats) -> Optional[dict]:
    if stats.documents == 0:
        return None
    return {"text_prefix": f"{name}/{split}_text_document",
            "loss_mask_prefix": f"{name}/{split}_loss_mask_document",
            "documents": stats.documents, "tokens": stats.tokens, "answer_tokens": stats.answer_tokens}


def _token_dtype_name(vocab_size: int) -> str:
    return "uint16" if vocab_size < 65500 else "int32"  # Megatron's DType.optimal_dtype rule


def write_blend(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- reading


def load_blend(path) -> Blend:
    """Read and check a blend.json (a directory holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / BLEND_FILE
    if not path.is_file():
        raise ConfigError("blend", f"no blend file {path}", "pass the blend.json written by desmoe-preprocess")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON blend file ({error})") from None
    if not isinstance(raw, dict) or raw.get("format") != BLEND_FORMAT or raw.get("version") != BLEND_VERSION:
        raise DataError(f"{path}: not a {BLEND_FORMAT} version {BLEND_VERSION} file")
    _require(raw, ("tokenizer", "domains"), path)
    _require(raw["tokenizer"], ("fingerprint", "vocab_size", "eos_id"), path, "tokenizer")
    domains = [_domain_entry(entry, index, path) for index, entry in enumerate(raw["domains"])]
    if not domains:
        raise DataError(f"{path}: lists no domains")
    if len({d.name for d in domains}) != len(domains):
        raise DataError(f"{path}: domain names repeat")
    return Blend(path, dict(raw["tokenizer"]), domains, raw)


def _domain_entry(entry: Any, index: int, path: Path) -> DomainEntry:
    where = f"domains[{index}]"
    _require(entry, ("name", "domain_id", "weight", "train"), path, where)
    if entry["domain_id"] != index:
        raise DataError(f"{path}: {where} ('{entry['name']}') has domain_id {entry['domain_id']}; "
                        f"ids must be the list positions 0..n-1")
    if not float(entry["weight"]) > 0:
        raise DataError(f"{path}: {where} ('{entry['name']}') has weight {entry['weight']}; weights must be > 0")
    if entry["train"] is None:
        raise DataError(f"{path}: domain '{entry['name']}' has no training data")
    return DomainEntry(entry["name"], index, float(entry["weight"]),
                       _split_files(entry["train"], entry["name"], "train", path),
                       _split_files(entry.get("valid"), entry["name"], "valid", path))


def _split_files(entry: Optional[dict], name: str, split: str, path: Path) -> Optional[SplitFiles]:
    if entry is None:
        return None
    _require(entry, ("text_prefix", "loss_mask_prefix", "documents", "tokens"), path, f"{name}.{split}")
    prefixes = [str((path.parent / entry[key]).resolve()) for key in ("text_prefix", "loss_mask_prefix")]
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise DataError(f"{path}: domain '{name}' ({split}) needs {prefix + suffix}, which is "
                                f"missing. Fix: rerun desmoe-preprocess, or keep blend.json next to "
                                f"its domain folders")
    return SplitFiles(prefixes[0], prefixes[1], int(entry["documents"]), int(entry["tokens"]),
                      int(entry.get("answer_tokens", 0)))


def _require(mapping: Any, keys, path: Path, where: str = "top level") -> None:
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: {where} must be a JSON object")
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise DataError(f"{path}: {where} lacks {', '.join(missing)}")

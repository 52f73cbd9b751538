"""End-to-end recipes on a multi-domain corpus: tokenizer + indexed data, a tiny pretrained
base, and fine-tuning runs. Used by the embedded quickstart and by the benchmark.

Every stage is cached under a work directory and reused when its inputs are unchanged
(a stamp file records them), so reruns skip what is already built.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_desmoe.training import checkpoint as ckpt
from megatron_desmoe.training.config import TrainConfig
from megatron_desmoe.training.trainer import TrainSummary, run_training

#: The corpus layout of ../shared/data/domains: domain -> file (README there).
CORPUS_FILES = {
    "general": "general/wikitext2.txt",
    "math": "math/gsm8k.jsonl",
    "code": "code/codealpaca.json",
    "law": "law/law.jsonl",
    "intent": "intent/intent.jsonl",
    "summary": "summary/summary.jsonl",
    "translation": "translation/translation.jsonl",
}
#: Fine-tuning domains in the paper's order of growth (math and code first).
FINE_TUNING_DOMAINS = ["math", "code", "law", "intent", "summary", "translation"]

#: The quickstart / benchmark model: Qwen3-MoE structure, 8 experts top-2, CPU-sized.
TINY_MODEL = dict(preset="qwen3-moe-tiny",
                  model_overrides={"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4,
                                   "num_query_groups": 2, "kv_channels": 32,
                                   "moe_ffn_hidden_size": 128, "num_experts": 8, "topk": 2,
                                   "max_position_embeddings": 512})


@dataclass
class CorpusSettings:
    vocab_size: int = 4000
    tokenizer_documents: int = 1500  # records per domain used to train the tokenizer
    max_documents: Optional[int] = None  # records per domain preprocessed (None: all)
    valid_fraction: float = 0.05
    workers: int = 2
    seed: int = 1234


def _stamp(path: Path, inputs: dict) -> bool:
    """True if `path` was built from exactly `inputs`; records them otherwise."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    stamp = path / ".desmoe-stamp"
    return stamp.is_file() and stamp.read_text() == digest


def _write_stamp(path: Path, inputs: dict) -> None:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    (path / ".desmoe-stamp").write_text(digest)


def prepare_corpus(corpus_dir: Path, work_dir: Path, settings: CorpusSettings = CorpusSettings(),
                   domains: Optional[list[str]] = None) -> Path:
    """Tokenizer trained on the corpus + indexed data for every domain; returns blend.json."""
    from megatron_desmoe.data.cli import main as preprocess
    from megatron_desmoe.data.tokenizer_cli import main as train_tokenizer

    domains = domains or list(CORPUS_FILES)
    out = Path(work_dir) / "corpus"
    inputs = {"corpus": str(corpus_dir), "domains": domains, **asdict(settings)}
    if _stamp(out, inputs):
        return out / "data" / "blend.json"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    flags = []
    for name in domains:
        path = Path(corpus_dir) / CORPUS_FILES[name]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: set DESMOE_DATA_DIR to the corpus folder")
        flags += ["--input", f"{name}={path}"]
    tokenizer = out / "tokenizer.model"
    code = train_tokenizer(flags + ["--max-documents", str(settings.tokenizer_documents),
                                    "--vocab-size", str(settings.vocab_size),
                                    "--character-coverage", "0.9995", "--output", str(tokenizer)])
    if code:
        raise RuntimeError("tokenizer training failed (see the message above)")
    extra = ["--max-documents", str(settings.max_documents)] if settings.max_documents else []
    code = preprocess(flags + extra + ["--tokenizer-model", str(tokenizer), "--output",
                                       str(out / "data"), "--workers", str(settings.workers),
                                       "--valid-fraction", str(settings.valid_fraction),
                                       "--seed", str(settings.seed)])
    if code:
        raise RuntimeError("preprocessing failed (see the message above)")
    _write_stamp(out, inputs)
    return out / "data" / "blend.json"


@dataclass
class RunSettings:
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-4
    lr_warmup_iters: int = 10
    weight_decay: float = 0.01
    eval_iters: int = 8
    log_interval: int = 25
    seed: int = 1234
    model: dict = field(default_factory=lambda: dict(TINY_MODEL))


def pretrain_base(blend: Path, work_dir: Path, steps: int, settings: RunSettings = RunSettings(),
                  domain: str = "general") -> Path:
    """Full training of the tiny MoE on the general text: the 'pretrained' base (cached)."""
    save = Path(work_dir) / "base"
    inputs = {"blend": str(blend), "steps": steps, **asdict(settings)}
    if _stamp(save, inputs) and ckpt.latest_iteration(save) == steps:
        return save
    if save.exists():
        shutil.rmtree(save)
    save.mkdir(parents=True)
    config = _config(blend, settings, domains=[domain], method="full", train_iters=steps,
                     save=str(save), desmoe={})
    run_training(config)
    _write_stamp(save, inputs)
    return save


def finetune(blend: Path, base: Path, save: Optional[Path], method: str, domains: list[str],
             steps: int, settings: RunSettings = RunSettings(), desmoe: Optional[dict] = None,
             **changes) -> TrainSummary:
    """Fine-tune the base with `method` on `domains` (a fresh run; `save` is replaced)."""
    if save is not None and Path(save).exists():
        shutil.rmtree(save)
    config = _config(blend, settings, domains=domains, method=method, train_iters=steps,
                     pretrained=str(base), save=str(save) if save else None,
                     desmoe=dict(desmoe or {}), **changes)
    return run_training(config)


def _config(blend: Path, settings: RunSettings, **values) -> TrainConfig:
    model = dict(settings.model)
    fields = dict(data_blend=str(blend), seq_length=settings.seq_length,
                  micro_batch_size=settings.micro_batch_size,
                  global_batch_size=settings.global_batch_size, lr=settings.lr,
                  min_lr=settings.min_lr, lr_warmup_iters=settings.lr_warmup_iters,
                  weight_decay=settings.weight_decay, eval_iters=settings.eval_iters,
                  log_interval=settings.log_interval, seed=settings.seed,
                  preset=model["preset"], model_overrides=model.get("model_overrides", {}))
    fields.update(values)
    return TrainConfig(**fields)

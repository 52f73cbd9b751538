"""Training configuration: a YAML file and/or Megatron-style command-line flags.

Flags use Megatron-LM's names (--tensor-model-parallel-size, --micro-batch-size, --lr, ...)
so launch scripts read as users expect; a YAML file (--config) sets the same fields with
underscores, and flags given on the command line win. Everything is validated before any
model, process group or dataset is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_desmoe.desmoe.config import DESMoEConfig
from megatron_desmoe.errors import ConfigError

METHODS = ("desmoe", "full", "esft_token", "esft_gate")
FP8_FORMATS = ("e4m3", "hybrid")


@dataclass
class TrainConfig:
    # ---- model
    preset: str = "mixtral-tiny"  # model preset name (megatron_desmoe.models.presets)
    model_overrides: dict = field(default_factory=dict)  # MoEModelConfig fields changed on the preset
    pretrained: Optional[str] = None  # dist checkpoint of the base model (weights only)
    backend: str = "local"  # "local" (CPU/GPU, Megatron modules) or "te" (Transformer Engine)
    bf16: bool = False  # bf16 parameters and compute (GPU)
    fp8_format: Optional[str] = None  # e4m3 | hybrid; needs backend te on an FP8-capable GPU
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    # ---- parallel layout (data parallel = world size / (TP * PP))
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False  # required with TP > 1 for MoE
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    use_distributed_optimizer: bool = False  # shard optimizer state over data parallel ranks
    overlap_grad_reduce: bool = False
    # ---- data
    data_blend: Optional[str] = None  # blend.json written by desmoe-preprocess
    tokenizer_model: Optional[str] = None  # the model's SentencePiece .model: refused if the data used another
    hf_tokenizer: Optional[str] = None  # or the model's Hugging Face tokenizer directory
    domains: Optional[list[str]] = None  # subset of the blend's domains to fine-tune on
    domain_weights: Optional[list[float]] = None  # sampling weights, same order as domains
    domain_pure_batches: bool = False  # every micro-batch from one domain (batch-level isolation)
    seq_length: int = 128  # tokens per sample
    micro_batch_size: int = 4  # samples per micro-batch per data-parallel rank
    global_batch_size: int = 8  # samples per optimizer step over all data-parallel ranks
    # ---- optimisation
    train_iters: int = 100  # optimizer steps
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    lr_warmup_iters: int = 0  # linear warm-up steps
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0  # global gradient-norm clip
    seed: int = 1234
    # ---- method
    method: str = "desmoe"  # desmoe | full | esft_token | esft_gate
    desmoe: dict = field(default_factory=dict)  # DESMoEConfig fields (num_domains is set from the blend)
    # ---- checkpoints
    save: Optional[str] = None  # directory for checkpoints
    load: Optional[str] = None  # directory to resume from (latest checkpoint in it)
    no_load_optim: bool = False  # with --load: restore model, DES-MoE state and step, not the optimizer
    save_interval: int = 0  # steps between checkpoints (0: only at the end)
    exit_interval: int = 0  # stop (after saving) once the step count is a multiple of this
    # ---- logging / evaluation
    log_interval: int = 10  # steps between progress lines
    eval_interval: int = 0  # steps between per-domain validation (0: only at the end)
    eval_iters: int = 4  # validation micro-batches per domain, over all data-parallel ranks
    tensorboard_dir: Optional[str] = None  # TensorBoard event files (default <save>/tensorboard)
    metrics_file: Optional[str] = None  # JSONL metrics (default <save>/metrics.jsonl)

    def desmoe_config(self, num_domains: int) -> DESMoEConfig:
        fields = dict(self.desmoe, num_domains=num_domains, method=self.method)
        return DESMoEConfig.from_dict(fields)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}", f"use one of {METHODS}")
        if self.fp8_format is not None and self.fp8_format not in FP8_FORMATS:
            raise ConfigError("fp8_format", f"unknown format {self.fp8_format!r}",
                              f"use one of {FP8_FORMATS}")
        if self.fp8_format and self.backend != "te":
            raise ConfigError("fp8_format", "FP8 runs through Transformer Engine",
                              "add --transformer-impl transformer_engine (backend te) on a GPU")
        for name in ("train_iters", "micro_batch_size", "global_batch_size", "seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}", "use 1 or more")
        data_parallel = world_size // (self.tensor_model_parallel_size *
                                       self.pipeline_model_parallel_size)
        per_step = self.micro_batch_size * max(data_parallel, 1)
        if self.global_batch_size % per_step:
            raise ConfigError(
                "global_batch_size", f"{self.global_batch_size} is not divisible by "
                f"micro_batch_size x data_parallel = {per_step}",
                f"use a multiple of {per_step}",
            )
        if self.eval_iters % max(data_parallel, 1):
            raise ConfigError("eval_iters", f"{self.eval_iters} validation micro-batches do not "
                              f"split over {data_parallel} data-parallel ranks",
                              f"use a multiple of {data_parallel}")
        if self.domains and self.domain_weights and len(self.domains) != len(self.domain_weights):
            raise ConfigError("domain_weights", "needs one weight per domain",
                              f"give {len(self.domains)} weights")
        if self.save_interval < 0 or self.log_interval < 1:
            raise ConfigError("save_interval", "intervals must be positive", "use >= 1 (0: end only)")
        return self

    def num_microbatches(self, world_size: int) -> int:
        data_parallel = world_size // (self.tensor_model_parallel_size *
                                       self.pipeline_model_parallel_size)
        return self.global_batch_size // (self.micro_batch_size * data_parallel)


_FLAG_ALIASES = {"transformer_impl": "backend"}


def _flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Multi-domain DES-MoE fine-tuning of a Megatron-Core MoE model. "
        "Launch with torchrun; flags follow Megatron-LM's names.")
    parser.add_argument("--config", help="YAML file with TrainConfig fields")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and print the parallel plan, build nothing")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in ("domains",):
            parser.add_argument(flag, dest=f.name, nargs="+", default=None)
        elif f.name == "domain_weights":
            parser.add_argument(flag, dest=f.name, nargs="+", type=float, default=None)
        elif f.name == "desmoe":
            parser.add_argument("--desmoe", dest="desmoe", action="append", default=None,
                                metavar="KEY=VALUE", help="DESMoEConfig field, e.g. phi=0.6")
        else:
            parser.add_argument(flag, dest=f.name, type=_scalar_type(f), default=None)
    parser.add_argument("--transformer-impl", dest="backend", choices=["local", "transformer_engine"],
                        default=None)
    return parser


def _scalar_type(f: dataclasses.Field):
    text = str(f.type)
    if "int" in text and "Optional" not in text:
        return int
    if "float" in text:
        return float
    return str


def parse_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = _flag_parser().parse_args(argv)
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for name, value in vars(args).items():
        if name in ("config", "dry_run") or value is None:
            continue
        if name == "desmoe":
            values["desmoe"] = dict(values.get("desmoe", {}), **_key_values(value))
        elif name == "backend":
            values["backend"] = "te" if value in ("te", "transformer_engine") else "local"
        else:
            values[name] = value
    return config_from_dict(values), args


def load_yaml(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError("config", f"{path} does not exist", "pass an existing YAML file")
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of TrainConfig fields",
                          "write key: value lines")
    return data


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {_FLAG_ALIASES.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(unknown[0], "is not a training option",
                          "see `desmoe-train --help` for the accepted fields")
    return TrainConfig(**values)


def _key_values(pairs: list[str]) -> dict:
    result = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError("desmoe", f"{pair!r} is not KEY=VALUE", "write e.g. --desmoe phi=0.6")
        key, value = pair.split("=", 1)
        result[key] = yaml.safe_load(value)
    return result

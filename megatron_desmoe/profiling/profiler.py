"""Throughput profiler: training-step time, tokens/s, model TFLOP/s, MFU and peak memory of
one model and parallel layout, per precision (fp32 / bf16 / each FP8 recipe), for the stock
Megatron router and for DES-MoE on the same config.

One step is the project's training step, `megatron_desmoe.training.engine.train_step`:
Float16Module for bf16/fp16, Megatron DDP (gradient buffers, DP all-reduce through
`finalize_model_grads`), Megatron's forward/backward schedule (1F1B with pipeline
parallelism), Megatron's optimizer step (Adam, fp32 main weights) and the loss reduction.
The batch is random token ids with per-sample domain ids; the stock run ignores the ids.

DES-MoE runs with every mechanism on at once, as in its stabilisation phase: the adapter
(trainable, added to the frozen logits), the distillation loss (weight `kd_weight`),
affinity accumulation and gradient isolation with a realistic mask, i.e. the phi-threshold
mask (`affinity_mask`) of a random peaked affinity (one Dirichlet(alpha) row per domain and
layer). Both routers train every parameter, so the ratio measures the mechanisms, not the
phase's freezing (which only removes work). Not included: `DESMoEController`'s per-step
bookkeeping outside the model (choosing parameters to skip, the affinity refresh every
T_update steps).

Timing: `warmup_steps` untimed steps, then `timed_steps` steps timed one by one, with CUDA
events on a GPU and `time.perf_counter` on a CPU; with several ranks, the slowest rank's
time per step. Figures use the median step time.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.models.builder import (  # noqa: E402
    DTYPES,
    ParallelConfig,
    transformer_config,
    validate_layout,
)
from megatron_desmoe.models.presets import (  # noqa: E402
    MoEModelConfig,
    count_active_parameters,
    count_parameters,
)
from megatron_desmoe.models.spec import MoEClasses, te_available  # noqa: E402
from megatron_desmoe.parallel.setup import init_model_parallel  # noqa: E402
from megatron_desmoe.profiling.devices import lookup_peak  # noqa: E402
from megatron_desmoe.profiling.flops import (  # noqa: E402
    BACKWARD_MULTIPLIER,
    adapter_forward_flops,
    forward_flops,
    training_step_flops,
)
from megatron_desmoe.profiling.fp8 import (  # noqa: E402
    FP8_RECIPES,
    check_fp8_shapes,
    check_fp8_supported,
    detect_te_version,
    fp8_settings,
)

ROUTERS = ("stock", "desmoe")
MECHANISMS = ("kd", "affinity", "isolation")
SCHEMA = "desmoe-profile/1"


@dataclass
class ProfileSpec:
    """What to profile. Precisions: "fp32", "bf16", "fp16", "fp8-<recipe>"; empty = automatic
    (GPU: bf16 and every FP8 recipe; CPU: fp32)."""

    model: MoEModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seq_len: int = 256
    micro_batch: int = 1
    num_microbatches: int = 1
    warmup_steps: int = 2
    timed_steps: int = 5
    precisions: tuple[str, ...] = ()
    routers: tuple[str, ...] = ROUTERS
    backend: str = "auto"  # "auto": te where TE imports and a GPU is present, else local
    fp8_format: Optional[str] = None  # None: the recipe's default (hybrid / e4m3)
    num_domains: int = 4
    kd_weight: float = 1.0
    mask_alpha: float = 0.3  # Dirichlet concentration of the random affinity (lower = peakier)
    desmoe_options: dict = field(default_factory=dict)  # extra DESMoEConfig fields
    # DES-MoE mechanisms switched on besides the adapter (benchmarks ablate them)
    desmoe_mechanisms: tuple[str, ...] = ("kd", "affinity", "isolation")
    peak_tflops: Optional[float] = None  # overrides the device table for MFU
    seed: int = 1234

    def validate(self) -> "ProfileSpec":
        for name in ("seq_len", "micro_batch", "num_microbatches", "timed_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}", "use 1 or more")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", "must be >= 0", "use 0 or more")
        if self.seq_len > self.model.max_position_embeddings:
            raise ConfigError("seq_len", f"{self.seq_len} exceeds the model's "
                              f"max_position_embeddings={self.model.max_position_embeddings}",
                              "use a shorter sequence")
        for router in self.routers:
            if router not in ROUTERS:
                raise ConfigError("routers", f"unknown router {router!r}", f"use {ROUTERS}")
        if not self.routers:
            raise ConfigError("routers", "empty", f"use some of {ROUTERS}")
        for precision in self.precisions:
            parse_precision(precision)
        for mechanism in self.desmoe_mechanisms:
            if mechanism not in MECHANISMS:
                raise ConfigError("desmoe_mechanisms", f"unknown mechanism {mechanism!r}",
                                  f"use some of {MECHANISMS}")
        if self.backend not in ("auto", "local", "te"):
            raise ConfigError("backend", f"unknown backend {self.backend!r}", "use auto, local or te")
        return self


def parse_precision(precision: str) -> tuple[str, Optional[str]]:
    """"bf16" -> ("bf16", None); "fp8-delayed" -> ("bf16", "delayed")."""
    if precision.startswith("fp8-"):
        recipe = precision[4:]
        if recipe not in FP8_RECIPES:
            raise ConfigError("precision", f"unknown FP8 recipe in {precision!r}",
                              f"use one of {['fp8-' + r for r in FP8_RECIPES]}")
        return "bf16", recipe
    if precision not in DTYPES:
        raise ConfigError("precision", f"unknown precision {precision!r}",
                          f"use fp32, bf16, fp16 or fp8-<{'|'.join(FP8_RECIPES)}>")
    return precision, None


def default_precisions(on_gpu: bool) -> tuple[str, ...]:
    return ("bf16",) + tuple(f"fp8-{r}" for r in FP8_RECIPES) if on_gpu else ("fp32",)


# ----------------------------------------------------------------------------- main entry


def run_profile(spec: ProfileSpec, log: Callable[[str], None] = lambda _: None) -> dict:
    """Profile every (precision, router) pair of `spec`; the result is a JSON-ready dict.

    Initialises torch.distributed (a world of one without torchrun) and Megatron's groups.
    """
    spec.validate()
    spec.model.validate()
    init_model_parallel(spec.parallel, seed=spec.seed)
    world = dist.get_world_size()
    validate_layout(spec.model, spec.parallel, world)
    on_gpu = torch.cuda.is_available()
    backend = spec.backend
    if backend == "auto":
        backend = "te" if on_gpu and te_available() else "local"
    precisions = spec.precisions or default_precisions(on_gpu)
    dp = spec.parallel.data_parallel(world)
    global_sequences = spec.micro_batch * spec.num_microbatches * dp
    tokens_per_step = global_sequences * spec.seq_len
    step_flops = training_step_flops(spec.model, spec.seq_len, global_sequences)
    device = _device_info(on_gpu, spec.peak_tflops)

    runs, skipped = [], []
    for precision in precisions:
        dtype, recipe = parse_precision(precision)
        reason = _skip_reason(spec, recipe, backend)
        if reason:
            skipped.append({"precision": precision, "reason": reason})
            log(f"skip {precision}: {reason}")
            continue
        for router in spec.routers:
            log(f"run {precision} / {router} ...")
            timing, memory, extra = _measure(spec, dtype, recipe, router, backend, on_gpu)
            if extra.get("adapter_hidden_size"):
                extra["adapter_flops_per_step"] = BACKWARD_MULTIPLIER * global_sequences * \
                    adapter_forward_flops(spec.model, extra["adapter_hidden_size"], spec.seq_len)
                extra["adapter_flops_share"] = extra["adapter_flops_per_step"] / step_flops
            runs.append(_run_record(precision, router, timing, memory, extra, tokens_per_step,
                                    step_flops, world, device))
            log(f"    median step {timing['median_s'] * 1e3:.1f} ms")

    overhead = {}
    for precision in precisions:
        by_router = {r["router"]: r for r in runs if r["precision"] == precision}
        if "stock" in by_router and "desmoe" in by_router:
            overhead[precision] = (by_router["desmoe"]["step_time"]["median_s"]
                                   / by_router["stock"]["step_time"]["median_s"])
    return {
        "schema": SCHEMA,
        "model": {**asdict(spec.model), "total_params": count_parameters(spec.model),
                  "active_params": count_active_parameters(spec.model)},
        "parallel": {**asdict(spec.parallel), "world_size": world, "data_parallel": dp},
        "workload": {
            "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
            "num_microbatches": spec.num_microbatches, "global_batch_sequences": global_sequences,
            "tokens_per_step": tokens_per_step, "warmup_steps": spec.warmup_steps,
            "timed_steps": spec.timed_steps, "backend": backend,
            "num_domains": spec.num_domains, "kd_weight": spec.kd_weight,
            "mask_alpha": spec.mask_alpha,
            "desmoe_mechanisms": list(spec.desmoe_mechanisms),
        },
        "device": device,
        "flops": {
            "per_step": step_flops,
            "forward_per_sequence": forward_flops(spec.model, spec.seq_len).as_dict(),
            "formula": "3 x forward model FLOPs (active experts only); docs/performance.md",
        },
        "runs": runs,
        "skipped": skipped,
        "desmoe_overhead": overhead,
        "environment": _environment(),
    }


# ----------------------------------------------------------------------------- one run


def _skip_reason(spec: ProfileSpec, recipe: Optional[str], backend: str) -> Optional[str]:
    if recipe is None:
        return None
    try:
        check_fp8_supported(recipe)
        if backend != "te":
            raise ConfigError("backend", "FP8 needs the Transformer Engine layer spec",
                              "use --backend te (or auto)")
        check_fp8_shapes(spec.model, recipe, seq_len=spec.seq_len, micro_batch=spec.micro_batch,
                         tensor_parallel=spec.parallel.tensor_parallel,
                         sequence_parallel=spec.parallel.sequence_parallel)
    except ConfigError as error:
        return str(error)
    return None


class StepRunner:
    """One model (stock or DES-MoE router) at one precision, ready to run training steps
    through the project's engine (`megatron_desmoe.training.engine`: Float16Module for
    bf16/fp16, Megatron DDP, Megatron optimizer, forward/backward schedule, loss reduction).
    `step()` runs one optimizer step; `close()` frees the model. Several runners may coexist
    (the overhead benchmark interleaves them)."""

    def __init__(self, spec: ProfileSpec, *, dtype: str, recipe: Optional[str], router: str,
                 backend: str, on_gpu: bool):
        from megatron_desmoe.training.engine import (
            build_optimizer,
            build_training_model,
            make_forward_step,
            unwrap_model,
        )

        self.spec, self.on_gpu = spec, on_gpu
        fp8_kwargs = fp8_settings(recipe, spec.fp8_format) if recipe else {}
        self.extra: dict = {}
        moe_classes, desmoe = MoEClasses(), None
        if router == "desmoe":
            from megatron_desmoe.desmoe.config import DESMoEConfig
            from megatron_desmoe.megatron.spec import desmoe_moe_classes, validate_megatron_config

            desmoe = DESMoEConfig(num_domains=spec.num_domains, **spec.desmoe_options).validate()
            validate_megatron_config(
                transformer_config(spec.model, spec.parallel, backend=backend, dtype=dtype,
                                   pipeline_dtype=DTYPES[dtype], **fp8_kwargs), desmoe)
            moe_classes = desmoe_moe_classes(desmoe)
        self.chunks = build_training_model(
            spec.model, spec.parallel, dtype=dtype, seed=spec.seed, moe_classes=moe_classes,
            backend=backend, **fp8_kwargs)
        model = unwrap_model(self.chunks[0])
        if desmoe is not None:
            self.extra.update(_switch_desmoe_on(model, spec, desmoe))
        self.optimizer = build_optimizer(self.chunks, lr=1e-5, weight_decay=0.0)
        self.config = self.chunks[0].config
        self.batch = _random_batch(spec, on_gpu)
        self.blocks = _expert_blocks(model)
        context = None
        if desmoe is not None:
            from megatron_desmoe.megatron.domain_context import domain_ids_context

            context = lambda batch: domain_ids_context(batch["domain_ids"], spec.num_domains)  # noqa: E731
        self.forward_step = make_forward_step(context)

    def step(self) -> None:
        from megatron_desmoe.training.engine import train_step

        spec = self.spec
        for block in self.blocks:  # as DESMoEController.begin_step does
            block.reset_allowed_tokens()
        train_step(self.chunks, self.optimizer, iter([self.batch] * spec.num_microbatches),
                   num_microbatches=spec.num_microbatches, micro_batch_size=spec.micro_batch,
                   seq_length=spec.seq_len, forward_step_func=self.forward_step)

    def timed_step(self) -> float:
        """Seconds of one step: CUDA events on a GPU, perf_counter on a CPU (this rank)."""
        return _timed(self.step, self.on_gpu)

    def close(self) -> None:
        config = self.config
        config.no_sync_func = config.grad_sync_func = None
        config.finalize_model_grads_func = config.grad_scale_func = None
        self.chunks = self.optimizer = self.blocks = self.batch = None
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()


def _measure(spec: ProfileSpec, dtype: str, recipe: Optional[str], router: str, backend: str,
             on_gpu: bool) -> tuple[dict, dict, dict]:
    runner = StepRunner(spec, dtype=dtype, recipe=recipe, router=router, backend=backend,
                        on_gpu=on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec.warmup_steps):
        runner.step()
    times = slowest_rank([runner.timed_step() for _ in range(spec.timed_steps)], on_gpu)
    memory = _peak_memory(on_gpu)
    extra = runner.extra
    runner.close()
    return summarise(times), memory, extra


def _switch_desmoe_on(model, spec: ProfileSpec, desmoe) -> dict:
    """Switch on `spec.desmoe_mechanisms` (default all: KD, affinity collection, isolation
    with a phi-threshold mask of a random peaked affinity, different per layer). Returns
    what the record should say about the DES-MoE run."""
    from megatron_desmoe.desmoe.affinity import affinity_mask
    from megatron_desmoe.megatron.experts import DESMoESequentialMLP
    from megatron_desmoe.megatron.router import DESMoERouter

    on = set(spec.desmoe_mechanisms)
    routers = [m for m in model.modules() if isinstance(m, DESMoERouter)]
    densities = []
    for index, router in enumerate(routers):
        affinity = random_affinity(spec.num_domains, spec.model.num_experts, spec.model.topk,
                                   alpha=spec.mask_alpha, seed=spec.seed + index)
        mask = affinity_mask(affinity, desmoe.phi)
        router.affinity.mask = mask.to(router.weight.device)
        router.kd_weight = spec.kd_weight if "kd" in on else 0.0
        router.collect_affinity = "affinity" in on
        router.isolation_active = "isolation" in on
        densities.append(float(mask.float().mean()))
    for block in model.modules():
        if isinstance(block, DESMoESequentialMLP):
            block.isolation_active = "isolation" in on
    return {"mechanisms": ["adapter"] + [m for m in MECHANISMS if m in on]
            if desmoe.uses_adapter else [m for m in MECHANISMS if m in on],
            "mask_density": statistics.fmean(densities) if densities else None,
            "adapter_hidden_size": desmoe.adapter_width(spec.model.hidden_size)
            if desmoe.uses_adapter else None,
            "phi": desmoe.phi}


def random_affinity(num_domains: int, num_experts: int, topk: int, *, alpha: float,
                    seed: int) -> torch.Tensor:
    """A [D, E] selection-frequency matrix (rows sum to top-k) drawn from Dirichlet(alpha)."""
    # torch's Dirichlet sampler takes no generator: draw under a forked, seeded global RNG
    # so the profile leaves the caller's random state alone and is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rows = torch.distributions.Dirichlet(torch.full((num_experts,), float(alpha))).sample(
            (num_domains,))
    return rows.to(torch.float64) * topk


def _expert_blocks(model) -> list:
    try:
        from megatron_desmoe.megatron.experts import DESMoESequentialMLP
    except Exception:
        return []
    return [m for m in model.modules() if isinstance(m, DESMoESequentialMLP)]


def _random_batch(spec: ProfileSpec, on_gpu: bool) -> dict:
    """One micro-batch in the engine's format; samples cycle through the domains."""
    generator = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, spec.model.vocab_size, (spec.micro_batch, spec.seq_len + 1),
                        generator=generator)
    batch = {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": torch.ones(spec.micro_batch, spec.seq_len),
        "position_ids": torch.arange(spec.seq_len).expand(spec.micro_batch, -1).contiguous(),
        "domain_ids": torch.arange(spec.micro_batch) % spec.num_domains,
    }
    if on_gpu:
        batch = {key: value.cuda(non_blocking=True) for key, value in batch.items()}
    return batch


def _timed(step: Callable[[], None], on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    step()
    return time.perf_counter() - begin


def slowest_rank(times: list[float], on_gpu: bool) -> list[float]:
    if dist.get_world_size() == 1:
        return times
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tensor = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def _peak_memory(on_gpu: bool) -> dict:
    if on_gpu:
        peak = torch.tensor([torch.cuda.max_memory_allocated()], dtype=torch.float64,
                            device=torch.device("cuda", torch.cuda.current_device()))
        if dist.get_world_size() > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"peak_mib": float(peak.item()) / 2**20,
                "kind": "torch.cuda.max_memory_allocated, largest rank"}
    # ru_maxrss is KiB on Linux: the process high-water mark, monotonic across runs
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": rss, "kind": "host RSS high-water mark of rank 0's process "
            "(monotonic over the whole profile, not per run)"}


def summarise(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "samples_s": times,
    }


def _run_record(precision, router, timing, memory, extra, tokens_per_step, step_flops, world,
                device) -> dict:
    seconds = timing["median_s"]
    tflops = step_flops / seconds / world / 1e12
    peak = device["peak_tflops"].get(precision) if device["peak_tflops"] else None
    return {
        "precision": precision,
        "router": router,
        "step_time": timing,
        "tokens_per_s_per_gpu": tokens_per_step / seconds / world,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_mib": memory["peak_mib"],
        "memory_kind": memory["kind"],
        **({"desmoe": extra} if extra else {}),
    }


def _device_info(on_gpu: bool, peak_override: Optional[float]) -> dict:
    if not on_gpu:
        return {"type": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "peak_tflops": {k: peak_override for k in ("fp32", "bf16", "fp16")}
                if peak_override else None,
                "peak_source": "--peak-tflops" if peak_override else
                "no CPU peak table: MFU not reported"}
    name = torch.cuda.get_device_name()
    peak = lookup_peak(name)
    if peak_override:
        peaks = {p: peak_override for p in ("bf16", "fp16") + tuple(f"fp8-{r}" for r in FP8_RECIPES)}
        source = "--peak-tflops"
    elif peak is not None:
        peaks = {"bf16": peak.bf16_tflops, "fp16": peak.bf16_tflops}
        if peak.fp8_tflops:
            peaks.update({f"fp8-{r}": peak.fp8_tflops for r in FP8_RECIPES})
        source = f"{peak.name}: {peak.source}"
    else:
        peaks, source = None, f"{name!r} is not in the peak table: MFU not reported"
    return {"type": "cuda", "name": name, "capability": list(torch.cuda.get_device_capability()),
            "peak_tflops": peaks, "peak_source": source}


def _environment() -> dict:
    def version(dist_name: str) -> Optional[str]:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": version("megatron-core"),
        "transformer_engine": detect_te_version(),
        "platform": platform.platform(),
    }

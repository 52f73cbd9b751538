"""The benchmark runs: one pretrained base, then for each number of domains N, each seed and
each method a fine-tuning run on the first N domains with identical data, steps and
hyper-parameters; plus the engine-level step-time overhead of DES-MoE over the stock router.

Every finished run is recorded in <out>/runs/N<n>/seed<s>/<method>/record.json and reused
when the benchmark is restarted with the same settings, so an interrupted full run resumes
and a partial one can still be reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_desmoe.benchmark import metrics as M
from megatron_desmoe.training.recipes import (
    FINE_TUNING_DOMAINS,
    TINY_MODEL,
    CorpusSettings,
    RunSettings,
    finetune,
    prepare_corpus,
    pretrain_base,
)

METHODS = ("full", "esft_token", "esft_gate", "desmoe")
BASELINES = ("full", "esft_token", "esft_gate")
#: The paper's headline figures (DES-MoE, EMNLP 2025), for comparison only.
PAPER = {"forgetting_reduction": 0.89, "domain_quality_ratio": 1.0, "time_to_target_reduction": 0.68}


@dataclass
class BenchmarkSettings:
    mode: str
    domain_counts: list[int]
    seeds: list[int]
    steps: int  # fine-tuning steps of every run
    base_steps: int  # pretraining steps of the base on the general text
    corpus: CorpusSettings
    base_run: RunSettings  # settings of the base pretraining (seed fixed: one base for all)
    run: RunSettings  # fine-tuning settings shared by every method (seed replaced per run)
    desmoe: dict  # DESMoEConfig fields shared by every method
    methods: tuple = METHODS
    window: int = 10  # running-mean window of the training loss (steps)
    margin: float = 0.02  # target = full FT's final running mean x (1 + margin)
    overhead_repeats: int = 5
    overhead_steps: int = 5
    work_dir: Optional[str] = None  # corpus + base cache (None: <cache>/benchmark-<mode>)

    def key(self) -> str:
        """Identity of a run's inputs (everything but seeds, N lists and the overhead)."""
        values = asdict(self)
        for name in ("domain_counts", "seeds", "overhead_repeats", "overhead_steps", "mode"):
            values.pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_settings() -> BenchmarkSettings:
    """The full mode. Sized for a shared 2-core CPU (see docs/benchmark.md). The corpus and
    the base are exactly the quickstart's (examples/quickstart.py), so its cache is reused."""
    return BenchmarkSettings(
        mode="full", domain_counts=[2, 3, 4, 5, 6], seeds=[1, 2], steps=80, base_steps=300,
        corpus=CorpusSettings(), base_run=RunSettings(),
        run=RunSettings(lr_warmup_iters=8, eval_iters=8, log_interval=20),
        desmoe={"affinity_update_interval": 8}, window=10, margin=0.02,
        overhead_repeats=5, overhead_steps=5)


def fast_settings() -> BenchmarkSettings:
    """The CI smoke mode: a small corpus, a 2-layer model, N = 2, one seed, a few steps."""
    model = {"preset": TINY_MODEL["preset"],
             "model_overrides": dict(TINY_MODEL["model_overrides"], hidden_size=64, num_layers=2,
                                     moe_ffn_hidden_size=64, kv_channels=16)}
    small = dict(seq_length=128, micro_batch_size=2, global_batch_size=2, eval_iters=2,
                 log_interval=5, model=model)
    return BenchmarkSettings(
        mode="fast", domain_counts=[2], seeds=[1], steps=8, base_steps=12,
        corpus=CorpusSettings(vocab_size=3000, tokenizer_documents=300, max_documents=150),
        base_run=RunSettings(lr_warmup_iters=2, **small),
        run=RunSettings(lr_warmup_iters=2, **small),
        desmoe={"affinity_update_interval": 2, "adapter_hidden_size": 32}, window=3, margin=0.02,
        overhead_repeats=2, overhead_steps=2)


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def step_timer():
    """Wall-clock of every training step run_training takes (its train_step calls only)."""
    from megatron_desmoe.training import trainer

    original = trainer.train_step
    times: list[float] = []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        times.append(time.perf_counter() - started)
        return result

    trainer.train_step = timed
    try:
        yield times
    finally:
        trainer.train_step = original


# --------------------------------------------------------------------------- runs


def run_benchmark(settings: BenchmarkSettings, out: Path, corpus_dir: Path,
                  overhead: bool = True, log=print, command: Optional[str] = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from megatron_desmoe.settings import cache_dir

    work = Path(settings.work_dir) if settings.work_dir else cache_dir() / f"benchmark-{settings.mode}"
    log(f"[benchmark] corpus and base under {work}")
    t0 = time.perf_counter()
    blend = prepare_corpus(corpus_dir, work, settings.corpus)
    base = pretrain_base(blend, work, settings.base_steps, settings.base_run)
    setup_seconds = time.perf_counter() - t0
    key = settings.key()
    runs = []
    largest = max(settings.domain_counts)
    # largest N first (the headline), all seeds, so an interrupted run still reports it
    for n in sorted(settings.domain_counts, reverse=True):
        for seed in settings.seeds:
            for method in settings.methods:
                runs.append(_one_run(settings, key, blend, base, out, n, seed, method,
                                     keep_checkpoint=(method == "desmoe" and n == largest
                                                      and seed == settings.seeds[0]), log=log))
    overhead_result = None
    if overhead:
        overhead_result = measure_overhead(settings, blend, largest, log=log)
    elif (out / "results.json").is_file():  # --no-overhead keeps an earlier measurement
        overhead_result = json.loads((out / "results.json").read_text()).get("overhead")
    results = assemble(settings, runs, overhead_result)
    results["runtime"] = {"setup_s": setup_seconds, "total_s": time.perf_counter() - started,
                          "runs_s": sum(r["run_seconds"] for r in runs)}
    results["environment"] = environment()
    results["work_dir"] = str(work)
    results["command"] = command
    from megatron_desmoe.benchmark.report import write_report

    write_report(results, out)
    return results


def _one_run(settings, key, blend, base, out, n, seed, method, keep_checkpoint, log) -> dict:
    folder = out / "runs" / f"N{n}" / f"seed{seed}" / method
    record_path = folder / "record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings_key") == key:
            log(f"[benchmark] reuse N={n} seed={seed} {method}")
            return record
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    domains = FINE_TUNING_DOMAINS[:n]
    log(f"[benchmark] N={n} seed={seed} {method}: {settings.steps} steps on {', '.join(domains)}")
    run = dataclasses.replace(settings.run, seed=seed)
    save = folder / "checkpoint" if keep_checkpoint else None
    t0 = time.perf_counter()
    with step_timer() as step_times:
        summary = finetune(blend, base, save, method, domains, settings.steps, run,
                           desmoe=settings.desmoe,
                           metrics_file=str(folder / "metrics.jsonl") if save is None else None)
    seconds = time.perf_counter() - t0
    metrics_file = (save / "metrics.jsonl") if save else folder / "metrics.jsonl"
    if save and (save / "affinity.png").is_file():
        shutil.copy(save / "affinity.png", folder / "affinity.png")
    record = {
        "settings_key": key, "n": n, "seed": seed, "method": method, "domains": domains,
        "steps": summary.steps, "losses": summary.losses, "step_times": list(step_times),
        "validation_before": summary.validation_before,
        "validation_after": summary.validation_after,
        "forgetting": M.forgetting(summary.validation_before, summary.validation_after),
        "train_seconds": float(sum(step_times)), "run_seconds": seconds,
        "metrics_file": str(metrics_file.relative_to(out)),
        "affinity_png": str((folder / "affinity.png").relative_to(out))
        if (folder / "affinity.png").is_file() else None,
    }
    record_path.write_text(json.dumps(record, indent=1))
    log(f"[benchmark]   done in {seconds:.0f} s: forgetting {record['forgetting']:+.4f}, "
        f"final loss {summary.losses[-1]:.4f}")
    return record


# --------------------------------------------------------------------------- overhead


def measure_overhead(settings: BenchmarkSettings, blend: Path, num_domains: int, log=print) -> dict:
    """Engine-level step time, DES-MoE router vs stock Megatron router, identical model,
    batch and weights (megatron_desmoe.profiling.run_profile); `overhead_repeats` profiles,
    each timing `overhead_steps` steps of both; the ratio of medians per repeat, then the
    median over repeats."""
    from megatron_desmoe.models.presets import get_preset
    from megatron_desmoe.profiling.profiler import ProfileSpec, run_profile

    vocab = json.loads(Path(blend).read_text())["tokenizer"]["vocab_size"]
    model = get_preset(settings.run.model["preset"],
                       **dict(settings.run.model.get("model_overrides", {}),
                              vocab_size=-(-vocab // 128) * 128))
    desmoe_options = {k: v for k, v in settings.desmoe.items() if k == "adapter_hidden_size"}
    ratios, stock, desmoe = [], [], []
    for repeat in range(settings.overhead_repeats):
        spec = ProfileSpec(model=model, seq_len=settings.run.seq_length,
                           micro_batch=settings.run.micro_batch_size,
                           num_microbatches=settings.run.global_batch_size // settings.run.micro_batch_size,
                           warmup_steps=1, timed_steps=settings.overhead_steps, precisions=("fp32",),
                           backend="local", num_domains=num_domains, desmoe_options=desmoe_options,
                           seed=1234 + repeat)
        result = run_profile(spec)
        by_router = {r["router"]: r["step_time"]["median_s"] for r in result["runs"]}
        stock.append(by_router["stock"])
        desmoe.append(by_router["desmoe"])
        ratios.append(by_router["desmoe"] / by_router["stock"])
        log(f"[benchmark] overhead repeat {repeat + 1}: stock {by_router['stock'] * 1e3:.1f} ms, "
            f"desmoe {by_router['desmoe'] * 1e3:.1f} ms, ratio {ratios[-1]:.3f}")
    return {"repeats": settings.overhead_repeats, "timed_steps": settings.overhead_steps,
            "num_domains": num_domains, "stock_median_s": stock, "desmoe_median_s": desmoe,
            "ratios": ratios, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "overhead_median": statistics.median(ratios) - 1.0}


# --------------------------------------------------------------------------- assembly


def assemble(settings: BenchmarkSettings, runs: list[dict], overhead: Optional[dict]) -> dict:
    """Every derived number, from the run records alone (the test recomputes them)."""
    by = {(r["n"], r["seed"], r["method"]): r for r in runs}
    # ---- targets and time to target, per (N, seed)
    for r in runs:
        full = by.get((r["n"], r["seed"], "full"))
        if full is None:
            r["target"] = r["steps_to_target"] = r["time_to_target_s"] = None
            continue
        target = M.target_loss(full["losses"], settings.window, settings.margin)
        r["target"] = target
        r["steps_to_target"] = M.steps_to_target(r["losses"], target, settings.window)
        r["time_to_target_s"] = M.time_to_target(r["step_times"], r["steps_to_target"])
    # ---- per (N, method) aggregates over seeds
    table = []
    for n in settings.domain_counts:
        for method in settings.methods:
            group = [by[(n, s, method)] for s in settings.seeds if (n, s, method) in by]
            if not group:
                continue
            domains = group[0]["domains"]
            table.append({
                "n": n, "method": method, "seeds": [g["seed"] for g in group],
                "forgetting": M.mean_std([g["forgetting"] for g in group]),
                "general_before": M.mean_std([g["validation_before"]["general"] for g in group]),
                "general_after": M.mean_std([g["validation_after"]["general"] for g in group]),
                "domain_loss_after": {d: M.mean_std([g["validation_after"][d] for g in group])
                                      for d in domains},
                "mean_domain_loss_after": M.mean_std(
                    [statistics.fmean(g["validation_after"][d] for d in domains) for g in group]),
                "final_running_loss": M.mean_std(
                    [M.running_mean(g["losses"], settings.window)[-1] for g in group]),
                "steps_to_target": M.mean_std([g["steps_to_target"] for g in group]),
                "time_to_target_s": M.mean_std([g["time_to_target_s"] for g in group]),
                "median_step_s": M.mean_std([statistics.median(g["step_times"]) for g in group]),
            })
    return {
        "schema": "desmoe-benchmark/1",
        "settings": json.loads(json.dumps(asdict(settings), default=str)),
        "definitions": M.__doc__,
        "runs": runs,
        "table": table,
        "headline": headline(settings, by),
        "overhead": overhead,
        "paper": PAPER,
    }


def headline(settings: BenchmarkSettings, by: dict) -> dict:
    """The paper's three ratios at the largest N, per seed, then mean +- std over seeds."""
    n = max(settings.domain_counts)
    per_seed = []
    for seed in settings.seeds:
        runs = {m: by.get((n, seed, m)) for m in settings.methods}
        if runs.get("desmoe") is None or runs.get("full") is None:
            continue
        d, f = runs["desmoe"], runs["full"]
        baselines = {m: runs[m]["validation_after"] for m in BASELINES if runs.get(m)}
        per_seed.append({
            "seed": seed,
            "forgetting_desmoe": d["forgetting"], "forgetting_full": f["forgetting"],
            "forgetting_reduction": M.reduction(M.clipped(d["forgetting"]), M.clipped(f["forgetting"])),
            "domain_quality_ratio": M.domain_quality_ratio(d["validation_after"], baselines, d["domains"]),
            "domain_quality_ratio_vs_full": M.domain_quality_ratio(
                d["validation_after"], {"full": f["validation_after"]}, d["domains"]),
            "time_to_target_reduction": M.reduction(d["time_to_target_s"], f["time_to_target_s"]),
            "steps_to_target_reduction": M.reduction(d["steps_to_target"], f["steps_to_target"]),
        })
    keys = ("forgetting_reduction", "domain_quality_ratio", "domain_quality_ratio_vs_full",
            "time_to_target_reduction", "steps_to_target_reduction")
    # forgetting reduction from the seed means of clipped forgetting (robust to a seed where
    # full FT happens not to forget)
    mean_clipped = {m: M.mean_std([M.clipped(by[(n, s, m)]["forgetting"]) for s in settings.seeds
                                   if (n, s, m) in by])["mean"] for m in ("desmoe", "full")}
    return {"n": n, "per_seed": per_seed,
            **{k: M.mean_std([p[k] for p in per_seed]) for k in keys},
            "forgetting_reduction_of_means": M.reduction(mean_clipped["desmoe"], mean_clipped["full"])}


def environment() -> dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_at_end": load,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="DES-MoE vs full fine-tuning and ESFT on N = 2..6 domains: forgetting, domain "
        "quality, time to target, step-time overhead (docs/benchmark.md)")
    parser.add_argument("--fast", action="store_true", help="CI smoke mode (minutes, numbers meaningless)")
    parser.add_argument("--out", required=True, help="output folder (results.md/json, PNGs, runs/)")
    parser.add_argument("--data-dir", default=None, help="the corpus (default: DESMOE_DATA_DIR)")
    parser.add_argument("--work-dir", default=None, help="corpus + base cache")
    parser.add_argument("--domain-counts", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-overhead", action="store_true", help="skip the step-time overhead")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results from the finished run records in --out")
    args = parser.parse_args(argv)
    settings = fast_settings() if args.fast else full_settings()
    if args.domain_counts:
        settings.domain_counts = args.domain_counts
    if args.seeds:
        settings.seeds = args.seeds
    if args.steps:
        settings.steps = args.steps
    if args.work_dir:
        settings.work_dir = args.work_dir
    elif not args.fast:
        from megatron_desmoe.settings import cache_dir

        settings.work_dir = str(cache_dir() / "quickstart")  # the quickstart's corpus and base
    if args.report_only:
        report_only(settings, Path(args.out), command=_command(argv))
        return 0
    from megatron_desmoe.settings import domain_data_dir

    corpus = Path(args.data_dir) if args.data_dir else domain_data_dir()
    run_benchmark(settings, Path(args.out), corpus, overhead=not args.no_overhead,
                  command=_command(argv))
    return 0


def _command(argv: Optional[list[str]]) -> str:
    return "python tools/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)


def report_only(settings: BenchmarkSettings, out: Path, command: Optional[str] = None) -> dict:
    """Results from whatever runs finished (a partial benchmark), overhead kept if recorded."""
    key = settings.key()
    runs = []
    for path in sorted(out.glob("runs/N*/seed*/*/record.json")):
        record = json.loads(path.read_text())
        if record.get("settings_key") == key:
            runs.append(record)
    previous = out / "results.json"
    overhead = json.loads(previous.read_text()).get("overhead") if previous.is_file() else None
    overhead_file = out / "overhead.json"
    if overhead is None and overhead_file.is_file():
        overhead = json.loads(overhead_file.read_text())
    results = assemble(settings, runs, overhead)
    results["runtime"] = {"runs_s": sum(r["run_seconds"] for r in runs)}
    results["environment"] = environment()
    results["command"] = command
    from megatron_desmoe.benchmark.report import write_report

    write_report(results, out)
    return results

#!/usr/bin/env python
"""DES-MoE step time over stock-router step time on the same model, on this machine.

Default config (small but not tiny): 4 layers, hidden 256, 8 heads (2 KV groups), 8 routed
experts of width 512, top-2, vocabulary 4096, sequence 256 x micro-batch 4 (1024 tokens per
step), fp32, local backend, one rank.

Every variant is built once in this process and the variants' timed steps are interleaved
(repeat r times: each variant runs `--steps` steps, in a rotated order), so background load
and drift hit all variants alike. Three ratios variant/stock are printed, because a shared
2-core machine is noisy: "wall" (per repeat the median wall-clock step time, ratio per
repeat, median [min, max] over repeats), "cpu" (the same with the process's CPU time, which
ignores time spent waiting for a core) and "best" (fastest step over fastest step).

Variants (all share the stock model's weights and batch):
  stock        Megatron TopKRouter + SequentialMLP
  adapter      DESMoERouter with the adapter only (KD 0, no affinity, no isolation)
  +kd          adapter + distillation loss
  +affinity    adapter + KD + affinity accumulation
  desmoe       adapter + KD + affinity + gradient isolation (phi mask of a random peaked
               affinity): what `desmoe-profile` measures as "desmoe"

Usage:
  python benchmarks/desmoe_overhead.py                       # defaults above
  python benchmarks/desmoe_overhead.py --adapter-hidden 64   # a narrower adapter
  python benchmarks/desmoe_overhead.py --variants desmoe --repeats 9
  python benchmarks/desmoe_overhead.py --profile desmoe      # cProfile of one variant
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

VARIANTS = {
    "adapter": (),
    "+kd": ("kd",),
    "+affinity": ("kd", "affinity"),
    "desmoe": ("kd", "affinity", "isolation"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mixtral-tiny", help="structure to start from")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--adapter-hidden", type=int, default=None,
                        help="adapter width (default: DESMoEConfig's 4 x hidden)")
    parser.add_argument("--variants", default="adapter,+kd,+affinity,desmoe",
                        help=f"comma list from {list(VARIANTS)} (stock always runs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", choices=list(VARIANTS) + ["stock"],
                        help="instead of timing, cProfile 10 steps of this variant and print "
                             "the top functions by cumulative time")
    return parser.parse_args(argv)


def model_config(args):
    from megatron_desmoe.models.presets import get_preset

    return get_preset(
        args.preset, num_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=args.heads, num_query_groups=args.groups,
        kv_channels=args.hidden // args.heads, ffn_hidden_size=4 * args.hidden,
        moe_ffn_hidden_size=args.expert_ffn, num_experts=args.experts, topk=args.topk,
        vocab_size=args.vocab, max_position_embeddings=max(args.seq_len, 256),
    )


def build_runners(args, names):
    from megatron_desmoe.profiling.profiler import ProfileSpec, StepRunner

    model = model_config(args)
    options = {"adapter_hidden_size": args.adapter_hidden} if args.adapter_hidden else {}
    runners = {}
    for name in names:
        spec = ProfileSpec(model=model, seq_len=args.seq_len, micro_batch=args.micro_batch,
                           desmoe_options=options,
                           desmoe_mechanisms=VARIANTS.get(name, ())).validate()
        runners[name] = StepRunner(spec, dtype="fp32", recipe=None,
                                   router="stock" if name == "stock" else "desmoe",
                                   backend="local", on_gpu=False)
    return model, runners


def adapter_flops_share(model, args) -> float:
    """Forward FLOPs of the adapter GEMMs over the model's forward FLOPs (analytic)."""
    from megatron_desmoe.profiling.flops import adapter_forward_flops, forward_flops

    width = args.adapter_hidden or 4 * model.hidden_size
    return (adapter_forward_flops(model, width, args.seq_len)
            / forward_flops(model, args.seq_len).total)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.parallel import init_model_parallel

    init_model_parallel(ParallelConfig())
    if args.profile:
        return profile(args)
    names = ["stock"] + [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names[1:] if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; use {list(VARIANTS)}")
    info = machine()
    model, runners = build_runners(args, names)
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    wall = {name: [] for name in names}  # per repeat: median wall-clock step time
    cpu = {name: [] for name in names}  # per repeat: median process CPU time per step
    best = {name: float("inf") for name in names}  # fastest single step seen
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            walls, cpus = [], []
            for _ in range(args.steps):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                runners[name].step()
                walls.append(time.perf_counter() - wall0)
                cpus.append(time.process_time() - cpu0)
            wall[name].append(statistics.median(walls))
            cpu[name].append(statistics.median(cpus))
            best[name] = min(best[name], min(walls))
    elapsed = time.perf_counter() - started
    ratios = {name: [v / s for v, s in zip(wall[name], wall["stock"])] for name in names[1:]}
    cpu_ratios = {name: [v / s for v, s in zip(cpu[name], cpu["stock"])] for name in names[1:]}
    load_end = os.getloadavg()

    print(f"command: {' '.join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:]))}")
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores, torch threads "
          f"{info['torch_threads']}, torch {info['torch']}, load average (1 min) "
          f"{info['load_average_at_start'][0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-"
          f"{args.topk} x {args.expert_ffn}, vocab {args.vocab}; seq {args.seq_len} x "
          f"micro-batch {args.micro_batch}; fp32 local; adapter width "
          f"{args.adapter_hidden or 4 * args.hidden}")
    print(f"timing: {args.warmup} warm-up, then {args.repeats} repeats x {args.steps} steps "
          f"per variant, interleaved ({elapsed:.0f} s)")
    print(f"analytic adapter GEMM FLOPs / model FLOPs: {adapter_flops_share(model, args):.3f}")
    print()
    print("ratio = variant / stock; wall: median over repeats of the per-repeat median step "
          "time ratio [min, max]; cpu: the same with process CPU time; best: fastest step "
          "over fastest step")
    print(f"{'variant':<10} {'wall ms':>8} {'wall ratio':>11} {'[min, max]':>16} "
          f"{'cpu ratio':>10} {'best ms':>8} {'best ratio':>11}")
    print(f"{'stock':<10} {statistics.median(wall['stock']) * 1e3:>8.1f} {'1':>11} {'':>16} "
          f"{'1':>10} {best['stock'] * 1e3:>8.1f} {'1':>11}")
    for name in names[1:]:
        r = ratios[name]
        print(f"{name:<10} {statistics.median(wall[name]) * 1e3:>8.1f} "
              f"{statistics.median(r):>11.3f} {f'[{min(r):.3f}, {max(r):.3f}]':>16} "
              f"{statistics.median(cpu_ratios[name]):>10.3f} {best[name] * 1e3:>8.1f} "
              f"{best[name] / best['stock']:>11.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {**vars(args), "json": str(args.json)}, "machine": info,
            "load_average_at_end": load_end,
            "per_repeat_median_wall_s": wall, "per_repeat_median_cpu_s": cpu,
            "best_step_s": best,
            "wall_ratio_median": {n: statistics.median(r) for n, r in ratios.items()},
            "wall_ratio_min_max": {n: [min(r), max(r)] for n, r in ratios.items()},
            "cpu_ratio_median": {n: statistics.median(r) for n, r in cpu_ratios.items()},
            "best_ratio": {n: best[n] / best["stock"] for n in names[1:]},
            "adapter_flops_share": adapter_flops_share(model, args),
        }, indent=2) + "\n")
    for runner in runners.values():
        runner.close()
    return 0


def profile(args) -> int:
    _, runners = build_runners(args, [args.profile])
    runner = runners[args.profile]
    for _ in range(args.warmup):
        runner.step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        runner.step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(40)
    print(stream.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

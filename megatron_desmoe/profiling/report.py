"""Profile results as a text table, a JSON file and a PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def format_table(result: dict) -> str:
    model, parallel, workload = result["model"], result["parallel"], result["workload"]
    device = result["device"]
    lines = [
        f"model {model['name']}  ({model['total_params'] / 1e6:.1f}M params, "
        f"{model['active_params'] / 1e6:.1f}M active)   layout TP={parallel['tensor_parallel']} "
        f"EP={parallel['expert_parallel']} PP={parallel['pipeline_parallel']} "
        f"DP={parallel['data_parallel']} ({parallel['world_size']} ranks)",
        f"device {device['type']}: {device['name']}   backend {workload['backend']}   "
        f"seq {workload['seq_len']} x micro-batch {workload['micro_batch']} x "
        f"{workload['num_microbatches']} micro-batches x DP -> {workload['tokens_per_step']} "
        f"tokens/step",
        f"model FLOPs per step {result['flops']['per_step']:.4g} (3 x forward, active experts)   "
        f"steps: {workload['warmup_steps']} warm-up + {workload['timed_steps']} timed (median)",
        "",
    ]
    header = ("precision", "router", "step ms", "+-ms", "tokens/s/GPU", "TFLOP/s/GPU", "MFU",
              "peak MiB")
    rows = []
    for run in result["runs"]:
        timing = run["step_time"]
        rows.append((
            run["precision"], run["router"], f"{timing['median_s'] * 1e3:.1f}",
            f"{timing['stdev_s'] * 1e3:.1f}", f"{run['tokens_per_s_per_gpu']:.1f}",
            f"{run['tflops_per_gpu']:.3g}",
            f"{run['mfu'] * 100:.1f}%" if run["mfu"] is not None else "n/a",
            f"{run['peak_memory_mib']:.0f}",
        ))
    lines += _columns(header, rows)
    if result["desmoe_overhead"]:
        lines.append("")
        for precision, ratio in result["desmoe_overhead"].items():
            lines.append(f"DES-MoE / stock step time ({precision}): {ratio:.3f} "
                         f"({(ratio - 1) * 100:+.1f}%)")
    desmoe = next((run["desmoe"] for run in result["runs"] if "desmoe" in run), None)
    if desmoe and desmoe.get("adapter_flops_share") is not None:
        lines.append(f"DES-MoE adapter (width {desmoe['adapter_hidden_size']}, fp32) adds "
                     f"{desmoe['adapter_flops_share'] * 100:.1f}% of the model FLOPs (not counted "
                     f"in TFLOP/s); isolation mask density {desmoe['mask_density']:.2f}")
    for item in result["skipped"]:
        lines.append(f"skipped {item['precision']}: {item['reason']}")
    if device["type"] == "cpu":
        lines.append("per GPU = per rank (process) on a CPU")
    if any(run["mfu"] is None for run in result["runs"]):
        lines.append(f"MFU: {device['peak_source']}")
    lines.append(f"memory: {result['runs'][0]['memory_kind']}" if result["runs"] else "")
    return "\n".join(lines)


def _columns(header, rows) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)


def plot(result: dict, path: Path) -> Optional[Path]:
    """Grouped bars per precision, one bar per router: tokens/s/GPU and TFLOP/s/GPU (MFU
    printed on the bars where known), DES-MoE/stock ratio above each pair."""
    if not result["runs"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(dict.fromkeys(run["precision"] for run in result["runs"]))
    routers = list(dict.fromkeys(run["router"] for run in result["runs"]))
    lookup = {(r["precision"], r["router"]): r for r in result["runs"]}
    width = 0.8 / len(routers)
    colours = {"stock": "#4C72B0", "desmoe": "#DD8452"}
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(precisions) + 4), 4.2))
    for axis, key, label in ((axes[0], "tokens_per_s_per_gpu", "tokens / s / GPU"),
                             (axes[1], "tflops_per_gpu", "model TFLOP/s / GPU")):
        for j, router in enumerate(routers):
            xs, heights, notes = [], [], []
            for i, precision in enumerate(precisions):
                run = lookup.get((precision, router))
                if run is None:
                    continue
                xs.append(i + (j - (len(routers) - 1) / 2) * width)
                heights.append(run[key])
                notes.append(f"{run['mfu'] * 100:.0f}%" if key == "tflops_per_gpu"
                             and run["mfu"] is not None else "")
            bars = axis.bar(xs, heights, width, label="DES-MoE" if router == "desmoe" else "stock",
                            color=colours.get(router))
            for bar, note in zip(bars, notes):
                if note:
                    axis.annotate(f"MFU {note}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                  ha="center", va="bottom", fontsize=7)
        if key == "tokens_per_s_per_gpu":
            top = max(run[key] for run in result["runs"])
            for i, precision in enumerate(precisions):
                ratio = result["desmoe_overhead"].get(precision)
                if ratio is not None and math.isfinite(ratio):
                    axis.annotate(f"DES-MoE / stock step {ratio:.3f}", (i, top * 1.04),
                                  ha="center", fontsize=8)
            axis.set_ylim(0, top * 1.15)
        axis.set_xticks(range(len(precisions)))
        axis.set_xticklabels(precisions, rotation=20)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    model, parallel, device = result["model"], result["parallel"], result["device"]
    fig.suptitle(
        f"{model['name']}  TP{parallel['tensor_parallel']} EP{parallel['expert_parallel']} "
        f"PP{parallel['pipeline_parallel']} DP{parallel['data_parallel']}  "
        f"seq {result['workload']['seq_len']}  on {device['name']}", fontsize=10)
    if result["skipped"]:
        fig.text(0.01, 0.01, "skipped: " + ", ".join(s["precision"] for s in result["skipped"]),
                 fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""results.json, results.md and the PNG plots of a benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_desmoe.benchmark.metrics import running_mean

LABELS = {"full": "full FT", "esft_token": "ESFT-Token", "esft_gate": "ESFT-Gate", "desmoe": "DES-MoE"}


def _ms(stat: dict, digits: int = 3, scale: float = 1.0) -> str:
    if not stat or stat.get("mean") is None:
        return f"n/a ({stat['missing']} of {stat['missing']} not reached/missing)" if stat and stat.get("missing") else "n/a"
    text = f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
    if stat.get("missing"):
        text += f" ({stat['missing']} of {stat['n'] + stat['missing']} not reached)"
    return text


def _pct(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean'] * 100:+.1f}% ± {stat['std'] * 100:.1f}%"


def write_report(results: dict, out: Path) -> None:
    out = Path(out)
    plots = {}
    try:
        plots = write_plots(results, out)
    except Exception as error:  # plots are a convenience; numbers come first
        results["plot_error"] = repr(error)
    results["plots"] = plots
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    s = results["settings"]
    h = results["headline"]
    paper = results["paper"]
    lines = [f"# DES-MoE benchmark results ({s['mode']} mode)", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    env = results.get("environment", {})
    lines += [f"Machine: {env.get('cpu_count')}-core CPU ({env.get('platform')}), torch "
              f"{env.get('torch')}, shared with other jobs (load average at the end: "
              f"{env.get('load_average_at_end')}). Wall-clock numbers are therefore noisy.", ""]
    lines += [f"N (domains) = {s['domain_counts']}, seeds {s['seeds']}, {s['steps']} fine-tuning steps "
              f"per run, global batch {s['run']['global_batch_size']} x {s['run']['seq_length']} tokens, "
              f"lr {s['run']['lr']} (warm-up {s['run']['lr_warmup_iters']}, cosine to "
              f"{s['run']['min_lr']}), DES-MoE/ESFT options {s['desmoe']} (the same for every "
              f"method), base pretrained {s['base_steps']} steps on general text. Target loss: full "
              f"FT's final {s['window']}-step running mean x (1 + {s['margin']}).", ""]
    lines += [f"## Headline ratios at N = {h['n']} (mean ± std over seeds)", "",
              "| claim | this benchmark | paper |", "|---|---|---|",
              f"| forgetting reduction vs full FT, 1 - F_desmoe/F_full | {_pct(h['forgetting_reduction'])}"
              f" (of seed means: {_fmt_pct(h.get('forgetting_reduction_of_means'))}) | "
              f"{paper['forgetting_reduction'] * 100:.0f}% |",
              f"| domain quality, mean_d L_desmoe/min_baseline L (<= 1 matches) | "
              f"{_ms(h['domain_quality_ratio'], 4)} | ~1 (matches single-domain experts) |",
              f"| same, vs full FT only | {_ms(h['domain_quality_ratio_vs_full'], 4)} | |",
              f"| time-to-target reduction vs full FT, 1 - T_desmoe/T_full (wall-clock) | "
              f"{_pct(h['time_to_target_reduction'])} | {paper['time_to_target_reduction'] * 100:.0f}% |",
              f"| steps-to-target reduction vs full FT | {_pct(h['steps_to_target_reduction'])} | |", ""]
    lines += ["Per seed:", "", "| seed | F desmoe | F full | forgetting red. | quality ratio | "
              "time-to-target red. |", "|---|---|---|---|---|---|"]
    for p in h["per_seed"]:
        lines.append(f"| {p['seed']} | {p['forgetting_desmoe']:+.4f} | {p['forgetting_full']:+.4f} | "
                     f"{_fmt_pct(p['forgetting_reduction'])} | {p['domain_quality_ratio']:.4f} | "
                     f"{_fmt_pct(p['time_to_target_reduction'])} |")
    lines += ["", "## Per N and method (mean ± std over seeds)", "",
              "| N | method | forgetting (general after - before) | general after | mean domain loss after "
              "| steps to target | time to target (s) | median step (ms) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["table"]:
        lines.append(f"| {row['n']} | {LABELS.get(row['method'], row['method'])} | "
                     f"{_ms(row['forgetting'], 4)} | {_ms(row['general_after'])} | "
                     f"{_ms(row['mean_domain_loss_after'])} | {_ms(row['steps_to_target'], 1)} | "
                     f"{_ms(row['time_to_target_s'], 1)} | {_ms(row['median_step_s'], 0, 1e3)} |")
    largest = max(s["domain_counts"])
    rows = [r for r in results["table"] if r["n"] == largest]
    if rows:
        domains = list(rows[0]["domain_loss_after"])
        lines += ["", f"## Validation loss per domain after fine-tuning, N = {largest}", "",
                  "| method | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        for row in rows:
            lines.append(f"| {LABELS.get(row['method'], row['method'])} | " +
                         " | ".join(_ms(row["domain_loss_after"][d]) for d in domains) + " |")
    o = results.get("overhead")
    lines += ["", "## Step-time overhead of DES-MoE vs the stock router", ""]
    if o:
        lines += [f"Engine-level (megatron_desmoe.profiling.run_profile): the same model, batch and "
                  f"weights with the stock Megatron router and with the DES-MoE router (adapter, KD, "
                  f"affinity, isolation on, {o['num_domains']} domains), {o['timed_steps']} timed "
                  f"steps each, {o['repeats']} repeats. Ratio DES-MoE/stock of the per-repeat "
                  f"median step times: median {o['ratio_median']:.3f} [min {o['ratio_min']:.3f}, "
                  f"max {o['ratio_max']:.3f}], i.e. {o['overhead_median'] * 100:+.1f}% step time."]
    else:
        lines += ["Not measured in this run."]
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in results["plots"].items()]
    runtime = results.get("runtime", {})
    lines += ["", f"Runtime: {runtime}", "", "Definitions:", "", "```", results["definitions"].strip(),
              "```", ""]
    return "\n".join(lines)


def _fmt_pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def write_plots(results: dict, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    s = results["settings"]
    # forgetting vs N
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in s["methods"]:
        rows = [r for r in results["table"] if r["method"] == method]
        if rows:
            ax.errorbar([r["n"] for r in rows], [r["forgetting"]["mean"] for r in rows],
                        yerr=[r["forgetting"]["std"] for r in rows], marker="o", capsize=3,
                        label=LABELS.get(method, method))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("number of fine-tuning domains N")
    ax.set_ylabel("forgetting: general-text val. loss after - before")
    ax.set_title("Forgetting vs N (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "forgetting_vs_n.png", dpi=110)
    plt.close(fig)
    plots["forgetting vs N"] = "forgetting_vs_n.png"
    # per-domain training loss curves at the largest N, first seed
    largest, seed = max(s["domain_counts"]), s["seeds"][0]
    runs = {r["method"]: r for r in results["runs"] if r["n"] == largest and r["seed"] == seed}
    if runs:
        domains = next(iter(runs.values()))["domains"]
        cols = min(3, len(domains))
        rows_n = -(-len(domains) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
        for i, domain in enumerate(domains):
            ax = axes[i // cols][i % cols]
            for method in s["methods"]:
                if method not in runs:
                    continue
                steps, values = _domain_curve(out / runs[method]["metrics_file"], domain)
                if values:
                    ax.plot(steps, running_mean(values, s["window"]), label=LABELS.get(method, method))
            ax.set_title(domain)
            ax.set_xlabel("step")
            ax.set_ylabel(f"train loss ({s['window']}-step mean)")
        for j in range(len(domains), rows_n * cols):
            axes[j // cols][j % cols].axis("off")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Per-domain training loss, N = {largest}, seed {seed}")
        fig.tight_layout()
        name = f"loss_curves_n{largest}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        plots[f"per-domain loss curves, N = {largest}"] = name
        affinity = runs.get("desmoe", {}).get("affinity_png")
        if affinity and (out / affinity).is_file():
            name = f"affinity_desmoe_n{largest}.png"
            shutil.copy(out / affinity, out / name)
            plots[f"DES-MoE affinity, N = {largest}"] = name
    return plots


def _domain_curve(path: Path, domain: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    if not path.is_file():
        return steps, values
    for line in path.read_text().splitlines():
        record = json.loads(line)
        key = f"loss/{domain}"
        if "validation" not in record and key in record and record[key] is not None:
            steps.append(record["step"])
            values.append(record[key])
    return steps, values

"""The benchmark's fast mode end to end (outputs exist, numbers consistent) + its formulas.

Consistency only: the fast mode's numbers make no performance claim."""

import json
import math
import statistics

import pytest

from megatron_desmoe.benchmark import metrics as M
from megatron_desmoe.settings import domain_data_dir


def test_running_mean_and_target():
    assert M.running_mean([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert M.target_loss([4.0, 2.0, 6.0, 0.0], 2, 0.1) == pytest.approx(3.3)
    assert M.steps_to_target([5.0, 4.0, 3.0, 2.0], 3.5, 2) == 3
    assert M.steps_to_target([5.0, 5.0], 1.0, 2) is None
    assert M.time_to_target([0.5, 1.0, 2.0], 2) == 1.5
    assert M.time_to_target([0.5], None) is None


def test_stats_and_ratios():
    stat = M.mean_std([1.0, 3.0, None])
    assert stat["mean"] == 2.0 and stat["std"] == pytest.approx(math.sqrt(2)) and stat["missing"] == 1
    assert M.mean_std([None])["mean"] is None
    assert M.reduction(0.1, 1.0) == pytest.approx(0.9)
    assert M.reduction(0.1, 0.0) is None and M.reduction(None, 1.0) is None
    assert M.clipped(-0.3) == 0.0
    ratio = M.domain_quality_ratio({"a": 2.0, "b": 3.0},
                                   {"x": {"a": 1.0, "b": 4.0}, "y": {"a": 2.0, "b": 3.0}}, ["a", "b"])
    assert ratio == pytest.approx((2.0 / 1.0 + 3.0 / 3.0) / 2)


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
    if not domain_data_dir().is_dir():
        pytest.skip(f"corpus absent: {domain_data_dir()} (set DESMOE_DATA_DIR)")
    from megatron_desmoe.benchmark.runner import main

    out = tmp_path_factory.mktemp("bench")
    assert main(["--fast", "--out", str(out / "out"), "--work-dir", str(out / "work")]) == 0
    return out / "out", json.loads((out / "out" / "results.json").read_text())


def test_outputs_exist(fast_results):
    out, results = fast_results
    for name in ("results.md", "forgetting_vs_n.png", "loss_curves_n2.png", "affinity_desmoe_n2.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text()
    assert "Headline ratios" in text and "DES-MoE" in text and "ESFT-Gate" in text
    methods = {(r["n"], r["method"]) for r in results["runs"]}
    assert methods == {(2, m) for m in ("full", "esft_token", "esft_gate", "desmoe")}


def test_run_numbers_are_consistent(fast_results):
    out, results = fast_results
    s = results["settings"]
    for run in results["runs"]:
        before, after = run["validation_before"], run["validation_after"]
        assert run["forgetting"] == pytest.approx(after["general"] - before["general"])
        assert set(run["domains"]) < set(after) and "general" in after
        assert len(run["losses"]) == len(run["step_times"]) == run["steps"] == s["steps"]
        steps = [json.loads(line) for line in (out / run["metrics_file"]).read_text().splitlines()]
        lm = [r["lm loss"] for r in steps if "lm loss" in r]
        assert lm == pytest.approx(run["losses"], rel=1e-6)
        full = next(r for r in results["runs"] if r["method"] == "full" and r["seed"] == run["seed"])
        window = s["window"]
        tail = full["losses"][-window:]
        assert run["target"] == pytest.approx(sum(tail) / len(tail) * (1 + s["margin"]))
        hand = None
        for i in range(len(run["losses"])):
            part = run["losses"][max(0, i - window + 1):i + 1]
            if sum(part) / len(part) <= run["target"]:
                hand = i + 1
                break
        assert run["steps_to_target"] == hand
        if hand is not None:
            assert run["time_to_target_s"] == pytest.approx(sum(run["step_times"][:hand]))
    full = next(r for r in results["runs"] if r["method"] == "full")
    assert full["steps_to_target"] is not None  # full FT reaches its own target by construction


def test_headline_from_hand_formulas(fast_results):
    _, results = fast_results
    runs = {r["method"]: r for r in results["runs"]}
    head = results["headline"]["per_seed"][0]
    d, f = runs["desmoe"], runs["full"]
    expected = None if f["forgetting"] <= 0 else 1 - max(d["forgetting"], 0) / f["forgetting"]
    if expected is None:
        assert head["forgetting_reduction"] is None
    else:
        assert head["forgetting_reduction"] == pytest.approx(expected)
    quality = statistics.fmean(
        d["validation_after"][k] / min(runs[m]["validation_after"][k] for m in ("full", "esft_token", "esft_gate"))
        for k in d["domains"])
    assert head["domain_quality_ratio"] == pytest.approx(quality)
    assert results["headline"]["domain_quality_ratio"]["mean"] == pytest.approx(quality)
    if d["time_to_target_s"] is not None:
        assert head["time_to_target_reduction"] == pytest.approx(1 - d["time_to_target_s"] / f["time_to_target_s"])
    row = next(r for r in results["table"] if r["method"] == "desmoe")
    assert row["forgetting"]["mean"] == pytest.approx(d["forgetting"])
    overhead = results["overhead"]
    assert overhead["ratios"] == pytest.approx([a / b for a, b in zip(overhead["desmoe_median_s"],
                                                                        overhead["stock_median_s"])])
    assert overhead["ratio_median"] == pytest.approx(statistics.median(overhead["ratios"]))

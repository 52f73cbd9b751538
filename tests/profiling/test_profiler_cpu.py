"""The profiler end to end on CPU: desmoe-profile on a tiny preset, 1 warm-up + 2 timed
steps, stock and DES-MoE routers. Checks the outputs are present and sane, not timings."""

import json
import math

import pytest
import torch

from megatron_desmoe.models.presets import get_preset
from megatron_desmoe.profiling import cli
from megatron_desmoe.profiling.flops import forward_flops, training_step_flops

SEQ, MICRO_BATCH = 32, 2


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    argv = ["--preset", "mixtral-tiny", "--seq-len", str(SEQ), "--micro-batch", str(MICRO_BATCH),
            "--warmup", "1", "--steps", "2", "--out-dir", str(out)]
    if torch.cuda.is_available():
        argv += ["--precisions", "fp32", "--backend", "local"]
    assert cli.main(argv) == 0
    return out, json.loads((out / "profile.json").read_text())


def test_runs_and_fields(profile):
    _, result = profile
    assert result["schema"] == "desmoe-profile/1"
    assert [(r["precision"], r["router"]) for r in result["runs"]] == [
        ("fp32", "stock"), ("fp32", "desmoe")]
    for run in result["runs"]:
        timing = run["step_time"]
        assert len(timing["samples_s"]) == 2 and all(t > 0 for t in timing["samples_s"])
        assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]
        assert run["tokens_per_s_per_gpu"] > 0 and run["tflops_per_gpu"] > 0
        assert run["peak_memory_mib"] > 0
        assert run["mfu"] is None  # no peak for a CPU
    assert result["runs"][1]["desmoe"]["adapter_flops_per_step"] == 3 * MICRO_BATCH * (
        sum(get_preset("mixtral-tiny").moe_layer_pattern) * SEQ * 2 * (64 * 256 + 256 * 4))
    desmoe = result["runs"][1]["desmoe"]
    assert desmoe["mechanisms"] == ["adapter", "kd", "affinity", "isolation"]
    assert 0 < desmoe["mask_density"] <= 1
    assert result["skipped"] == []


def test_throughput_and_flops_follow_the_formula(profile):
    _, result = profile
    model = get_preset("mixtral-tiny")
    assert result["workload"]["tokens_per_step"] == SEQ * MICRO_BATCH
    assert result["flops"]["per_step"] == training_step_flops(model, SEQ, MICRO_BATCH)
    assert result["flops"]["per_step"] == 3 * MICRO_BATCH * forward_flops(model, SEQ).total
    assert result["flops"]["forward_per_sequence"] == forward_flops(model, SEQ).as_dict()
    for run in result["runs"]:
        seconds = run["step_time"]["median_s"]
        assert run["tokens_per_s_per_gpu"] == pytest.approx(SEQ * MICRO_BATCH / seconds)
        assert run["tflops_per_gpu"] == pytest.approx(result["flops"]["per_step"] / seconds / 1e12)


def test_desmoe_overhead_ratio(profile):
    _, result = profile
    ratio = result["desmoe_overhead"]["fp32"]
    stock, desmoe = (r["step_time"]["median_s"] for r in result["runs"])
    assert ratio > 0 and math.isfinite(ratio)
    assert ratio == pytest.approx(desmoe / stock)


def test_png_is_written(profile):
    out, _ = profile
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp8_only_request_is_skipped_with_reason(tmp_path, capsys):
    code = cli.main(["--preset", "mixtral-tiny", "--seq-len", "16", "--precisions",
                     "fp8-delayed,fp8-mxfp8", "--out-dir", str(tmp_path), "--no-plot"])
    assert code == 3
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["runs"] == []
    assert [s["precision"] for s in result["skipped"]] == ["fp8-delayed", "fp8-mxfp8"]
    assert all("GPU" in s["reason"] for s in result["skipped"])
    assert "skipped fp8-delayed" in capsys.readouterr().out


def test_config_errors_exit_2(tmp_path, capsys):
    assert cli.main(["--preset", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["--set", "num_layerz=2", "--out-dir", str(tmp_path)]) == 2
    assert cli.main(["--precisions", "fp9", "--out-dir", str(tmp_path)]) == 2
    assert cli.main(["--seq-len", "100000", "--out-dir", str(tmp_path)]) == 2


def test_fp8_support_report(capsys):
    assert cli.main(["--fp8-support"]) == 0
    out = capsys.readouterr().out
    assert out.count("fp8-") == 4


def test_hf_config_is_mapped_through_the_conversion_adapters(tmp_path):
    pytest.importorskip("transformers")
    config = {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
        "num_experts_per_tok": 2, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = cli.resolve_model(None, tmp_path, {"num_layers": 1})
    assert (model.family, model.hidden_size, model.num_experts, model.topk) == ("mixtral", 64, 4, 2)
    assert model.num_layers == 1 and model.num_query_groups == 2

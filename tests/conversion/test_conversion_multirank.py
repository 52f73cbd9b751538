"""HF -> Megatron at TP=2 x PP=2 x EP=2 (and TP=2 x PP=2 x ETP=2) on 4 gloo ranks, one torchrun
launch for all families -> HF in one process: bit-exact. The same launch checks OLMoE's
full-width q/k norm at TP=2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conversion_models import add_router_sidecar, read_safetensors_dir, save_hf_model

HERE = Path(__file__).parent
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2")
pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def multirank_conversions(tmp_path_factory):
    """(HF dirs, root of the Megatron checkpoints per layout, torchrun output)."""
    root = tmp_path_factory.mktemp("multirank")
    hf_dirs = {family: save_hf_model(family, root / "hf" / family, num_hidden_layers=4) for family in FAMILIES}
    hf_dirs["desmoe"] = save_hf_model("qwen3_moe", root / "hf" / "desmoe", num_hidden_layers=4)
    add_router_sidecar(hf_dirs["desmoe"], [f"model.layers.{layer}.mlp.gate.weight" for layer in range(4)])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               str(HERE / "conversion_multirank_worker.py"), str(root / "megatron"),
               "2,2,2,1=" + ",".join(map(str, hf_dirs.values())),
               f"2,2,1,2={hf_dirs['qwen2_moe']},{hf_dirs['deepseek_v2']}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    return hf_dirs, root / "megatron", result.stdout


CASES = [("tp2pp2ep2etp1", family) for family in FAMILIES] + \
        [("tp2pp2ep1etp2", family) for family in ("qwen2_moe", "deepseek_v2")]


@pytest.mark.parametrize("layout,family", CASES)
def test_multirank_round_trip_is_bit_exact(layout, family, multirank_conversions, tmp_path, world):
    from megatron_desmoe.conversion import convert_megatron_to_hf, load_model_json

    hf_dirs, megatron_root, _ = multirank_conversions
    megatron_dir = megatron_root / layout / family
    saved = load_model_json(megatron_dir)[1]["saved_layout"]
    assert "tp{tensor_parallel}pp{pipeline_parallel}ep{expert_parallel}etp{expert_tensor_parallel}".format(**saved) == layout
    convert_megatron_to_hf(megatron_dir, tmp_path / "hf", progress=False)
    original, back = read_safetensors_dir(hf_dirs[family]), read_safetensors_dir(tmp_path / "hf")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())


def test_router_adapters_survive_a_multirank_layout(multirank_conversions, tmp_path, world):
    """DES-MoE adapters (replicated like the router weight on their TP/DP/PP ranks) come back
    exactly from a TP2/PP2/EP2 checkpoint."""
    from safetensors.torch import load_file

    from megatron_desmoe.conversion import convert_megatron_to_hf

    hf_dirs, megatron_root, _ = multirank_conversions
    convert_megatron_to_hf(megatron_root / "tp2pp2ep2etp1" / "desmoe", tmp_path / "hf",
                           router_export="keep", progress=False)
    original = load_file(str(hf_dirs["desmoe"] / "desmoe_router.safetensors"))
    back = load_file(str(tmp_path / "hf" / "desmoe_router.safetensors"))
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
    weights, original_weights = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(hf_dirs["desmoe"])
    assert all(torch.equal(weights[k], original_weights[k]) for k in original_weights)


def test_full_width_qk_norm_matches_at_tp2(multirank_conversions):
    assert multirank_conversions[2].count("QK_NORM_TP2_OK") == 4  # every rank checked outputs and gradients

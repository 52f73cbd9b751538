"""The desmoe-convert command (in process) and the thin tools/ script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conversion_models import read_safetensors_dir

REPO = Path(__file__).resolve().parents[2]


def test_cli_round_trip_and_show_config(hf_zoo, tmp_path, world, capsys):
    from megatron_desmoe.conversion.cli import main

    source = hf_zoo["deepseek_v2"]
    assert main(["hf-to-megatron", str(source), str(tmp_path / "megatron"), "--dtype", "fp32"]) == 0
    assert main(["megatron-to-hf", str(tmp_path / "megatron"), str(tmp_path / "hf"),
                 "--max-shard-size", "200KB"]) == 0
    output = capsys.readouterr()
    assert "hf->megatron:" in output.out and "tensors/s" in output.out and "MB/s" in output.out
    original, back = read_safetensors_dir(source), read_safetensors_dir(tmp_path / "hf")
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    assert main(["show-config", str(source)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["family"] == "deepseek_v2" and shown["mla"]["kv_lora_rank"] == 32
    assert shown["rope_scaling"]["factor"] == 4.0 and shown["topk_scaling_factor"] == 1.5


def test_tools_script_is_the_same_command():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "hf-to-megatron" in result.stdout and "megatron-to-hf" in result.stdout

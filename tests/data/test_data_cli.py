"""desmoe-preprocess: flags, YAML config, exit codes, the tools/ scripts."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from data_fixtures import leftovers, read_documents, write_jsonl
from megatron_desmoe.data.cli import main
from megatron_desmoe.settings import REPO_ROOT
from synthetic_domains import make_domains


def test_flags_with_format_fields_and_weights(tmp_path, sp_model, sp_tokenizer, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"p{i}", "solution": f"s{i}"} for i in range(12)])
    sources, _ = make_domains(tmp_path / "inputs", count=12, names=("code",))
    argv = ["--input", f"puzzles={data}", "--input", f"code={sources[0].path}",
            "--format", "puzzles=qa", "--fields", "puzzles:question=problem,answer=solution",
            "--weight", "puzzles=2", "--weight", "code=1", "--tokenizer-model", str(sp_model),
            "--output", str(tmp_path / "out"), "--workers", "2", "--valid-fraction", "0", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "documents/s" in out and "tokens/s" in out
    blend = json.loads((tmp_path / "out" / "blend.json").read_text())
    assert [(d["name"], d["domain_id"], d["weight"]) for d in blend["domains"]] == [("puzzles", 0, 2.0), ("code", 1, 1.0)]
    assert blend["domains"][0]["source"]["fields"] == {"question": "problem", "answer": "solution"}
    first = read_documents(tmp_path / "out" / "puzzles" / "train_text_document")[0]
    assert sp_tokenizer.decode(first.tolist()[:-1]) == "User: p0\nAssistant: s0"


def test_yaml_config_paths_are_relative_to_the_file_and_flags_win(tmp_path, sp_model):
    make_domains(tmp_path / "conf" / "data", count=10, names=("math", "law"))
    config = {"domains": [{"name": "law", "path": "data/law.jsonl"},
                          {"name": "math", "path": "data/math.jsonl", "format": "qa",
                           "fields": "question=question"}],
              "output": "indexed", "tokenizer_model": str(sp_model), "max_documents": 4, "workers": 3}
    (tmp_path / "conf" / "domains.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "conf" / "domains.yaml"), "--quiet", "--workers", "1"]) == 0
    blend = json.loads((tmp_path / "conf" / "indexed" / "blend.json").read_text())
    assert [d["name"] for d in blend["domains"]] == ["law", "math"]
    assert [d["records"] for d in blend["domains"]] == [4, 4]


def test_errors_exit_non_zero_with_a_message(tmp_path, sp_model, capsys):
    sources, _ = make_domains(tmp_path / "inputs", count=5, names=("math",))
    base = ["--input", f"math={sources[0].path}", "--tokenizer-model", str(sp_model), "--quiet"]
    (tmp_path / "out").mkdir()
    assert main(base + ["--output", str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(base) == 2
    assert "--output" in capsys.readouterr().err
    assert main(base + ["--output", str(tmp_path / "o2"), "--format", "physics=qa"]) == 2
    assert "physics" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    assert main(["--input", f"bad={bad}", "--tokenizer-model", str(sp_model), "--output", str(tmp_path / "o3")]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert leftovers(tmp_path, "o2") == leftovers(tmp_path, "o3") == []


def test_tool_scripts_are_wired():
    for script, program in (("tools/preprocess_data.py", "desmoe-preprocess"),
                            ("tools/train_tokenizer.py", "desmoe-train-tokenizer")):
        result = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and f"usage: {program}" in result.stdout

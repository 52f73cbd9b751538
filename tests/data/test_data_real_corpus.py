"""A few hundred records of the real six-domain corpus, end to end.

Expected documents are built here from the raw files (one small reader per file), with the
documented template, not with megatron_desmoe.data.formats.
"""

from __future__ import annotations

import ast
import json
from itertools import islice

import pytest

from data_fixtures import read_documents, write_json
from megatron_desmoe.data.cli import main as preprocess_main
from megatron_desmoe.data.tokenizer import SentencePieceTokenizer
from megatron_desmoe.data.tokenizer_cli import main as train_tokenizer_main

PER_DOMAIN = 50
FILES = {"general": "general/wikitext2.txt", "math": "math/gsm8k.jsonl", "code": "code/codealpaca.json",
         "law": "law/law.jsonl", "intent": "intent/intent.jsonl", "summary": "summary/summary.jsonl",
         "translation": "translation/translation.jsonl"}
FORMATS = {"general": "plain", "math": "qa", "code": "alpaca", "law": "chat", "intent": "chat",
           "summary": "prompt_answers", "translation": "prompt_answers"}


def _template(prompt: str, answer: str) -> str:
    return f"User: {prompt}\nAssistant: {answer}"


def _unwrap(prompt: str) -> str:
    inner = prompt.strip()
    assert inner.startswith("User:") and inner.endswith("Assistant:")  # how the ESFT files look
    return inner[len("User:"):-len("Assistant:")].strip()


def _expected(name: str, raw) -> str:
    if name == "general":
        return raw.strip()
    if name == "math":
        return _template(raw["question"], raw["answer"])
    if name == "code":
        prompt = raw["instruction"] + (f"\n\n{raw['input']}" if raw["input"] else "")
        return _template(prompt, raw["output"])
    if name in ("law", "intent"):
        user, assistant = raw["messages"]
        return _template(user["content"], assistant["content"])
    answers = raw["answers"]
    answers = ast.literal_eval(answers) if isinstance(answers, str) else answers
    return _template(_unwrap(raw["prompt"]), answers[0])


@pytest.fixture(scope="module")
def sampled(corpus_dir, tmp_path_factory):
    """The first PER_DOMAIN records of every file, copied in the file's own format."""
    root = tmp_path_factory.mktemp("real")
    expected = {}
    for name, relative in FILES.items():
        source = corpus_dir / relative
        target = root / "inputs" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".json":
            records = json.loads(source.read_text(encoding="utf-8"))[:PER_DOMAIN]
            write_json(target, records)
        else:
            with open(source, encoding="utf-8") as stream:
                lines = list(islice((line for line in stream if line.strip()), PER_DOMAIN))
            target.write_text("".join(lines), encoding="utf-8")
            records = lines if name == "general" else [json.loads(line) for line in lines]
        expected[name] = [_expected(name, record) for record in records]
    inputs = [arg for name, relative in FILES.items() for arg in ("--input", f"{name}={root / 'inputs' / (corpus_dir / relative).name}")]
    return root, inputs, expected


def test_real_records_round_trip_through_a_trained_tokenizer(sampled):
    root, inputs, expected = sampled
    model = root / "tok.model"
    assert train_tokenizer_main(inputs + ["--output", str(model), "--vocab-size", "3000",
                                          "--character-coverage", "0.98"]) == 0
    assert preprocess_main(inputs + ["--tokenizer-model", str(model), "--output", str(root / "out"),
                                     "--workers", "2", "--valid-fraction", "0", "--quiet"]) == 0
    blend = json.loads((root / "out" / "blend.json").read_text())
    assert {d["name"]: d["source"]["format"] for d in blend["domains"]} == FORMATS
    tokenizer = SentencePieceTokenizer(model)
    for name in FILES:
        documents = read_documents(root / "out" / name / "train_text_document")
        decoded = [tokenizer.decode(d[:-1].tolist()) for d in documents]
        assert decoded == expected[name], name
        assert all(d[-1] == tokenizer.eos_id for d in documents)
    assert any("\u13a0" <= ch <= "\u13ff" for ch in "".join(expected["translation"]))
    assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(expected["law"]))

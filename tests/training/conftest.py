"""A tiny preprocessed multi-domain corpus built once per test session from the shared data
(a few dozen records per domain), through the user-facing CLIs."""

import pytest

from megatron_desmoe.settings import domain_data_dir

DOMAINS = {
    "general": "general/wikitext2.txt",
    "math": "math/gsm8k.jsonl",
    "code": "code/codealpaca.json",
    "law": "law/law.jsonl",
}


@pytest.fixture(scope="session")
def tiny_blend(tmp_path_factory):
    corpus = domain_data_dir()
    if not (corpus / "math").is_dir():
        pytest.skip(f"shared corpus not found at {corpus} (set DESMOE_DATA_DIR)")
    from megatron_desmoe.data.cli import main as preprocess
    from megatron_desmoe.data.tokenizer_cli import main as train_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    inputs = []
    for name, relative in DOMAINS.items():
        inputs += ["--input", f"{name}={corpus / relative}"]
    tokenizer = root / "tok.model"
    assert train_tokenizer(inputs + ["--max-documents", "80", "--vocab-size", "1000", "--character-coverage", "0.99",
                                     "--output", str(tokenizer)]) == 0
    assert preprocess(inputs + ["--max-documents", "120", "--valid-fraction", "0.2",
                                "--tokenizer-model", str(tokenizer), "--output",
                                str(root / "data"), "--quiet"]) == 0
    return root / "data" / "blend.json"

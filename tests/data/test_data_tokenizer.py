"""Tokenizers: exact round trips (byte fallback), deterministic training, fingerprints, HF loading."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import sentencepiece

from data_fixtures import UNSEEN, corpus_texts, train_small_tokenizer, write_jsonl
from megatron_desmoe.data.errors import TokenizerMismatchError
from megatron_desmoe.data.tokenizer import (
    HuggingFaceTokenizer, SentencePieceOptions, SentencePieceTokenizer, check_tokenizer_matches,
    train_sentencepiece,
)
from megatron_desmoe.data.tokenizer_cli import main as train_tokenizer_main
from megatron_desmoe.errors import ConfigError

ROUND_TRIP = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72",
    "赵四与妻子王五通过相亲认识，2011年登记结婚。",
    "ᎠᏴᏰᏃ ᏓᏨᏁᎵ ᎢᏥᏪᏍᏗᏱ ᎠᎴ ᎠᎦ-ᏙᎥᎯᏍᏗ",
    "def f(x):\n\treturn  x  *  2\n\n\n  # trailing spaces   ",
    UNSEEN,
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip_is_exact(sp_tokenizer, text):
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


def test_unseen_characters_use_byte_pieces(sp_model, sp_tokenizer):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    ids = sp_tokenizer.encode(UNSEEN)
    assert any(processor.IsByte(i) for i in ids)
    assert not any(processor.IsUnknown(i) for i in ids)


def test_specials_and_sizes(sp_tokenizer):
    assert sp_tokenizer.vocab_size == 600
    assert sp_tokenizer.eos_id not in sp_tokenizer.encode("".join(ROUND_TRIP))
    assert sp_tokenizer.pad_id is not None and sp_tokenizer.pad_id != sp_tokenizer.eos_id


def test_fingerprint_is_the_model_file_hash(sp_model, sp_tokenizer):
    assert sp_tokenizer.fingerprint().endswith(hashlib.sha256(sp_model.read_bytes()).hexdigest())


def test_training_is_deterministic_and_options_matter():
    texts = corpus_texts(300, seed=3)
    first = train_sentencepiece(texts, SentencePieceOptions(vocab_size=500, character_coverage=1.0))
    second = train_sentencepiece(texts, SentencePieceOptions(vocab_size=500, character_coverage=1.0))
    other = train_sentencepiece(texts, SentencePieceOptions(vocab_size=520, character_coverage=1.0))
    assert first == second
    assert other != first


def test_training_errors_are_config_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_sentencepiece(["tiny text"], SentencePieceOptions(vocab_size=5000))
    with pytest.raises(ConfigError, match="model_type"):
        SentencePieceOptions(model_type="wordpiece").check()


def test_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(ConfigError, match="no SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "absent.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        SentencePieceTokenizer(bogus)


def test_check_tokenizer_matches(tmp_path, sp_tokenizer):
    blend = SimpleNamespace(path=tmp_path / "blend.json", tokenizer={"fingerprint": sp_tokenizer.fingerprint()})
    check_tokenizer_matches(blend, sp_tokenizer)
    check_tokenizer_matches(blend, sp_tokenizer.fingerprint())
    other = SentencePieceTokenizer(train_small_tokenizer(tmp_path / "other.model", vocab_size=650))
    with pytest.raises(TokenizerMismatchError, match="tokenized with"):
        check_tokenizer_matches(blend, other)


def _tiny_hf_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus_texts(200), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>").save_pretrained(directory)
    return directory


def test_hugging_face_tokenizer_from_local_directory(tmp_path):
    directory = _tiny_hf_tokenizer(tmp_path / "hf")
    tokenizer = HuggingFaceTokenizer(directory)
    for text in ROUND_TRIP:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch(ROUND_TRIP[:2]) == [tokenizer.encode(t) for t in ROUND_TRIP[:2]]
    assert tokenizer.eos_id == tokenizer._tokenizer.convert_tokens_to_ids("<eos>")
    before = tokenizer.fingerprint()
    config = directory / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "model_max_length": 77}', 1))
    assert HuggingFaceTokenizer(directory).fingerprint() != before


def test_hugging_face_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match="no directory"):
        HuggingFaceTokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds none"):
        HuggingFaceTokenizer(tmp_path / "empty")


def test_train_tokenizer_command(tmp_path, capsys):
    rows = [{"question": q, "answer": a} for q, a in zip(corpus_texts(200, 1), corpus_texts(200, 2))]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    argv = ["--input", f"qa={data}", "--output", str(tmp_path / "tok"), "--vocab-size", "500",
            "--character-coverage", "1.0"]
    assert train_tokenizer_main(argv) == 0
    model = tmp_path / "tok.model"
    first = model.read_bytes()
    sidecar = json.loads((tmp_path / "tok.json").read_text())
    assert sidecar["options"]["vocab_size"] == 500 and sidecar["inputs"][0]["format"] == "qa"
    assert train_tokenizer_main(argv) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert train_tokenizer_main(argv + ["--overwrite"]) == 0
    assert model.read_bytes() == first
    tokenizer = SentencePieceTokenizer(model)
    text = f"User: {rows[0]['question']}\nAssistant: {rows[0]['answer']}"
    assert tokenizer.decode(tokenizer.encode(text)) == text

"""Preprocessing: round trips, loss masks, determinism, splits, atomic output, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import leftovers, read_documents, tree_bytes, write_jsonl
from megatron_desmoe.data.blend import load_blend
from megatron_desmoe.data.errors import DataError
from megatron_desmoe.data.preprocess import PreprocessOptions, preprocess, validation_mask
from megatron_desmoe.data.sources import DomainSource
from megatron_desmoe.errors import ConfigError
from synthetic_domains import EXPECTED_FORMATS, make_domains


def _options(sp_model, output, **overrides):
    fields = dict(output=output, tokenizer=_spec(sp_model), progress=False, chunk_size=7)
    fields.update(overrides)
    return PreprocessOptions(**fields)


def _spec(sp_model):
    from megatron_desmoe.data.tokenizer import TokenizerSpec

    return TokenizerSpec("sentencepiece", str(sp_model))


def _expected_document(tokenizer, pieces):
    """Tokens and loss mask computed by hand: each piece encoded on its own, then EOS."""
    tokens, mask = [], []
    for text, is_answer in pieces:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [int(is_answer)] * len(ids)
    return tokens + [tokenizer.eos_id], mask + [1]


@pytest.fixture(scope="module")
def all_in_train(tmp_path_factory, sp_model):
    """Every synthetic domain preprocessed with no validation split (documents in input order)."""
    root = tmp_path_factory.mktemp("all")
    sources, expected = make_domains(root / "inputs")
    report = preprocess(sources, _options(sp_model, root / "out", valid_fraction=0.0))
    return root / "out", expected, report


def test_formats_are_detected(all_in_train):
    output, _, _ = all_in_train
    blend = json.loads((output / "blend.json").read_text())
    assert {d["name"]: d["source"]["format"] for d in blend["domains"]} == EXPECTED_FORMATS


@pytest.mark.parametrize("domain", list(EXPECTED_FORMATS))
def test_round_trip_and_loss_mask_match_an_independent_computation(all_in_train, sp_tokenizer, domain):
    output, expected, _ = all_in_train
    documents = read_documents(output / domain / "train_text_document")
    masks = read_documents(output / domain / "train_loss_mask_document")
    assert len(documents) == len(expected[domain])
    for tokens, mask, pieces in zip(documents, masks, expected[domain]):
        want_tokens, want_mask = _expected_document(sp_tokenizer, pieces)
        assert tokens.tolist() == want_tokens
        assert mask.tolist() == want_mask
        assert sp_tokenizer.decode(tokens[:-1].tolist()) == "".join(text for text, _ in pieces)


def test_chinese_and_cherokee_survive(all_in_train, sp_tokenizer):
    output, _, _ = all_in_train
    law = sp_tokenizer.decode(read_documents(output / "law" / "train_text_document")[0][:-1].tolist())
    translation = sp_tokenizer.decode(read_documents(output / "translation" / "train_text_document")[0][:-1].tolist())
    assert any("\u4e00" <= ch <= "\u9fff" for ch in law)
    assert any("\u13a0" <= ch <= "\u13ff" for ch in translation)


def test_blend_counts_match_the_files(all_in_train):
    output, _, report = all_in_train
    blend = load_blend(output)
    assert blend.names == list(EXPECTED_FORMATS)
    for domain in blend.domains:
        documents = read_documents(domain.train.text_prefix)
        masks = read_documents(domain.train.loss_mask_prefix)
        assert domain.train.documents == len(documents)
        assert domain.train.tokens == sum(len(d) for d in documents)
        assert domain.train.answer_tokens == sum(int(m.sum()) for m in masks)
        assert domain.weight == domain.train.tokens  # default: proportional to training tokens
        assert domain.valid is None
    assert report.tokens == sum(d.train.tokens for d in blend.domains)


def test_one_and_two_workers_and_reruns_write_identical_bytes(tmp_path, sp_model):
    sources, _ = make_domains(tmp_path / "inputs", count=30)
    for name, workers in (("one", 1), ("two", 2), ("again", 2)):
        preprocess(sources, _options(sp_model, tmp_path / name, workers=workers))
    one = tree_bytes(tmp_path / "one")
    assert one == tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "again")
    assert any(name.endswith("valid_text_document.bin") for name in one)


def test_validation_split_is_a_seeded_per_record_hash(tmp_path, sp_model, sp_tokenizer):
    sources, expected = make_domains(tmp_path / "inputs", count=60, names=("math",))
    output = tmp_path / "out"
    preprocess(sources, _options(sp_model, output, valid_fraction=0.25, seed=7))
    valid_texts = [sp_tokenizer.decode(d[:-1].tolist()) for d in read_documents(output / "math" / "valid_text_document")]
    train_texts = [sp_tokenizer.decode(d[:-1].tolist()) for d in read_documents(output / "math" / "train_text_document")]
    all_texts = ["".join(t for t, _ in pieces) for pieces in expected["math"]]
    assert sorted(valid_texts + train_texts) == sorted(all_texts)
    assert train_texts == [t for t in all_texts if t in set(train_texts)]  # input order kept
    assert 5 <= len(valid_texts) <= 25
    mask = validation_mask("math", 60, 0.25, 7)
    assert [all_texts[i] for i in np.flatnonzero(mask)] == valid_texts
    # A record keeps its split when fewer records are read, and other seeds split differently.
    assert np.array_equal(validation_mask("math", 30, 0.25, 7), mask[:30])
    assert not np.array_equal(validation_mask("math", 60, 0.25, 8), mask)


def test_small_domain_still_gets_one_validation_document():
    assert validation_mask("tiny", 3, 0.01, 0).sum() == 1
    assert validation_mask("tiny", 3, 0.0, 0).sum() == 0
    assert validation_mask("tiny", 2, 0.99, 0).sum() == 1


def test_max_documents(tmp_path, sp_model):
    sources, _ = make_domains(tmp_path / "inputs", count=30, names=("math", "code"))
    report = preprocess(sources, _options(sp_model, tmp_path / "out", max_documents=11, valid_fraction=0.0))
    assert [d.records for d in report.domains] == [11, 11]
    assert len(read_documents(tmp_path / "out" / "code" / "train_text_document")) == 11


def test_user_weights_and_field_mapping(tmp_path, sp_model):
    data = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"p{i}", "solution": f"s{i}"} for i in range(8)])
    sources = [DomainSource("alpha", data, fields={"question": "problem", "answer": "solution"}, weight=3.0),
               DomainSource("beta", data, format="qa", fields={"question": "problem", "answer": "solution"},
                            weight=1.0)]
    preprocess(sources, _options(sp_model, tmp_path / "out"))
    blend = load_blend(tmp_path / "out" / "blend.json")
    assert [(d.name, d.domain_id, d.weight) for d in blend.domains] == [("alpha", 0, 3.0), ("beta", 1, 1.0)]
    assert blend.raw["weights"] == "user"


# --------------------------------------------------------------------------- bad input


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q0", "answer": "a0"}\n{"question": "q1", "answer": \n'
                    '{"question": "q2", "answer": "a2"}\n{"question": "q3"}\n', encoding="utf-8")
    return path


def test_malformed_line_stops_and_leaves_nothing(tmp_path, sp_model):
    sources, _ = make_domains(tmp_path / "inputs", count=20, names=("math",))  # a good domain first
    sources.append(DomainSource("bad", _bad_jsonl(tmp_path)))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON.*--on-error skip"):
        preprocess(sources, _options(sp_model, tmp_path / "out"))
    assert leftovers(tmp_path, "out") == []


def test_missing_field_error_names_the_field_and_line(tmp_path, sp_model):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}] * 9 + [{"question": "q"}])
    with pytest.raises(DataError, match=r"m\.jsonl:10: missing field 'answer'"):
        preprocess([DomainSource("m", path)], _options(sp_model, tmp_path / "out"))
    assert leftovers(tmp_path, "out") == []


def test_skip_counts_and_reports_bad_records(tmp_path, sp_model, sp_tokenizer):
    report = preprocess([DomainSource("bad", _bad_jsonl(tmp_path))],
                        _options(sp_model, tmp_path / "out", on_error="skip", valid_fraction=0.0))
    assert dict(report.domains[0].skipped) == {"malformed JSON": 1, "missing field": 1}
    assert "bad.jsonl:2" in report.domains[0].skipped_examples[0]
    assert "skipped" in report.summary()
    blend = json.loads((tmp_path / "out" / "blend.json").read_text())
    assert blend["domains"][0]["skipped"] == {"malformed JSON": 1, "missing field": 1}
    texts = [sp_tokenizer.decode(d.tolist()) for d in read_documents(tmp_path / "out" / "bad" / "train_text_document")]
    assert [t.split("\n")[0] for t in texts] == ["User: q0", "User: q2"]


@pytest.mark.parametrize("content, error, match", [
    ("", DataError, "empty file"),
    ("\n\n  \n", DataError, "only blank lines"),
    ('{"prompt_text": "x", "reply": "y"}\n', DataError, "cannot tell the format.*prompt_text"),
    ('{"question": "q", "answer": "a"}\n', ConfigError, "unknown format 'qna'"),
    ('{"question": "q", "answer": "a"}\n', ConfigError, "does not belong to format 'plain'"),
    ('{"question": "q"}\n', DataError, "missing field 'answer'"),
])
def test_bad_inputs_fail_before_work(tmp_path, sp_model, content, error, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    overrides = {"unknown format 'qna'": {"format": "qna"},
                 "does not belong to format 'plain'": {"format": "plain", "fields": {"question": "q"}},
                 "missing field 'answer'": {"format": "qa"}}
    source = DomainSource("d", path, **overrides.get(match, {}))
    with pytest.raises(error, match=match):
        preprocess([source], _options(sp_model, tmp_path / "out", on_error="skip"))
    assert leftovers(tmp_path, "out") == []


def test_output_exists_needs_overwrite(tmp_path, sp_model):
    sources, _ = make_domains(tmp_path / "inputs", count=10, names=("math",))
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="exists.*--overwrite"):
        preprocess(sources, _options(sp_model, output))
    assert (output / "keep.txt").exists()
    preprocess(sources, _options(sp_model, output, overwrite=True))
    assert not (output / "keep.txt").exists() and (output / "blend.json").is_file()
    assert leftovers(tmp_path, "out") == ["out"]


def test_failed_overwrite_keeps_the_old_output(tmp_path, sp_model):
    sources, _ = make_domains(tmp_path / "inputs", count=10, names=("math",))
    output = tmp_path / "out"
    preprocess(sources, _options(sp_model, output))
    before = tree_bytes(output)
    with pytest.raises(DataError):
        preprocess([DomainSource("bad", _bad_jsonl(tmp_path))], _options(sp_model, output, overwrite=True))
    assert tree_bytes(output) == before and leftovers(tmp_path, "out") == ["out"]


def test_option_and_tokenizer_errors(tmp_path, sp_model):
    sources, _ = make_domains(tmp_path / "inputs", count=5, names=("math",))
    for overrides, match in (({"workers": 0}, "workers"), ({"valid_fraction": 1.0}, "valid_fraction"),
                             ({"on_error": "ignore"}, "on_error")):
        with pytest.raises(ConfigError, match=match):
            preprocess(sources, _options(sp_model, tmp_path / "out", **overrides))
    with pytest.raises(ConfigError, match="no SentencePiece model"):
        preprocess(sources, _options(tmp_path / "absent.model", tmp_path / "out"))
    with pytest.raises(ConfigError, match="given twice"):
        preprocess(sources * 2, _options(sp_model, tmp_path / "out"))
    with pytest.raises(ConfigError, match="no file"):
        preprocess([DomainSource("x", tmp_path / "absent.jsonl")], _options(sp_model, tmp_path / "out"))
    with pytest.raises(ConfigError, match="would replace the input"):
        preprocess(sources, _options(sp_model, Path(sources[0].path).parent, overwrite=True))
    assert leftovers(tmp_path, "out") == []

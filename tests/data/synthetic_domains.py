"""Small synthetic domain files in the five formats, with their expected template pieces.

The expected pieces are written out here from the raw records and the documented template,
independently of megatron_desmoe.data.formats / templates.
"""

from __future__ import annotations

import random
from pathlib import Path

from data_fixtures import ASSISTANT, USER, sentence, write_json, write_jsonl
from megatron_desmoe.data.sources import DomainSource

Pieces = list  # [(text, is_answer)]


def qa_pieces(prompt: str, answer: str) -> Pieces:
    return [(USER + prompt + ASSISTANT, False), (answer, True)]


def general(directory: Path, rng: random.Random, count: int):
    lines = [sentence(rng, ("latin", "chinese", "cherokee")[i % 3], 12) for i in range(count)]
    path = directory / "general.txt"
    path.write_text("".join(f" {line} \n\n" for line in lines), encoding="utf-8")
    return path, [[(line, True)] for line in lines]


def math(directory: Path, rng: random.Random, count: int):
    rows = [{"question": f"{sentence(rng, 'latin')} {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(count)]
    return write_jsonl(directory / "math.jsonl", rows), [qa_pieces(r["question"], r["answer"]) for r in rows]


def code(directory: Path, rng: random.Random, count: int):
    rows, expected = [], []
    for i in range(count):
        instruction, extra = f"Write f{i}", (f"n = {i}" if i % 2 else "")
        body = f"def f{i}(n):\n    return n * {i}  # {sentence(rng, 'latin', 3)}"
        answer_key = "output" if i % 3 else "response"
        rows.append({"instruction": instruction, "input": extra, answer_key: body})
        expected.append(qa_pieces(instruction + (f"\n\n{extra}" if extra else ""), body))
    return write_json(directory / "code.json", rows), expected


def law(directory: Path, rng: random.Random, count: int):
    rows, expected = [], []
    for i in range(count):
        u1, a1, u2, a2 = (sentence(rng, "chinese", 4) for _ in range(4))
        rows.append({"id": i, "messages": [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                           {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]})
        expected.append([(USER + u1 + ASSISTANT, False), (a1, True), ("\n" + USER + u2 + ASSISTANT, False),
                         (a2, True)])
    return write_jsonl(directory / "law.jsonl", rows), expected


def translation(directory: Path, rng: random.Random, count: int):
    rows, expected = [], []
    for i in range(count):
        source, target = sentence(rng, "cherokee", 5), sentence(rng, "latin", 6)
        inner = f"Translate Cherokee to English: {source}\nTranslation:"
        rows.append({"idx": i, "prompt": f"User: {inner}\n\nAssistant:", "answers": repr([target, "other"])})
        expected.append(qa_pieces(inner, target))
    return write_jsonl(directory / "translation.jsonl", rows), expected


WRITERS = {"general": general, "math": math, "code": code, "law": law, "translation": translation}
EXPECTED_FORMATS = {"general": "plain", "math": "qa", "code": "alpaca", "law": "chat",
                    "translation": "prompt_answers"}


def make_domains(directory: Path, count: int = 40, seed: int = 0, names=tuple(WRITERS)):
    """(sources, {name: [expected pieces per record]}) for the named synthetic domains."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources, expected = [], {}
    for name in names:
        path, pieces = WRITERS[name](directory, rng, count)
        sources.append(DomainSource(name, path))
        expected[name] = pieces
    return sources, expected

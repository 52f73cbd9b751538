"""Helpers shared by the data tests: synthetic multi-script text, file writers, readers.

Expected values in the tests are computed from the raw records and the documented template
("User: {prompt}\\nAssistant: {answer}" + EOS), never by calling the code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

LATIN = ("the river crosses old stone bridges while merchants count silver coins near "
         "quiet harbours and children learn numbers letters songs").split()
CHINESE = list("法院判决双方协议离婚孩子抚养费支付每月原告被告请分析下面这句话的意图并转化为格式答案总结对话客服流量")
# Cherokee syllabics; U+13F5 and U+13F4 are left out of the training text on purpose.
CHEROKEE = [chr(c) for c in range(0x13A0, 0x13F4)]
UNSEEN = "\u13f5\u13f4 \U0001f642 \u2603"  # never in the tokenizer's training text: byte fallback

USER, ASSISTANT = "User: ", "\nAssistant: "


def sentence(rng: random.Random, script: str, words: int = 8) -> str:
    if script == "latin":
        return " ".join(rng.choice(LATIN) for _ in range(words))
    if script == "chinese":
        return "".join(rng.choice(CHINESE) for _ in range(words * 2)) + "。"
    return " ".join("".join(rng.choice(CHEROKEE) for _ in range(rng.randint(2, 5))) for _ in range(words))


def corpus_texts(count: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        script = ("latin", "chinese", "cherokee")[index % 3]
        texts.append(f"{USER}{sentence(rng, script)}{ASSISTANT}{sentence(rng, script)} {index}\n"
                     f"    code_{index % 7}(x) = {index} * x")
    return texts


def train_small_tokenizer(path: Path, vocab_size: int = 600, texts=None) -> Path:
    from megatron_desmoe.data.tokenizer import SentencePieceOptions, train_sentencepiece

    options = SentencePieceOptions(vocab_size=vocab_size, character_coverage=1.0)
    path.write_bytes(train_sentencepiece(texts or corpus_texts(), options))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def read_documents(prefix) -> list[np.ndarray]:
    """Every document of an indexed dataset, read with Megatron's IndexedDataset."""
    from megatron_desmoe.compat import ensure_megatron_importable

    ensure_megatron_importable()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]


def tree_bytes(directory: Path, skip=("cache",)) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).parts[0] not in skip}


def leftovers(directory: Path, name: str) -> list[str]:
    """Entries of `directory` that belong to output `name` (itself or temporaries beside it)."""
    return sorted(p.name for p in directory.iterdir() if p.name == name or p.name.startswith(f".{name}."))

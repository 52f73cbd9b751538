"""Tokenizers: train a SentencePiece model on the user's corpus, or load a local Hugging Face one.

Both are wrapped in `Tokenizer` (encode / encode_batch / decode / eos_id / pad_id / vocab_size /
fingerprint). The fingerprint (sha256 of the tokenizer files) is written into blend.json by
preprocessing; `check_tokenizer_matches` refuses to train with a different tokenizer.

SentencePiece settings (train_sentencepiece) keep text exactly recoverable: byte_fallback
(characters outside the vocabulary, e.g. rare Cherokee syllabics or emoji, become UTF-8 byte
pieces), identity normalization, no dummy prefix and no whitespace collapsing (code keeps its
indentation), and "\\n" as a user-defined piece. The trained model is a deterministic function
of the input text and the options, num_threads included (SentencePiece splits its work per
thread), so num_threads has a fixed default instead of the machine's core count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from megatron_desmoe.data.errors import TokenizerMismatchError
from megatron_desmoe.errors import ConfigError

# Files that define a Hugging Face tokenizer; those present are hashed into the fingerprint.
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja",
)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3  # ids of the specials in models we train


@dataclass(frozen=True)
class TokenizerSpec:
    """A picklable reference to a tokenizer (workers load their own copy from it)."""

    kind: str  # "sentencepiece" (path = .model file) or "huggingface" (path = directory)
    path: str


class Tokenizer(ABC):
    """What preprocessing and the dataset need from a tokenizer."""

    spec: TokenizerSpec

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> Optional[int]: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    def describe(self) -> dict:
        """What blend.json records about the tokenizer."""
        return {"kind": self.spec.kind, "fingerprint": self.fingerprint(),
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: Union[str, Path]):
        import sentencepiece

        path = Path(model_path)
        if not path.is_file():
            raise ConfigError("tokenizer_model", f"no SentencePiece model at {path}",
                              "pass the .model file written by desmoe-train-tokenizer")
        self.spec = TokenizerSpec("sentencepiece", str(path.resolve()))
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ConfigError("tokenizer_model", f"{path} is not a SentencePiece model ({error})",
                              "pass the .model file written by desmoe-train-tokenizer") from None
        if self._processor.eos_id() < 0:
            raise ConfigError("tokenizer_model", f"{path} defines no EOS piece",
                              "train it with an eos_id (desmoe-train-tokenizer does)")
        self._fingerprint = "sentencepiece-sha256:" + _sha256_file(path)

    def encode(self, text: str) -> list[int]:
        return self._processor.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One call into C++ per batch; a single thread because workers are already parallel.
        return self._processor.Encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> Optional[int]:
        pad = self._processor.pad_id()
        return pad if pad >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    def fingerprint(self) -> str:
        return self._fingerprint


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, directory: Union[str, Path]):
        path = Path(directory)
        if not path.is_dir():
            raise ConfigError("hf_tokenizer", f"no directory {path}",
                              "pass a local directory holding tokenizer.json / tokenizer_config.json")
        files = [name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
        if not files:
            raise ConfigError("hf_tokenizer", f"{path} holds none of {', '.join(HF_TOKENIZER_FILES)}",
                              "save the tokenizer there with tokenizer.save_pretrained(dir)")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError("hf_tokenizer", f"cannot load a tokenizer from {path} ({error})",
                              "check the directory was written by save_pretrained") from None
        if self._tokenizer.eos_token_id is None:
            raise ConfigError("hf_tokenizer", f"the tokenizer in {path} has no EOS token",
                              "set eos_token in its tokenizer_config.json")
        self.spec = TokenizerSpec("huggingface", str(path.resolve()))
        digest = hashlib.sha256()
        for name in files:
            digest.update(f"{name}\0{_sha256_file(path / name)}\0".encode())
        self._fingerprint = "huggingface-sha256:" + digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)

    @property
    def eos_id(self) -> int:
        return int(self._tokenizer.eos_token_id)

    @property
    def pad_id(self) -> Optional[int]:
        pad = self._tokenizer.pad_token_id
        return None if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def fingerprint(self) -> str:
        return self._fingerprint


def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizer(spec.path)
    if spec.kind == "huggingface":
        return HuggingFaceTokenizer(spec.path)
    raise ConfigError("tokenizer", f"unknown tokenizer kind '{spec.kind}'",
                      "use 'sentencepiece' or 'huggingface'")


def tokenizer_spec(model: Optional[str] = None, hf_dir: Optional[str] = None) -> TokenizerSpec:
    """Exactly one of a SentencePiece model file or a Hugging Face tokenizer directory."""
    if bool(model) == bool(hf_dir):
        raise ConfigError("tokenizer", "give exactly one tokenizer",
                          "pass --tokenizer-model FILE.model or --hf-tokenizer DIR")
    return TokenizerSpec("sentencepiece", model) if model else TokenizerSpec("huggingface", hf_dir)


def fingerprint_of(tokenizer_or_fingerprint: Union[Tokenizer, str]) -> str:
    if isinstance(tokenizer_or_fingerprint, str):
        return tokenizer_or_fingerprint
    return tokenizer_or_fingerprint.fingerprint()


def check_tokenizer_matches(blend, tokenizer_or_fingerprint: Union[Tokenizer, str]) -> None:
    """Raise TokenizerMismatchError unless the blend was tokenized with this tokenizer."""
    expected = blend.tokenizer["fingerprint"]
    given = fingerprint_of(tokenizer_or_fingerprint)
    if given != expected:
        raise TokenizerMismatchError(
            f"{blend.path}: the data was tokenized with tokenizer {expected}, but training was "
            f"given {given}. Fix: train with the tokenizer used for preprocessing, or rerun "
            f"desmoe-preprocess with this tokenizer")


# --------------------------------------------------------------------------- training


@dataclass
class SentencePieceOptions:
    vocab_size: int = 8000
    model_type: str = "bpe"  # or "unigram"
    character_coverage: float = 0.9995
    num_threads: int = 2
    max_sentence_length: int = 1 << 16  # bytes; longer documents are skipped by SentencePiece
    user_defined_symbols: list[str] = field(default_factory=lambda: ["\n"])

    def check(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ConfigError("model_type", f"'{self.model_type}' is not supported", "use bpe or unigram")
        if self.vocab_size < 300:
            raise ConfigError("vocab_size", f"{self.vocab_size} is too small for byte fallback "
                              "(256 byte pieces + specials)", "use at least 300")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError("character_coverage", f"{self.character_coverage} is out of range",
                              "use a value in [0.9, 1.0], e.g. 0.9995")
        if self.num_threads < 1:
            raise ConfigError("num_threads", f"{self.num_threads} < 1", "use 1 or more")


def train_sentencepiece(texts: Iterable[str], options: SentencePieceOptions) -> bytes:
    """Train on `texts` (one document each) and return the serialized model."""
    import sentencepiece

    options.check()
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts), model_writer=model,
            vocab_size=options.vocab_size, model_type=options.model_type,
            character_coverage=options.character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=options.user_defined_symbols,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=options.num_threads, max_sentence_length=options.max_sentence_length,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as error:
        raise ConfigError("vocab_size", f"SentencePiece training failed: {error}",
                          "raise --vocab-size (or lower --character-coverage) when SentencePiece "
                          "asks for more pieces than the vocabulary holds; lower --vocab-size "
                          "when the corpus is too small for it") from None
    return model.getvalue()


def write_tokenizer_model(model: bytes, output: Path, options: SentencePieceOptions,
                          provenance: dict, overwrite: bool = False) -> Path:
    """Write `output` (.model) and a `.json` sidecar with the options, atomically."""
    output = check_model_output(output, overwrite)
    sidecar = output.with_suffix(".json")
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"options": asdict(options), "sha256": hashlib.sha256(model).hexdigest(), **provenance}
    _atomic_write(sidecar, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())
    _atomic_write(output, model)
    return output


def check_model_output(output: Path, overwrite: bool) -> Path:
    """The .model path to write; ConfigError if it (or its sidecar) exists without overwrite."""
    output = output if output.suffix == ".model" else output.with_name(output.name + ".model")
    for path in (output, output.with_suffix(".json")):
        if path.exists() and not overwrite:
            raise ConfigError("output", f"{path} exists", "choose another path or pass --overwrite")
    return output


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

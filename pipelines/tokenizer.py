"""Tokenizers: raw bytes for tiny models and tests, byte-level BPE trained on the input, or the
tokenizer.json of a Hugging Face model directory (`hf:DIR`) to train that model on.

A tokenizer's identity (`to_json()`) is written into every manifest, so that a run can refuse data
prepared with another tokenizer (`manifest.token_mismatch_check`) and rebuild the exact tokenizer
from a prepared directory (`tokenizer_from_json`).
"""

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pipelines.errors import DataError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    """What prepare writes with and what a run needs to read the data back."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray:
        """1-D array of unsigned ids, without EOS; ValueError for text it cannot encode."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable identity: equal specs mean equal id streams."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids, with EOS = 0 (the NUL byte).

    Text has no NUL in practice, so reusing it as EOS keeps vocab_size at 256 for the tiny
    models; text that does contain NUL is refused rather than silently split in two documents.
    """

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> np.ndarray:
        if "\0" in text:
            raise ValueError(
                f"text contains NUL (character {text.index(chr(0))}), the byte tokenizer's EOS"
            )
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class BPETokenizer:
    """Byte-level BPE (HF `tokenizers`), trained offline on the data it will encode.

    It is held as its JSON text: that text is saved as tokenizer.json beside the data, hashed
    into the manifest identity, and pickled to prepare's worker processes.
    """

    file_name = "tokenizer.json"

    def __init__(self, json_text: str, eos_token: str = EOS_TOKEN) -> None:
        self._json = json_text
        self.eos_token = eos_token
        try:
            self._tok = HFTokenizer.from_str(json_text)
        except Exception as e:  # `tokenizers` raises a bare Exception for malformed JSON
            raise ValueError(f"not a tokenizers JSON file ({e})") from e
        # Not serialised by `tokenizers`: without it, "<|endoftext|>" inside a document would
        # become a real EOS and split it.
        self._tok.encode_special_tokens = True
        eos = self._tok.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"tokenizer has no {eos_token} token")
        self.eos_id: int = eos
        self.vocab_size: int = self._tok.get_vocab_size()

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False
    ) -> "BPETokenizer":
        """Learn merges from `texts`; the vocabulary may end smaller on a small corpus."""
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str())

    @classmethod
    def load(cls, path: Path, eos_token: str = EOS_TOKEN) -> "BPETokenizer":
        return cls(path.read_text(encoding="utf-8"), eos_token)

    def save(self, path: Path) -> None:
        path.write_text(self._json, encoding="utf-8")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.uint32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "bpe",
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "file": self.file_name,
            "sha256": hashlib.sha256(self._json.encode("utf-8")).hexdigest(),
        } | ({"eos_token": self.eos_token} if self.eos_token != EOS_TOKEN else {})

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return BPETokenizer, (self._json, self.eos_token)


def model_tokenizer(directory: Path) -> BPETokenizer:
    """A Hugging Face model's own tokenizer (DIR/tokenizer.json), so that data prepared with it
    feeds that model's embedding. EOS is the model's: tokenizer_config.json's `eos_token`, else
    the token of config.json's `eos_token_id`."""
    path = Path(directory) / BPETokenizer.file_name
    if not path.is_file():
        raise DataError(f"hf:{directory}: no {BPETokenizer.file_name} in the model directory")
    text = path.read_text(encoding="utf-8")
    eos = _model_eos(Path(directory), text)
    try:
        return BPETokenizer(text, eos)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e


def _model_eos(directory: Path, tokenizer_json: str) -> str:
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        eos = json.loads(config_path.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    model_config = directory / "config.json"
    eos_id = (
        json.loads(model_config.read_text()).get("eos_token_id") if model_config.is_file() else None
    )
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    token = (
        HFTokenizer.from_str(tokenizer_json).id_to_token(eos_id)
        if isinstance(eos_id, int)
        else None
    )
    if token is None:
        raise DataError(
            f"hf:{directory}: no end-of-text token: neither tokenizer_config.json's eos_token nor"
            " config.json's eos_token_id names one"
        )
    return token


def tokenizer_from_json(spec: Mapping[str, Any], directory: Path) -> Tokenizer:
    """Rebuild the tokenizer a manifest names; a BPE file must hash to the recorded identity."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        path = Path(directory) / str(spec["file"])
        try:
            tok = BPETokenizer.load(path, str(spec.get("eos_token", EOS_TOKEN)))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot load tokenizer ({e})") from e
        if tok.to_json() != dict(spec):
            raise DataError(f"{path}: tokenizer differs from the one recorded in the manifest")
        return tok
    raise DataError(f"unknown tokenizer kind {kind!r} in {directory}")

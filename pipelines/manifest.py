"""manifest.json: what a prepared directory holds, and how to tell it is intact and compatible.

`prepare` writes it last, so its presence marks a complete directory; the loader reads it
first. Sizes, counts and checksums turn a truncated or swapped file into a clear error, and the
tokenizer identity lets a resumed run refuse data encoded with another tokenizer.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import DataError

FORMAT = "memfit-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SplitInfo:
    """One Arrow IPC file of token ids."""

    file: str
    tokens: int
    documents: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SourceInfo:
    """One input file, as it was when prepared."""

    path: str
    bytes: int
    documents: int


@dataclass(frozen=True)
class Manifest:
    tokenizer: dict[str, Any]
    dtype: str
    splits: dict[str, SplitInfo]
    sources: list[SourceInfo]
    text_column: str
    val_fraction: float
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        return cls(
            tokenizer=dict(data["tokenizer"]),
            dtype=str(data["dtype"]),
            splits={name: SplitInfo(**info) for name, info in data["splits"].items()},
            sources=[SourceInfo(**source) for source in data["sources"]],
            text_column=str(data["text_column"]),
            val_fraction=float(data["val_fraction"]),
            version=int(data["version"]),
        )

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise DataError(f"{path}: no manifest; prepare the data with `memfit prepare`") from e
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable manifest ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{path}: not a memfit token manifest")
        if data.get("version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: format version {data.get('version')!r}, this memfit reads "
                f"{FORMAT_VERSION}; prepare the data again"
            )
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: malformed manifest ({e!r})") from e


def token_mismatch_check(manifest: Manifest, tokenizer_spec: dict[str, Any]) -> None:
    """Raise DataError when the data was prepared with another tokenizer than the run expects.

    Used on resume: a checkpoint's embedding rows mean nothing for ids from another vocabulary.
    """
    if manifest.tokenizer == tokenizer_spec:
        return
    keys = sorted(set(manifest.tokenizer) | set(tokenizer_spec))
    diff = ", ".join(
        f"{k}: data {manifest.tokenizer.get(k)!r} vs run {tokenizer_spec.get(k)!r}"
        for k in keys
        if manifest.tokenizer.get(k) != tokenizer_spec.get(k)
    )
    raise DataError(
        f"the data was prepared with a different tokenizer than this run expects ({diff}); "
        "prepare the data again with the run's tokenizer, or resume with matching data"
    )

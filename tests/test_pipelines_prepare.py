"""prepare: every input format round-trips, outputs are checked, bad input names its file."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from memfit.prepare_cmd import prepare_command
from pipelines.corpus import default_dataset, embedded_corpus
from pipelines.errors import DataError
from pipelines.manifest import MANIFEST_NAME, Manifest, token_mismatch_check
from pipelines.prepare import prepare
from pipelines.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, tokenizer_from_json

TEXT_DOC = "Plain text file: one document.\nÜnïcödé ✓ and a second line\n"
JSONL_DOCS = ["first json doc", "", "second\njson doc ✓", "third"]
PARQUET_DOCS = [f"parquet row {i} " + "x" * i for i in range(10)]


def write_inputs(root: Path) -> tuple[list[Path], list[str]]:
    """One file of each format; returns the paths and the non-empty documents in input order."""
    root.mkdir(parents=True, exist_ok=True)
    text = root / "a.txt"
    text.write_text(TEXT_DOC, encoding="utf-8")
    jsonl = root / "b.jsonl"
    lines = [json.dumps({"text": doc, "id": i}) for i, doc in enumerate(JSONL_DOCS)]
    jsonl.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    parquet = root / "c.parquet"
    table = pa.table({"id": list(range(len(PARQUET_DOCS))), "text": PARQUET_DOCS})
    pq.write_table(table, parquet, row_group_size=3)
    docs = [TEXT_DOC, *(d for d in JSONL_DOCS if d), *PARQUET_DOCS]
    return [text, jsonl, parquet], docs


def split_ids(out: Path, split: str) -> np.ndarray:
    with pa.memory_map(str(out / f"{split}.arrow")) as source:
        return pa.ipc.open_file(source).read_all().column("tokens").to_numpy()


def split_documents(out: Path, split: str, tokenizer: Tokenizer) -> list[str]:
    ids = split_ids(out, split)
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    assert len(ends) == 0 or ends[-1] == len(ids) - 1, "stream must end with EOS"
    starts = [0, *(ends[:-1] + 1)][: len(ends)]
    return [tokenizer.decode(ids[start:end]) for start, end in zip(starts, ends, strict=True)]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(any(doc == other for other in rest) for doc in part)


def check_round_trip(out: Path, manifest: Manifest, tokenizer: Tokenizer, docs: list[str]) -> None:
    got = {split: split_documents(out, split, tokenizer) for split in ("train", "val")}
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    for split, split_docs in got.items():
        assert is_subsequence(split_docs, docs), "each split keeps input order"
        assert manifest.splits[split].documents == len(split_docs)
        assert manifest.splits[split].tokens == len(split_ids(out, split))


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_all_formats(tmp_path: Path, workers: int) -> None:
    inputs, docs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    manifest = prepare(inputs, out, val_fraction=0.3, workers=workers, progress=False)
    assert manifest == Manifest.load(out)
    assert manifest.dtype == "uint16" and manifest.tokenizer == ByteTokenizer().to_json()
    assert manifest.splits["val"].documents > 0, "this corpus puts documents in both splits"
    check_round_trip(out, manifest, ByteTokenizer(), docs)
    sources = {Path(s.path).name: (s.bytes, s.documents) for s in manifest.sources}
    assert sources == {
        "a.txt": (inputs[0].stat().st_size, 1),
        "b.jsonl": (inputs[1].stat().st_size, 3),
        "c.parquet": (inputs[2].stat().st_size, 10),
    }


def test_split_independent_of_workers_and_order(tmp_path: Path) -> None:
    inputs, _ = write_inputs(tmp_path / "in")
    one = prepare(inputs, tmp_path / "one", workers=1, val_fraction=0.3, progress=False)
    two = prepare(inputs, tmp_path / "two", workers=2, val_fraction=0.3, progress=False)
    for split in ("train", "val"):
        assert one.splits[split] == two.splits[split]
    reordered = prepare(inputs[::-1], tmp_path / "rev", val_fraction=0.3, progress=False)
    assert reordered.splits["val"].documents == one.splits["val"].documents


def test_directory_input_expands_sorted(tmp_path: Path) -> None:
    inputs, docs = write_inputs(tmp_path / "in")
    (tmp_path / "in" / ".hidden").write_text("not data")
    manifest = prepare([tmp_path / "in"], tmp_path / "out", progress=False)
    assert [Path(s.path).name for s in manifest.sources] == ["a.txt", "b.jsonl", "c.parquet"]


def test_manifest_checksums_and_sizes(tmp_path: Path) -> None:
    inputs, _ = write_inputs(tmp_path / "in")
    manifest = prepare(inputs, tmp_path / "out", progress=False)
    for info in manifest.splits.values():
        data = (tmp_path / "out" / info.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256
        assert len(data) == info.bytes


class WideTokenizer:
    """Byte ids shifted past 2**16, to force uint32 storage."""

    vocab_size = 70_000
    eos_id = 69_999

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint32) + 65_536

    def decode(self, ids: np.ndarray) -> str:
        return (np.asarray(ids) - 65_536).astype(np.uint8).tobytes().decode()

    def to_json(self) -> dict[str, object]:
        return {"kind": "wide", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def test_dtype_follows_vocab_size(tmp_path: Path) -> None:
    inputs, docs = write_inputs(tmp_path / "in")
    manifest = prepare(inputs, tmp_path / "wide", WideTokenizer(), progress=False)
    assert manifest.dtype == "uint32"
    assert split_ids(tmp_path / "wide", "train").dtype == np.uint32
    check_round_trip(tmp_path / "wide", manifest, WideTokenizer(), docs)
    assert prepare(inputs, tmp_path / "byte", progress=False).dtype == "uint16"


def test_bpe_trained_saved_and_reloaded(tmp_path: Path) -> None:
    inputs, docs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    manifest = prepare(inputs, out, "bpe", vocab_size=300, val_fraction=0.3, progress=False)
    assert manifest.tokenizer["kind"] == "bpe"
    assert (out / "tokenizer.json").is_file()
    tokenizer = tokenizer_from_json(manifest.tokenizer, out)
    assert tokenizer.to_json() == manifest.tokenizer
    assert 257 <= tokenizer.vocab_size <= 300
    check_round_trip(out, manifest, tokenizer, docs)
    token_mismatch_check(manifest, tokenizer.to_json())
    with pytest.raises(DataError, match="different tokenizer"):
        token_mismatch_check(manifest, ByteTokenizer().to_json())
    BPETokenizer.train(["other text"], vocab_size=280).save(out / "tokenizer.json")
    with pytest.raises(DataError, match="tokenizer.json: tokenizer differs"):
        tokenizer_from_json(manifest.tokenizer, out)
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.json: cannot load"):
        tokenizer_from_json(manifest.tokenizer, out)


def test_bpe_keeps_eos_text_inside_documents() -> None:
    tokenizer = BPETokenizer.train(["a <|endoftext|> b"] * 3, vocab_size=270)
    ids = tokenizer.encode("x <|endoftext|> y")
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "x <|endoftext|> y"


def bad_inputs(root: Path) -> list[tuple[str, Path, str]]:
    """(case, file, expected message part) for each kind of bad input."""
    root.mkdir()
    cases: list[tuple[str, Path, str]] = []

    def add(case: str, name: str, content: bytes, expect: str) -> None:
        path = root / name
        path.write_bytes(content)
        cases.append((case, path, expect))

    add("empty", "empty.txt", b"", "empty file")
    add("not json", "bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{not json}\n', "line 3")
    add(
        "no text field",
        "nofield.jsonl",
        b'{"text": "ok"}\n{"body": "x"}\n',
        "line 2: no 'text' field; it has body",
    )
    add("not an object", "list.jsonl", b'{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON")
    add("text not string", "number.jsonl", b'{"text": 5}\n', "line 1")
    add("no documents", "blank.jsonl", b'{"text": ""}\n\n', "no documents")
    add("not utf-8", "latin1.txt", "one\ntwo \xe9\n".encode("latin-1"), "line 2")
    add("NUL byte", "nul.jsonl", b'{"text": "ok"}\n{"text": "a\\u0000b"}\n', "line 2")
    add("not parquet", "fake.parquet", b"PAR1 this is not parquet", "not a readable Parquet")
    column = root / "column.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), column)
    cases.append(("no column", column, "no column 'text'; it has body, id"))
    null = root / "null.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), null, row_group_size=2)
    cases.append(("null row", null, "row 2"))
    cases.append(("missing", root / "missing.txt", "cannot read"))
    return cases


def test_bad_inputs_name_file_and_place(tmp_path: Path) -> None:
    good, _ = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    for case, path, expect in bad_inputs(tmp_path / "bad"):
        with pytest.raises(DataError) as info:
            prepare([*good, path], out, progress=False)
        message = str(info.value)
        assert str(path) in message and expect in message, (case, message)
        assert not out.exists(), f"{case}: a failed prepare must leave no output directory"


def test_bad_input_in_a_worker_process(tmp_path: Path) -> None:
    good, _ = write_inputs(tmp_path / "in")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=f"{bad}, line 2: no 'text' field"):
        prepare([*good, bad], tmp_path / "out", workers=2, progress=False)


def test_existing_output_is_never_lost(tmp_path: Path) -> None:
    inputs, _ = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    prepare(inputs, out, "bpe", vocab_size=280, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"notes.txt", "train.arrow", "val.arrow", "tokenizer.json", MANIFEST_NAME}

    with pytest.raises(DataError, match="already holds prepared data"):
        prepare(inputs, out, progress=False)
    bad = tmp_path / "empty.txt"
    bad.touch()
    with pytest.raises(DataError, match="empty file"):
        prepare([*inputs, bad], out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    prepare(inputs, out, overwrite=True, progress=False)
    after = {p.name for p in out.iterdir()}
    assert after == {"notes.txt", "train.arrow", "val.arrow", MANIFEST_NAME}, "stale BPE file"
    assert (out / "notes.txt").read_text() == "mine"
    assert Manifest.load(out).tokenizer["kind"] == "byte"


def test_cli_success_and_data_error_exit_code(tmp_path: Path) -> None:
    inputs, _ = write_inputs(tmp_path / "in")
    runner = CliRunner()
    args = [*map(str, inputs), "--out", str(tmp_path / "out"), "--val-fraction", "0.2"]
    result = runner.invoke(prepare_command, args)
    assert result.exit_code == 0, result.output
    assert "train.arrow" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n[1, 2]\n')
    result = runner.invoke(prepare_command, [str(bad), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 2
    assert f"{bad}, line 2" in result.output and "Traceback" not in result.output


def test_embedded_corpus_is_stdlib_sorted_and_bounded() -> None:
    files = embedded_corpus(budget_bytes=200_000)
    assert files and sum(p.stat().st_size for p in files) <= 200_000
    assert files == embedded_corpus(budget_bytes=200_000)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)


def test_default_dataset_prepared_once(tmp_path: Path) -> None:
    first = default_dataset(tmp_path, progress=False)
    stamp = (first / MANIFEST_NAME).stat().st_mtime_ns
    assert default_dataset(tmp_path, progress=False) == first
    assert (first / MANIFEST_NAME).stat().st_mtime_ns == stamp
    manifest = Manifest.load(first)
    assert manifest.tokenizer == ByteTokenizer().to_json()
    assert manifest.splits["train"].tokens > 1_000_000 and manifest.splits["val"].tokens > 0

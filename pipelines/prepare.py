"""prepare: text, JSONL and Parquet files → token ids in Arrow IPC files + manifest.json.

A document is a whole text file, one JSONL line's `text_column` field, or one Parquet row's
`text_column` value; each is tokenized and followed by EOS (empty documents are skipped). A
document goes to val when a 64-bit hash of its text falls under `val_fraction`: the split is
independent of file order and worker count, and duplicated documents never straddle the splits.

Memory stays bounded whatever the corpus size: documents are read one at a time (Parquet one
record batch at a time), workers append ids to raw shard files on disk, and each split is
written as ONE Arrow record batch straight from a memory-mapped raw file. One record batch means
one contiguous buffer, which is what lets the loader map a whole split as a single zero-copy
tensor.

Nothing in `out_dir` is touched until every input was tokenized: outputs are built in a
temporary directory inside it and moved into place with os.replace, manifest.json last.
"""

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pipelines.errors import DataError
from pipelines.manifest import MANIFEST_NAME, SPLITS, Manifest, SourceInfo, SplitInfo
from pipelines.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, model_tokenizer

ARROW_FILES = {split: f"{split}.arrow" for split in SPLITS}
OUTPUT_NAMES = (*ARROW_FILES.values(), BPETokenizer.file_name, MANIFEST_NAME)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIX = ".parquet"
# Below this much input a worker pool costs more to start than it saves.
POOL_MIN_BYTES = 16 * 2**20
PARQUET_JOB_BYTES = 32 * 2**20
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class _Job:
    """A unit of parallel work: a whole text/JSONL file, or a run of Parquet row groups."""

    index: int
    path: Path
    nbytes: int
    row_groups: tuple[int, ...] = ()
    first_row: int = 0


@dataclass(frozen=True)
class _Settings:
    tokenizer: Tokenizer
    dtype: str
    text_column: str
    val_threshold: int  # documents whose 64-bit text hash is below this go to val
    work_dir: Path  # the temporary directory inside out_dir


def prepare(
    inputs: Sequence[Path | str],
    out_dir: Path | str,
    tokenizer: Tokenizer | str = "byte",
    *,
    vocab_size: int = 8192,
    text_column: str = "text",
    val_fraction: float = 0.01,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Tokenize `inputs` (files or directories) into `out_dir`; return the written manifest.

    `tokenizer` is a Tokenizer, "byte", "hf:DIR" (a model's tokenizer.json), or "bpe", which
    first trains a byte-level BPE of `vocab_size` on the inputs. `workers=None` uses one process
    for small inputs and all cores otherwise. Raises DataError naming the file (and line or row)
    for bad input, and when `out_dir` already holds prepared data and not `overwrite`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    files = _expand(inputs)
    _check_out_dir(out_dir, overwrite)
    jobs = _plan_jobs(files, text_column)
    total_bytes = sum(job.nbytes for job in jobs)
    if workers is None:
        workers = 1 if total_bytes < POOL_MIN_BYTES else os.cpu_count() or 1

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        tok = _make_tokenizer(tokenizer, jobs, text_column, vocab_size, progress)
        dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
        settings = _Settings(tok, dtype, text_column, int(val_fraction * 2**64), tmp)
        documents = _tokenize(jobs, settings, workers, total_bytes, progress)
        for path in files:
            if not sum(documents[path, split] for split in SPLITS):
                raise DataError(f"{path}: no documents (every {text_column!r} is empty)")
        splits = {
            split: _write_split(settings, split, sum(documents[p, split] for p in files))
            for split in SPLITS
        }
        manifest = Manifest(
            tokenizer=tok.to_json(),
            dtype=dtype,
            splits=splits,
            sources=[
                SourceInfo(str(p.resolve()), p.stat().st_size, sum(documents[p, s] for s in SPLITS))
                for p in files
            ],
            text_column=text_column,
            val_fraction=val_fraction,
        )
        names = list(ARROW_FILES.values())
        if isinstance(tok, BPETokenizer):
            tok.save(tmp / BPETokenizer.file_name)
            names.append(BPETokenizer.file_name)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        _commit(tmp, out_dir, names)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _make_tokenizer(
    tokenizer: Tokenizer | str, jobs: list[_Job], text_column: str, vocab_size: int, progress: bool
) -> Tokenizer:
    if not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        texts = (text for job in jobs for text, _ in _documents(job, text_column))
        return BPETokenizer.train(texts, vocab_size, show_progress=progress)
    if tokenizer.startswith("hf:"):
        return model_tokenizer(Path(tokenizer.removeprefix("hf:")))
    raise ValueError(f"tokenizer must be 'byte', 'bpe', 'hf:DIR' or a Tokenizer, got {tokenizer!r}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    existing = [name for name in OUTPUT_NAMES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DataError(
            f"{out_dir}: already holds prepared data ({', '.join(existing)}); "
            "pass --overwrite (overwrite=True) to replace it"
        )


def _expand(inputs: Sequence[Path | str]) -> list[Path]:
    """Input paths, with each directory replaced by its non-hidden files in sorted order."""
    if not inputs:
        raise DataError("no input files given")
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
            )
            if not found:  # never an empty dataset, which --overwrite would put over good data
                raise DataError(f"{path}: directory holds no input files (hidden ones are skipped)")
            files.extend(found)
        else:
            files.append(path)
    return files


def _plan_jobs(files: list[Path], text_column: str) -> list[_Job]:
    """Split the work: one job per text/JSONL file, Parquet row groups batched to ~32 MB."""
    jobs: list[_Job] = []
    for path in files:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from e
        if not path.is_file():
            raise DataError(f"{path}: not a regular file")
        if size == 0:
            raise DataError(f"{path}: empty file")
        if path.suffix.lower() != PARQUET_SUFFIX:
            jobs.append(_Job(len(jobs), path, size))
            continue
        metadata = _parquet_file(path, text_column).metadata
        if metadata.num_rows == 0:
            raise DataError(f"{path}: empty file (no rows)")
        first_row = 0
        groups: list[int] = []
        rows = group_bytes = 0
        for group in range(metadata.num_row_groups):
            info = metadata.row_group(group)
            groups.append(group)
            rows += info.num_rows
            group_bytes += info.total_byte_size
            if group_bytes >= PARQUET_JOB_BYTES or group == metadata.num_row_groups - 1:
                nbytes = size * rows // metadata.num_rows
                jobs.append(_Job(len(jobs), path, nbytes, tuple(groups), first_row))
                first_row += rows
                groups, rows, group_bytes = [], 0, 0
    return jobs


def _parquet_file(path: Path, column: str) -> pq.ParquetFile:
    """Open a Parquet file whose `column` holds strings; DataError otherwise."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path}: no column {column!r}; it has {', '.join(schema.names)}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, not strings")
    return parquet


def _documents(job: _Job, column: str) -> Iterator[tuple[str, str]]:
    """Yield (text, location) for each document of a job; location is for error messages."""
    try:
        if job.path.suffix.lower() == PARQUET_SUFFIX:
            yield from _parquet_documents(job, column)
        elif job.path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(job.path, column)
        else:
            yield _text_document(job.path), ""
    except OSError as e:
        raise DataError(f"{job.path}: cannot read ({e.strerror or e})") from e


def _text_document(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text ({e.reason})") from e


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise DataError(f"{path}, line {number}: expected a JSON object, got {kind}")
            if field not in record:
                keys = ", ".join(record) or "none"
                raise DataError(f"{path}, line {number}: no {field!r} field; it has {keys}")
            text = record[field]
            if not isinstance(text, str):
                kind = type(text).__name__
                raise DataError(f"{path}, line {number}: {field!r} is {kind}, not a string")
            yield text, f"line {number}"


def _parquet_documents(job: _Job, column: str) -> Iterator[tuple[str, str]]:
    row = job.first_row
    batches = _parquet_file(job.path, column).iter_batches(
        batch_size=PARQUET_BATCH_ROWS, row_groups=list(job.row_groups), columns=[column]
    )
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DataError(f"{job.path}, row {row}: {column!r} is null")
            yield text, f"row {row}"
            row += 1


def _tokenize(
    jobs: list[_Job], settings: _Settings, workers: int, total_bytes: int, progress: bool
) -> Counter[tuple[Path, str]]:
    """Tokenize all jobs, in job order, into one raw file of ids per split.

    Returns document counts by (file, split).
    """
    documents: Counter[tuple[Path, str]] = Counter()
    with ExitStack() as stack:
        raw = {s: stack.enter_context(_raw_path(settings, s).open("wb")) for s in SPLITS}
        if workers <= 1 or len(jobs) <= 1:
            results = ((job, _tokenize_job(job, settings, raw)) for job in jobs)
        else:
            results = _run_pool(stack, jobs, settings, workers, raw)
        # Only now, with the workers forked, may the progress bar start its refresh thread.
        columns = (TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        bar = stack.enter_context(Progress(*columns, TimeRemainingColumn(), disable=not progress))
        task = bar.add_task("prepare", total=total_bytes)
        for job, counts in results:
            for split in SPLITS:
                documents[job.path, split] += counts[split]
            bar.advance(task, job.nbytes)
    return documents


def _run_pool(
    stack: ExitStack, jobs: list[_Job], settings: _Settings, workers: int, raw: dict[str, BinaryIO]
) -> Iterator[tuple[_Job, dict[str, int]]]:
    """Start worker processes (owned by `stack`) on the first jobs; iterate results in order.

    Fork on Linux: workers start in milliseconds and the caller's main module (which may import
    torch) is not re-imported in each one, as spawn would. They only tokenize, so threads of the
    parent (BPE training, torch) are never needed in a worker.
    """
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=(settings,),
    )
    stack.callback(pool.shutdown, cancel_futures=True)
    todo = iter(jobs)
    pending = deque(
        (job, pool.submit(_tokenize_to_shards, job)) for job in itertools.islice(todo, 2 * workers)
    )
    return _in_order(pool, todo, pending, settings, raw)


def _in_order(
    pool: ProcessPoolExecutor,
    todo: Iterator[_Job],
    pending: deque[tuple[_Job, Future[dict[str, int]]]],
    settings: _Settings,
    raw: dict[str, BinaryIO],
) -> Iterator[tuple[_Job, dict[str, int]]]:
    """Append finished shards to `raw` in job order, keeping at most 2×workers jobs in flight."""
    while pending:
        job, future = pending.popleft()
        counts = future.result()
        follow = next(todo, None)
        if follow is not None:
            pending.append((follow, pool.submit(_tokenize_to_shards, follow)))
        for split in SPLITS:
            shard = _shard_path(settings, job, split)
            with shard.open("rb") as src:
                shutil.copyfileobj(src, raw[split], 2**22)
            shard.unlink()
        yield job, counts


# A pool worker's settings, set once per process: a BPE tokenizer is costly to unpickle per job.
_worker_settings: _Settings | None = None


def _init_worker(settings: _Settings) -> None:
    global _worker_settings
    _worker_settings = settings


def _tokenize_to_shards(job: _Job) -> dict[str, int]:
    assert _worker_settings is not None, "_init_worker did not run"
    with ExitStack() as files:
        shards = {
            s: files.enter_context(_shard_path(_worker_settings, job, s).open("wb")) for s in SPLITS
        }
        return _tokenize_job(job, _worker_settings, shards)


def _raw_path(settings: _Settings, split: str) -> Path:
    return settings.work_dir / f"{split}.bin"


def _shard_path(settings: _Settings, job: _Job, split: str) -> Path:
    return settings.work_dir / f"{job.index}.{split}.bin"


def _tokenize_job(job: _Job, settings: _Settings, out: dict[str, BinaryIO]) -> dict[str, int]:
    """Append each document's ids + EOS to its split's file; return documents per split."""
    tokenizer = settings.tokenizer
    counts = dict.fromkeys(SPLITS, 0)
    for text, where in _documents(job, settings.text_column):
        if not text:
            continue
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:
            raise DataError(f"{job.path}{', ' + where if where else ''}: {e}") from e
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        split = "val" if int.from_bytes(digest, "little") < settings.val_threshold else "train"
        tokens = np.empty(len(ids) + 1, dtype=settings.dtype)
        tokens[:-1] = ids
        tokens[-1] = tokenizer.eos_id
        out[split].write(tokens.data)
        counts[split] += 1
    return counts


def _write_split(settings: _Settings, split: str, documents: int) -> SplitInfo:
    """Turn a split's raw ids into a one-batch Arrow IPC file without loading them in memory."""
    raw, dtype = _raw_path(settings, split), settings.dtype
    count = raw.stat().st_size // np.dtype(dtype).itemsize
    values = np.memmap(raw, dtype=dtype, mode="r") if count else np.empty(0, dtype=dtype)
    tokens = pa.Array.from_buffers(pa.from_numpy_dtype(dtype), count, [None, pa.py_buffer(values)])
    batch = pa.record_batch([tokens], names=["tokens"])
    dest = settings.work_dir / ARROW_FILES[split]
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    del tokens, batch, values  # unmap the raw file, so that unlinking it frees its space now
    raw.unlink()
    with dest.open("rb") as fh:
        sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    return SplitInfo(dest.name, count, documents, dest.stat().st_size, sha256)


def _commit(tmp: Path, out_dir: Path, names: list[str]) -> None:
    """Move finished outputs into `out_dir`; the manifest goes last and marks completion."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the old data is invalid
    for stale in set(OUTPUT_NAMES) - set(names):
        (out_dir / stale).unlink(missing_ok=True)
    for name in [*names, MANIFEST_NAME]:
        os.replace(tmp / name, out_dir / name)

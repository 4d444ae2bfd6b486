"""Pipelines throughput: prepare (MB/s of input) and WindowLoader (tokens/s), embedded corpus.

    PYTHONPATH=. python benchmarks/bench_pipelines.py [--batch-size B] [--seq-len T] [--batches N]

The loader goal is ≥ 20M tokens/s on one core from a warm memory map. If HF `datasets` is
importable, the same two jobs are timed with it side by side: byte tokenization into an Arrow
dataset with `map`, and shuffled batches of packed blocks through `with_format("torch")`.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pipelines.corpus import embedded_corpus
from pipelines.loader import TokenDataset, WindowLoader
from pipelines.prepare import prepare

Row = tuple[str, str, str]


def bench_prepare(files: list[Path], work: Path) -> list[Row]:
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    rows = []
    for tokenizer, workers in (("byte", 1), ("byte", 2), ("bpe", 1), ("bpe", 2)):
        start = time.perf_counter()
        out = work / f"{tokenizer}-{workers}"
        prepare(files, out, tokenizer, vocab_size=8192, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        name = "byte" if tokenizer == "byte" else "BPE 8192 (training included)"
        rows.append(
            (
                f"prepare, {name}, {workers} worker(s)",
                f"{megabytes / seconds:.1f} MB/s",
                f"{megabytes:.1f} MB in {seconds:.2f} s",
            )
        )
    return rows


def bench_loader(data: Path, batch_size: int, seq_len: int, batches: int) -> list[Row]:
    dataset = TokenDataset.open(data)
    dataset.tokens.numpy().sum()  # warm the memory map
    rows = []
    for prefetch in (0, 2):
        with WindowLoader(dataset, batch_size, seq_len, seed=0, prefetch=prefetch) as loader:
            next(loader)  # start the prefetch thread outside the timing
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            rate = batches * batch_size * seq_len / (time.perf_counter() - start)
        rows.append(
            (
                f"WindowLoader {batch_size}×{seq_len}, prefetch={prefetch}",
                f"{rate / 1e6:.0f}M tokens/s",
                f"{batches} batches; goal ≥ 20M",
            )
        )
    return rows


def bench_hf(
    files: list[Path], data: Path, batch_size: int, seq_len: int, batches: int, work: Path
) -> list[Row]:
    """The same two jobs done with HF `datasets`, when it is installed."""
    try:
        import datasets
    except ImportError:
        return [("HF datasets", "skipped", "not installed")]
    datasets.disable_progress_bars()
    texts = [p.read_text(encoding="utf-8") for p in files]
    megabytes = sum(p.stat().st_size for p in files) / 1e6

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"ids": [[*text.encode(), 0] for text in batch["text"]]}

    start = time.perf_counter()
    datasets.Dataset.from_dict({"text": texts}).map(
        encode, batched=True, remove_columns=["text"], cache_file_name=str(work / "hf.arrow")
    )
    prepare_seconds = time.perf_counter() - start

    tokens = TokenDataset.open(data).tokens.numpy()
    blocks = len(tokens) // (seq_len + 1)
    packed = tokens[: blocks * (seq_len + 1)].reshape(blocks, seq_len + 1)
    table = datasets.Dataset.from_dict({"ids": packed.tolist()}).with_format("torch")
    order = torch.randperm(blocks).tolist()
    start = time.perf_counter()
    for b in range(batches):
        first = b * batch_size % (blocks - batch_size)
        ids = table[order[first : first + batch_size]]["ids"]
        ids[:, :-1].long(), ids[:, 1:].long()
    rate = batches * batch_size * seq_len / (time.perf_counter() - start)
    return [
        (
            "HF datasets map, byte tokenize",
            f"{megabytes / prepare_seconds:.1f} MB/s",
            f"datasets {datasets.__version__}",
        ),
        (
            f"HF datasets packed blocks {batch_size}×{seq_len}",
            f"{rate / 1e6:.1f}M tokens/s",
            f"{batches} batches",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="pipelines throughput")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = embedded_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_prepare(files, work)
        data = work / "byte-1"
        rows += bench_loader(data, args.batch_size, args.seq_len, args.batches)
        rows += bench_hf(files, data, args.batch_size, args.seq_len, args.batches, work)
    table = Table(title=f"pipelines on the embedded corpus ({len(files)} stdlib files)")
    for column in ("what", "throughput", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()

"""What `memfit train --deterministic` costs, and what it buys: runs of the same command with
the default threads and with --deterministic under several OMP_NUM_THREADS, compared bit for
bit (losses at every step) and by the median step time.

    PYTHONPATH=. python benchmarks/bench_determinism.py [--model gpt2-mini] [--steps 30]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run(out: Path, args: argparse.Namespace, threads: int | None, deterministic: bool) -> list:
    """One training run in a fresh process; its metrics records."""
    cmd = [sys.executable, "-m", "memfit", "train", args.model, "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--val-every", "0", "--checkpoint-every", "0"]
    cmd += ["--out", str(out)] + (["--deterministic"] if deterministic else [])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-mini")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    configs = [
        ("default threads, run 1", None, False),
        ("default threads, run 2", None, False),
        ("--deterministic, OMP_NUM_THREADS unset", None, True),
        ("--deterministic, OMP_NUM_THREADS=2", 2, True),
        ("--deterministic, OMP_NUM_THREADS=1", 1, True),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, threads, deterministic) in enumerate(configs):
            results[name] = run(Path(tmp) / str(i), args, threads, deterministic)
    first, det = results[configs[0][0]], results[configs[2][0]]
    table = Table(
        title=f"{args.model}, batch {args.batch}, {args.steps} steps, {os.cpu_count()} CPUs"
    )
    for column in ("run", "median step", "steps ≠ default run 1", "steps ≠ --deterministic"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, records in results.items():
        step = statistics.median(r["seconds"] for r in records[1:])
        differ = [
            sum(a["loss"] != b["loss"] for a, b in zip(records, ref, strict=True))
            for ref in (first, det)
        ]
        table.add_row(name, f"{step * 1e3:.1f} ms", *(f"{n} of {len(records)}" for n in differ))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

"""What precision, LoRA and a quantised frozen base save in bytes, and what bf16/fp16 cost in loss.

    PYTHONPATH=. python benchmarks/bench_precision.py [--batch B] [--seq T] [--steps N]
                                                      [--skip-bytes] [--skip-train]

1. GPT-2-small (124M, traced on the meta device) fine-tuned five ways: fp32, bf16, LoRA r=8 on
   q,k,v,o, and LoRA with the frozen base stored int8 or nf4. Bytes by role from the compiled
   graph: parameters, buffers (quantised weights, the causal mask), optimizer states, gradients;
   the goal is LoRA + int8 ≤ 0.3 × fp32 for params + grads + optimizer states. "Saved for
   backward" sums the forward buffers the backward reads (no liveness: an upper bound).
2. gpt2-tiny trained N steps on the embedded corpus in fp32, bf16 and fp16 from one init and
   one batch order: the mean loss of the last 10 steps, and the validation loss at the end.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice

import torch
from rich.console import Console
from rich.table import Table

from compiler.compile import CompileOptions, compile_model
from compiler.lora import LoraConfig
from compiler.models import resolve_model
from compiler.passes.precision import Precision, saved_for_backward, state_bytes
from examples.loss import lm_loss
from runtime.corpus_runs import corpus_batches, load_state, train_steps, validation_loss

LORA = LoraConfig(r=8, alpha=16, targets=("q", "k", "v", "o"))
CONFIGS: dict[str, dict] = {
    "fp32 full fine-tune": {},
    "bf16 full fine-tune": {"precision": Precision.BF16},
    "LoRA r=8 (fp32 base)": {"lora": LORA},
    "LoRA r=8 + int8 base": {"lora": LORA, "quantize_base": "int8"},
    "LoRA r=8 + nf4 base": {"lora": LORA, "quantize_base": "nf4"},
}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def bench_bytes(batch: int, seq: int) -> Table:
    table = Table(title=f"GPT-2-small fine-tuning, batch {batch} × {seq}: MiB by role")
    roles = ("param", "buffer", "grad", "optimizer state")
    for column in ("config", *roles, "p+b+g+o", "vs fp32", "saved for bwd", "s"):
        table.add_column(column, justify="left" if column == "config" else "right")
    baseline = None
    for name, extra in CONFIGS.items():
        start = time.perf_counter()
        model = resolve_model("gpt2-small", device="meta")
        options = CompileOptions(batch_size=batch, seq_len=seq, **extra)
        graph = compile_model(model, lm_loss, options).graph
        by_role = state_bytes(graph)
        total = sum(by_role.values())
        baseline = baseline or total
        table.add_row(
            name,
            *map(mib, by_role.values()),
            mib(total),
            f"{total / baseline:.3f}",
            mib(saved_for_backward(graph)),
            f"{time.perf_counter() - start:.0f}",
        )
    table.caption = (
        "p+b+g+o = params + buffers (int8/nf4 codes and scales, the 1 MiB causal mask) + grads"
        " + optimizer states; goal: LoRA + int8 ≤ 0.3 × fp32. Saved for bwd: forward buffers"
        " the backward reads (no liveness)"
    )
    return table


def bench_training(steps: int, batch: int, seq: int, lr: float) -> Table:
    title = f"gpt2-tiny, {steps} steps of {batch} × {seq}, lr {lr:g}, on the embedded corpus"
    table = Table(title=title)
    for column in ("precision", "last-10 train loss", "val loss", "vs fp32", "skipped", "s"):
        table.add_column(column, justify="left" if column == "precision" else "right")
    val = list(islice(corpus_batches("val", batch, seq), 8))
    reference = None
    for precision in Precision:
        torch.manual_seed(0)
        model = resolve_model("gpt2-tiny")
        options = CompileOptions(batch_size=batch, seq_len=seq, precision=precision)
        start = time.perf_counter()
        batches = corpus_batches("train", batch, seq)
        program, losses = train_steps(model, batches, steps, lr, options)
        seconds = time.perf_counter() - start
        load_state(model.module, program.state)
        val_loss = validation_loss(model.module, val)
        reference = reference or val_loss
        scaler = program.loss_scaler
        table.add_row(
            precision,
            f"{sum(losses[-10:]) / 10:.4f}",
            f"{val_loss:.4f}",
            f"{val_loss / reference - 1:+.2%}",
            str(scaler.skipped_steps) if scaler else "-",
            f"{seconds:.0f}",
        )
    table.caption = "same init and batches; fp32 validation forward; CPU eager backend, 1 thread"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024, help="GPT-2-small sequence length")
    parser.add_argument("--steps", type=int, default=200, help="gpt2-tiny training steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="gpt2-tiny learning rate")
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(width=150)
    if not args.skip_bytes:
        console.print(bench_bytes(args.batch, args.seq))
    if not args.skip_train:
        console.print(bench_training(args.steps, 8, 64, args.lr))


if __name__ == "__main__":
    main()

"""Plan peaks of gpt2-small and llama-small at batch 1 over sequence lengths (fp32, default
pipeline, no recompute budget): with attention held at O(T), the activation bytes (the peak
minus parameters, buffers and optimizer states) grow linearly in T.

The examples' block_size is raised to the longest length measured (so every row plans the
same parameters; gpt2's position table grows with it). Run from a checkout's root:

    PYTHONPATH=$PWD python benchmarks/attention_plan.py > benchmarks/results/attention-plan-cpu.txt
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from compiler.compile import CompileOptions, compile_model
from compiler.ir import Role
from examples import GPT2_CONFIGS, LLAMA_CONFIGS, ExampleModel
from examples.gpt2 import GPT2
from examples.llama import Llama
from examples.loss import lm_loss

ROW = "{:12} {:>6} {:>10} {:>10} {:>10} {:>9}"
MODELS = {"gpt2-small": (GPT2, GPT2_CONFIGS), "llama-small": (Llama, LLAMA_CONFIGS)}


def peak(name: str, seq: int, longest: int) -> tuple[int, int]:
    """(step peak, bytes of parameters, buffers and optimizer states) of one plan; the
    parameters' gradients and the activations are the rest."""
    cls, configs = MODELS[name]
    cfg = replace(configs[name], block_size=longest)
    with torch.device("meta"):
        model = ExampleModel(cls(cfg), cfg.vocab_size, cfg.block_size, name)
    plan = compile_model(model, lm_loss, CompileOptions(batch_size=1, seq_len=seq)).plan
    assert plan is not None
    persistent = sum(b for r, b in plan.outside.items() if Role(r).persistent)
    return plan.peak_bytes, persistent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    args = parser.parse_args()
    print(ROW.format("model", "seq", "peak MB", "states MB", "act MB", "act/prev"))
    for name in MODELS:
        prev = None
        for seq in args.seq:
            total, states = peak(name, seq, max(args.seq))
            act = total - states
            ratio = f"{act / prev:.3f}" if prev else ""
            mb = (f"{x / 1e6:.1f}" for x in (total, states, act))
            print(ROW.format(name, seq, *mb, ratio))
            prev = act


if __name__ == "__main__":
    main()

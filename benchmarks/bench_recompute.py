"""Recomputation side by side: memfit's recompute pass vs PyTorch's own partitioner.

For each activation budget (a fraction of what the backward reads with no recomputation),
both compilers split the same model's joint graph; we report the bytes of saved activations
and the matmul FLOPs recomputed in the backward (FLOPs counted the same way for both, with
`compiler.ops.flops` on ATen nodes). PyTorch's side is AOTAutograd with
`min_cut_rematerialization_partition` under `torch._functorch.config.activation_memory_budget`.

Saved bytes are counted the same way on both sides: the distinct storages the saved values
keep alive, excluding the graph's inputs (parameters, buffers, the batch) and views of them —
the parameters are held anyway, saving them costs nothing. PyTorch's partitioner lists the
parameters (and transposed views of them) among its saved values; those are left out here.

    PYTHONPATH=. python benchmarks/bench_recompute.py --model gpt2-small --batch 2 --seq 256
"""

from __future__ import annotations

import argparse
import math

import torch
import torch._functorch.config as functorch_config
from functorch.compile import aot_function, make_boxed_func
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from compiler.ir import Node
from compiler.ops import OP_KINDS, Kind, flops, ir_name
from compiler.passes.manager import PassContext
from compiler.passes.noop_views import eliminate_noop_views
from compiler.passes.recompute import (
    Boundary,
    RecomputePolicy,
    layer_checkpoint_saved,
    recompute_pass,
    rewrite,
)
from compiler.trace import trace
from examples import build_example
from examples.loss import lm_loss


def _fx_matmul_flops(gm: torch.fx.GraphModule) -> int:
    """Matmul FLOPs of an fx graph, by the same formula memfit uses for its own nodes."""
    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or not hasattr(n.target, "name"):
            continue
        op = ir_name(n.target)
        if OP_KINDS.get(op) is not Kind.MATMUL:
            continue
        args = tuple(_Shaped(a.meta["val"].shape) if hasattr(a, "meta") else a for a in n.args)
        total += flops(Node(op, args, {}, []))
    return total


class _Shaped:
    def __init__(self, shape: torch.Size) -> None:
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)


def torch_partition(
    model: torch.nn.Module, x: torch.Tensor, budget: float | None
) -> tuple[int, int]:
    """(saved activation bytes, backward matmul FLOPs) of AOTAutograd's split at `budget`."""
    seen: dict[str, torch.fx.GraphModule] = {}

    def keep(name: str):  # noqa: ANN202
        def compiler(gm: torch.fx.GraphModule, _inputs: object) -> object:
            seen[name] = gm
            return make_boxed_func(gm)

        return compiler

    params = dict(model.named_parameters()) | dict(model.named_buffers())

    def step(p: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (tokens,))
        return lm_loss(logits, tokens.roll(1, 1))

    partition = default_partition if budget is None else min_cut_rematerialization_partition
    with functorch_config.patch(activation_memory_budget=budget or 1.0):
        compiled = aot_function(step, keep("fw"), keep("bw"), partition_fn=partition)
        compiled(params, x).backward()
    fw_out = next(n for n in seen["fw"].graph.nodes if n.op == "output").args[0]
    saved = [
        a for a in fw_out[1:] if hasattr(a, "meta") and isinstance(a.meta.get("val"), torch.Tensor)
    ]
    bases = {id(b): b for b in map(_storage_of, saved) if b.op != "placeholder"}
    saved_bytes = sum(b.meta["val"].numel() * b.meta["val"].element_size() for b in bases.values())
    return saved_bytes, _fx_matmul_flops(seen["bw"])


def _storage_of(node: torch.fx.Node) -> torch.fx.Node:
    """The fx node owning the storage `node` views (itself unless it is a view op's result)."""
    while (
        node.op == "call_function"
        and hasattr(node.target, "name")
        and OP_KINDS.get(ir_name(node.target)) is Kind.VIEW
    ):
        node = node.args[0]
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--budgets", default="1.0,0.5,0.25,0.1")
    args = parser.parse_args()
    torch.manual_seed(0)
    example = build_example(args.model)
    x = torch.randint(0, example.vocab_size, (args.batch, args.seq))
    graph = eliminate_noop_views(
        trace(example.module, lm_loss, (x, x), return_grads=True), PassContext()
    )
    boundary = Boundary.of(graph)
    full = boundary.saved_bytes(boundary.needed)
    step_flops = sum(flops(n) for n in graph.nodes)

    def matmul_flops(nodes: list[Node]) -> int:
        return sum(flops(n) for n in nodes if OP_KINDS[n.op] is Kind.MATMUL)

    torch_none = torch_partition(example.module, x, None)
    print(
        f"{args.model}, batch {args.batch} × seq {args.seq}; no-recompute saved activations:"
        f" memfit {full / 2**20:.1f} MiB, PyTorch {torch_none[0] / 2**20:.1f} MiB;"
        f" step {step_flops / 1e9:.2f} GFLOP"
    )
    print(
        "saved MiB, both sides: distinct storages of the values the forward saves for the"
        " backward, excluding parameters, buffers, the batch and views of them (held anyway);"
        " recompute GFLOP: matmul FLOPs the backward recomputes, by compiler.ops.flops"
    )
    print(
        f"{'budget':>8} | {'memfit saved MiB':>16} {'recompute GFLOP':>16} {'% step':>7} |"
        f" {'torch saved MiB':>15} {'recompute GFLOP':>16} {'% step':>7}"
    )
    for fraction in (float(f) for f in args.budgets.split(",")):
        ctx = PassContext()
        recompute_pass(graph, ctx, RecomputePolicy(activation_budget=int(fraction * full)))
        assert ctx.recompute is not None
        ours_saved = ctx.recompute.saved_bytes_after
        ours_extra = ctx.recompute.extra_matmul_flops
        theirs_saved, theirs_bw = torch_partition(example.module, x, fraction)
        theirs_extra = theirs_bw - torch_none[1]
        print(
            f"{fraction:>8} | {ours_saved / 2**20:>16.1f} {ours_extra / 1e9:>16.3f}"
            f" {100 * ours_extra / step_flops:>6.2f}% | {theirs_saved / 2**20:>15.1f}"
            f" {theirs_extra / 1e9:>16.3f} {100 * theirs_extra / step_flops:>6.2f}%"
        )
    saved = layer_checkpoint_saved(
        boundary, next(v for v in graph.inputs if v.name == "tokens"), len(example.module.blocks)
    )
    _, clones = rewrite(graph, saved)
    print(
        f"per-layer full checkpointing: saved {boundary.saved_bytes(saved) / 2**20:.1f} MiB,"
        f" recompute {matmul_flops(clones) / 1e9:.3f} GFLOP matmul"
        f" ({100 * matmul_flops(clones) / step_flops:.2f}% of the step)"
    )


if __name__ == "__main__":
    main()

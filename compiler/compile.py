"""From a model to a compiled step: trace, then the pass pipeline, each pass verified."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from compiler.ir import Graph, Node, Role, Value, dump, parse
from compiler.lora import LoraConfig, apply_lora
from compiler.mesh import DEFAULT_BUCKET_BYTES, Mesh, MeshError
from compiler.optimizers import Optimizer
from compiler.passes.accumulate import accumulate_into
from compiler.passes.attention import attention_pass
from compiler.passes.buffers import plan_buffers
from compiler.passes.fused_update import fuse_updates
from compiler.passes.fusion import FusionOptions, fuse
from compiler.passes.linear_cross_entropy import linear_cross_entropy
from compiler.passes.manager import Pass, PassContext, PassManager
from compiler.passes.noop_views import eliminate_noop_views
from compiler.passes.offload import offload_optimizer
from compiler.passes.precision import FOUND_INF, LOSS_SCALE, Precision, precision_pass
from compiler.passes.recompute import RecomputePolicy, recompute_pass
from compiler.passes.schedule import schedule
from compiler.passes.shard import ShardLayout, ShardOptions, shard_pass, tensor_parallel
from compiler.plan import MemoryPlan
from compiler.quantize import QuantMode, quantize_frozen_linears
from compiler.trace import LR, STEP, Accumulate, AdamW, LossFn, trace
from examples import ExampleModel


@dataclass
class CompileOptions:
    """Everything a compilation is asked for; `pass_manager` builds each pass's options."""

    batch_size: int = 8
    seq_len: int | None = None  # default: the model's block size
    optimizer: AdamW | Optimizer | None = field(default_factory=AdamW)  # a name: AdamW.named
    return_grads: bool = False
    grad_accum: int = 1  # micro-batches per optimizer step, summed inside the step (trace.py)
    precision: Precision = Precision.FP32  # compute dtype; master weights stay fp32
    lora: LoraConfig | None = None  # rewrites the module in place before tracing
    quantize_base: QuantMode | None = None  # int8 | nf4: frozen Linear weights quantised
    mesh: Mesh | None = None  # data/tensor parallel: compile rank `rank`'s step (per-rank batch)
    rank: int = 0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # gradient bucket size of the data-parallel reduction
    recompute: RecomputePolicy | None = RecomputePolicy()  # None: keep every activation
    backend: str = "eager"  # eager | triton: triton groups fusible nodes into generated kernels
    fused_cross_entropy: bool = True  # the LM head as chunked linear+cross-entropy ops
    # a tied weight's gradient halves summed in place (passes/accumulate.py): one weight-sized
    # buffer less, at the price of another fp32 summation order than eager PyTorch's
    accumulate_grads: bool = False
    # AdamW's states in host memory, each update run by the CPU during the backward
    # (passes/offload.py)
    offload_optimizer: bool = False
    dump_after: set[str] = field(default_factory=set)
    dump_dir: Path | None = None

    def __post_init__(self) -> None:
        self.precision = Precision(self.precision)  # a name from a flag or a config file
        if isinstance(self.optimizer, str):
            self.optimizer = AdamW.named(Optimizer(self.optimizer))


@dataclass(frozen=True)
class StepIO:
    """What the runtime holds, feeds and reads for a step graph, named once here.

    `state` is every persistent input by role (allocated once, carried across steps and in
    checkpoints); `lr`/`step` are the optimizer's scalars and `loss_scale` fp16's, each None
    when the graph does not take it; the loss is output 0 and `found_inf` is fp16's overflow
    flag's output index. Gradients a graph returns are `grads`.
    """

    state: dict[str, Role]
    batch: tuple[str, ...]
    lr: str | None
    step: str | None
    loss_scale: str | None
    found_inf: int | None
    grads: tuple[str, ...]

    @classmethod
    def of(cls, graph: Graph) -> StepIO:
        names = {v.name for v in graph.inputs}
        outputs = [v.name for v in graph.outputs]
        return cls(
            state={v.name: v.role for v in graph.inputs if v.role.persistent},
            batch=tuple(v.name for v in graph.inputs if v.role is Role.INPUT and v.shape),
            lr=LR if LR in names else None,
            step=STEP if STEP in names else None,
            loss_scale=LOSS_SCALE if LOSS_SCALE in names else None,
            found_inf=outputs.index(FOUND_INF) if FOUND_INF in outputs else None,
            grads=tuple(v.name for v in graph.outputs if v.role is Role.GRAD),
        )

    def of_role(self, role: Role) -> list[str]:
        return [name for name, r in self.state.items() if r is role]


@dataclass
class CompiledStep:
    graph: Graph
    context: PassContext
    batch_size: int
    seq_len: int
    plan: MemoryPlan | None = None  # where every byte of the step lives (passes/buffers.py)
    layout: ShardLayout | None = None  # a mesh's gradient buckets and state shards
    # with grad_accum > 1: the micro-step run grad_accum - 1 times before this (the last) one
    micro: CompiledStep | None = None

    @property
    def io(self) -> StepIO:
        return StepIO.of(self.graph)

    @property
    def peak_bytes(self) -> int:
        """The planned peak of a whole optimizer step: the larger arena of the two graphs
        (they share one), the state this graph holds, the larger kernel scratch."""
        assert self.plan is not None
        if self.micro is None or self.micro.plan is None:
            return self.plan.peak_bytes
        arena = max(self.plan.arena_bytes, self.micro.plan.arena_bytes)
        workspace = max(self.plan.workspace, self.micro.plan.workspace)
        return arena + sum(self.plan.outside.values()) + workspace


def pass_manager(
    options: CompileOptions | None = None, shard: ShardOptions | None = None
) -> PassManager:
    """The pipeline, in order, each pass bound to its own options. Each entry is one file in
    compiler/passes/; a pass switched off by `options` is left out."""
    options = options or CompileOptions()
    if shard is not None:  # ZeRO holds parameters in the compute precision
        shard = replace(shard, precision=options.precision)
    passes: list[tuple[str, Pass]] = [
        ("noop_views", eliminate_noop_views),
        ("attention", attention_pass),
        ("shard", partial(shard_pass, options=shard)),
    ]
    if options.fused_cross_entropy:
        passes.append(("linear_cross_entropy", linear_cross_entropy))
    passes.append(("precision", partial(precision_pass, precision=options.precision)))
    # the host runs an offloaded update as memfit::update's chunks, whatever the backend
    fused_on = "eager" if options.offload_optimizer else options.backend
    passes.append(("fused_update", partial(fuse_updates, backend=fused_on)))
    if options.accumulate_grads:
        passes.append(("accumulate", accumulate_into))
    if options.offload_optimizer:
        passes.append(("offload", offload_optimizer))
    if options.recompute is not None:
        passes.append(("recompute", partial(recompute_pass, policy=options.recompute)))
    passes += [
        ("schedule", schedule),
        ("fusion", partial(fuse, options=FusionOptions(options.backend))),
        ("buffers", plan_buffers),
    ]
    return PassManager(passes)


def example_batch(model: ExampleModel, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Token ids shaped like a training batch, on the model's device (meta when planning)."""
    device = next(model.module.parameters()).device
    shape = (batch_size, seq_len)
    tokens = torch.zeros(shape, dtype=torch.int64, device=device)
    return tokens, torch.zeros(shape, dtype=torch.int64, device=device)


@dataclass(frozen=True)
class TracedStep:
    graph: Graph
    seq_len: int
    shard: ShardOptions | None  # a mesh's data-parallel rewrite of the traced step
    micro: Graph | None = None  # the accumulating micro-step, with grad_accum > 1
    # the graph after the passes before recompute, per (source graph, precision, backend, fused
    # head): they do not depend on the recompute policy, so a budget search or sweep runs them
    # once (the micro-step's TracedStep shares this dict; its source graph keys its own entries)
    prepared: dict[tuple, tuple[Graph, PassContext]] = field(
        default_factory=dict, compare=False, repr=False
    )


POLICY_PASSES = ("recompute", "schedule")  # the first pass whose result depends on the policy


def trace_model(model: ExampleModel, loss_fn: LossFn, options: CompileOptions) -> TracedStep:
    """Apply the model rewrites (LoRA, quantised base, tensor parallel) and trace the step."""
    seq_len = options.seq_len or model.block_size
    if options.batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {options.batch_size}")
    if not 1 <= seq_len <= model.block_size:
        raise ValueError(f"sequence length must be in 1..{model.block_size}, got {seq_len}")
    if options.lora is not None:  # in place, so Program.from_module finds the adapters
        apply_lora(model.module, options.lora)
    if options.quantize_base is not None:
        quantize_frozen_linears(model.module, options.quantize_base)
    optimizer, shard = options.optimizer, None
    if options.offload_optimizer:
        _check_offload(options)
    if options.mesh is not None:  # the shard pass rebuilds the update on each rank's shapes
        if options.optimizer is None or options.return_grads:
            raise MeshError(
                "a --dp/--tp mesh compiles whole training steps (an optimizer, no grads)"
            )
        if options.optimizer.block:
            raise MeshError(
                "--optimizer adamw8bit with --dp/--tp/--zero is not supported: the shard pass"
                " keeps AdamW moments as fp32 shards shaped like the parameters; use adamw"
            )
        loss_fn = tensor_parallel(model.module, loss_fn, options.mesh, options.rank)
        trainable = tuple(n for n, p in model.module.named_parameters() if p.requires_grad)
        shard = ShardOptions(options.mesh, trainable, optimizer, options.bucket_bytes)
        optimizer = None
    if options.grad_accum < 1:
        raise ValueError(f"grad_accum must be ≥ 1, got {options.grad_accum}")
    accumulate = options.grad_accum > 1
    if accumulate and options.mesh is not None:
        raise MeshError("gradient accumulation on a --dp/--tp mesh is not supported yet")
    if accumulate and (options.return_grads or not optimizer):
        raise ValueError("gradient accumulation compiles whole steps (an optimizer, no grads)")
    batch = example_batch(model, options.batch_size, seq_len)

    def step(apply: bool) -> Graph:
        how = Accumulate(options.grad_accum, apply) if accumulate else None
        return trace(
            model.module,
            loss_fn,
            batch,
            optimizer,
            return_grads=options.return_grads,
            accumulate=how,
        )

    return TracedStep(step(True), seq_len, shard, step(False) if accumulate else None)


def _check_offload(options: CompileOptions) -> None:
    """--offload-optimizer moves fp32 AdamW states of a whole single-process step."""
    if options.optimizer is None or options.return_grads:
        raise ValueError("--offload-optimizer offloads AdamW's states: compile with an optimizer")
    if options.optimizer.block:
        raise ValueError(
            "--offload-optimizer with --optimizer adamw8bit is not supported: offload moves"
            " fp32 moments to the host (where their bytes are cheap); use one or the other"
        )
    if options.mesh is not None:
        raise MeshError(
            "--offload-optimizer with --dp/--tp/--zero is not supported: the shard pass"
            " updates each rank's shard on the device; use ZeRO to spread the states instead"
        )


def optimize(traced: TracedStep, options: CompileOptions) -> CompiledStep:
    """Run the pass pipeline on a fresh copy of a traced step (so one trace serves many plans).

    The passes before the policy's (recompute, or schedule without it) run once per traced
    step and option set; each plan continues from a copy of their graph."""
    micro = None
    if traced.micro is not None:
        micro = optimize(replace(traced, graph=traced.micro, micro=None), options)
    step = _optimize(traced, options)
    step.micro = micro
    return step


def _optimize(traced: TracedStep, options: CompileOptions) -> CompiledStep:
    ctx = PassContext(dump_after=set(options.dump_after), dump_dir=options.dump_dir)
    passes = pass_manager(options, traced.shard).passes
    split = next(i for i, (name, _) in enumerate(passes) if name in POLICY_PASSES)
    if options.dump_after:  # the dumps of every pass are asked for: no shortcut
        graph = PassManager(passes).run(parse(dump(traced.graph)), ctx)
    else:
        key = (
            id(traced.graph),
            options.precision,
            options.backend,
            options.fused_cross_entropy,
            options.accumulate_grads,
            options.offload_optimizer,
        )
        if key not in traced.prepared:
            before = PassContext()
            prefix = PassManager(passes[:split]).run(parse(dump(traced.graph)), before)
            traced.prepared[key] = (prefix, before)
        prefix, before = traced.prepared[key]
        ctx.timings.update(before.timings)
        ctx.shard = before.shard
        graph = PassManager(passes[split:]).run(clone(prefix), ctx)
    if ctx.plan is not None and ctx.recompute is not None:
        ctx.plan.recompute = {
            "extra_flops": ctx.recompute.extra_flops,
            "step_flops": ctx.recompute.step_flops,
            "values": list(ctx.recompute.recomputed),
        }
    return CompiledStep(graph, ctx, options.batch_size, traced.seq_len, ctx.plan, ctx.shard)


def clone(graph: Graph) -> Graph:
    """A copy with its own values (passes set roles on values; the original keeps its own)."""
    fresh = {id(v): Value(v.name, v.shape, v.dtype, v.role) for v in graph.values()}
    nodes = []
    for n in graph.nodes:
        node = Node(n.op, n.args, dict(n.kwargs), [fresh[id(v)] for v in n.outputs], n.phase)
        node.source, node.group = n.source, n.group
        node.map_args(lambda v: fresh[id(v)])
        nodes.append(node)
    return Graph([fresh[id(v)] for v in graph.inputs], nodes, [fresh[id(v)] for v in graph.outputs])


def compile_model(
    model: ExampleModel, loss_fn: LossFn, options: CompileOptions | None = None
) -> CompiledStep:
    """Trace the model's step and run the pass pipeline on it."""
    options = options or CompileOptions()
    return optimize(trace_model(model, loss_fn, options), options)

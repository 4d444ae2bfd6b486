"""shard: data parallelism and ZeRO as collectives in the training step's own graph.

Input: a step traced WITHOUT an optimizer (outputs: the loss, then one gradient per trainable
parameter, in `ShardOptions.trainable` order). Output: the same forward and backward on this
rank's slice of the batch, gradient buckets reduced across the data-parallel group, and the
AdamW update rebuilt on the shapes each rank really holds — so the verifier checks the shards
and the planner counts exactly the bytes one rank needs.

- Buckets: trainable parameters in the order the backward completes their gradients, filled up
  to `bucket_bytes`. Each bucket's collective starts right after its last gradient is made
  (`memfit::all_reduce` / `reduce_scatter` run asynchronously); its wait reads the next
  bucket's start too, so no schedule can wait before then: the reduction of one bucket
  overlaps the backward of the next (the last bucket's, the update of the others).
- zero=0: all-reduce each bucket, divide by dp, update every parameter (the states keep their
  per-parameter names, `exp_avg.NAME`, as in a one-process step).
- zero=1: the same all-reduce, but each rank updates only its shard of the bucket (the padded
  flat concatenation, split in dp equal parts): AdamW moments are `exp_avg.bucketK` of 1/dp of
  the bucket; the new shard is all-gathered and written back into every parameter.
- zero=2: a reduce-scatter instead, so only the gradient shard outlives the bucket.
- ZeRO with bf16/fp16 (`ShardOptions.precision`): parameters are held in the low dtype and the
  fp32 master copy becomes a sharded state `master.bucketK` (mixed-precision ZeRO); the forward
  reads the parameters through a widening cast the precision pass then folds away.

The AdamW arithmetic is `trace.trace_update` traced once on a stand-in tensor and stamped out
for each parameter or shard, its scalar part (bias corrections, decay factor) shared.
Tensor parallelism changes the model's math (which columns a rank owns, the vocabulary-parallel
loss), so it is a module rewrite before tracing: `tensor_parallel` below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler import collectives
from compiler.builder import GraphBuilder
from compiler.errors import VerifyError
from compiler.ir import Graph, Phase, Role, Value
from compiler.mesh import DEFAULT_BUCKET_BYTES, Mesh, MeshError
from compiler.models.adapter import TPLayout, tp_layout, tp_sizes
from compiler.passes.manager import PassContext
from compiler.passes.precision import Precision
from compiler.trace import STATE_PREFIXES, AdamW, LossFn, mark_activations, trace_update
from examples.loss import lm_loss

MASTER = "master."
DP = "dp"


@dataclass(frozen=True)
class Bucket:
    """Parameters whose gradients are reduced together; flattened and padded to dp shards."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    world: int

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def shard(self) -> int:
        """Elements each rank holds of the padded bucket."""
        return collectives.shard_size(self.numel, self.world)

    def offsets(self) -> list[int]:
        return list(accumulate(self.numels, initial=0))[:-1]

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The padded flat bucket [world · shard] from per-parameter tensors."""
        flat = torch.cat([tensors[n].reshape(-1) for n in self.names])
        return torch.nn.functional.pad(flat, (0, self.world * self.shard - self.numel))

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-parameter tensors from the flat bucket (padded or not)."""
        return {
            n: flat[o : o + k].view(s)
            for n, s, o, k in zip(self.names, self.shapes, self.offsets(), self.numels, strict=True)
        }


@dataclass(frozen=True)
class ShardLayout:
    """What the runtime needs to map a sharded rank's state to and from a full checkpoint."""

    mesh: Mesh
    buckets: tuple[Bucket, ...]
    master: bool  # the fp32 parameters live as sharded `master.bucketK` states

    @property
    def sharded_states(self) -> bool:
        return self.mesh.zero >= 1  # a Mesh has dp ≥ 2 whenever zero ≥ 1

    @staticmethod
    def state_name(prefix: str, k: int) -> str:
        return f"{prefix}bucket{k}"


def buckets(
    order: Sequence[str], shapes: Mapping[str, tuple[int, ...]], itemsize: int, cap: int, world: int
) -> list[Bucket]:
    """Consecutive parameters of `order`, each bucket closed once it holds `cap` bytes."""
    out: list[Bucket] = []
    names: list[str] = []
    size = 0
    for name in order:
        names.append(name)
        size += math.prod(shapes[name]) * itemsize
        if size >= cap:
            out.append(Bucket(tuple(names), tuple(shapes[n] for n in names), world))
            names, size = [], 0
    if names:
        out.append(Bucket(tuple(names), tuple(shapes[n] for n in names), world))
    return out


@dataclass(frozen=True)
class ShardOptions:
    """How to shard a step traced without an optimizer: the mesh, the trainable parameters in
    the traced gradients' order, the AdamW to rebuild per shard, the bucket size, and the
    compute precision (ZeRO holds low-precision parameters with fp32 master shards)."""

    mesh: Mesh
    trainable: tuple[str, ...]
    optimizer: AdamW = AdamW()
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    precision: Precision = Precision.FP32


def shard_pass(graph: Graph, ctx: PassContext, options: ShardOptions | None = None) -> Graph:
    """The pass entry: a no-op without options (no mesh); records the layout as `ctx.shard`."""
    if options is None:
        return graph
    rewrite = _Rewrite(graph, options)
    out = rewrite.run()
    ctx.shard = rewrite.layout
    return out


class _Rewrite:
    """One walk over the traced step, emitting the sharded step."""

    def __init__(self, graph: Graph, options: ShardOptions) -> None:
        mesh, trainable = options.mesh, options.trainable
        low = options.precision.low_dtype if mesh.zero >= 1 else None  # ZeRO: low-precision params
        loss, *grads = graph.outputs
        if len(grads) != len(trainable):
            raise VerifyError(
                "shard expects a step traced without an optimizer (outputs: the loss, then one"
                f" gradient per trainable parameter); got {len(grads)} gradients for"
                f" {len(trainable)} trainable parameters"
            )
        self.src, self.mesh, self.optimizer, self.low = graph, mesh, options.optimizer, low
        self.loss = loss
        self.grad_of = dict(zip(trainable, grads, strict=True))
        self.params = {v.name: v for v in graph.inputs if v.role is Role.PARAM}
        ready = {id(v): i for i, n in enumerate(graph.nodes) for v in n.outputs}
        order = sorted(trainable, key=lambda n: ready.get(id(self.grad_of[n]), -1))
        shapes = {n: self.params[n].shape for n in trainable}
        itemsize = max(g.dtype.itemsize for g in grads)
        self.buckets = buckets(order, shapes, itemsize, options.bucket_bytes, mesh.dp)
        self.ready = [
            max(ready.get(id(self.grad_of[n]), -1) for n in b.names) for b in self.buckets
        ]
        self.layout = ShardLayout(mesh, tuple(self.buckets), master=low is not None)
        self.b = GraphBuilder.rewriting(graph)
        self.b.source = "shard"
        self.scalars: dict[int, Value] = {}  # the update's shared scalar values, by template id

    def piece(self, flat: Value, offset: int, shape: tuple[int, ...], name: str) -> Value:
        """`flat[offset : offset + numel]` viewed as `shape` (no bytes of its own)."""
        numel = math.prod(shape)
        if offset or numel != flat.shape[0]:
            flat = self.b.emit1(
                "slice.Tensor", (flat, 0, offset, offset + numel), name=name, role=flat.role
            )
        return self.b.emit1("view", (flat, list(shape)), name=name, role=flat.role)

    def state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Value:
        """A new optimizer-state input (a moment, a master shard) under exactly `name`."""
        return self.b.input(name, shape, dtype, Role.OPTIMIZER_STATE)

    # --- the rewrite ------------------------------------------------------------------------

    def run(self) -> Graph:
        params = self.params
        if self.low is not None:  # mixed-precision ZeRO: low-precision parameters
            params = {n: Value(n, v.shape, self.low, Role.PARAM) for n, v in params.items()}
        b = self.b
        b.inputs = [params.get(v.name, v) for v in self.src.inputs]
        env: dict[int, Value] = {}
        if self.low is not None:
            for name, v in self.params.items():
                env[id(v)] = b.emit1(
                    "_to_copy", (params[name],), {"dtype": v.dtype}, name=f"{name}.f32"
                )
        started: dict[int, Value] = {}
        for i, node in enumerate(self.src.nodes):
            b.copy(node, lambda v: env.get(id(v), v))
            for k in range(len(self.buckets)):
                if self.ready[k] == i and self.mesh.dp > 1:
                    started[k] = self.start(k)
        for k in range(len(self.buckets)):
            if k not in started and self.mesh.dp > 1:  # gradients made by no node
                started[k] = self.start(k)
        b.phase = Phase.OPTIMIZER
        lr = b.input("lr", (), torch.float64, Role.INPUT)
        step = b.input("step", (), torch.float64, Role.INPUT)
        for k, bucket in enumerate(self.buckets):
            grad = self.finish(k, started[k], started.get(k + 1)) if self.mesh.dp > 1 else None
            self.update(k, bucket, grad, params, lr, step)
        graph = b.graph([self.loss])
        mark_activations(graph)
        return graph

    def start(self, k: int) -> Value:
        """Launch bucket k's reduction (backward phase, right after its last gradient)."""
        bucket, dp = self.buckets[k], self.mesh.dp
        self.b.phase = Phase.BACKWARD
        grads = [self.grad_of[n] for n in bucket.names]
        op = collectives.REDUCE_SCATTER if self.mesh.zero == 2 else collectives.ALL_REDUCE
        return self.b.emit1(op, (grads, DP, dp), name=f"grad.bucket{k}", role=Role.GRAD)

    def finish(self, k: int, started: Value, next_start: Value | None) -> Value:
        """Bucket k's averaged gradient: flat (zero 0), or this rank's shard (zero 1, 2).
        Its wait comes after the next bucket's start: the backward between them overlaps."""
        dp, grad = self.mesh.dp, Role.GRAD
        after = [] if next_start is None else [next_start]
        reduced = self.b.emit1(
            collectives.WAIT, (started, after), name=f"grad.bucket{k}.done", role=grad
        )
        if self.mesh.zero == 1:
            reduced = self.b.emit1(
                collectives.SHARD, ([reduced], DP, dp), name=f"grad.shard{k}", role=grad
            )
        return self.b.emit1("mul.Scalar", (reduced, 1.0 / dp), name=f"grad.mean{k}", role=grad)

    def update(
        self,
        k: int,
        bucket: Bucket,
        grad: Value | None,
        params: dict[str, Value],
        lr: Value,
        step: Value,
    ) -> None:
        """AdamW for bucket k given its reduced gradient (None: dp 1, the traced gradients)."""
        if not self.layout.sharded_states:
            for name, shape, offset in zip(
                bucket.names, bucket.shapes, bucket.offsets(), strict=True
            ):
                g = (
                    self.grad_of[name]
                    if grad is None
                    else self.piece(grad, offset, shape, f"grad.{name}")
                )
                p = params[name]
                m, v = (self.state(pre + name, p.shape, p.dtype) for pre in STATE_PREFIXES)
                new_p = self.adamw(name, p, g, m, v, lr, step)
                self.b.write(p, new_p)
            return
        dp, tag = self.mesh.dp, f"bucket{k}"
        members = [params[n] for n in bucket.names]
        f32 = self.params[bucket.names[0]].dtype
        if self.low is not None:
            p = self.state(ShardLayout.state_name(MASTER, k), (bucket.shard,), f32)
        else:
            p = self.b.emit1(collectives.SHARD, (members, DP, dp), name=f"param.{tag}")
        m, v = (self.state(ShardLayout.state_name(pre, k), p.shape, f32) for pre in STATE_PREFIXES)
        assert grad is not None
        new_p = self.adamw(tag, p, grad, m, v, lr, step)
        if self.low is not None:
            self.b.write(p, new_p)
            new_p = self.b.emit1("_to_copy", (new_p,), {"dtype": self.low}, name=f"{tag}.low")
        started = self.b.emit1(collectives.ALL_GATHER, (new_p, DP, dp), name=f"{tag}.gather")
        full = self.b.emit1(collectives.WAIT, (started, []), name=f"{tag}.gathered")
        for dst, offset in zip(members, bucket.offsets(), strict=True):
            self.b.write(dst, self.piece(full, offset, dst.shape, f"{dst.name}.new"))

    def adamw(
        self, tag: str, p: Value, g: Value, m: Value, v: Value, lr: Value, step: Value
    ) -> Value:
        """Stamp out the AdamW template for one tensor; writes m and v, returns the new p."""
        template = _adamw_template(self.optimizer, p.dtype)
        tensor_inputs = template.inputs[:4]
        env: dict[int, Value] = dict(
            zip(map(id, template.inputs), [p, g, m, v, lr, step], strict=True)
        )
        depends = {id(x) for x in tensor_inputs}
        for node in template.nodes:
            if node.op == "copy_":
                continue
            on_tensor = any(id(x) in depends for x in node.inputs)
            (out,) = node.outputs
            if not on_tensor and id(out) in self.scalars:
                env[id(out)] = self.scalars[id(out)]
                continue
            name = f"{out.name}.{tag}" if on_tensor else out.name
            with self.b.at(Phase.OPTIMIZER, "adamw"):
                (env[id(out)],) = self.b.emit(
                    node.op, node.args, node.kwargs, names=name, read=lambda x: env[id(x)]
                )
            if on_tensor:
                depends.add(id(out))
            else:
                self.scalars[id(out)] = env[id(out)]
        writes = {id(n.args[0]): env[id(n.args[1])] for n in template.nodes if n.op == "copy_"}
        self.b.write(m, writes[id(template.inputs[2])])
        self.b.write(v, writes[id(template.inputs[3])])
        return writes[id(template.inputs[0])]


_TEMPLATE_SHAPE = (7,)  # a stand-in tensor's shape, told apart from the update's scalars ()


@cache
def _adamw_template(optimizer: AdamW, dtype: torch.dtype) -> Graph:
    """AdamW on one stand-in tensor: inputs p, grad, exp_avg, exp_avg_sq, lr, step."""
    return trace_update({"t": torch.empty(_TEMPLATE_SHAPE, dtype=dtype, device="meta")}, optimizer)


# --- tensor parallelism: a module rewrite before tracing ---------------------------------------

TP = "tp"


@dataclass(frozen=True)
class TPSpec:
    """How a parameter is split over the tp group: along `dim`, each of `parts` equal blocks
    (q, k, v of a fused projection) cut in tp pieces, a rank keeping piece tp_rank of each."""

    dim: int
    parts: int = 1

    def take(self, full: Tensor, tp: int, rank: int) -> Tensor:
        blocks = full.chunk(self.parts, self.dim)
        return torch.cat([b.chunk(tp, self.dim)[rank] for b in blocks], self.dim)

    def join(self, pieces: Sequence[Tensor]) -> Tensor:
        """The full tensor from every rank's piece, in rank order (inverse of `take`)."""
        per_rank = [p.chunk(self.parts, self.dim) for p in pieces]
        return torch.cat(
            [torch.cat(col, self.dim) for col in zip(*per_rank, strict=True)], self.dim
        )


def tp_plan(module: nn.Module) -> tuple[dict[str, TPSpec], dict[str, int]]:
    """The split of every tensor-parallel parameter (the rest is replicated) and the sizes tp
    must divide, from the module's layout (compiler/models/adapter.py)."""
    layout = _layout(module)
    specs = {f"{layout.embedding}.weight": TPSpec(0)}  # vocabulary-parallel
    head, embedding = module.get_submodule(layout.head), module.get_submodule(layout.embedding)
    if head.weight is not embedding.weight:
        specs[f"{layout.head}.weight"] = TPSpec(0)  # an untied head splits its vocabulary too
    for i in range(len(module.get_submodule(layout.blocks))):
        p = f"{layout.blocks}.{i}."
        for name, parts in layout.column.items():
            specs |= {p + name + ".weight": TPSpec(0, parts), p + name + ".bias": TPSpec(0, parts)}
        specs |= {p + name + ".weight": TPSpec(1) for name in layout.row}
    return specs, tp_sizes(module, layout)


def _layout(module: nn.Module) -> TPLayout:
    layout = tp_layout(module)
    if layout is None:
        raise MeshError(
            f"--tp: no tensor-parallel layout fits {type(module).__name__} (layouts for"
            " memfit's GPT-2 and Llama examples and Hugging Face Llama, Qwen2, Mistral and Gemma"
            " are in compiler/models/adapter.py); use --dp and --zero for other models"
        )
    return layout


class _ColumnParallel(nn.Module):
    """y = x Wᵀ + b with this rank's rows of W and b (the input is already copied in)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _RowParallel(nn.Module):
    """y = Σ_ranks x_r W_rᵀ, then + b once: the one all-reduce of a parallel region."""

    def __init__(self, weight: Tensor, bias: Tensor | None, tp: int) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        y = collectives.reduce_from_group(F.linear(x, self.weight), TP, self.tp)
        return y if self.bias is None else y + self.bias


class _VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the table; other ids give zeros, summed over the group."""

    def __init__(self, weight: Tensor, start: int, tp: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.tp = start, tp
        self.num_embeddings = weight.shape[0] * tp

    def forward(self, idx: Tensor) -> Tensor:
        local, outside = _local_ids(idx, self.start, self.weight.shape[0])
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return collectives.reduce_from_group(x, TP, self.tp)


def _local_ids(ids: Tensor, start: int, rows: int) -> tuple[Tensor, Tensor]:
    """ids shifted into this rank's rows (0 where outside), and where they are outside."""
    local = ids - start
    outside = (local < 0) | (local >= rows)
    return local.masked_fill(outside, 0), outside


def vocab_parallel_cross_entropy(logits: Tensor, targets: Tensor, start: int, tp: int) -> Tensor:
    """Mean cross-entropy from this rank's vocabulary columns [B, T, V/tp]; no rank ever holds
    a full row of logits. log Σ_v e^x = log Σ_ranks e^(logsumexp of the rank's columns)."""
    x = logits.flatten(0, 1)
    lse = collectives.gather_from_group(torch.logsumexp(x, dim=-1), TP, tp).logsumexp(dim=0)
    local, outside = _local_ids(targets.flatten(), start, x.shape[-1])
    picked = x.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)
    return (lse - collectives.reduce_from_group(picked, TP, tp)).mean(dim=0)


def tensor_parallel(module: nn.Module, loss_fn: LossFn, mesh: Mesh, rank: int) -> LossFn:
    """Rewrite `module` in place into global rank `rank`'s tensor-parallel slice (Megatron):
    column-parallel then row-parallel linears in attention and MLP, a vocabulary-parallel
    embedding and tied head; returns the loss to trace (vocabulary-parallel cross-entropy)."""
    if mesh.tp == 1:
        return loss_fn
    if loss_fn is not lm_loss:
        raise MeshError(
            "--tp computes the built-in next-token loss vocabulary-parallel; a custom"
            " loss function cannot be split"
        )
    specs, sizes = tp_plan(module)
    mesh.check_sizes(sizes)
    layout = _layout(module)
    tp, tp_rank = mesh.tp, mesh.coords(rank)[1]

    def piece(name: str, t: Tensor | None) -> Tensor | None:
        return None if t is None else specs[name].take(t.detach(), tp, tp_rank)

    for name, sub in list(module.named_modules()):
        if not isinstance(sub, nn.Linear) or f"{name}.weight" not in specs or name == layout.head:
            continue
        weight = piece(f"{name}.weight", sub.weight)
        if specs[f"{name}.weight"].dim == 0:
            bias = piece(f"{name}.bias", sub.bias)
            module.set_submodule(name, _ColumnParallel(weight, bias))
        else:
            bias = None if sub.bias is None else sub.bias.detach()
            module.set_submodule(name, _RowParallel(weight, bias, tp))
    for block in module.get_submodule(layout.blocks):
        for region in layout.regions:
            _copy_in(block.get_submodule(region), tp)
        attention = block.get_submodule(layout.regions[0])
        for count in layout.heads:
            setattr(attention, count, getattr(attention, count) // tp)
    embedding, head = module.get_submodule(layout.embedding), module.get_submodule(layout.head)
    start = tp_rank * (embedding.num_embeddings // tp)
    parallel = _VocabParallelEmbedding(
        piece(f"{layout.embedding}.weight", embedding.weight), start, tp
    )
    module.set_submodule(layout.embedding, parallel)
    tied = head.weight is embedding.weight
    head_weight = parallel.weight if tied else piece(f"{layout.head}.weight", head.weight)
    module.set_submodule(layout.head, _ColumnParallel(head_weight, None))  # tied: one Parameter
    _copy_in(module.get_submodule(layout.head), tp)
    return parallel_loss(module, loss_fn)


def _copy_in(region: nn.Module, tp: int) -> None:
    """Megatron's f on a parallel region's input: identity forward, all-reduce backward. The
    input is the first argument, positional or (as Hugging Face layers pass it) by keyword."""

    def hook(
        _m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[tuple[object, ...], dict[str, object]]:
        if args:
            return (collectives.copy_to_group(args[0], TP, tp), *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, kwargs | {first: collectives.copy_to_group(kwargs[first], TP, tp)}

    region.register_forward_pre_hook(hook, with_kwargs=True)


def parallel_loss(module: nn.Module, loss_fn: LossFn) -> LossFn:
    """The loss to trace `module` with: vocabulary-parallel if `tensor_parallel` rewrote it."""
    emb = next((m for m in module.modules() if isinstance(m, _VocabParallelEmbedding)), None)
    if emb is None:
        return loss_fn
    return partial(vocab_parallel_cross_entropy, start=emb.start, tp=emb.tp)

"""Trace model + loss + optimizer into ONE IR graph: forward, backward and the AdamW update.

`make_fx` runs the user's forward and `torch.autograd.grad` under fake tensors with the core
ATen decompositions, so the backward is recorded op by op and no real memory is touched (a
7B model traces on the meta device). The AdamW math is traced in the same function, and the
in-place writes of parameters and optimizer states are appended as `copy_` nodes: with the
whole step in one graph, gradients can die right after their update and the planner sees all.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch._decomp import core_aten_decompositions
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.func import functional_call
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.proxy_tensor import (
    disable_proxy_modes_tracing,
    get_proxy_mode,
    get_proxy_slot,
    has_proxy_slot,
    make_fx,
)
from torch.overrides import TorchFunctionMode

from compiler import attention
from compiler.builder import GraphBuilder
from compiler.errors import TraceError, UnsupportedOpError, is_library, short_path, user_frame
from compiler.ir import Graph, Node, Phase, Role, Value
from compiler.models.adapter import known_setting
from compiler.ops import OP_KINDS, Kind, ir_name, kind
from compiler.optimizers import Optimizer

LossFn = Callable[[Tensor, Tensor], Tensor]
STATE_PREFIXES = ("exp_avg.", "exp_avg_sq.")
SCALE_PREFIXES = ("exp_avg.scale.", "exp_avg_sq.scale.")  # 8-bit moments' per-block scales
GRAD_ACCUM = "grad_accum."  # prefix of each trainable parameter's accumulation buffer
LR, STEP = "lr", "step"  # the optimizer's per-step scalar inputs
UPDATE_BLOCKS = 4096  # 8-bit moments are dequantised this many blocks (1 Mi elements) at a time


@dataclass(frozen=True)
class AdamW:
    """AdamW as torch.optim.AdamW computes it; the learning rate is a per-step graph input."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    block: int = 0  # > 0: both moments int8 in blocks of this many elements (optimizers.py)

    @classmethod
    def named(cls, optimizer: Optimizer, weight_decay: float = 0.01) -> AdamW:
        return cls(weight_decay=weight_decay, block=Optimizer(optimizer).state_block)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The state inputs' name prefixes, in graph order, each followed by every parameter."""
        return STATE_PREFIXES + (SCALE_PREFIXES if self.block else ())

    def state_examples(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Zeroed optimizer states for `params`, in the order of `prefixes` then parameters:
        moments shaped like the parameter, or int8 codes (blocks, block) and fp32 scales."""
        if not self.block:
            return [torch.zeros_like(p) for _ in STATE_PREFIXES for p in params]
        blocks = [-(-p.numel() // self.block) for p in params]
        codes = [
            torch.zeros(n, self.block, dtype=torch.int8, device=p.device)
            for _ in STATE_PREFIXES
            for n, p in zip(blocks, params, strict=True)
        ]
        scales = [
            torch.zeros(n, dtype=torch.float32, device=p.device)
            for _ in SCALE_PREFIXES
            for n, p in zip(blocks, params, strict=True)
        ]
        return codes + scales


@dataclass(frozen=True)
class Accumulate:
    """Gradient accumulation inside the step, over `micro_steps` micro-batches.

    Each micro-step adds its gradients into persistent `grad_accum.NAME` buffers (planned
    state, so a resume or the fit check sees them). The `apply` graph is the last micro-step:
    it adds its own gradients, updates with their mean and zeroes the buffers, so a step is
    `micro_steps - 1` runs of the other graph, then one of this one.
    """

    micro_steps: int
    apply: bool


def trace(
    module: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    optimizer: AdamW | None = AdamW(),
    *,
    return_grads: bool = False,
    training: bool = True,
    batch_names: tuple[str, str] = ("tokens", "targets"),
    accumulate: Accumulate | None = None,
) -> Graph:
    """The training step of `module` on a batch shaped like `batch`, as an IR graph.

    Graph inputs, in order: parameters, buffers, optimizer states (`exp_avg.NAME`,
    `exp_avg_sq.NAME` for each trainable parameter), accumulation buffers with `accumulate`,
    the batch, then `lr` and `step` (f64 scalars) when there is an optimizer. Outputs: the
    loss, then the gradients if asked. `training=False` traces the forward and loss alone
    (validation).
    """
    if not training:
        optimizer = accumulate = None
    if accumulate is not None and not accumulate.apply:
        optimizer = None  # a micro-step only adds its gradients up
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    trainable = [n for n, p in params.items() if p.requires_grad] if training else []
    if training and not trainable:
        raise TraceError("the model has no trainable parameters (every requires_grad is False)")
    n_p, n_b, n_t = len(params), len(buffers), len(trainable)

    def step(*flat: Tensor) -> list[Tensor]:
        p_vals, rest = flat[:n_p], flat[n_p:]
        b_vals, rest = rest[:n_b], rest[n_b:]
        bound = dict(zip(params, p_vals, strict=True)) | dict(zip(buffers, b_vals, strict=True))
        n_states = len(optimizer.prefixes) * n_t if optimizer else 0
        states, rest = rest[:n_states], rest[n_states:]
        sums, rest = (rest[:n_t], rest[n_t:]) if accumulate else ((), rest)
        (x, y), scalars = rest[:2], rest[-2:]
        with AttentionAsOneOp():
            loss = loss_fn(logits_of(functional_call(module, bound, (x,))), y)
        if loss.ndim != 0:
            raise TraceError(f"the loss must be a scalar, got shape {list(loss.shape)}")
        if not training:
            return [loss]
        leaves = [bound[n] for n in trainable]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)
        ]
        outs = [loss, *grads]
        if accumulate:
            summed = [a + g for a, g in zip(sums, grads, strict=True)]
            if not accumulate.apply:
                return outs + summed
            grads = [s / accumulate.micro_steps for s in summed]
        if optimizer:
            lr, t = scalars
            outs += _adamw(optimizer, leaves, grads, states, lr, t)
        return outs + ([torch.zeros_like(a) for a in sums] if accumulate else [])

    example = [p.detach().requires_grad_(p.requires_grad) for p in params.values()]
    example += [b.detach() for b in buffers.values()]
    if optimizer:
        example += optimizer.state_examples([params[n] for n in trainable])
    if accumulate:
        example += [torch.zeros_like(params[n]) for n in trainable]
    example += [t.detach() for t in batch]
    if optimizer:
        example += [torch.tensor(1e-3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    gm = _make_fx(step, example)

    names = [*params, *buffers]
    roles = [Role.PARAM] * n_p + [Role.BUFFER] * n_b
    if optimizer:
        names += [p + n for p in optimizer.prefixes for n in trainable]
        roles += [Role.OPTIMIZER_STATE] * (len(optimizer.prefixes) * n_t)
    sums = [GRAD_ACCUM + n for n in trainable] if accumulate else []
    names += [*sums, *batch_names]
    roles += [Role.GRAD_ACCUM] * len(sums) + [Role.INPUT, Role.INPUT]
    if optimizer:
        names += [LR, STEP]
        roles += [Role.INPUT, Role.INPUT]
    states = [n for n, r in zip(names, roles, strict=True) if r is Role.OPTIMIZER_STATE]
    writes = [*trainable, *states] if optimizer else []
    return_grads = return_grads or not (optimizer or accumulate)
    return _to_ir(gm, names, roles, n_t, [*writes, *sums], return_grads)


def logits_of(output: object) -> Tensor:
    """A forward's logits: the tensor itself, or `.logits` of a ModelOutput (Hugging Face)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TraceError(
            f"the model's forward returned {type(output).__name__}; memfit needs the logits: a"
            " tensor, or an object with a `.logits` tensor (a Hugging Face ModelOutput)"
        )
    return logits


def trace_update(params: dict[str, Tensor], optimizer: AdamW = AdamW()) -> Graph:
    """The AdamW update alone, for gradients accumulated over several micro-batches.

    Inputs: parameters, `grad.NAME` (already averaged), optimizer states, `lr`, `step`.
    """
    names = list(params)
    n = len(names)

    def update(*flat: Tensor) -> list[Tensor]:
        p, g = flat[:n], flat[n : 2 * n]
        return _adamw(optimizer, p, g, flat[2 * n : -2], *flat[-2:])

    shapes = [torch.empty_like(t, device="meta") for t in params.values()]
    example = [s.clone() for _ in range(2) for s in shapes] + optimizer.state_examples(shapes)
    example += [torch.tensor(1e-3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    gm = _make_fx(update, example)
    states = [p + k for p in optimizer.prefixes for k in names]
    all_names = [*names, *(f"grad.{k}" for k in names), *states, LR, STEP]
    all_roles = [Role.PARAM] * n + [Role.GRAD] * n + [Role.OPTIMIZER_STATE] * len(states)
    all_roles += [Role.INPUT, Role.INPUT]
    writes = [*names, *states]
    return _to_ir(gm, all_names, all_roles, 0, writes, return_grads=False)


def _adamw(
    opt: AdamW,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Tensor],
    lr: Tensor,
    step: Tensor,
) -> list[Tensor]:
    """New parameters, then new states in input order — torch.optim.AdamW's arithmetic, on
    moments dequantised and requantised around it when they are 8-bit."""
    beta1, beta2 = opt.betas
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step).sqrt()

    def moments(g: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """New m, new v, its square root and the step direction m / (sqrt(v̂) + eps)."""
        m = m.lerp(g, 1 - beta1)
        v = v * beta2 + g * g * (1 - beta2)
        root = v.sqrt()
        return m, v, root, m / (root / bias_correction2_sqrt + opt.eps)

    n = len(params)
    new_p, new_s = [], [[] for _ in opt.prefixes]
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if opt.block:
            update, *quantized = _update_8bit(opt.block, moments, g, states[i::n])
            update = update.reshape(-1)[: p.numel()].view(p.shape)
            for group, t in zip(new_s, quantized, strict=True):
                group.append(t)
        else:
            m, v, _, update = moments(g, states[i], states[n + i])
            new_s[0].append(m)
            new_s[1].append(v)
        new_p.append(p * (1 - lr * opt.weight_decay) - step_size * update)
    return [*new_p, *(t for group in new_s for t in group)]


def _update_8bit(
    block: int,
    moments: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]],
    grad: Tensor,
    states: Sequence[Tensor],
) -> list[Tensor]:
    """The step direction (blocks, block), then the new m codes, sqrt(v) codes, m scales and
    sqrt(v) scales, computed UPDATE_BLOCKS blocks at a time: a large parameter's dequantised
    moments are never whole fp32 tensors, only the direction is (the parameter's update)."""
    g = _to_blocks(grad, block)
    m_codes, v_codes, m_scales, v_scales = states
    parts = []
    for a in range(0, g.shape[0], UPDATE_BLOCKS):
        rows = slice(a, a + UPDATE_BLOCKS)
        m = dequantize_blocks(m_codes[rows], m_scales[rows])
        v = dequantize_blocks(v_codes[rows], v_scales[rows]).square()
        m, _, root, update = moments(g[rows], m, v)
        (mq, ms), (vq, vs) = quantize_blocks(m), quantize_blocks(root, True)
        parts.append((update, mq, vq, ms, vs))
    return [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*parts, strict=True)]


def _to_blocks(x: Tensor, block: int) -> Tensor:
    """`x` flattened, zero-padded to a multiple of `block`, as (blocks, block)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, block)


def quantize_blocks(x: Tensor, keep_nonzero: bool = False) -> tuple[Tensor, Tensor]:
    """int8 codes and fp32 scales of `x` (blocks, block), linear absmax per block: code =
    round(x / scale), scale = absmax / 127, so |x - code·scale| ≤ absmax / 254. An all-zero
    block has scale 0 and codes 0 (the division is guarded, no NaN).

    `keep_nonzero` (for sqrt(v) ≥ 0): a positive value under half a step is stored as one
    step, not 0, so a dequantised second moment is 0 only where every gradient so far was —
    else AdamW divides a surviving first moment by eps (an embedding row absent from the
    batch) and the weights blow up within tens of steps."""
    scale = x.abs().amax(dim=1) / 127
    safe = scale.clamp_min(torch.finfo(torch.float32).tiny)
    codes = (x / safe[:, None]).round()
    if keep_nonzero:
        codes = torch.where(x > 0, codes.clamp_min(1), codes)
    return codes.to(torch.int8), scale


def dequantize_blocks(codes: Tensor, scale: Tensor) -> Tensor:
    """fp32 values of int8 block codes: code · its block's scale."""
    return codes.to(torch.float32) * scale[:, None]


@contextmanager
def _every_frame() -> Iterator[None]:
    """Record whole stacks on fx nodes: make_fx keeps only frames named `forward`, but the line
    that made an op is often in a library helper (`apply_rotary_pos_emb`, a routing function)."""
    tracer = proxy_tensor.PythonKeyTracer
    keep_forward_only = tracer._filter_traceback_frames

    def keep_all(self: fx.Tracer, summary: traceback.StackSummary) -> traceback.StackSummary:
        self._record_forward_stack_traces_only = False
        return keep_forward_only(self, summary)

    tracer._filter_traceback_frames = keep_all
    try:
        yield
    finally:
        tracer._filter_traceback_frames = keep_forward_only


class AttentionAsOneOp(TorchFunctionMode):
    """Traces `F.scaled_dot_product_attention` as `memfit::attention` (and its backward as
    `memfit::attention_backward`) on any device, before ATen picks a backend: the trace then
    holds the output and row log-sum-exp, never the [T, S] scores. An explicit `attn_mask`
    becomes the op's options when it is computed from no input and is causal / causal within a
    window, or when it is `segments[..., :, None] == segments[..., None, :]` (one [B, T] tensor
    read both ways: a document mask) and-ed with such a mask; other masks are spelled out
    (softmax of masked scores). Dropout cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[Tensor, object, tuple]] = {}  # id(result) → how it was made

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            out = func(*args, **kwargs)
            if func in _EQUALS | _ANDS and isinstance(out, Tensor):
                self.made[id(out)] = (out, func, args)  # kept alive: ids stay unique
            return out
        call = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
        if call.get("dropout_p", 0.0) > 0:
            where = _calling_frame()
            raise TraceError(
                f"scaled_dot_product_attention{f' at {where}' if where else ''} has"
                f" dropout_p={call['dropout_p']}: memfit traces deterministic steps; set the"
                " model's attention dropout to 0"
            )
        mask = call.get("attn_mask")
        queries, keys = call["query"].shape[-2], call["key"].shape[-2]
        documents = self._documents(mask, queries, keys) if mask is not None else None
        if documents is not None:
            call["segment_ids"], (call["is_causal"], call["window"]) = documents
            call["attn_mask"] = None
        elif mask is not None:
            options = _mask_options(mask, queries, keys)
            if options is None or (options[0] and call.get("is_causal")):
                return attention.spelled_out(**call)
            call["attn_mask"], call["is_causal"], call["window"] = None, *options
        return attention.sdpa(**call)

    def _documents(self, mask: Tensor, queries: int, keys: int) -> tuple[Tensor, tuple] | None:
        """(segment ids [B, T], (causal, window)) of a document mask, else None."""
        made = self.made.get(id(mask))
        if made is None or made[0] is not mask or made[1] not in _ANDS or queries != keys:
            return None
        for equal, rest in (made[2][:2], made[2][1::-1]):
            eq = self.made.get(id(equal))
            if eq is None or eq[0] is not equal or eq[1] not in _EQUALS:
                continue
            segments = _read_both_ways(*eq[2][:2], queries)
            options = _mask_options(rest, queries, keys) if isinstance(rest, Tensor) else None
            if segments is not None and options is not None:
                return segments, options
        return None


_EQUALS = {Tensor.__eq__, Tensor.eq, torch.eq}
_ANDS = {Tensor.__and__, Tensor.logical_and, Tensor.bitwise_and, torch.logical_and}


def _read_both_ways(a: object, b: object, t: int) -> Tensor | None:
    """The [B, t] tensor that `a` ([..., t, 1]) and `b` ([..., 1, t]) both view, element for
    element (same base, offset and strides), else None."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a._base is None:
        return None
    if a.shape[-2:] != (t, 1) or b.shape[-2:] != (1, t) or a._base is not b._base:
        return None
    if a.numel() != b.numel() or a.is_floating_point():
        return None
    rows_a, rows_b = a.reshape(-1, t), b.reshape(-1, t)
    same = rows_a.stride() == rows_b.stride() and rows_a.storage_offset() == rows_b.storage_offset()
    return rows_a if same else None


def _calling_frame() -> str:
    """`file:line` of the innermost user frame on the current stack."""
    for frame in reversed(traceback.extract_stack()):
        if not is_library(frame.filename):
            return f"{short_path(frame.filename)}:{frame.lineno}"
    return ""


def _mask_options(mask: Tensor, queries: int, keys: int) -> tuple[bool, int] | None:
    """`attention.mask_options` of a traced mask computed from no graph input (built from
    arange, ones, comparisons...: evaluated on the CPU); None if it reads an input."""
    mode = get_proxy_mode()
    if mode is None or not has_proxy_slot(mask, mode.tracer):
        return None
    order: list[fx.Node] = []

    def visit(node: fx.Node) -> bool:
        if node in order:
            return True
        if node.op != "call_function" or not all(map(visit, node.all_input_nodes)):
            return False
        order.append(node)
        return True

    root = get_proxy_slot(mask, mode.tracer).proxy.node
    if not visit(root):
        return None
    env: dict[fx.Node, object] = {}
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        for node in order:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": torch.device("cpu")}
            env[node] = node.target(*args, **kwargs)
        return attention.mask_options(env[root], queries, keys)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _make_fx(fn: Callable[..., list[Tensor]], example: list[Tensor]) -> fx.GraphModule:
    try:
        with _every_frame():
            return make_fx(
                fn,
                decomposition_table=core_aten_decompositions(),
                tracing_mode="fake",
                record_stack_traces=True,
                _allow_non_fake_inputs=True,  # torch.tensor(..., device=x.device) on meta
            )(*example)
    except TraceError:
        raise
    except Exception as exc:  # the user's forward or loss failed under tracing
        where = user_frame(exc)
        exc_kind = type(exc).__name__
        hint = ""
        if "data-dependent" in str(exc).lower() or "DynamicOutputShape" in exc_kind:
            hint = (
                " memfit compiles static graphs: an op whose output shape depends on tensor"
                " values (nonzero, masked_select, boolean indexing, .item()) cannot be traced."
            )
        if setting := known_setting(where):
            hint += f" To avoid it, {setting}."
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc_kind
        at = f" at {where}" if where else ""
        raise TraceError(f"tracing the model failed{at}: {exc_kind}: {first_line}.{hint}") from exc


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _source(node: fx.Node) -> str:
    """`file:line` of the user code that produced an fx node, from its recorded stack."""
    stack = node.meta.get("stack_trace") or ""
    for match in reversed(_FRAME.findall(stack)):
        if not is_library(match[0]):
            return f"{short_path(match[0])}:{match[1]}"
    return ""


def _to_ir(
    gm: fx.GraphModule,
    names: list[str],
    roles: list[Role],
    n_grads: int,
    writes: list[str],
    return_grads: bool,
) -> Graph:
    builder = GraphBuilder()
    env: dict[fx.Node, object] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for fx_node, name, role in zip(placeholders, names, roles, strict=True):
        meta = _tensor(fx_node.meta["val"], name)
        env[fx_node] = builder.input(name, tuple(meta.shape), meta.dtype, role)

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for fx_node in gm.graph.nodes:
        if fx_node.op == "get_attr":  # a tensor the forward built from literals
            source = next((_source(u) for u in fx_node.users), "")
            with builder.at(Phase.FORWARD, source):
                env[fx_node] = _constant(getattr(gm, fx_node.target), fx_node.name, builder)
        elif fx_node.op == "call_function" and fx_node.target.__name__ == "getitem":
            env[fx_node] = env[fx_node.args[0]][fx_node.args[1]]
        elif fx_node.op == "call_function":
            _convert(fx_node, env, builder, order)
        elif fx_node.op == "output":
            results = [env[a] for a in fx_node.args[0]]

    n_loss = len(results) - n_grads - len(writes)
    losses, grads = results[:n_loss], results[n_loss : n_loss + n_grads]
    updates = results[n_loss + n_grads :]
    by_name = {v.name: v for v in builder.inputs}
    with builder.at(Phase.OPTIMIZER):
        for target, new in zip(writes, updates, strict=True):
            builder.write(by_name[target], new)
    graph = builder.graph([*losses, *grads] if return_grads else losses)
    eliminate_dead_nodes(graph)
    _assign_phases_and_roles(graph, losses, grads)
    return graph


def _tensor(meta: object, name: str) -> Tensor:
    if not isinstance(meta, Tensor):
        raise TraceError(f"%{name} is not a tensor ({type(meta).__name__}); memfit traces tensors")
    return meta


_DROPPED_KWARGS = {"device", "layout", "pin_memory"}


def _convert(
    fx_node: fx.Node, env: dict[fx.Node, object], builder: GraphBuilder, order: dict[fx.Node, int]
) -> None:
    """Emit the IR node of one ATen call; its outputs are typed by the op on meta tensors."""
    op = ir_name(fx_node.target)
    source = _source(fx_node)
    if op not in OP_KINDS and fx_node.target._schema.is_mutable:
        op = _functional(fx_node, op, order, source)
    if op not in OP_KINDS:
        where = f" at {source}" if source else ""
        setting = known_setting(source, op)
        fix = setting or "rewrite the model to avoid it or add it to compiler/ops.py"
        raise UnsupportedOpError(
            f"op aten.{fx_node.target.name().split('::')[1]} (node {fx_node.name}){where} is not"
            f" in memfit's op set; {fix}"
        )

    def arg(a: object) -> object:
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, list | tuple):
            return type(a)(arg(x) for x in a)
        if isinstance(a, torch.memory_format) and a == torch.preserve_format:
            return None
        return a

    kwargs = {
        k: arg(v)
        for k, v in fx_node.kwargs.items()
        if k not in _DROPPED_KWARGS and arg(v) is not None
    }
    meta = fx_node.meta["val"]
    metas = meta if isinstance(meta, list | tuple) else [meta]
    for i, m in enumerate(metas):
        _tensor(m, f"{fx_node.name}.{i}")
    if any(isinstance(d, torch.SymInt) for m in metas for d in m.shape):
        where = f" at {source}" if source else ""
        raise TraceError(
            f"op aten.{op} (node {fx_node.name}){where} has an output shape that depends on"
            " tensor values. memfit compiles static graphs: nonzero, masked_select, boolean"
            " indexing and .item() cannot be traced; use masks of static shape instead"
        )
    builder.source = source  # phases are assigned once the whole step is traced
    outputs = builder.emit(op, tuple(arg(a) for a in fx_node.args), kwargs, names=fx_node.name)
    env[fx_node] = outputs if isinstance(meta, list | tuple) else outputs[0]


CONSTANT_ELEMENTS = 64  # larger constants belong in a buffer, where the state holds them


def _constant(tensor: Tensor, name: str, builder: GraphBuilder) -> Value:
    """Creation nodes that rebuild a constant the forward made (`torch.tensor([...])`).

    The IR is text that parses back, so a constant lives in the graph as its literal values:
    one `full` when every element is equal (empty tensors included), else one `scalar_tensor`
    per element, stacked and viewed to its shape. Big tables are refused: as a registered
    buffer they become a graph input instead of thousands of nodes.
    """
    shape, dtype = list(tensor.shape), tensor.dtype
    # a constant made on the meta device (planning) has no values: only its shape matters
    flat = [0] * tensor.numel() if tensor.is_meta else tensor.detach().cpu().flatten().tolist()
    if len(set(flat)) <= 1:
        return builder.emit1("full", (shape, flat[0] if flat else 0), {"dtype": dtype}, name)
    if len(flat) > CONSTANT_ELEMENTS:
        where = f" at {builder.source}" if builder.source else ""
        raise TraceError(
            f"the forward builds a constant tensor of {len(flat)} elements{where}; memfit keeps"
            f" constants of up to {CONSTANT_ELEMENTS} elements in the graph. Register it once as"
            " a buffer (self.register_buffer(name, tensor, persistent=False)) and read that"
        )
    scalars = [builder.emit1("scalar_tensor", (x,), {"dtype": dtype}, name) for x in flat]
    return builder.emit1("view", (builder.emit1("stack", (scalars,), {}, name), shape), {}, name)


def _functional(fx_node: fx.Node, op: str, order: dict[fx.Node, int], source: str) -> str:
    """`div_.Tensor` → `div.Tensor`: an in-place write the IR can express as a new value.

    Library code updates fresh temporaries in place (`x /= x.sum(-1, keepdim=True)`). Once
    every later reader reads the write's result, the old value is dead and the out-of-place op
    computes the same thing. A write into an input or a view would also change what other
    names see, which a value graph cannot say: that is refused with the line that wrote.
    """
    packet, dot, variant = op.partition(".")
    functional = packet.removesuffix("_") + dot + variant
    target = fx_node.args[0]
    if not isinstance(target, fx.Node):
        return op
    producer = target.args[0] if getattr(target.target, "__name__", "") == "getitem" else target
    fresh = (
        producer.op == "call_function"
        and isinstance(producer.target, torch._ops.OpOverload)
        and ir_name(producer.target) in OP_KINDS
        and kind(ir_name(producer.target)) is not Kind.VIEW
        and all(u is fx_node or order[u] < order[fx_node] for u in target.users)
    )
    if functional == op or functional not in OP_KINDS:
        return op
    if not fresh:
        where = f" at {source}" if source else ""
        raise UnsupportedOpError(
            f"op aten.{op} (node {fx_node.name}){where} writes in place into a view, an input"
            " or a tensor read again afterwards; memfit's graph holds values, so write"
            f" `x = x.{packet.removesuffix('_')}(...)` instead"
        )
    return functional


def eliminate_dead_nodes(graph: Graph) -> None:
    """Drop nodes whose outputs nothing reads (in-place writes always stay)."""
    live = {id(v) for v in graph.outputs}
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if kind(node.op) is Kind.WRITE or any(id(v) in live for v in node.outputs):
            kept.append(node)
            live.update(id(v) for v in node.inputs)
    graph.nodes = kept[::-1]


def _assign_phases_and_roles(graph: Graph, losses: list[Value], grads: list[Value]) -> None:
    """Forward = what the loss needs; backward = what the gradients need; the rest updates."""
    producers = graph.producers()

    def ancestors(roots: list[Value]) -> set[int]:
        seen: set[int] = set()
        stack = [producers[id(v)] for v in roots if id(v) in producers]
        while stack:
            node = stack.pop()
            if id(node) not in seen:
                seen.add(id(node))
                stack += [producers[id(v)] for v in node.inputs if id(v) in producers]
        return seen

    forward = ancestors(losses)
    backward = ancestors(grads) - forward
    for node in graph.nodes:
        if id(node) in forward:
            node.phase = Phase.FORWARD
        elif id(node) in backward:
            node.phase = Phase.BACKWARD
        else:
            node.phase = Phase.OPTIMIZER
    mark_activations(graph)
    for g in grads:
        if id(g) in producers:
            g.role = Role.GRAD
    for loss in losses:
        loss.role = Role.OUTPUT


def mark_activations(graph: Graph) -> None:
    """Forward values read by the backward are activations; other forward values temporaries."""
    backward_reads = {id(v) for n in graph.nodes if n.phase is Phase.BACKWARD for v in n.inputs}
    for node in graph.nodes:
        for v in node.outputs:
            if node.phase is Phase.FORWARD and v.role in (Role.ACTIVATION, Role.TEMPORARY):
                v.role = Role.ACTIVATION if id(v) in backward_reads else Role.TEMPORARY

"""linear_cross_entropy: the LM head as chunked fused ops that never hold all the logits.

The pass rewrites the LM head — the output-projection matmul, log_softmax, the target gather
and their backward — into `memfit::linear_cross_entropy(_backward)` (compiler/custom_ops.py),
which never hold more than a chunk of logits: at 8×1024 tokens and a 50257 vocabulary the fp32
logits alone are 1.6 GB, several copies of them live at once in the traced backward. The match
is exact or nothing: any extra use of an intermediate (a logits output, a bias) leaves the
graph as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler import custom_ops
from compiler.builder import GraphBuilder
from compiler.ir import Graph, Node, Phase, Value
from compiler.liveness import liveness
from compiler.passes.manager import PassContext
from compiler.trace import eliminate_dead_nodes, mark_activations

_VIEWS = ("view", "_unsafe_view")


@dataclass(frozen=True)
class LossHead:
    """The traced LM head, matched node by node (see `match_loss_heads`)."""

    logits_mm: Node
    gather: Node
    hidden: Value  # [M, K]
    weight: Value  # [V, K]
    index: Value  # [M, 1] int64: the gathered column of each row
    grad_index: Value  # [M, 1] int64: the backward's scatter index
    grad_coef: Value  # [M, 1]: the backward's per-row scale
    scatter_value: float
    grad_hidden_mm: Node
    grad_weight_mm: Node


class _Uses:
    """Producers and readers of every value, for matching."""

    def __init__(self, graph: Graph) -> None:
        self.producer = graph.producers()
        self.readers = graph.users()
        self.outputs = {id(v) for v in graph.outputs}

    def made_by(self, v: object, *ops: str) -> Node | None:
        node = self.producer.get(id(v)) if isinstance(v, Value) else None
        return node if node is not None and node.op in ops else None

    def only_reader(self, v: Value) -> Node | None:
        readers = self.readers.get(id(v), [])
        return readers[0] if len(readers) == 1 and id(v) not in self.outputs else None

    def readers_of(self, v: Value) -> list[Node] | None:
        """Readers of an intermediate, None if it is a graph output (then it must stay)."""
        return None if id(v) in self.outputs else self.readers.get(id(v), [])

    def view_source(self, v: Value) -> Value:
        """Follow single-use reshapes back to the value they view."""
        while (node := self.made_by(v, *_VIEWS)) and self.only_reader(node.args[0]) is node:
            v = node.args[0]
        return v

    def view_sink(self, v: Value) -> Value:
        """Follow single-use reshapes forward to the last one."""
        while (node := self.only_reader(v)) and node.op in _VIEWS:
            v = node.outputs[0]
        return v

    def transposed(self, v: Value) -> Value | None:
        """`w` when `v` is w.T (a 2-D permute or t), else None."""
        node = self.made_by(v, "permute", "t")
        if node is None or len(v.shape) != 2:
            return None
        return node.args[0] if node.op == "t" or list(node.args[1]) == [1, 0] else None


def _last_dim(dim: object, rank: int) -> bool:
    return isinstance(dim, int) and dim % rank == rank - 1


def _other(node: Node, v: Value) -> object:
    """The other operand of a binary node that reads `v`."""
    a, b = node.args[:2]
    return b if a is v else a


def match_loss_heads(graph: Graph) -> list[LossHead]:
    """Every mm → log_softmax → gather head whose backward is the traced nll/log_softmax one."""
    uses = _Uses(graph)
    return [h for n in graph.nodes if n.op == "_log_softmax" and (h := _match(n, uses))]


def _match(log_softmax: Node, uses: _Uses) -> LossHead | None:
    logits, dim, half_to_float = log_softmax.args
    if len(logits.shape) != 2 or not _last_dim(dim, 2) or half_to_float:
        return None
    rows, vocab = logits.shape
    mm = uses.made_by(uses.view_source(logits), "mm")
    if mm is None or uses.view_sink(mm.outputs[0]) is not logits:
        return None
    hidden, weight_t = mm.args
    weight = uses.transposed(weight_t)
    if weight is None or weight.shape != (vocab, hidden.shape[1]) or hidden.shape[0] != rows:
        return None
    log_probs = log_softmax.outputs[0]
    readers = uses.readers_of(log_probs) or []
    gathers = [n for n in readers if n.op == "gather"]
    exps = [n for n in readers if n.op == "exp"]
    templates = [n for n in readers if n.op in ("full_like", "zeros_like")]
    if len(gathers) != 1 or len(exps) != 1 or len(readers) != 2 + len(templates):
        return None
    gather = gathers[0]
    if gather.args[0] is not log_probs or not _last_dim(gather.args[1], 2) or gather.kwargs:
        return None
    # backward: sub(G, exp(log_probs) * sum(G, -1, keepdim)), G = scatter(0, index, s) * coef
    scale = uses.only_reader(exps[0].outputs[0])
    if scale is None or scale.op != "mul.Tensor":
        return None
    row_sum = uses.made_by(_other(scale, exps[0].outputs[0]), "sum.dim_IntList")
    if row_sum is None or list(row_sum.args[1]) not in ([1], [-1]) or not row_sum.args[2]:
        return None
    grad = row_sum.args[0]
    sub = uses.only_reader(scale.outputs[0])
    if sub is None or sub.op != "sub.Tensor" or sub.args[:2] != (grad, scale.outputs[0]):
        return None
    if sub.kwargs or {id(n) for n in uses.readers_of(grad) or []} != {id(row_sum), id(sub)}:
        return None
    coef_mul = uses.made_by(grad, "mul.Tensor")
    scatter = coef_mul and next(
        (s for a in coef_mul.args if (s := uses.made_by(a, "scatter.value"))), None
    )
    if scatter is None or uses.only_reader(scatter.outputs[0]) is not coef_mul:
        return None
    coef = _other(coef_mul, scatter.outputs[0])
    zeros = uses.made_by(scatter.args[0], "full_like", "zeros_like")
    filled_zero = zeros is not None and (zeros.op == "zeros_like" or zeros.args[1] == 0)
    if not filled_zero or not _last_dim(scatter.args[1], 2) or scatter.kwargs:
        return None
    if not isinstance(coef, Value) or coef.shape != (rows, 1):
        return None
    grad_logits = uses.view_sink(sub.outputs[0])
    if grad_logits.shape != (rows, vocab):
        return None
    grad_mms = _grad_mms(grad_logits, hidden, weight_t, uses)
    if grad_mms is None:
        return None
    return LossHead(
        mm,
        gather,
        hidden,
        weight,
        gather.args[2],
        scatter.args[2],
        coef,
        float(scatter.args[3]),
        *grad_mms,
    )


def _grad_mms(
    grad_logits: Value, hidden: Value, weight_t: Value, uses: _Uses
) -> tuple[Node, Node] | None:
    """mm(dlogits, (w.T).T) = d hidden and mm(dlogits.T, hidden) = d weight, its only readers."""
    readers = uses.readers_of(grad_logits) or []
    grad_hidden = next((n for n in readers if n.op == "mm" and n.args[0] is grad_logits), None)
    transpose = next((n for n in readers if n.op in ("permute", "t")), None)
    if grad_hidden is None or transpose is None or len(readers) != 2:
        return None
    if uses.transposed(grad_hidden.args[1]) is not weight_t:
        return None
    if uses.transposed(transpose.outputs[0]) is not grad_logits:
        return None
    grad_weight = uses.only_reader(transpose.outputs[0])
    if grad_weight is None or grad_weight.op != "mm" or grad_weight.args[1] is not hidden:
        return None
    return grad_hidden, grad_weight


def linear_cross_entropy(graph: Graph, ctx: PassContext) -> Graph:
    """Replace each matched LM head by the chunked fused ops; the rest of the graph is kept.

    In the pipeline unless `CompileOptions.fused_cross_entropy` is False."""
    out = graph.copy()
    for head in match_loss_heads(out):
        out = _rewrite(out, head)
    eliminate_dead_nodes(out)
    mark_activations(out)
    return out


def _rewrite(graph: Graph, head: LossHead) -> Graph:
    """`graph` with the head's forward and backward nodes replaced by the fused ops, which
    define the same values (the picked log-probabilities, the two gradients)."""
    rows, vocab = head.gather.outputs[0].shape[0], head.weight.shape[0]
    chunk = custom_ops.chunk_rows(rows, vocab, head.hidden.shape[1])
    b = GraphBuilder.rewriting(graph)
    b.source = head.logits_mm.source
    backward_done = False
    for node in graph.nodes:
        if node is head.gather:
            forward = (head.hidden, head.weight, head.index, chunk)
            b.append(Node(custom_ops.FORWARD, forward, {}, node.outputs, Phase.FORWARD, b.source))
        elif node is head.grad_hidden_mm or node is head.grad_weight_mm:
            if backward_done:
                continue
            backward_done = True
            with b.at(Phase.BACKWARD, ""):
                coef = (head.grad_coef, head.scatter_value)
                grad = b.emit1("mul.Tensor", coef, name="linear_cross_entropy_grad")
            outs = [head.grad_hidden_mm.outputs[0], head.grad_weight_mm.outputs[0]]
            args = (head.hidden, head.weight, head.grad_index, grad, chunk)
            b.append(Node(custom_ops.BACKWARD, args, {}, outs, Phase.BACKWARD, b.source))
        else:
            b.append(node)
    return b.graph(graph.outputs)


def loss_head_peak(graph: Graph) -> int:
    """Peak bytes the LM head adds on top of the rest of the step.

    Over the head's span — from the logits matmul (or the fused forward) to the last gradient
    matmul (or the fused backward) — the arena buffers born inside the span that are live at
    each step (`compiler.liveness`: a view's bytes are its base's), plus the fused ops' chunk
    workspace; the maximum over the span.
    """
    fused = [i for i, n in enumerate(graph.nodes) if n.op in custom_ops.OPS]
    if fused:
        start, end = fused[0], fused[-1]
    else:
        heads = match_loss_heads(graph)
        if not heads:
            raise ValueError("the graph has no LM head (mm → log_softmax → gather) to measure")
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        start = index[id(heads[0].logits_mm)]
        end = max(index[id(heads[0].grad_hidden_mm)], index[id(heads[0].grad_weight_mm)])
    born = [lt for lt in liveness(graph) if start <= lt.start <= end]
    return max(
        sum(lt.size for lt in born if lt.start <= i <= lt.last)
        + (custom_ops.workspace_bytes(graph.nodes[i]) if graph.nodes[i].op in custom_ops.OPS else 0)
        for i in range(start, end + 1)
    )

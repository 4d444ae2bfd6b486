"""offload: AdamW's states live in host memory and the CPU updates each parameter while the
device runs the rest of the backward (`--offload-optimizer`; the ops: compiler/offload_op.py).

Each chunked update (`memfit::update`, from passes/fused_update.py) that writes optimizer
states becomes a `memfit::host_update` with the same body: its state targets become host
state (`Role.HOST_STATE`, outside the device's peak), its other targets (the parameter) and
inputs (the gradient, AdamW's scalars) are copied to the host there, so the gradient dies at
it. One `memfit::host_update_wait` after them writes every offloaded parameter back; it takes
each update's token, so it follows them all, and it writes the parameters, so the schedule
keeps it after their last read. The schedule pass then puts each `host_update` right after its
gradient's producer (its rank, as for any optimizer node), where the host work overlaps the
backward still to run. An update that was not outlined keeps its states on the device; the
plan's offload report says how many bytes that leaves there.
"""

from __future__ import annotations

from compiler.builder import GraphBuilder
from compiler.ir import Graph, Node, Phase, Role, Value
from compiler.offload_op import HOST_UPDATE, HOST_WAIT
from compiler.passes.manager import PassContext
from compiler.update_op import UPDATE, permute_targets


def _offloadable(node: Node) -> bool:
    return node.op == UPDATE and any(t.role is Role.OPTIMIZER_STATE for t in node.args[0])


def offload_optimizer(graph: Graph, ctx: PassContext) -> Graph:
    """Every update of optimizer states runs on the host; one wait writes the parameters."""
    builder = GraphBuilder.rewriting(graph)
    written: list[Value] = []
    tokens: list[Value] = []
    for node in graph.nodes:
        if not _offloadable(node):
            builder.append(node)
            continue
        targets, inputs, body, chunk = node.args
        order = sorted(range(len(targets)), key=lambda k: targets[k].role is Role.OPTIMIZER_STATE)
        on_device = [targets[k] for k in order if targets[k].role is not Role.OPTIMIZER_STATE]
        states = [targets[k] for k in order if targets[k].role is Role.OPTIMIZER_STATE]
        for state in states:
            state.role = Role.HOST_STATE
        with builder.at(node.phase, node.source):
            args = (on_device, states, inputs, permute_targets(body, order), chunk)
            tokens += builder.emit(HOST_UPDATE, args, names="host")
        written += on_device
    if not tokens:
        return graph
    with builder.at(Phase.OPTIMIZER, "host_update_wait"):
        builder.emit(HOST_WAIT, (written, tokens))
    return builder.graph(graph.outputs)

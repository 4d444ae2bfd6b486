"""What an IR node computes, and the output types it infers, by calling its ATen op.

One definition of a node's semantics serves both sides of the layering: passes infer output
shapes and dtypes by running the op on meta tensors (exact, and free of memory), and the
runtime backends execute the same call on real tensors. It lives in compiler/ so no pass
has to import the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compiler.ir import Node, map_values
from compiler.ops import Kind, kind, resolve

META = torch.device("meta")


def bind(obj: Any, env: Mapping[int, Tensor]) -> Any:
    """`obj` (a node's args or kwargs) with every Value replaced by its tensor in `env`."""
    return map_values(obj, lambda v: env[id(v)])


def run_node(node: Node, env: Mapping[int, Tensor], device: torch.device) -> list[Tensor]:
    """Execute one node given tensors for its inputs (by id of their Value); its outputs."""
    creation = kind(node.op) is Kind.CREATION
    if creation:  # full_like(x, 0) needs x's shape, not its bytes: x may be freed
        env = _metas(node)
    args = bind(node.args, env)
    kwargs = bind(node.kwargs, env)
    if node.op == "copy_":
        args[0].copy_(args[1])
        return []
    if kind(node.op) is Kind.WRITE:  # memfit's in-place updates; host_update returns a token
        result = resolve(node.op)(*args, **kwargs)
        return [] if result is None else results(result)
    if creation:
        kwargs["device"] = device
    return results(resolve(node.op)(*args, **kwargs))


def results(result: Any) -> list[Tensor]:
    """An op's outputs as a list, whether it returned one tensor or several."""
    return list(result) if isinstance(result, tuple | list) else [result]


def infer_outputs(node: Node) -> list[Tensor]:
    """The node's outputs as meta tensors: the shapes and dtypes its op computes."""
    return run_node(node, _metas(node), META)


def _metas(node: Node) -> dict[int, Tensor]:
    return {id(v): torch.empty(v.shape, dtype=v.dtype, device=META) for v in node.inputs}

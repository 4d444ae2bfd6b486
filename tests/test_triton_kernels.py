"""Each kernel kind the triton backend generates, against eager PyTorch.

Every case traces a small function (forward and backward) into the IR, fuses it, checks the
kernel kind was really generated (a group holding the op that names it), runs the graph on
the triton backend and compares every output with torch autograd. Shapes are small and rows
are not powers of two, so masking is exercised. On CPU the kernels run in the Triton
interpreter; TRITON_INTERPRET must be set before triton is imported, hence the top lines.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from compiler import custom_ops  # noqa: E402
from compiler.codegen import cross_entropy  # noqa: E402
from compiler.codegen.triton import group_kernels  # noqa: E402
from compiler.ir import Graph, parse  # noqa: E402
from compiler.passes.fusion import FusionOptions, fuse  # noqa: E402
from compiler.passes.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from compiler.passes.manager import Pass, PassContext, PassManager  # noqa: E402
from compiler.passes.noop_views import eliminate_noop_views  # noqa: E402
from compiler.plan import MemoryPlan, PlannedValue  # noqa: E402
from compiler.trace import AdamW, trace  # noqa: E402
from examples.llama import RMSNorm, apply_rope, rope_tables  # noqa: E402
from runtime import eager, triton_backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = FusionOptions("triton")
RTOL, ATOL = 1e-5, 1e-6  # fp32; kernels differ from ATen only in summation order


class Function(nn.Module):
    """fn(*params, *consts) as a module: every tensor argument is a parameter, so the backward
    reaches it; `consts` (masks, tables) are buffers."""

    def __init__(self, fn: Callable[..., Tensor], *tensors: Tensor, consts: tuple = ()) -> None:
        super().__init__()
        self.fn = fn
        self.args = nn.ParameterList(nn.Parameter(t.clone()) for t in tensors)
        for i, c in enumerate(consts):
            self.register_buffer(f"const{i}", c)
        self.n_consts = len(consts)

    def forward(self, _: Tensor) -> Tensor:
        consts = [getattr(self, f"const{i}") for i in range(self.n_consts)]
        return self.fn(*self.args, *consts)


def weighted_sum(out: Tensor, weights: Tensor) -> Tensor:
    """A loss whose gradient with respect to `out` is an arbitrary tensor."""
    return (out * weights).sum()


def fused_graph(
    module: nn.Module,
    loss_fn: Callable,
    batch: tuple[Tensor, Tensor],
    optimizer: AdamW | None = None,
    fused_cross_entropy: bool = True,
) -> Graph:
    graph = trace(module, loss_fn, batch, optimizer, return_grads=True)
    passes: list[tuple[str, Pass]] = [("noop_views", eliminate_noop_views)]
    if fused_cross_entropy:
        passes.append(("linear_cross_entropy", linear_cross_entropy))
    passes.append(("fusion", partial(fuse, options=TRITON)))
    return PassManager(passes).run(graph, PassContext())


def feeds(graph: Graph, module: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    out = {"tokens": batch[0], "targets": batch[1]}
    out |= {k: t.detach().clone() for k, t in named.items()}
    for v in graph.inputs:  # AdamW moments and hyper-parameters
        if v.name.startswith(("exp_avg.", "exp_avg_sq.")):
            out[v.name] = torch.full(v.shape, 0.01, dtype=v.dtype)
        elif v.name in ("lr", "step"):
            out[v.name] = torch.tensor({"lr": 1e-2, "step": 3.0}[v.name], dtype=torch.float64)
    return {k: t.to(DEVICE) for k, t in out.items()}


def assert_kernel(graph: Graph, *ops: str) -> None:
    """Some generated kernel contains all of `ops` (so this kind really went through Triton)."""
    kernels = group_kernels(graph)
    assert any(set(ops) <= set(k.ops) for k in kernels), [k.ops for k in kernels]


def check(
    fn: Callable[..., Tensor],
    *tensors: Tensor,
    kernels: list[tuple[str, ...]],
    consts: tuple = (),
    atol: float = ATOL,
) -> None:
    """Triton backend vs torch autograd on loss = sum(fn(*tensors) * w): loss and gradients."""
    gen = torch.Generator().manual_seed(1)
    module = Function(fn, *tensors, consts=consts)
    out = fn(*tensors, *consts)
    weights = torch.randn(out.shape, generator=gen)
    batch = (torch.zeros(1), weights)
    graph = fused_graph(module, weighted_sum, batch)
    for ops in kernels:
        assert_kernel(graph, *ops)
    params = [p.detach().clone().requires_grad_() for p in module.args]
    loss = weighted_sum(fn(*params, *consts), weights)
    want = [loss, *torch.autograd.grad(loss, params)]
    got = triton_backend.run_graph(graph, feeds(graph, module, batch), DEVICE)
    for g, w in zip(got, want, strict=True):
        assert_close(g.cpu(), w.detach(), rtol=RTOL, atol=atol)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_layer_norm_forward_and_backward() -> None:
    check(
        lambda x, w, b: F.layer_norm(x, (33,), w, b, 1e-5),
        randn(3, 5, 33),
        1 + 0.1 * randn(33, seed=1),
        0.1 * randn(33, seed=2),
        kernels=[("native_layer_norm",), ("sum.dim_IntList", "sub.Tensor", "mul.Tensor")],
    )


def test_rms_norm_forward_and_backward() -> None:
    norm = RMSNorm(40, 1e-5)
    check(
        lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * w,
        randn(2, 7, 40),
        1 + 0.1 * randn(40, seed=1),
        kernels=[("mean.dim", "rsqrt"), ("sum.dim_IntList", "pow.Tensor_Scalar")],
    )


def test_masked_softmax_forward_and_backward() -> None:
    check(
        lambda s, future: (s * 0.5).masked_fill(future, float("-inf")).softmax(dim=-1),
        randn(2, 3, 7, 7),
        consts=(torch.ones(7, 7, dtype=torch.bool).triu(1),),  # the future: masked
        kernels=[("_softmax", "where.self"), ("sum.dim_IntList", "where.self")],
    )


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_forward_and_backward(approximate: str) -> None:
    """Inputs up to ±9 reach tanh's saturation, where the traced backward's 1 - tanh² cancels:
    one ulp of tanh (1e-7) becomes ~1e-6 in the gradient, in ATen as in the kernel."""
    check(
        lambda x: F.gelu(x, approximate=approximate),
        3 * randn(6, 50),
        kernels=[("gelu",), ("mul.Tensor", "exp" if approximate == "none" else "tanh")],
        atol=1e-5,
    )


def test_swiglu_forward_and_backward() -> None:
    """silu's backward decomposes through sigmoid in torch 2.13 and through 1 / (1 + exp(-x))
    before it, so the backward kernel is checked by the ops both forms share."""
    check(
        lambda a, b: F.silu(a) * b,
        randn(4, 24),
        randn(4, 24, seed=1),
        kernels=[("sigmoid", "mul.Tensor"), ("mul.Tensor", "sub.Tensor", "add.Tensor")],
    )


def test_rotary_forward_and_backward() -> None:
    check(
        apply_rope,
        randn(2, 3, 5, 8),
        consts=rope_tables(8, 5, 10000.0),
        kernels=[("mul.Tensor", "sub.Tensor", "add.Tensor"), ("neg", "mul.Tensor", "add.Tensor")],
    )


def test_cross_entropy_row_kernels_forward_and_backward() -> None:
    """Unfused head (logits are a parameter, no matmul to fuse into): log_softmax + gather
    forward and scatter + softmax backward as row kernels."""
    targets = torch.tensor([3, 0, 36, 5, -100, 12])
    logits = randn(6, 37)
    module = Function(lambda z: z, logits)
    batch = (torch.zeros(1), targets)
    graph = fused_graph(module, F.cross_entropy, batch, fused_cross_entropy=False)
    assert_kernel(graph, "_log_softmax", "gather")
    assert_kernel(graph, "scatter.value", "sum.dim_IntList", "exp")
    z = logits.clone().requires_grad_()
    loss = F.cross_entropy(z, targets)
    got = triton_backend.run_graph(graph, feeds(graph, module, batch), DEVICE)
    assert_close(got[0].cpu(), loss.detach(), rtol=RTOL, atol=ATOL)
    assert_close(got[1].cpu(), torch.autograd.grad(loss, z)[0], rtol=RTOL, atol=ATOL)


def test_fused_linear_cross_entropy_in_a_graph() -> None:
    hidden, weight = randn(10, 12), randn(45, 12, seed=1)
    targets = torch.tensor([3, 0, 44, 5, -100, 12, 7, 7, 1, 2])
    module = Function(lambda h, w: h @ w.T, hidden, weight)
    batch = (torch.zeros(1), targets)
    graph = fused_graph(module, F.cross_entropy, batch)
    assert {custom_ops.FORWARD, custom_ops.BACKWARD} <= {n.op for n in graph.nodes}
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets)
    want = [loss, *torch.autograd.grad(loss, [h, w])]
    got = triton_backend.run_graph(graph, feeds(graph, module, batch), DEVICE)
    for g, wanted in zip(got, want, strict=True):
        assert_close(g.cpu(), wanted.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("vocab", [45, 1500])  # one block per row, and several
def test_linear_cross_entropy_kernels_match_torch_reference(vocab: int) -> None:
    hidden, weight = randn(9, 16).to(DEVICE), randn(vocab, 16, seed=1).to(DEVICE)
    index = torch.randint(0, vocab, (9, 1), generator=torch.Generator().manual_seed(2))
    index, grad = index.to(DEVICE), randn(9, 1, seed=3).to(DEVICE)
    picked = cross_entropy.linear_cross_entropy(hidden, weight, index, 4)
    assert_close(
        picked, custom_ops.linear_cross_entropy(hidden, weight, index, 4), rtol=RTOL, atol=ATOL
    )
    got = cross_entropy.linear_cross_entropy_backward(hidden, weight, index, grad, 4)
    want = custom_ops.linear_cross_entropy_backward(hidden, weight, index, grad, 4)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_adamw_update_matches_eager() -> None:
    """One AdamW step (bias correction at step 3, weight decay) from the same gradients."""
    torch.manual_seed(0)
    module = nn.Linear(37, 5)
    batch = (randn(4, 37), randn(4, 5, seed=1))

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        return ((out - target) ** 2).mean(dim=(0, 1))

    graph = fused_graph(module, loss_fn, batch, optimizer=AdamW())
    assert_kernel(graph, "sqrt", "div.Tensor", "where.self", "sub.Tensor")
    want_feeds, got_feeds = feeds(graph, module, batch), feeds(graph, module, batch)
    eager.run_graph(graph, want_feeds, DEVICE)
    triton_backend.run_graph(graph, got_feeds, DEVICE)
    written = [v.name for v in graph.inputs if v.role.persistent]
    assert len(written) == 6
    for name in written:
        assert_close(got_feeds[name], want_feeds[name], rtol=RTOL, atol=ATOL)


def test_kernels_are_cached_on_disk_by_content_hash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(triton_backend.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(triton_backend, "_LOADED", {})
    module = Function(torch.tanh, randn(3, 5))
    graph = fused_graph(module, weighted_sum, (torch.zeros(1), randn(3, 5, seed=1)))
    kernels = group_kernels(graph)
    for kernel in kernels:
        triton_backend.load_kernel(kernel, DEVICE)
    files = {p.name: p.read_text() for p in tmp_path.glob("*.py")}
    assert files == {f"{k.name}_{k.key}.py": k.source for k in kernels}


ROW_SUM = """\
input %x: f32[4,8] input
input %w: f32[8,8] input
%y: f32[4,8] temporary = mm(%x, %w)  # forward
%r: f32[4,1] temporary = sum.dim_IntList(%y, [-1], True)  # forward
%z: f32[4,{cols}] output = {op}  # forward
output %z
"""
CENTER = ROW_SUM.format(cols=8, op="sub.Tensor(%y, %r)")
SCALE = ROW_SUM.format(cols=1, op="mul.Tensor(%r, 2.0)")


@pytest.mark.parametrize(
    ("text", "z_offset", "fused"),
    [
        (CENTER, 0, True),  # z overwrites y in place: each lane reads its element first
        (SCALE, 128, True),
        (SCALE, 0, False),  # z [4,1] over y's first row: program 1 could write before 0 reads
    ],
)
def test_arena_launches_a_group_only_when_its_plan_is_safe(
    text: str, z_offset: int, fused: bool
) -> None:
    graph = fuse(parse(text), PassContext(), TRITON)
    offsets = {"y": 0, "r": 256, "z": z_offset}
    planned = [
        PlannedValue(v.name, v.nbytes, v.nbytes, offsets[v.name], 0, 3, v.role)
        for n in graph.nodes
        for v in n.outputs
    ]
    plan = MemoryPlan(planned, 3, 512, 512, 0, "test", {}, [])
    arena = triton_backend.TritonArena(graph, plan, DEVICE)
    assert (arena.launched, arena.unfused) == (([0], []) if fused else ([], [0]))
    feeds = {"x": randn(4, 8).to(DEVICE), "w": randn(8, 8, seed=1).to(DEVICE)}
    for got, want in zip(arena(graph, feeds), eager.run_graph(graph, feeds, DEVICE), strict=True):
        assert_close(got, want, rtol=RTOL, atol=ATOL)


OPERANDS = """\
input %x: f32[5,7] input
input %g: f32[5,7] input
input %p: f32[5,7] input
input %s: f32[7] input
input %m: b8[5,7] input
input %n: b8[5,7] input
input %i: i64[5,7] input
input %idx: i64[5,1] input
"""
# One node per entry, "declaration = call": every op of the codegen tables the example models
# do not exercise, each checked against ATen on the same inputs (p > 0; s holds nan and ±inf).
SINGLE_OPS = [
    "f32[5,7] = gelu_backward(%g, %x, approximate='tanh')",
    "f32[5,7] = gelu_backward(%g, %x)",
    "f32[5,7] = gelu(%x)",
    "f32[5,7] = silu(%x)",
    "f32[5,7] = silu_backward(%g, %x)",
    "f32[5,7] = sigmoid_backward(%g, %p)",
    "f32[5,7] = tanh_backward(%g, %x)",
    "f32[5,7] = threshold_backward(%g, %x, 0.0)",
    "f32[5,7] = pow.Tensor_Scalar(%x, 3)",
    "f32[5,7] = pow.Tensor_Scalar(%x, -2)",
    "f32[5,7] = pow.Tensor_Scalar(%p, 1.5)",
    "f32[5,7] = pow.Tensor_Scalar(%p, -0.5)",
    "f32[5,7] = pow.Scalar(2.0, %x)",
    "f32[5,7] = clamp(%x, -0.5, 0.5)",
    "f32[5,7] = clamp_min(%x, 0.1)",
    "f32[5,7] = clamp_max(%x, 0.1)",
    "f32[5,7] = lerp.Scalar(%x, %g, 0.3)",
    "f32[5,7] = lerp.Tensor(%x, %g, %p)",
    "f32[5,7] = addcmul(%x, %g, %p, value=0.5)",
    "f32[5,7] = addcdiv(%x, %g, %p, value=0.5)",
    "f32[5,7] = masked_fill.Scalar(%x, %m, -1.5)",
    "f32[5,7] = add.Tensor(%x, %g, alpha=2)",
    "f32[5,7] = maximum(%x, %s)",
    "f32[5,7] = minimum(%x, %g)",
    "f32[5,7] = reciprocal(%p)",
    "f32[5,7] = log(%p)",
    "f32[5,7] = sin(%x)",
    "f32[5,7] = cos(%x)",
    "f32[5,7] = erf(%x)",
    "f32[5,7] = relu(%x)",
    "f32[5,7] = div.Tensor(%i, %i)",
    "b8[7] = isnan(%s)",
    "b8[7] = isinf(%s)",
    "b8[5,7] = logical_and(%m, %n)",
    "b8[5,7] = logical_not(%m)",
    "b8[5,7] = bitwise_not(%m)",
    "b8[5,7] = bitwise_or.Tensor(%m, %n)",
    "b8[5,7] = lt.Tensor(%x, %g)",
    "b8[5,7] = eq.Scalar(%i, 3)",
    "i64[5,7] = _to_copy(%x, dtype=i64)",
    "bf16[5,7] = _to_copy(%x, dtype=bf16)",
    "f64[5,7] = _to_copy(%x, dtype=f64)",
    "f32[5,1] = amax(%x, [-1], True)",
    "f32[5] = amin(%x, [1])",
    "f32[5,1] = mean.dim(%x, [-1], True)",
    "i64[5] = sum.dim_IntList(%m, [-1])",
    "f32[5,7] = _log_softmax(%x, 1, False)",
    "f32[5,7] = _softmax_backward_data(%g, %p, -1, f32)",
    "f32[5,7] = _log_softmax_backward_data(%g, %x, -1, f32)",
    "f32[5,1] = gather(%x, 1, %idx)",
    "f32[5,7] = scatter.value(%x, 1, %idx, 2.5)",
]


@pytest.mark.parametrize("line", SINGLE_OPS, ids=[op.split(" = ")[1] for op in SINGLE_OPS])
def test_single_op_kernel_matches_aten(line: str) -> None:
    decl, call = line.split(" = ")
    graph = parse(f"{OPERANDS}%y: {decl} output = {call}  # forward\noutput %y\n")
    graph = fuse(graph, PassContext(), TRITON)
    assert graph.nodes[0].group is not None, "not fused: the op would have stayed in ATen"
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    feeds = {
        "x": x,
        "g": g,
        "p": torch.rand(5, 7, generator=gen) + 0.1,
        "s": torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -2.0, 3.0]),
        "m": x > 0,
        "n": g > 0,
        "i": torch.randint(1, 9, (5, 7), generator=gen),
        "idx": torch.randint(0, 7, (5, 1), generator=gen),
    }
    feeds = {k: t.to(DEVICE) for k, t in feeds.items()}
    (got,) = triton_backend.run_graph(graph, feeds, DEVICE)
    (want,) = eager.run_graph(graph, feeds, DEVICE)
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter truncates fp32 → bf16 (GPUs round to nearest even): one bf16 ulp
        assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)

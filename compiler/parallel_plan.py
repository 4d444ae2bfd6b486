"""One rank's memory for a --dp/--tp/--zero mesh, from shapes alone: no devices, no weights.

The rank's step is compiled exactly as `memfit train` compiles it on that rank — tensor-parallel
rewrite, shard pass (its collectives and ZeRO shards are ordinary IR values), precision,
schedule, buffers — on the meta device, so the numbers are the planner's own (compiler/plan.py):
bytes by role at the rank's peak step, arena plus what the caller holds (parameters, optimizer
states, buffers, the batch). Every rank of a mesh holds the same shapes; rank 0 is planned.

Layer scaling. Tracing a joint graph costs milliseconds per node, and a 32-layer 7B step has
~15k nodes. A decoder's layers are identical, so every quantity of the plan (bytes of each role
at the peak, the peak) is affine in the layer count once the first layer's boundary effects are
past: Q(N) = Q(3) + (N − 3)·(Q(3) − Q(2)), from traces of 2 and 3 layers. Exact up to the
padding of ZeRO buckets (a few elements per bucket), and checked against full traces in
tests/test_parallel_plan.py. Likewise the batch: every activation scales with it and nothing
else does, so the largest batch that fits comes from two batch sizes and is then confirmed.

`llama_formula` is the hand derivation (docs/parallel-memory.md) the simulation is checked
against: parameters, gradients and AdamW states by the ZeRO paper, activations per layer
counted tensor by tensor as Korthikanti et al. do, for memfit's Llama.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from rich.table import Table

from compiler.compile import CompileOptions, compile_model
from compiler.ir import Role
from compiler.mesh import DEFAULT_BUCKET_BYTES, Mesh
from compiler.models import resolve_model
from compiler.models.adapter import decoder_blocks
from compiler.passes.precision import Precision
from compiler.passes.recompute import RecomputePolicy
from compiler.plan import MemoryPlan, fmt_bytes
from examples import GPT2_CONFIGS, LLAMA_CONFIGS, ExampleModel
from examples.gpt2 import GPT2
from examples.llama import Llama, LlamaConfig
from examples.loss import lm_loss

SCALING_LAYERS = (2, 3)  # traced depths whose difference is one layer


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds at its peak step."""

    model: str
    mesh: Mesh
    precision: Precision
    batch: int  # rows per rank (the global batch is batch · dp)
    seq: int
    layers: int
    by_role: dict[Role, int]  # bytes live at the peak step: arena and caller-held, by role
    traced: tuple[int, ...]  # depths actually traced: (layers,) or SCALING_LAYERS
    packing: float  # arena / lower bound of the (deepest) traced plan: the allocator's overhead
    recompute: bool  # the recompute pass ran (memfit's default min-cut)

    @property
    def peak(self) -> int:
        """Bytes live at the rank's peak step (the arena's lower bound plus caller-held)."""
        return sum(self.by_role.values())

    @property
    def method(self) -> str:
        saved = "min-cut recompute" if self.recompute else "every activation saved"
        if self.traced == (self.layers,):
            return f"full trace of {self.layers} layers; {saved}"
        a, b = self.traced
        return f"layers {a} and {b} traced, extrapolated to {self.layers}; {saved}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "mesh": {"dp": self.mesh.dp, "tp": self.mesh.tp, "zero": self.mesh.zero},
            "precision": self.precision,
            "batch_per_rank": self.batch,
            "seq": self.seq,
            "layers": self.layers,
            "bytes_at_peak": {str(r): b for r, b in self.by_role.items()},
            "peak_bytes": self.peak,
            "arena_over_lower_bound": round(self.packing, 6),
            "method": self.method,
        }

    def table(self, formula: dict[str, int] | None = None) -> Table:
        title = (
            f"rank 0 of {self.mesh.world}: {self.model}, {self.mesh}, {self.precision},"
            f" {self.batch} × {self.seq} tokens per rank"
        )
        table = Table(title=title, caption=self.method)
        table.add_column("at the peak")
        table.add_column("bytes", justify="right")
        for role, nbytes in self.by_role.items():
            table.add_row(str(role), fmt_bytes(nbytes))
        table.add_section()
        table.add_row("peak (live bytes)", fmt_bytes(self.peak), style="bold")
        table.add_row("arena packing / lower bound", f"{self.packing:.4f}")
        if formula is not None:
            total = formula["total"]
            table.add_row("formula (docs/parallel-memory.md)", fmt_bytes(total))
            table.add_row("simulation / formula", f"{self.peak / total:.4f}")
        return table


def example_config(name: str) -> Any:
    """The config of a built-in example (GPT2Config or LlamaConfig), or None."""
    return (GPT2_CONFIGS | LLAMA_CONFIGS).get(name)


def _build(name: str, layers: int | None) -> ExampleModel:
    cfg = example_config(name)
    if cfg is None or layers is None:
        return resolve_model(name, device="meta")
    cfg = replace(cfg, n_layer=layers)
    with torch.device("meta"):
        module = (Llama if isinstance(cfg, LlamaConfig) else GPT2)(cfg)
    return ExampleModel(module, cfg.vocab_size, cfg.block_size, name)


def compile_rank(
    model: ExampleModel,
    mesh: Mesh,
    precision: Precision,
    batch: int,
    seq: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    recompute: bool = True,
) -> MemoryPlan:
    """The plan of rank 0's step."""
    options = CompileOptions(
        batch_size=batch,
        seq_len=seq,
        precision=precision,
        mesh=mesh,
        bucket_bytes=bucket_bytes,
        recompute=RecomputePolicy() if recompute else None,
    )
    plan = compile_model(model, lm_loss, options).plan
    assert plan is not None
    return plan


def rank_plan(
    name: str,
    mesh: Mesh,
    precision: Precision,
    batch: int,
    seq: int | None = None,
    *,
    scale_layers: bool = True,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    recompute: bool = True,
) -> RankPlan:
    """Rank 0's bytes by role at its peak; deep examples by layer scaling (module docstring)."""
    cfg = example_config(name)
    if cfg is None or not scale_layers or cfg.n_layer <= SCALING_LAYERS[-1]:
        model = _build(name, None)
        seq = seq or model.block_size
        p = compile_rank(model, mesh, precision, batch, seq, bucket_bytes, recompute)
        n = len(decoder_blocks(model.module) or ())
        by_role = p.breakdown()
        return RankPlan(name, mesh, precision, batch, seq, n, by_role, (n,), p.ratio, recompute)
    seq = seq or cfg.block_size
    a, b = (
        compile_rank(_build(name, n), mesh, precision, batch, seq, bucket_bytes, recompute)
        for n in SCALING_LAYERS
    )
    steps = cfg.n_layer - SCALING_LAYERS[-1]
    peaks_a, peaks_b = _phase_peaks(a), _phase_peaks(b)
    candidates = [  # each phase's own peak is affine in depth; which phase wins may change
        {r: x for r in roles if (x := _affine(peaks_a[ph].get(r, 0), roles[r], steps))}
        for ph, roles in peaks_b.items()
    ]
    by_role = max(candidates, key=lambda c: sum(c.values()))
    depth = cfg.n_layer
    return RankPlan(
        name, mesh, precision, batch, seq, depth, by_role, SCALING_LAYERS, b.ratio, recompute
    )


def _phase_peaks(plan: MemoryPlan) -> dict[str, dict[Role, int]]:
    """For forward, backward and optimizer: bytes by role at the phase's most loaded step."""
    timeline = plan.timeline()
    live = [sum(col) for col in zip(*timeline.values(), strict=True)]
    best: dict[str, int] = {}
    for phase, first, last in plan.phases:
        i = max(range(first, last + 1), key=live.__getitem__)
        if phase not in best or live[i] > live[best[phase]]:
            best[phase] = i
    return {
        phase: {r: timeline.get(r, [0] * plan.steps)[i] + plan.outside.get(r, 0) for r in Role}
        for phase, i in best.items()
    }


def _affine(at_a: int, at_b: int, steps: int) -> int:
    return at_b + steps * (at_b - at_a)


def largest_batch(
    name: str,
    mesh: Mesh,
    precision: Precision,
    device_bytes: int,
    seq: int | None = None,
    **kw: Any,
) -> tuple[int, RankPlan]:
    """The most rows per rank whose peak fits `device_bytes`, and its plan (0 and the plan of
    one row if not even one fits). The peak is affine in the batch; the answer is confirmed."""
    one = rank_plan(name, mesh, precision, 1, seq, **kw)
    if one.peak > device_bytes:
        return 0, one
    two = rank_plan(name, mesh, precision, 2, seq, **kw)
    per_row = max(two.peak - one.peak, 1)
    best = 1 + (device_bytes - one.peak) // per_row
    plan = rank_plan(name, mesh, precision, best, seq, **kw)
    while plan.peak > device_bytes:  # the affine guess was optimistic: step down
        best -= 1
        plan = rank_plan(name, mesh, precision, best, seq, **kw)
    return best, plan


# --- the hand-derived formula ------------------------------------------------------------------


def llama_formula(
    cfg: LlamaConfig, mesh: Mesh, precision: Precision, batch: int, seq: int
) -> dict[str, int]:
    """Rank bytes at the peak for a memfit Llama under bf16/fp16 and ZeRO ≥ 1 (derivation and
    notation in docs/parallel-memory.md). Keys: the terms, and "total"."""
    if mesh.zero < 1 or precision.low_dtype is None:
        raise ValueError("the formula covers mixed-precision ZeRO (bf16/fp16, --zero 1 or 2)")
    s, b, h, a, f, t = seq, batch, cfg.n_embd, cfg.n_head, cfg.ffn_dim, mesh.tp
    hkv, v, n = cfg.kv_heads * cfg.head_dim, cfg.vocab_size, cfg.n_layer
    sharded = v * h + n * (2 * h * h + 2 * h * hkv + 3 * h * f)  # split by tensor parallelism
    replicated = n * 2 * h + h  # RMSNorm weights
    psi = sharded // t + replicated  # parameters this rank holds
    # per layer: 6 [s,b,h] around the norms, q and attention's output [s,b,h/t] and its
    # merged copy, k and v [s,b,hkv/t] (never repeated for GQA), 4 [s,b,f/t], attention's fp32
    # row log-sum-exp [a/t,s,b] and one fp32 rsqrt: no s² term (compiler/attention.py)
    split = (3 * h + 2 * hkv + 4 * f) // t
    layer = 2 * s * b * (6 * h + split) + 4 * a // t * s * b + 4 * s * b
    # the peak is in the last layer's MLP backward: one of its [s,b,f/t] activations is dead,
    # the logits' gradient [s,b,v/t], the hidden state's [s,b,h], two [s,b,f/t] gradients
    # and the fp32 copy of one of them are live
    backward = 2 * s * b * (v // t + h) + 8 * s * b * f // t
    terms = {
        "parameters (bf16, every rank)": 2 * psi,
        "gradients live at the peak": 0,
        "AdamW m, v and fp32 master (1/dp)": 12 * math.ceil(psi / mesh.dp),
        "activations": n * layer - 2 * s * b * f // t,
        "backward temporaries at the peak": backward,
        "buffers and batch": 2 * 4 * cfg.block_size * cfg.head_dim // 2 + 2 * 8 * s * b,
    }
    terms["total"] = sum(terms.values())
    return terms

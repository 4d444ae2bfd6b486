"""LoRA: train a low-rank update of chosen linear weights, W + (alpha/r)·B·A, with W frozen.

A model-level rewrite applied before tracing: each target nn.Linear becomes a `LoraLinear`
holding the frozen base (an nn.Linear, or a `QuantizedLinear` with --quantize-base) and two
small trainable matrices, and every other parameter is frozen. The tracer gives frozen
parameters no gradient and no optimizer state, so the step's persistent bytes are the base
(once) plus r·(in + out) per target for A, B, their gradients and AdamW moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compiler.models.adapter import LORA_TARGETS
from compiler.quantize import QuantizedLinear
from compiler.trace import STATE_PREFIXES

# Target names a user types → module-name suffixes in examples/ (gpt2: fused qkv, proj, mlp.fc,
# mlp.proj; llama: wq wk wv wo, SwiGLU w1 gate, w3 up, w2 down). GPT-2's q, k and v share one
# fused Linear, so any of them targets the fused `attn.qkv` (as peft does with GPT-2's c_attn).
# Hugging Face families' suffixes for the same names are data in compiler/models/adapter.py.
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("attn.qkv", "attention.wq"),
    "k": ("attn.qkv", "attention.wk"),
    "v": ("attn.qkv", "attention.wv"),
    "o": ("attn.proj", "attention.wo"),
    "fc": ("mlp.fc",),
    "up": ("mlp.fc", "feed_forward.w3"),
    "gate": ("feed_forward.w1",),
    "down": ("mlp.proj", "feed_forward.w2"),
}
ADAPTER_MARK = ".lora_"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self) -> None:
        if self.r < 1 or not self.targets:
            raise ValueError(f"LoRA needs r ≥ 1 and at least one target, got {self}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def parse(cls, text: str) -> LoraConfig:
        """`r=8,alpha=16,targets=q,k,v,o` (a bare word continues the previous key's list)."""
        fields: dict[str, list[str]] = {}
        key = None
        for item in filter(None, (s.strip() for s in text.split(","))):
            if "=" in item:
                key, _, item = item.partition("=")
                key = key.strip()
                fields[key] = []
            if key is None:
                raise ValueError(f"--lora {text!r}: expected key=value, got {item!r}")
            fields[key].append(item.strip())
        unknown = fields.keys() - {"r", "alpha", "targets"}
        if unknown:
            raise ValueError(f"--lora {text!r}: unknown keys {sorted(unknown)} (r, alpha, targets)")
        try:
            r = int(fields.get("r", [cls.r])[0])
            alpha = float(fields.get("alpha", [cls.alpha])[0])
        except ValueError as e:
            raise ValueError(f"--lora {text!r}: {e}") from None
        return cls(r, alpha, tuple(fields.get("targets", cls.targets)))


class LoraLinear(nn.Module):
    """base(x) + (alpha/r)·x Aᵀ Bᵀ. B starts at zero, so the wrapped model starts unchanged."""

    def __init__(self, base: nn.Linear | QuantizedLinear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.r, self.scaling = r, alpha / r
        device = base.weight.device if isinstance(base, nn.Linear) else base.weight_codes.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft does
        self.merged = False

    def delta(self) -> Tensor:
        """The weight update (alpha/r)·B·A, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference without the extra matmuls)."""
        if self.merged:
            return
        self._dense_base().weight.add_(self.delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight, to continue training the adapter."""
        if not self.merged:
            return
        self._dense_base().weight.sub_(self.delta())
        self.merged = False

    def _dense_base(self) -> nn.Linear:
        if not isinstance(self.base, nn.Linear):
            raise ValueError(
                "cannot merge into a quantised base in place (it would be requantised and the"
                " update lost in rounding); use merge_lora() to export a dense model"
            )
        return self.base


def target_modules(module: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear (or already-wrapped) modules the target names select."""
    suffixes = {s for t in targets for s in TARGET_ALIASES.get(t, (t,)) + LORA_TARGETS.get(t, ())}
    linears = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear | LoraLinear) and not name.endswith(".base")
    ]
    chosen = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not chosen:
        raise ValueError(
            f"LoRA targets {','.join(targets)} match no Linear module; Linear modules here end in"
            f" {sorted({n.rpartition('.')[2] for n in linears})}"
        )
    return chosen


def apply_lora(module: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze every parameter and wrap the targets in LoraLinear, in place; returns them."""
    chosen = target_modules(module, config.targets)
    for p in module.parameters():
        p.requires_grad_(False)
    for name in chosen:
        current = module.get_submodule(name)
        if isinstance(current, LoraLinear):
            current.lora_A.requires_grad_(True)
            current.lora_B.requires_grad_(True)
        else:
            module.set_submodule(name, LoraLinear(current, config.r, config.alpha))
    return chosen


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoraLinear by a dense nn.Linear holding W + (alpha/r)·B·A, in place."""
    for name, m in list(module.named_modules()):
        if not isinstance(m, LoraLinear):
            continue
        base = m.base
        weight = base.weight if isinstance(base, nn.Linear) else base.dequantized_weight()
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        dense = dense.to(weight.device)
        dense.weight.copy_(weight if m.merged else weight + m.delta())
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        module.set_submodule(name, dense)
    return module


def is_adapter(name: str) -> bool:
    """A LoRA tensor's name, or (with an exp_avg./exp_avg_sq. prefix) one of its moments."""
    return ADAPTER_MARK in f".{name}"


def adapter_state(
    tensors: nn.Module | dict[str, Tensor], *, optimizer: bool = False
) -> dict[str, Tensor]:
    """The LoRA tensors alone, from a module or a name → tensor state (e.g. Program.state);
    with `optimizer`, their AdamW moments too (to resume training from the file)."""
    return {
        k: t.detach().contiguous()
        for k, t in _named(tensors).items()
        if is_adapter(k) and (optimizer or not k.startswith(STATE_PREFIXES))
    }


def save_adapters(
    tensors: nn.Module | dict[str, Tensor], path: Path | str, *, optimizer: bool = False
) -> None:
    """Write only the adapters (safetensors): r·(in + out) numbers per target, no base."""
    state = adapter_state(tensors, optimizer=optimizer)
    if not state:
        raise ValueError("no LoRA adapters to save (names containing '.lora_')")
    save_file(state, str(path))


@torch.no_grad()
def load_adapters(target: nn.Module | dict[str, Tensor], path: Path | str) -> None:
    """Copy saved adapters (and moments, if saved) into a module or a Program's state that is
    LoRA-wrapped the same way."""
    saved, own = load_file(str(path)), _named(target)
    needed = adapter_state(own).keys()
    missing, extra = sorted(needed - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or extra:
        raise ValueError(
            f"{path}: adapters do not fit this model (missing {missing}, extra {extra})"
        )
    for name, t in saved.items():
        own[name].copy_(t)


def _named(tensors: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    return dict(tensors.named_parameters()) if isinstance(tensors, nn.Module) else tensors

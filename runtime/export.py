"""Trained weights out: a run directory's latest checkpoint as a Hugging Face model directory.

memfit trains a `transformers` model under its own parameter names, so a full fine-tune is
exported by loading the checkpoint into the model built from the run's MODEL and calling
`save_pretrained` (transformers writes its own format, shards and tied weights included). A
LoRA run exports only its adapters, in peft's layout (`adapter_config.json` +
`adapter_model.safetensors`), for `PeftModel.from_pretrained(base, DIR)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from compiler.errors import MemfitError
from compiler.lora import ADAPTER_MARK, adapter_state
from compiler.models import resolve_model
from compiler.models.hf import PREFIX, is_hf_model
from compiler.trace import STATE_PREFIXES
from runtime.checkpoint import latest_checkpoint, load_checkpoint
from runtime.train import CHECKPOINTS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# files of a model directory that describe its tokenizer, copied beside the exported weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExportError(MemfitError):
    """A run that cannot be exported; says which file or setting is at fault."""


def export_run(run_dir: Path, out: Path) -> str:
    """Write the run's latest weights to `out`; returns "model" or "adapter" (what was written)."""
    checkpoint = latest_checkpoint(Path(run_dir) / CHECKPOINTS)
    if checkpoint is None:
        raise ExportError(f"{run_dir}: no checkpoint under {Path(run_dir) / CHECKPOINTS}")
    tensors, state = load_checkpoint(checkpoint)
    config = state["config"]
    spec = str(config["model"])
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty; nothing was overwritten")
    out.mkdir(parents=True, exist_ok=True)
    if config.get("lora"):
        write_peft_adapter(tensors, config["lora"], spec, out)
        kind = "adapter"
    else:
        write_model(tensors, spec, out)
        kind = "model"
    if spec.startswith(PREFIX):
        source = Path(spec.removeprefix(PREFIX))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    return kind


def write_model(tensors: dict[str, Tensor], spec: str, out: Path) -> None:
    """The checkpoint's parameters and buffers in the model `spec` builds, `save_pretrained`."""
    example = resolve_model(spec, device="meta")  # every tensor is replaced: allocate nothing
    model = example.module
    if not is_hf_model(model):
        raise ExportError(
            f"MODEL {spec!r} is not a transformers model; export writes Hugging Face directories"
            " (train hf:DIR or a factory returning a PreTrainedModel)"
        )
    # moments are not weights; non-persistent buffers (rotary tables) are rebuilt on load
    weights = {k: t for k, t in tensors.items() if not k.startswith(STATE_PREFIXES)}
    transient = {n for n, _ in model.named_buffers()} - model.state_dict().keys()
    weights = {k: t for k, t in weights.items() if k not in transient}
    result = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # `assign` replaced the tied tensor on one side only
    still_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if result.unexpected_keys or still_meta:
        raise ExportError(
            f"the checkpoint does not fit {spec}: unexpected {sorted(result.unexpected_keys)[:3]},"
            f" missing {still_meta[:3]}"
        )
    model.save_pretrained(out)


def write_peft_adapter(
    tensors: dict[str, Tensor], lora: dict[str, Any], spec: str, out: Path
) -> None:
    """memfit's `X.lora_A` / `X.lora_B` as peft's `base_model.model.X.lora_A.weight` / ...B."""
    adapters = adapter_state(tensors)
    if not adapters:
        raise ExportError("the LoRA run's checkpoint holds no adapter tensors")
    weights = {f"base_model.model.{name}.weight": t for name, t in adapters.items()}
    modules = sorted({name.rpartition(ADAPTER_MARK)[0] for name in adapters})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(spec.removeprefix(PREFIX)).resolve())
        if spec.startswith(PREFIX)
        else spec,
        "r": int(lora["r"]),
        "lora_alpha": float(lora["alpha"]),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
        "inference_mode": True,
    }
    save_file({k: t.contiguous() for k, t in weights.items()}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

"""The settings a resumed run must share with the run that wrote its checkpoint.

A checkpoint's parameters and AdamW moments mean one thing only for the model, lowering,
optimizer, batch shape and data they were trained with: resuming with another `--grad-accum`
silently changes the tokens per step, another `--data` silently trains on other text. So a
checkpoint records these settings and `--resume` refuses, naming each flag, any that differ.
Nothing is taken from the checkpoint behind the user's back: the command line says what runs.
The schedule (`--steps`, `--lr`, `--warmup`), the mesh (`--dp/--tp/--zero`) and checkpointing
flags may change on resume; checkpoints are full, so they load on any mesh.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.errors import MemfitError

if TYPE_CHECKING:
    from pipelines.manifest import Manifest
    from runtime.train_config import TrainConfig

FLAGS = {
    "model": "MODEL",
    "precision": "--precision",
    "lora": "--lora",
    "quantize_base": "--quantize-base",
    "optimizer": "--optimizer",
    "batch_size": "--batch",
    "seq_len": "--seq",
    "grad_accum": "--grad-accum",
    "data": "--data",
}
UNRECORDED = {"optimizer": "adamw"}  # what checkpoints from before a setting was recorded used


class SettingsMismatch(MemfitError):
    """`--resume` with a command whose settings differ from the checkpoint's."""


def run_settings(cfg: TrainConfig, seq_len: int, manifest: Manifest) -> dict[str, Any]:
    """The settings of FLAGS as JSON; the data by its split checksums, wherever it lives."""
    return {
        "model": cfg.model,
        "precision": cfg.precision,
        "lora": None if cfg.lora is None else _lora_text(asdict(cfg.lora)),
        "quantize_base": cfg.quantize_base,
        "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size,
        "seq_len": seq_len,
        "grad_accum": cfg.grad_accum,
        "data": {split: info.sha256 for split, info in sorted(manifest.splits.items())},
    }


def _lora_text(lora: dict[str, Any]) -> str:
    return f"r={lora['r']},alpha={lora['alpha']:g},targets={','.join(lora['targets'])}"


def check_resume(recorded: dict[str, Any] | None, current: dict[str, Any], where: Path) -> None:
    """Raise SettingsMismatch naming every flag whose value differs from the checkpoint's."""
    if recorded is None:
        raise SettingsMismatch(
            f"--resume: {where} records no run settings (written by an older memfit); start a"
            " new run with another --out"
        )
    recorded = UNRECORDED | recorded
    differ = [name for name in FLAGS if recorded.get(name) != current.get(name)]
    if not differ:
        return
    parts = [
        f"{FLAGS[name]} {_show(name, recorded.get(name))} (this command: "
        f"{_show(name, current.get(name))})"
        for name in differ
    ]
    raise SettingsMismatch(
        f"--resume: checkpoint {where} was written with " + "; ".join(parts) + ". Resume with"
        " the run's own settings, or start a new run with another --out; nothing was changed"
    )


def _show(name: str, value: Any) -> str:
    if name == "data" and isinstance(value, dict):
        return f"train split sha256 {str(value.get('train', '?'))[:12]}…"
    return "none" if value is None else str(value)

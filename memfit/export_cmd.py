"""`memfit export RUN_DIR --out DIR`: a run's trained weights as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from runtime.export import export_run


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
def export_command(run_dir: Path, out: Path) -> None:
    """Write RUN_DIR's trained weights to --out as a Hugging Face directory.

    The latest checkpoint becomes the full model (AutoModelForCausalLM.from_pretrained loads
    it) or, for a LoRA run, a peft adapter (PeftModel.from_pretrained loads it)."""
    kind = export_run(run_dir, out)
    what = "peft adapter" if kind == "adapter" else "Hugging Face model"
    Console().print(f"wrote {what} to {out}")

"""Tensor parallelism on Hugging Face models: the layout comes from compiler/models/adapter.py.

Two gloo ranks with --tp 2 train hf:DIR (Llama with GQA, Qwen2 with tied embeddings and q/k/v
biases) as one process does: losses at every step and every tensor of the final checkpoint,
with test_distributed's tolerances.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compiler.models.adapter import tp_layout  # noqa: E402
from compiler.models.hf import load_hf  # noqa: E402
from tests.test_distributed import (  # noqa: E402
    LOSS_TOL,
    TENSOR_TOL,
    _config,
    _final,
    _losses,
    _one_process,
    _spawn,
)
from tests.test_hf_models import tiny_config  # noqa: E402

FAMILIES = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(one process, two tp ranks) run directories per family, 3 steps on byte data."""
    from pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("hf-tp")
    compiler = Path(__file__).resolve().parents[1] / "compiler"
    sources = sorted(p for p in compiler.glob("*.py") if p.stat().st_size)
    data = root / "data"
    prepare(sources[:4], data, "byte", val_fraction=0.0, progress=False)
    jobs, out = [], {}
    for family in FAMILIES:
        directory = root / family
        config = tiny_config(family)
        config.vocab_size = 256  # the byte data's vocabulary
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        cfg = _config(data, root / f"{family}-one", model=f"hf:{directory}", steps=3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _one_process(cfg)
        finally:
            torch.set_num_threads(threads)
        jobs.append(replace(cfg, out=root / f"{family}-tp", dp=1, tp=2))
        out[family] = (cfg.out, root / f"{family}-tp")
    _spawn(2, jobs)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_hf_model_trains_as_one_process(
    family: str, runs: dict[str, tuple[Path, Path]]
) -> None:
    one, two = runs[family]
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), **LOSS_TOL)
    got, want = _final(two), _final(one)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TENSOR_TOL, msg=name)


def test_layouts_are_found_from_module_structure(tmp_path: Path) -> None:
    tiny_config("mistral").save_pretrained(tmp_path)
    layout = tp_layout(load_hf(f"hf:{tmp_path}", device="meta").module)
    assert layout is not None and layout.blocks == "model.layers"
    tiny_config("gpt2").save_pretrained(tmp_path / "gpt2")  # Conv1D projections: no layout
    assert tp_layout(load_hf(f"hf:{tmp_path / 'gpt2'}", device="meta").module) is None

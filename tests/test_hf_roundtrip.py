"""Pretrained weights in, trained weights out, through the command line.

A tiny Llama with its own tokenizer is saved with `save_pretrained` (random init, nothing
downloaded); `memfit prepare --tokenizer hf:DIR`, `memfit train hf:DIR`, `memfit export`; then
`from_pretrained` (or peft) must give the logits of memfit's trained parameters, exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from compiler.models import resolve_model  # noqa: E402
from compiler.models.adapter import ATTN_IMPLEMENTATION  # noqa: E402
from memfit.cli import main  # noqa: E402
from runtime.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from runtime.train import TrainConfig, Trainer  # noqa: E402
from tests.test_hf_models import tiny_config  # noqa: E402

VOCAB = 128
TEXT = "the quick brown fox jumps over the lazy dog while memfit plans every byte of a step\n"


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-family directory as the Hub has them: config, sharded weights, tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_config("llama", vocab_size=VOCAB)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, max_shard_size="40KB")  # sharded, with an index
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "</s>"])
    tokenizer.train_from_iterator([TEXT], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory


@pytest.fixture(scope="module")
def data_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(TEXT * 200)
    out = root / "data"
    _run("prepare", str(root / "text.txt"), "--out", str(out), "--tokenizer", f"hf:{model_dir}")
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.arange(16).reshape(1, 16) % VOCAB
    with torch.no_grad():
        return model(tokens).logits


def test_prepare_uses_the_models_tokenizer(model_dir: Path, data_dir: Path) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert manifest["tokenizer"]["eos_id"] == tokenizer.token_to_id("</s>")
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size() <= VOCAB


def test_training_starts_from_the_directorys_weights(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        model=f"hf:{model_dir}", data=data_dir, steps=1, batch_size=2, seq_len=16, out=tmp_path
    )
    state = Trainer(cfg).state
    saved = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, tensor in saved.named_parameters():
        assert torch.equal(state[name], tensor), name


def test_full_fine_tune_exports_what_from_pretrained_loads(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "exported"
    args = ["--data", str(data_dir), "--steps", "5", "--batch", "2", "--seq", "16"]
    _run("train", f"hf:{model_dir}", *args, "--out", str(run), "--lr", "1e-2")
    _run("export", str(run), "--out", str(out))
    trained, _ = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    reference = resolve_model(f"hf:{model_dir}").module
    before = _logits(reference)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trained[name])
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    )
    assert not torch.equal(_logits(reference), before)  # five steps moved the weights
    torch.testing.assert_close(_logits(exported), _logits(reference), rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()


def test_lora_run_exports_a_peft_adapter(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "adapter"
    args = ["--data", str(data_dir), "--steps", "3", "--batch", "2", "--seq", "16"]
    _run("train", f"hf:{model_dir}", *args, "--out", str(run), "--lora", "r=4,targets=q,v")
    _run("export", str(run), "--out", str(out))
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    trained, _ = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert any(t.abs().sum() > 0 for n, t in trained.items() if n.endswith("lora_B"))
    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    )
    merged = resolve_model(f"hf:{model_dir}").module
    with torch.no_grad():
        for name, module in merged.named_modules():
            if f"{name}.lora_A" in trained:
                a, b = trained[f"{name}.lora_A"], trained[f"{name}.lora_B"]
                module.weight += (b @ a) * (16.0 / 4)
    loaded = peft.PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(loaded), _logits(merged), rtol=1e-5, atol=1e-6)

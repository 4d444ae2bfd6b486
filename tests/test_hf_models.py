"""Hugging Face causal LMs compile, plan and train, equal to eager PyTorch (the README's table).

Every family is built from a tiny config (random init, nothing downloaded) and loaded the way
`hf:DIR` loads it. Tolerances (fp32): rtol 1e-5, atol 1e-6 for loss, gradients and parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

from compiler.compile import CompileOptions, compile_model  # noqa: E402
from compiler.lora import target_modules  # noqa: E402
from compiler.models import resolve_model  # noqa: E402
from compiler.models.adapter import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    LORA_TARGETS,
    decoder_blocks,
)
from compiler.models.hf import HFModelError, as_example, load_hf  # noqa: E402
from compiler.passes.recompute import RecomputePolicy  # noqa: E402
from compiler.trace import AdamW  # noqa: E402
from examples import ExampleModel  # noqa: E402
from examples.loss import lm_loss  # noqa: E402
from runtime.program import Program  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-6}
LORA_NAMES = {s.rpartition(".")[2] for t in ("q", "v") for s in LORA_TARGETS[t]}
TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
GQA = {"num_key_value_heads": 2}
MOE = {"num_experts": 4, "num_experts_per_tok": 2}
# family → (config class, what differs from TINY); each row of the README's table is one entry.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", GQA),
    "qwen2": ("Qwen2Config", GQA | {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", GQA | {"sliding_window": 8}),  # the window is shorter than seq
    "gemma": ("GemmaConfig", GQA | {"head_dim": 16}),  # not hidden / heads
    "phi3": ("Phi3Config", GQA | {"pad_token_id": 0}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "mixtral": ("MixtralConfig", GQA | {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        GQA | MOE | {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    ),
    "olmoe": ("OlmoeConfig", GQA | MOE),
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """The family's transformers config at test size (`overrides` on top)."""
    cls_name, changes = FAMILIES[family]
    keys = TINY if family != "gpt2" else {"vocab_size": 128}
    return getattr(transformers, cls_name)(**(keys | changes | overrides))


def tiny_model(family: str, seed: int = 0) -> ExampleModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    return as_example(model, f"hf:{family}")


def batch(vocab: int, seed: int, size: int = 2, seq: int = 16) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, vocab, (size, seq + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compiles_plans_and_trains_like_eager(family: str) -> None:
    """Loss and every gradient of two compiled steps equal eager; parameters equal AdamW's."""
    example = tiny_model(family)
    model = example.module
    options = CompileOptions(batch_size=2, seq_len=16, return_grads=True, optimizer=AdamW())
    compiled = compile_model(example, lm_loss, options)
    assert compiled.plan is not None and compiled.plan.arena_bytes > 0
    program = Program.from_module(compiled.graph, model)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for step in range(2):
        x, y = batch(example.vocab_size, seed=step)
        loss, *grads = program.step(x, y, lr=1e-3)
        eager = lm_loss(model(x).logits, y)
        eager.backward()
        torch.testing.assert_close(loss, eager.detach(), **TOL)
        for (n, p), g in zip(trainable, grads, strict=True):
            torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")
            p.grad = g.clone()  # AdamW is compared on identical gradients (see test_trace)
        reference.step()
        reference.zero_grad()
        for n, p in trainable:
            torch.testing.assert_close(
                program.state[n], p.detach(), **TOL, msg=lambda m, n=n: f"param {n}: {m}"
            )


def _plan(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from memfit.cli import main

    result = CliRunner().invoke(main, ["plan", *args, "--batch", "2", "--seq", "16"])
    return result.exit_code, " ".join(result.output.split())


def test_plan_from_a_config_alone(tmp_path: Path) -> None:
    """config.json without weights plans on the meta device, also data+tensor parallel."""
    tiny_config("qwen2").save_pretrained(tmp_path)
    code, text = _plan(f"hf:{tmp_path}")
    assert code == 0 and "step peak" in text, text
    code, text = _plan(f"hf:{tmp_path}", "--dp", "2", "--tp", "2", "--zero", "1")
    assert code == 0 and "rank" in text, text


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    code, text = _plan(f"hf:{tmp_path}")
    assert code == 2 and "no config.json" in text and str(tmp_path) in text, text


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "model_type"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "architectures"),
    ],
)
def test_non_causal_architecture_names_its_config_line(
    tmp_path: Path, config: dict[str, Any], key: str
) -> None:
    text = json.dumps({"hidden_size": 32} | config, indent=2)
    (tmp_path / "config.json").write_text(text)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if f'"{key}"' in s)
    code, out = _plan(f"hf:{tmp_path}")
    assert code == 2 and f"config.json:{line}" in out and "causal" in out, out


def test_weights_that_do_not_match_the_config_name_the_file(tmp_path: Path) -> None:
    tiny_model("llama").module.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 48}))
    with pytest.raises(HFModelError) as info:
        load_hf(f"hf:{tmp_path}")
    message = str(info.value)
    assert "model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape [32, 64]" in (
        message
    )
    assert "config.json makes it [32, 48]" in message


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_per_layer_checkpointing_finds_the_blocks_and_equals_eager(family: str) -> None:
    example = tiny_model(family)
    blocks = decoder_blocks(example.module)
    assert blocks is example.module.model.layers
    policy = RecomputePolicy(checkpoint_layers=len(blocks))
    options = CompileOptions(batch_size=2, seq_len=16, return_grads=True, recompute=policy)
    compiled = compile_model(example, lm_loss, options)
    default = compile_model(tiny_model(family), lm_loss, CompileOptions(2, 16, return_grads=True))
    assert compiled.plan.recompute["values"] and compiled.plan.recompute != default.plan.recompute
    program = Program.from_module(compiled.graph, example.module)
    x, y = batch(example.vocab_size, seed=0)
    loss, *grads = program.step(x, y)
    eager = lm_loss(example.module(x).logits, y)
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), **TOL)
    for (n, p), g in zip(example.module.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_lora_targets_q_v_name_every_layers_projections(family: str) -> None:
    """`--lora targets=q,v` finds the family's query/value Linear in every decoder layer."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    chosen = target_modules(model, ("q", "v"))
    layers = decoder_blocks(model)
    assert {name.split(".")[2] for name in chosen} == {str(i) for i in range(len(layers))}
    assert all(name.split(".")[-1] in LORA_NAMES for name in chosen), chosen


def test_gpt2_has_no_lora_targets_and_says_which_modules_exist() -> None:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    with pytest.raises(ValueError, match="match no Linear module"):
        target_modules(model, ("q", "v"))


def test_a_factory_returning_a_pretrained_model_is_made_traceable(tmp_path: Path) -> None:
    """`file.py:factory` may return a transformers model as it comes (any attention, cache on)."""
    (tmp_path / "factory.py").write_text(
        "import transformers\n\n"
        "def build():\n"
        "    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32,"
        " intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,"
        " max_position_embeddings=32)\n"
        "    return transformers.AutoModelForCausalLM.from_config(config,"
        ' attn_implementation="eager")\n'
    )
    example = resolve_model(f"{tmp_path / 'factory.py'}:build")
    model = example.module
    assert (example.vocab_size, example.block_size) == (64, 32)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION and not model.config.use_cache
    compiled = compile_model(example, lm_loss, CompileOptions(2, 8, return_grads=True))
    x, y = batch(64, seed=0, seq=8)
    loss, *_ = Program.from_module(compiled.graph, model).step(x, y)
    torch.testing.assert_close(loss, lm_loss(model(x).logits, y).detach(), **TOL)

"""LoRA: the base is frozen in the graph (no gradient, no optimizer state), the adapters'
gradients equal eager PyTorch's, merge/unmerge round-trip, and checkpoints hold adapters only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compiler import ops
from compiler.compile import CompileOptions, compile_model
from compiler.ir import Role
from compiler.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
    target_modules,
)
from compiler.models import resolve_model
from examples import ExampleModel
from examples.loss import lm_loss
from runtime.eager import run_graph
from runtime.program import Program, initial_state

B, T = 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = LoraConfig(r=4, alpha=8)


def lora_model(name: str, config: LoraConfig = SMALL) -> ExampleModel:
    """A seeded model with adapters whose B is random (at init B = 0 and A gets no gradient)."""
    torch.manual_seed(0)
    model = resolve_model(name)
    apply_lora(model.module, config)
    with torch.no_grad():
        for m in model.module.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(std=0.05)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def test_parse_reads_the_cli_spelling_and_names_bad_keys() -> None:
    assert LoraConfig.parse("r=8,alpha=16,targets=q,k,v,o") == LoraConfig(
        8, 16.0, ("q", "k", "v", "o")
    )
    assert LoraConfig.parse("targets=fc, r=2") == LoraConfig(2, 16.0, ("fc",))
    assert LoraConfig.parse("r=4").scaling == 4.0
    with pytest.raises(ValueError, match="unknown keys \\['rank'\\]"):
        LoraConfig.parse("rank=8")
    with pytest.raises(ValueError, match="expected key=value"):
        LoraConfig.parse("q,k")
    with pytest.raises(ValueError, match="r ≥ 1"):
        LoraConfig.parse("r=0")


@pytest.mark.parametrize(
    ("name", "targets", "expected"),
    [
        ("gpt2-tiny", ("q", "k", "v", "o"), ["attn.qkv", "attn.proj"]),
        ("gpt2-tiny", ("v",), ["attn.qkv"]),  # GPT-2's q, k, v are one fused Linear
        ("gpt2-tiny", ("up", "down"), ["mlp.fc", "mlp.proj"]),
        ("gpt2-tiny", ("proj",), ["attn.proj", "mlp.proj"]),  # a literal module-name suffix
        ("llama-tiny", ("q", "v"), ["attention.wq", "attention.wv"]),
        (
            "llama-tiny",
            ("gate", "up", "down"),
            ["feed_forward.w1", "feed_forward.w3", "feed_forward.w2"],
        ),
    ],
)
def test_target_names_map_to_the_example_modules(
    name: str, targets: tuple[str, ...], expected: list[str]
) -> None:
    with torch.device("meta"):
        module = resolve_model(name).module
    chosen = target_modules(module, targets)
    assert chosen == [f"blocks.{i}.{s}" for i in range(2) for s in expected]  # module order


def test_unknown_targets_list_the_linear_modules() -> None:
    with torch.device("meta"):
        module = resolve_model("gpt2-tiny").module
    with pytest.raises(ValueError, match=r"match no Linear module.*'qkv'"):
        target_modules(module, ("wq",))


@pytest.fixture(scope="module")
def gpt2_lora() -> tuple[ExampleModel, object]:
    model = lora_model("gpt2-tiny")
    options = CompileOptions(batch_size=B, seq_len=T, return_grads=True)
    return model, compile_model(model, lm_loss, options)


def test_base_weights_get_no_gradient_and_no_optimizer_state(gpt2_lora: tuple) -> None:
    model, step = gpt2_lora
    graph = step.graph
    adapters = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert adapters and all(".lora_" in n for n in adapters)
    states = [v.name for v in graph.inputs if v.role is Role.OPTIMIZER_STATE]
    assert sorted(states) == sorted(f"{p}.{n}" for p in ("exp_avg", "exp_avg_sq") for n in adapters)
    assert len(graph.outputs) == 1 + len(adapters)  # the loss, then one gradient per adapter
    written = {v.name for n in graph.nodes for v in ops.written(n)}
    assert written == set(adapters) | set(states)
    base = [v for v in graph.inputs if v.name.endswith(".base.weight")]
    assert len(base) == 4 and all(v.role is Role.PARAM for v in base)


def test_adapter_gradients_equal_eager_pytorch(gpt2_lora: tuple) -> None:
    model, step = gpt2_lora
    tokens, targets = batch()
    feeds = {"tokens": tokens, "targets": targets}
    feeds |= {
        "lr": torch.tensor(0.0, dtype=torch.float64),
        "step": torch.tensor(1.0, dtype=torch.float64),
    }
    loss, *grads = run_graph(step.graph, initial_state(step.graph, model.module) | feeds)
    eager = lm_loss(model.module(tokens), targets)
    adapters = [p for p in model.module.parameters() if p.requires_grad]
    expected = torch.autograd.grad(eager, adapters)
    torch.testing.assert_close(loss, eager.detach())
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_llama_adapter_gradients_equal_eager_pytorch() -> None:
    model = lora_model("llama-tiny", LoraConfig(r=2, alpha=4, targets=("q", "v", "gate")))
    step = compile_model(model, lm_loss, CompileOptions(batch_size=B, seq_len=T, optimizer=None))
    tokens, targets = batch(2)
    feeds = {"tokens": tokens, "targets": targets}
    loss, *grads = run_graph(step.graph, initial_state(step.graph, model.module) | feeds)
    adapters = [p for p in model.module.parameters() if p.requires_grad]
    expected = torch.autograd.grad(lm_loss(model.module(tokens), targets), adapters)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_training_moves_the_adapters_only_and_saves_them_alone(
    gpt2_lora: tuple, tmp_path: Path
) -> None:
    model, step = gpt2_lora
    program = Program.from_module(step.graph, model.module)
    before = {k: t.clone() for k, t in program.parameters.items()}
    tokens, targets = batch()
    losses = [float(program.step(tokens, targets, lr=1e-2)[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    moved = {k for k, t in program.parameters.items() if not torch.equal(t, before[k])}
    assert moved and all(".lora_" in k for k in moved)
    path = tmp_path / "adapters.safetensors"
    save_adapters(program.state, path)
    adapters = {k for k in program.parameters if ".lora_" in k}
    assert load_file(str(path)).keys() == adapters
    assert path.stat().st_size < 0.25 * sum(t.nbytes for t in program.parameters.values())
    save_adapters(program.state, path, optimizer=True)  # resumable: the moments come along
    states = {v.name for v in step.graph.inputs if v.role is Role.OPTIMIZER_STATE}
    assert load_file(str(path)).keys() == adapters | states
    resumed = Program.from_module(step.graph, model.module)
    load_adapters(resumed.state, path)
    assert all(torch.equal(resumed.state[k], program.state[k]) for k in adapters | states)


def test_load_adapters_restores_outputs_and_refuses_other_shapes(tmp_path: Path) -> None:
    trained, fresh = lora_model("gpt2-tiny"), lora_model("gpt2-tiny")
    with torch.no_grad():
        for m in fresh.module.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.zero_()
    tokens, _ = batch()
    path = tmp_path / "a.safetensors"
    save_adapters(trained.module, path)
    load_adapters(fresh.module, path)
    torch.testing.assert_close(fresh.module(tokens), trained.module(tokens))
    other = lora_model("gpt2-tiny", LoraConfig(r=4, targets=("fc",)))
    with pytest.raises(ValueError, match="do not fit this model"):
        load_adapters(other.module, path)


def test_merge_unmerge_and_export_keep_the_function() -> None:
    model = lora_model("gpt2-tiny")
    tokens, _ = batch()
    with torch.no_grad():
        expected = model.module(tokens)
        layer = model.module.blocks[0].attn.qkv
        weight = layer.base.weight.clone()
        for m in model.module.modules():
            if isinstance(m, LoraLinear):
                m.merge()
        torch.testing.assert_close(model.module(tokens), expected, rtol=1e-5, atol=1e-5)
        for m in model.module.modules():
            if isinstance(m, LoraLinear):
                m.unmerge()
        torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-6)
        merge_lora(model.module)
        assert type(model.module.blocks[0].attn.qkv) is nn.Linear
        assert not any(".lora_" in n for n, _ in model.module.named_parameters())
        torch.testing.assert_close(model.module(tokens), expected, rtol=1e-5, atol=1e-5)


def test_apply_twice_is_a_no_op() -> None:
    model = lora_model("gpt2-tiny")
    names = sorted(n for n, _ in model.module.named_parameters())
    apply_lora(model.module, SMALL)
    assert sorted(n for n, _ in model.module.named_parameters()) == names

"""Pruning: magnitude masks keep the right weights (unstructured and n:m), the mask is applied
in the graph so pruned weights get zero gradient and stay zero through training, and
`memfit prune` reports the validation-loss cost."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from compiler.compile import CompileOptions, compile_model
from compiler.ir import Phase, Role
from compiler.models import resolve_model
from compiler.prune import MaskedLinear, magnitude_mask, parse_pattern, prune_linears
from examples.loss import lm_loss
from memfit.prune_cmd import prune_command, revived
from runtime.program import Program
from tests.strategies import examples

pytestmark = pytest.mark.usefixtures("one_thread")


@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 6).map(lambda g: 4 * g),
    sparsity=st.sampled_from([0.25, 0.5, 0.75]),
    seed=st.integers(0, 2**16),
)
@examples(40)
def test_masks_keep_the_largest_magnitudes(
    rows: int, cols: int, sparsity: float, seed: int
) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_mask(w, sparsity, None)
    assert int(mask.sum()) == w.numel() - round(sparsity * w.numel())
    if mask.any() and (~mask).any():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()
    n = round(4 * (1 - sparsity))
    groups = magnitude_mask(w, sparsity, (n, 4)).reshape(rows, -1, 4)
    assert (groups.sum(dim=-1) == n).all()
    magnitude = w.abs().reshape(rows, -1, 4)
    kept = magnitude.masked_fill(~groups, float("inf")).amin(dim=-1)
    dropped = magnitude.masked_fill(groups, -1.0).amax(dim=-1)
    assert (kept >= dropped).all()


def test_patterns_parse_and_must_match_the_sparsity() -> None:
    assert parse_pattern("unstructured", 0.3) is None
    assert parse_pattern("2:4", 0.5) == (2, 4)
    assert parse_pattern("n:m", 0.75) == (1, 4)
    for text, sparsity in [("2:4", 0.6), ("n:m", 0.3), ("5:4", -0.25), ("two:four", 0.5)]:
        with pytest.raises(ValueError, match="--structured"):
            parse_pattern(text, sparsity)


def test_n_m_needs_whole_groups_along_the_input() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        magnitude_mask(torch.ones(2, 6), 0.5, (2, 4))


@pytest.fixture(scope="module")
def pruned() -> tuple:
    torch.manual_seed(0)
    model = resolve_model("gpt2-tiny")
    achieved = prune_linears(model.module, 0.5, (2, 4))
    options = CompileOptions(batch_size=2, seq_len=16, return_grads=True)
    return model, achieved, compile_model(model, lm_loss, options).graph


def test_every_unshared_linear_is_masked_and_the_tied_head_is_not(pruned: tuple) -> None:
    model, achieved, _ = pruned
    assert len(achieved) == 8 and all(s == 0.5 for s in achieved.values())
    assert "lm_head" not in achieved and type(model.module.lm_head) is torch.nn.Linear
    masked = [m for m in model.module.modules() if isinstance(m, MaskedLinear)]
    assert all((m.weight[~m.weight_mask] == 0).all() for m in masked)
    names = {n for n, _ in model.module.named_parameters()}
    assert "blocks.0.attn.qkv.weight" in names  # the Linear's names are kept


def test_the_mask_is_a_buffer_multiplied_into_the_weight_and_its_gradient(pruned: tuple) -> None:
    _, _, graph = pruned
    masks = [v for v in graph.inputs if v.name.endswith("weight_mask")]
    assert len(masks) == 8 and all(v.role is Role.BUFFER and v.dtype == torch.bool for v in masks)
    users = graph.users()
    for mask in masks:  # W ⊙ M in the forward; the backward masks W's gradient the same way
        readers = users[id(mask)]  # (and may recompute W ⊙ M rather than keep it)
        assert {n.op for n in readers} == {"mul.Tensor"}
        forward = [n for n in readers if n.phase is Phase.FORWARD]
        assert [{v.name for v in n.inputs} for n in forward] == [
            {mask.name.removesuffix("_mask"), mask.name}
        ]
        assert any(n.phase is Phase.BACKWARD for n in readers)


def test_pruned_weights_get_zero_gradient_and_stay_zero(pruned: tuple) -> None:
    model, _, graph = pruned
    program = Program.from_module(graph, model.module)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    trainable = [n for n, p in model.module.named_parameters() if p.requires_grad]
    masks = {n: program.state[n + "_mask"] for n in trainable if n + "_mask" in program.state}
    losses = []
    for _ in range(5):
        loss, *grads = program.step(tokens, targets, lr=1e-2)
        losses.append(float(loss))
        by_name = dict(zip(trainable, grads, strict=True))
        assert all((by_name[n][~m] == 0).all() for n, m in masks.items())
    assert losses[-1] < losses[0]
    assert all((program.state[n][~m] == 0).all() for n, m in masks.items())
    assert revived(model.module) == 0


@pytest.mark.slow
def test_prune_command_reports_the_cost_on_the_default_corpus() -> None:
    args = ["--steps", "20", "--finetune-steps", "5", "--val-batches", "2", "--batch", "4"]
    result = CliRunner().invoke(prune_command, [*args, "--seq", "32", "--structured", "2:4"])
    assert result.exit_code == 0, result.output
    assert "pruned, one-shot" in result.output and "pruned + fine-tuned" in result.output
    assert "non-zero after fine-tuning: 0" in result.output

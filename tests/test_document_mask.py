"""Document masking for packed training: with the model's `document_eos` set, attention stays
inside each document and positions restart at each, so the packed loss equals the per-document
losses computed separately (token-weighted: each document's summed loss over all tokens) —
eagerly and through the compiled step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from compiler import attention
from compiler.trace import trace
from examples import build_example
from examples.layers import documents
from examples.loss import lm_loss
from runtime.program import Program

EOS = 0
LENGTHS = [(5, 9, 3, 7), (12, 12)]  # documents per row, each ending with EOS (24 tokens + 1)


def _packed(vocab: int) -> Tensor:
    """Rows of documents ending with EOS; one extra token for the last target."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for lengths in LENGTHS:
        docs = [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]
        for d in docs:
            d[-1] = EOS
        rows.append(torch.cat([*docs, torch.randint(1, vocab, (1,), generator=gen)]))
    return torch.stack(rows)


def _per_document(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Each document run alone (no mask needed), cross-entropy summed, over all tokens."""
    total = torch.zeros(())
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            logits = model(x[row : row + 1, start : start + n])
            target = y[row, start : start + n]
            total = total + F.cross_entropy(logits[0], target, reduction="sum")
            start += n
    return total / y.numel()


def test_documents_gives_segments_and_restarting_positions() -> None:
    idx = torch.tensor([[4, 0, 5, 6, 0, 7], [0, 0, 3, 3, 3, 3]])
    segments, positions = documents(idx, EOS)
    assert segments.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_packed_loss_with_the_mask_equals_the_documents_alone(name: str) -> None:
    torch.manual_seed(0)
    model = build_example(name).module
    packed = _packed(model.tok_emb.num_embeddings)
    x, y = packed[:, :-1], packed[:, 1:]
    separate = _per_document(model, x, y)
    unmasked = lm_loss(model(x), y)
    model.document_eos = EOS
    masked = lm_loss(model(x), y)
    torch.testing.assert_close(masked, separate, rtol=1e-5, atol=1e-6)
    assert (unmasked - separate).abs() > 10 * (1e-5 * separate + 1e-6)  # the mask makes it equal

    graph = trace(model, lm_loss, (x, y), return_grads=True)
    forward = [n for n in graph.nodes if n.op == attention.FORWARD]
    assert forward and all(n.args[3] is not None for n in forward)  # segment ids, no [T, T]
    assert not [v for v in graph.values() if v.shape[-2:] == (24, 24)]
    loss, *grads = Program.from_module(graph, model).step(x, y, lr=0.0)
    torch.testing.assert_close(loss, separate, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    masked.backward()
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_document_mask_option_sets_the_data_eos_or_names_the_problem() -> None:
    from pipelines.manifest import Manifest
    from runtime.train import TrainingError, mask_documents

    manifest = Manifest.__new__(Manifest)
    object.__setattr__(manifest, "tokenizer", {"kind": "byte", "eos_id": 7})
    model = build_example("llama-tiny").module
    mask_documents(model, manifest, "llama-tiny")
    assert model.document_eos == 7
    with pytest.raises(TrainingError, match="--document-mask: my.py:f has no `document_eos`"):
        mask_documents(torch.nn.Linear(2, 2), manifest, "my.py:f")

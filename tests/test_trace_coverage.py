"""What library models do in their forward traces: constants, list indexing, in-place updates of
temporaries, ModelOutput returns; what cannot be traced fails naming the line (library code
included) and, where one is known, the setting that avoids it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from compiler.compile import CompileOptions, compile_model
from compiler.errors import TraceError, UnsupportedOpError
from compiler.trace import CONSTANT_ELEMENTS, trace
from examples import ExampleModel
from examples.loss import lm_loss
from runtime.program import Program

TOL = {"rtol": 1e-5, "atol": 1e-6}
VOCAB, WIDTH, SEQ = 32, 8, 8


class Tiny(nn.Module):
    """Embedding → `body` → head; subclasses put one library idiom in `body`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def body(self, h: Tensor) -> Tensor:
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.emb(x)))


class Constants(Tiny):
    def body(self, h: Tensor) -> Tensor:
        scale = torch.tensor([float(i) for i in range(WIDTH)], device=h.device)
        empty = torch.tensor([], device=h.device)  # what a KV cache starts from
        return h * scale + empty.sum() + h[..., [-1], :]  # list indexing, as HF slices logits


class InPlaceTemporary(Tiny):
    def body(self, h: Tensor) -> Tensor:
        weights = h.softmax(-1).topk(2, dim=-1).values
        weights /= weights.sum(dim=-1, keepdim=True)  # MoE routing renormalises in place
        return h * weights.sum(-1, keepdim=True)


class InPlaceView(Tiny):
    def body(self, h: Tensor) -> Tensor:
        h = h * 2
        h[..., 0].mul_(3)  # writes through a view into h
        return h


class BigConstant(Tiny):
    def body(self, h: Tensor) -> Tensor:
        table = torch.tensor([float(i) for i in range(CONSTANT_ELEMENTS + 1)])
        return h + table.mean()


class DataDependent(Tiny):
    def body(self, h: Tensor) -> Tensor:
        if h.sum() > 0:  # control flow on a value: no static graph
            return h * 2
        return h


class Dropout(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def body(self, h: Tensor) -> Tensor:
        return self.drop(h)


class ReturnsOutput(Tiny):
    def forward(self, x: Tensor) -> SimpleNamespace:  # like a Hugging Face ModelOutput
        return SimpleNamespace(logits=super().forward(x), loss=None)


def _batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def _line(cls: type, text: str) -> str:
    """`tests/test_trace_coverage.py:N` of the line in `cls` containing `text`."""
    import inspect

    lines, start = inspect.getsourcelines(cls)
    n = next(i for i, line in enumerate(lines) if text in line)
    return f"test_trace_coverage.py:{start + n}"


def _logits(out: object) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


@pytest.mark.parametrize("cls", [Constants, InPlaceTemporary, ReturnsOutput])
def test_library_idioms_compile_and_equal_eager(cls: type[Tiny]) -> None:
    torch.manual_seed(0)
    model = cls()
    example = ExampleModel(model, VOCAB, SEQ, cls.__name__)
    options = CompileOptions(batch_size=2, seq_len=SEQ, return_grads=True)
    compiled = compile_model(example, lm_loss, options)
    program = Program.from_module(compiled.graph, model)
    x, y = _batch()
    loss, *grads = program.step(x, y)
    eager = lm_loss(_logits(model(x)), y)
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), **TOL)
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


def test_constants_plan_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = Constants()
    compiled = compile_model(ExampleModel(model, VOCAB, SEQ, "c"), lm_loss, CompileOptions(2, SEQ))
    assert compiled.plan is not None


@pytest.mark.parametrize(
    ("cls", "error", "line", "says"),
    [
        (InPlaceView, UnsupportedOpError, "mul_(3)", "writes in place into a view"),
        (BigConstant, TraceError, "torch.tensor(", "register_buffer"),
        (DataDependent, TraceError, "if h.sum()", "static graphs"),
        (Dropout, UnsupportedOpError, "self.drop(h)", "model.eval()"),
    ],
)
def test_what_cannot_trace_names_its_line(
    cls: type[Tiny], error: type[Exception], line: str, says: str
) -> None:
    with pytest.raises(error) as info:
        trace(cls(), lm_loss, _batch())
    assert _line(cls, line) in str(info.value) and says in str(info.value)


def test_a_library_failure_names_the_library_line(tmp_path: Path) -> None:
    """Code under site-packages is where a model broke, not the user's one-line factory."""
    library = tmp_path / "site-packages" / "somelib"
    library.mkdir(parents=True)
    (library / "modeling.py").write_text(
        "import torch\n\ndef route(h):\n    return h[h > 0].sum() * h\n"
    )
    spec = importlib.util.spec_from_file_location("somelib_modeling", library / "modeling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    class UsesLibrary(Tiny):
        def body(self, h: Tensor) -> Tensor:
            return module.route(h)

    with pytest.raises(TraceError, match=r"site-packages/somelib/modeling\.py:4"):
        trace(UsesLibrary(), lm_loss, _batch())


def test_a_forward_without_logits_is_refused() -> None:
    class ReturnsDict(Tiny):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"scores": super().forward(x)}

    with pytest.raises(TraceError, match="needs the logits"):
        trace(ReturnsDict(), lm_loss, _batch())

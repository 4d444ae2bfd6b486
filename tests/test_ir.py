"""The text form round-trips: dump → parse → dump is identical."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from compiler.ir import Graph, Node, ParseError, Phase, Role, Value, dump, parse
from tests.strategies import examples, graphs


@given(graphs())
@examples(80)
def test_dump_parse_dump_is_identical(graph: Graph) -> None:
    text = dump(graph)
    assert dump(parse(text)) == text


def test_every_literal_kind_round_trips() -> None:
    """Syntax only: parse does not check ops, so one node can carry every literal kind."""
    x = Value("x", (2, 3), torch.float32, Role.INPUT)
    y = Value("y", (2, 3), torch.bfloat16, Role.OUTPUT)
    literals = (x, [0, -1], (2,), -math.inf, math.inf, None, True, "tanh", 1e-05, torch.bfloat16)
    kwargs = {"dtype": torch.bfloat16, "memory_format": torch.contiguous_format}
    node = Node("_to_copy", literals, kwargs, [y], Phase.BACKWARD, "m.py:3")
    text = dump(Graph([x], [node], [y]))
    assert (
        "%y: bf16[2,3] output = _to_copy(%x, [0, -1], (2,), -inf, inf, None, True, 'tanh',"
        " 1e-05, bf16, dtype=bf16, memory_format=contiguous_format)  # backward @ m.py:3"
    ) in text
    assert dump(parse(text)) == text


def test_parse_names_the_line_of_a_use_before_def() -> None:
    text = "input %x: f32[2] input\n%y: f32[2] temporary = neg(%w)  # forward\noutput %y\n"
    with pytest.raises(ParseError, match=r"line 2: %w is used before it is defined"):
        parse(text)

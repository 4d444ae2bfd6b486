"""The command line: compile writes an artifact, and bad input is one clear paragraph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.artifact import read_artifact
from compiler.passes.verify import verify
from memfit.cli import main

MODELS = "tests/models/user_models.py"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_compile_writes_a_loadable_artifact(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, text = _run(
        "compile",
        "llama-tiny",
        "--batch",
        "2",
        "--seq",
        "8",
        "--out",
        str(out),
        "--dump-after",
        "trace",
    )
    assert code == 0, text
    assert "parameters" in text and "optimizer_state" in text
    graph, manifest = read_artifact(out)
    verify(graph)
    assert manifest["summary"]["parameters"] == 123_200
    assert (out / "after-trace.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["batch_size"] == 2


def test_compile_a_user_file(tmp_path: Path) -> None:
    code, text = _run("compile", f"{MODELS}:good", "--batch", "2", "--out", str(tmp_path / "a"))
    assert code == 0, text


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt3-huge", r"MODEL 'gpt3-huge' is neither a built-in example"),
        ("nope/model.py:make", r"no such file nope/model.py"),
        (f"{MODELS}:missing", r"defines no callable 'missing'"),
        (f"{MODELS}:not_a_model", r"returned int; expected an nn.Module"),
        (f"{MODELS}:failing", r"tracing the model failed at tests/models/user_models.py:\d+"),
        (
            f"{MODELS}:fft",
            r"op aten\.\w+ \(node \w+\) at tests/models/user_models.py:\d+ is not in",
        ),
        (f"{MODELS}:data_dependent", r"user_models.py:\d+ .*depends on tensor values"),
    ],
)
def test_bad_model_is_one_paragraph_without_traceback(model: str, expected: str) -> None:
    code, text = _run("compile", model, "--batch", "2", "--out", "/tmp/memfit-never-written")
    assert code == 2
    assert text.startswith("error:")
    assert "Traceback" not in text
    assert re.search(expected, text), text


def test_debug_shows_the_traceback() -> None:
    result = CliRunner().invoke(main, ["--debug", "compile", "gpt3-huge"])
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["compile", "gpt2-tiny", "--seq", "65"], "sequence length must be in 1..64"),
        (["compile", "gpt2-tiny", "--batch", "0"], "Invalid value for '--batch'"),
        (["compile", "gpt2-tiny", "--dump-after", "nopass"], "nopass (passes:"),
        (["train", "--steps", "0"], "--steps must be ≥ 1"),
    ],
)
def test_bad_flags_are_named(args: list[str], expected: str) -> None:
    code, text = _run(*args)
    assert code == 2 and expected in text, text


@pytest.mark.parametrize("command", ["compile", "train", "prepare"])
def test_help_everywhere(command: str) -> None:
    code, text = _run(command, "--help")
    assert code == 0 and "Usage:" in text

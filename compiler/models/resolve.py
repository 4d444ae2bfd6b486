"""Resolve a MODEL argument: a built-in example name, `hf:DIR`, or `path/to/file.py:factory`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from compiler.errors import MemfitError, user_frame
from compiler.models import hf
from compiler.models.adapter import context_length
from examples import EXAMPLES, ExampleModel, build_example


class ModelSpecError(MemfitError):
    """The MODEL string names nothing memfit can build."""


def resolve_model(
    spec: str, *, device: str | torch.device = "cpu", vocab_size: int | None = None
) -> ExampleModel:
    """Build the model `spec` names on `device` ("meta" plans without allocating weights).

    `vocab_size` sizes a built-in example's embedding (a user's file or directory builds its own).
    """
    if spec.startswith(hf.PREFIX):
        return hf.load_hf(spec, device=device)
    with torch.device(device):
        if spec in EXAMPLES:
            return build_example(spec, vocab_size)
        if ":" not in spec:
            raise ModelSpecError(
                f"MODEL {spec!r} is neither a built-in example ({', '.join(EXAMPLES)}),"
                " hf:DIR (a Hugging Face model directory) nor path/to/file.py:factory"
            )
        return _from_file(spec)


def _from_file(spec: str) -> ExampleModel:
    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ModelSpecError(f"MODEL {spec!r}: no such file {path}")
    module_name = f"memfit_user_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    assert loader_spec is not None and loader_spec.loader is not None
    user_module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = user_module
    try:
        loader_spec.loader.exec_module(user_module)
    except Exception as exc:
        raise ModelSpecError(
            f"MODEL {spec!r}: importing {path} failed at {user_frame(exc) or path}:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        raise ModelSpecError(f"MODEL {spec!r}: {path} defines no callable {factory_name!r}")
    try:
        built = factory()
    except Exception as exc:
        raise ModelSpecError(
            f"MODEL {spec!r}: {factory_name}() failed at {user_frame(exc) or path}:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(built, ExampleModel):
        return built
    if hf.is_hf_model(built):
        return hf.as_example(built, spec)
    if not isinstance(built, nn.Module):
        raise ModelSpecError(
            f"MODEL {spec!r}: {factory_name}() returned {type(built).__name__}; expected an"
            " nn.Module or examples.ExampleModel"
        )
    config = getattr(built, "config", built)
    vocab = getattr(config, "vocab_size", None)
    block = getattr(config, "block_size", None) or context_length(config)
    if not isinstance(vocab, int) or not isinstance(block, int):
        raise ModelSpecError(
            f"MODEL {spec!r}: the module needs integer `vocab_size` and `block_size` attributes"
            " (on itself or on `.config`), or return an examples.ExampleModel or a transformers"
            " PreTrainedModel"
        )
    return ExampleModel(built, vocab, block, spec)

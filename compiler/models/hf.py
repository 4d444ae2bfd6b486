"""Hugging Face causal LMs as memfit models: `hf:DIR` and factories returning a PreTrainedModel.

A local directory (config.json, safetensors weights optional, sharded or not; nothing is
downloaded) becomes the `transformers` model itself, not a copy: parameter names stay the
library's, so a trained state exports back with `save_pretrained` and LoRA adapters map 1:1
onto peft's. memfit fixes the settings that make a model trace statically (compiler/models/
adapter.py) and puts it in eval mode: dropout would add random ops to a deterministic graph.
Without weights (planning, or on the meta device) the model is built from the config alone.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compiler.errors import MemfitError
from compiler.models.adapter import ATTN_IMPLEMENTATION, EXPERTS_IMPLEMENTATION, context_length
from examples import ExampleModel

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PretrainedConfig, PreTrainedModel

PREFIX = "hf:"
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"


class HFModelError(MemfitError):
    """A Hugging Face directory or model memfit cannot train; names the file at fault."""


def load_hf(spec: str, *, device: str | torch.device = "cpu") -> ExampleModel:
    """The causal LM in `hf:DIR`, with DIR's weights if it has any and `device` is not meta."""
    directory = Path(spec.removeprefix(PREFIX)).expanduser()
    config = read_config(directory)
    with _quiet_transformers():
        from transformers import AutoModelForCausalLM

        settings: dict[str, Any] = {
            "dtype": torch.float32,  # master weights are fp32; --precision lowers compute
        }
        if weight_files(directory) and torch.device(device).type != "meta":
            model = _from_pretrained(directory, config, settings, device)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, **settings)
    return as_example(model, spec)


def as_example(model: nn.Module, spec: str) -> ExampleModel:
    """A `transformers` causal LM, made traceable: eager attention, static experts, no KV
    cache, eval mode; vocabulary and context length from its config."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    config = model.config
    config.use_cache = False
    model.eval()
    vocab = getattr(config, "vocab_size", None)
    block = context_length(config)
    if not isinstance(vocab, int) or block is None:
        raise HFModelError(
            f"MODEL {spec!r}: its config has no integer vocab_size or context length"
            " (max_position_embeddings, n_positions, n_ctx, max_sequence_length, seq_length)"
        )
    return ExampleModel(model, vocab, block, spec)


def is_hf_model(model: object) -> bool:
    """A `transformers` PreTrainedModel (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def read_config(directory: Path) -> PretrainedConfig:
    """DIR/config.json as a transformers config of a causal-LM architecture."""
    path = directory / CONFIG
    if not directory.is_dir():
        raise HFModelError(f"hf:{directory}: no such directory")
    if not path.is_file():
        raise HFModelError(
            f"hf:{directory}: no {CONFIG} in the directory; a Hugging Face model directory holds"
            " config.json (and optionally *.safetensors weights)"
        )
    text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HFModelError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    with _quiet_transformers():
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = raw.get("model_type")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise HFModelError(
                f"{path}:{_line_of(text, 'model_type')}: model_type {model_type!r} has no"
                " causal-LM class in transformers; memfit trains decoder-only causal language"
                " models (llama, qwen2, mistral, gemma, phi3, gpt2, gpt_neox, mixtral, ...)"
            )
        archs = [a for a in raw.get("architectures") or [] if not a.endswith("ForCausalLM")]
        if archs and len(archs) == len(raw["architectures"]):
            raise HFModelError(
                f"{path}:{_line_of(text, 'architectures')}: architecture {archs[0]} is not a"
                " causal LM (…ForCausalLM); memfit trains next-token prediction"
            )
        try:
            return AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as exc:
            raise HFModelError(f"{path}: transformers cannot read it: {exc}") from exc


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of DIR: the shards its index names, or model.safetensors."""
    index = directory / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    return sorted(directory.glob("*.safetensors"))


def _from_pretrained(
    directory: Path, config: PretrainedConfig, settings: dict[str, Any], device: str | torch.device
) -> PreTrainedModel:
    """Load DIR's weights; any tensor missing, extra or misshapen is an error naming its file."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory,
        config=config,
        local_files_only=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below, with the file that holds the tensor
        device_map={"": torch.device(device)},
        **settings,
    )
    files = _files_by_tensor(directory)
    where = files.get("", directory)
    if mismatched := sorted(info.get("mismatched_keys", [])):
        name, ckpt, want = mismatched[0]
        raise HFModelError(
            f"{files.get(name, where)}: tensor {name} has shape {list(ckpt)} but"
            f" {directory / CONFIG} makes it {list(want)}; the weights do not match the config"
        )
    if missing := sorted(info.get("missing_keys", [])):
        raise HFModelError(
            f"{directory}: the weights lack {len(missing)} tensor(s) the config needs, e.g."
            f" {missing[0]}; the weights do not match {directory / CONFIG}"
        )
    if unexpected := sorted(info.get("unexpected_keys", [])):
        raise HFModelError(
            f"{files.get(unexpected[0], where)}: tensor {unexpected[0]} (and"
            f" {len(unexpected) - 1} more) is not part of the model {directory / CONFIG}"
            " describes; the weights do not match the config"
        )
    return model


def _files_by_tensor(directory: Path) -> dict[str, Path]:
    """Which file holds each tensor (key "": the one file of an unsharded directory)."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / v for k, v in weight_map.items()}
    files = weight_files(directory)
    return {"": files[0]} if len(files) == 1 else {}


def _line_of(text: str, key: str) -> int:
    """1-based line of `"key":` in a JSON text (1 if absent), for file:line in errors."""
    match = re.search(rf'"{re.escape(key)}"\s*:', text)
    return text.count("\n", 0, match.start()) + 1 if match else 1


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers logs load reports and progress bars; memfit reports problems as errors."""
    try:
        from transformers.utils import logging
    except ImportError:
        raise HFModelError(
            "hf:DIR models need the transformers package: pip install 'memfit[hf]'"
        ) from None

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()

"""Named example models for memfit to trace, plan and train.

tiny/mini use a byte vocabulary (256) and train on a CPU; small are the 124M-class models;
llama-7b/13b/70b are real Llama-2 shapes meant for planning only: build them under
`with torch.device("meta"):`, on a real device they allocate their full weights.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from torch import nn

from examples.gpt2 import GPT2, GPT2Config
from examples.llama import Llama, LlamaConfig


@dataclass(frozen=True)
class ExampleModel:
    module: nn.Module
    vocab_size: int
    block_size: int
    name: str


GPT2_CONFIGS: dict[str, GPT2Config] = {
    "gpt2-tiny": GPT2Config(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "gpt2-mini": GPT2Config(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "gpt2-small": GPT2Config(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}

# Llama-2 tokenizer and context; ffn sizes follow Meta (multiple_of 256; 70B: 1.3x, 4096).
_llama2 = partial(LlamaConfig, vocab_size=32000, block_size=4096)
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "llama-mini": LlamaConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "llama-small": LlamaConfig(
        vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_embd=768
    ),
    "llama-7b": _llama2(n_layer=32, n_head=32, n_embd=4096, ffn_multiple_of=256),
    "llama-13b": _llama2(n_layer=40, n_head=40, n_embd=5120, ffn_multiple_of=256),
    "llama-70b": _llama2(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, ffn_hidden=28672),
}


def _builder(name: str, cfg: GPT2Config | LlamaConfig) -> Callable[..., ExampleModel]:
    model_cls = GPT2 if isinstance(cfg, GPT2Config) else Llama

    def build(vocab_size: int | None = None) -> ExampleModel:
        sized = cfg if vocab_size is None else replace(cfg, vocab_size=vocab_size)
        return ExampleModel(model_cls(sized), sized.vocab_size, sized.block_size, name)

    return build


EXAMPLES: dict[str, Callable[..., ExampleModel]] = {
    name: _builder(name, cfg) for name, cfg in (GPT2_CONFIGS | LLAMA_CONFIGS).items()
}


def build_example(name: str, vocab_size: int | None = None) -> ExampleModel:
    """Build the named model on the current default device (see the module docstring).

    `vocab_size` replaces the config's: a run embeds exactly its data's vocabulary.
    """
    if name not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}; valid names: {', '.join(EXAMPLES)}")
    return EXAMPLES[name](vocab_size)

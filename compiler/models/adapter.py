"""What memfit needs to know about Hugging Face model families, as data in one place.

`transformers` models trace as they come once three settings are fixed: attention through
`F.scaled_dot_product_attention` (traced as memfit's fused attention op, compiler/trace.py),
mixture-of-experts layers as gathers + batched matmuls (static shapes: no `nonzero` over the
routing), and no KV cache. Context length hides under a different
config key per family. Everything family-specific that a pass or the CLI reads lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from torch import Tensor, nn

# SDPA traces to memfit's attention op (no [T, T] scores saved); "eager" spells it out.
ATTN_IMPLEMENTATION = "sdpa"
# HF's batched_mm experts gather each token's expert weights and run one bmm: a static graph.
EXPERTS_IMPLEMENTATION = "batched_mm"
# Where families keep their context length, in the order they are looked up.
CONTEXT_KEYS = (
    "max_seq_len",
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_sequence_length",
    "seq_length",
)
# Settings that avoid a failure, keyed by the library file it happens in (errors name them).
KNOWN_SETTINGS: dict[str, str] = {
    "sdpa_attention.py": 'load the model with attn_implementation="eager"',
    "flash_attention.py": f'load the model with attn_implementation="{ATTN_IMPLEMENTATION}"',
    "flex_attention.py": f'load the model with attn_implementation="{ATTN_IMPLEMENTATION}"',
    "moe.py": f'load the model with experts_implementation="{EXPERTS_IMPLEMENTATION}"',
    "cache_utils.py": "set config.use_cache = False (memfit traces no KV cache)",
}
_DROPOUT = "call model.eval() or set every dropout probability to 0 (the graph is deterministic)"
# ... and by the op that failed, for ops only one known construct emits.
OP_SETTINGS: dict[str, str] = {
    "empty_permuted": _DROPOUT,
    "bernoulli": _DROPOUT,
    "bernoulli.p": _DROPOUT,
    "native_dropout": _DROPOUT,
    "rand": _DROPOUT,
}


# LoRA target names a user types → module-name suffixes in transformers families (llama, qwen2,
# mistral, gemma, mixtral, olmoe: q_proj...; phi3: fused qkv_proj, gate_up_proj; gpt_neox: fused
# query_key_value, dense_h_to_4h). A fused projection is targeted by any of its parts, as peft
# does. GPT-2's projections are transformers Conv1D, not nn.Linear: no LoRA targets there.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj", "self_attn.qkv_proj", "attention.query_key_value"),
    "k": ("self_attn.k_proj", "self_attn.qkv_proj", "attention.query_key_value"),
    "v": ("self_attn.v_proj", "self_attn.qkv_proj", "attention.query_key_value"),
    "o": ("self_attn.o_proj", "attention.dense"),
    "gate": ("mlp.gate_proj", "mlp.gate_up_proj"),
    "up": ("mlp.up_proj", "mlp.gate_up_proj", "mlp.dense_h_to_4h"),
    "down": ("mlp.down_proj", "mlp.dense_4h_to_h"),
    "fc": ("mlp.dense_h_to_4h",),
}


def context_length(config: Any) -> int | None:
    """The longest sequence the config's positions cover, or None if no known key holds it."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def known_setting(where: str, op: str = "") -> str:
    """The setting that avoids a failure of `op` at `where` (`file:line`), or "" if none."""
    name = where.rsplit("/", 1)[-1].rsplit(":", 1)[0]
    return OP_SETTINGS.get(op) or KNOWN_SETTINGS.get(name, "")


@dataclass(frozen=True)
class TPLayout:
    """Where a decoder's tensor-parallel pieces are, by module path (Megatron's split).

    In each block, `column` linears (→ number of fused parts: 3 for a q|k|v projection) are cut
    by output rows and `row` linears by input columns; the input of each `regions` submodule is
    copied into the group. Head counts that the attention module keeps as attributes (`heads`)
    shrink by tp; `sizes` name every count tp must divide and its attribute path (a weight's
    path stands for its number of rows).
    """

    blocks: str
    column: dict[str, int]
    row: tuple[str, ...]
    regions: tuple[str, ...]
    sizes: dict[str, str]
    embedding: str
    head: str = "lm_head"
    heads: tuple[str, ...] = ()


_HF_LLAMA_LIKE = TPLayout(  # llama, qwen2, mistral, gemma: attention reshapes with -1 heads
    blocks="model.layers",
    column={f"self_attn.{p}_proj": 1 for p in "qkv"} | {"mlp.gate_proj": 1, "mlp.up_proj": 1},
    row=("self_attn.o_proj", "mlp.down_proj"),
    regions=("self_attn", "mlp"),
    sizes={
        "n_head": "config.num_attention_heads",
        "n_kv_head": "config.num_key_value_heads",
        "ffn_dim": "config.intermediate_size",
        "vocab_size": "config.vocab_size",
    },
    embedding="model.embed_tokens",
)
TP_LAYOUTS: tuple[TPLayout, ...] = (
    TPLayout(  # examples.gpt2
        blocks="blocks",
        column={"attn.qkv": 3, "mlp.fc": 1},
        row=("attn.proj", "mlp.proj"),
        regions=("attn", "mlp"),
        sizes={
            "n_head": "blocks.0.attn.n_head",
            "4·n_embd": "blocks.0.mlp.fc.weight",
            "vocab_size": "tok_emb.num_embeddings",
        },
        embedding="tok_emb",
        heads=("n_head",),
    ),
    TPLayout(  # examples.llama
        blocks="blocks",
        column={f"attention.w{p}": 1 for p in "qkv"} | {"feed_forward.w1": 1, "feed_forward.w3": 1},
        row=("attention.wo", "feed_forward.w2"),
        regions=("attention", "feed_forward"),
        sizes={
            "n_head": "blocks.0.attention.n_head",
            "n_kv_head": "blocks.0.attention.n_kv_head",
            "ffn_dim": "blocks.0.feed_forward.w1.weight",
            "vocab_size": "tok_emb.num_embeddings",
        },
        embedding="tok_emb",
        heads=("n_head", "n_kv_head"),
    ),
    _HF_LLAMA_LIKE,
)


def tp_sizes(module: nn.Module, layout: TPLayout) -> dict[str, int]:
    """The counts `layout.sizes` names, read from `module`."""
    sizes = {}
    for name, path in layout.sizes.items():
        value = attrgetter(path)(module)
        sizes[name] = int(value.shape[0]) if isinstance(value, Tensor) else int(value)
    return sizes


def tp_layout(module: nn.Module) -> TPLayout | None:
    """The first layout whose every path exists in `module` (read from its structure)."""
    names = dict(module.named_modules())
    for layout in TP_LAYOUTS:
        blocks = names.get(layout.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        inside = [f"{layout.blocks}.0.{p}" for p in (*layout.column, *layout.row, *layout.regions)]
        if all(p in names for p in (*inside, layout.embedding, layout.head)):
            return layout
    return None


def decoder_blocks(module: nn.Module) -> nn.ModuleList | None:
    """The stack of decoder layers, read from the structure: the ModuleList of same-typed
    children holding the most parameters (an MoE's expert list lives inside one block)."""
    stacks = [
        m
        for m in module.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)

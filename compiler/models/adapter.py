"""What memfit needs to know about Hugging Face model families, as data in one place.

`transformers` models trace as they come once three settings are fixed: attention in its
eager (matmul + softmax) form, mixture-of-experts layers as gathers + batched matmuls (static
shapes: no `nonzero` over the routing), and no KV cache. Context length hides under a different
config key per family. Everything family-specific that a pass or the CLI reads lives here.
"""

from __future__ import annotations

from typing import Any

# Until SDPA traces to memfit's fused attention op, attention is traced through HF's eager path.
ATTN_IMPLEMENTATION = "eager"
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
    "sdpa_attention.py": f'load the model with attn_implementation="{ATTN_IMPLEMENTATION}"',
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

"""How long `memfit plan hf:DIR` takes on 7B/8B-shaped Hugging Face configs (config.json only).

Each case writes the config of a real model shape into a temporary directory (no weights, no
network) and runs the `memfit plan` command in a fresh process, as a user would: the model is
built on the meta device, traced, passed through the pipeline and planned. Reported per case:
wall seconds, the process's CPU seconds (user + system: what the work costs when the machine's
cores are shared), and the planned step peak the command printed.

    PYTHONPATH=. python benchmarks/bench_hf_plan.py
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

LLAMA3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
QWEN2_7B = LLAMA3_8B | {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
}
MISTRAL_7B = LLAMA3_8B | {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "vocab_size": 32768,
    "sliding_window": 4096,
    "max_position_embeddings": 32768,
}
LORA_NF4 = ["--lora", "r=16,targets=q,k,v,o", "--quantize-base", "nf4", "--precision", "bf16"]
CASES: list[tuple[str, dict[str, object], list[str]]] = [
    ("Llama-3-8B LoRA r=16 nf4, 1×4096", LLAMA3_8B, ["--batch", "1", "--seq", "4096", *LORA_NF4]),
    (
        "Qwen2-7B full bf16, 1×2048",
        QWEN2_7B,
        ["--batch", "1", "--seq", "2048", "--precision", "bf16"],
    ),
    (
        "Mistral-7B dp 8 zero 2 tp 2, 2×2048",
        MISTRAL_7B,
        ["--batch", "2", "--seq", "2048", "--dp", "8", "--zero", "2", "--tp", "2"],
    ),
]


def run(config: dict[str, object], args: list[str]) -> tuple[float, float, str, int]:
    """Wall seconds, CPU seconds, the step peak line, exit status of one `memfit plan`."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "memfit", "plan", f"hf:{tmp}", *args],
            capture_output=True,
            text=True,
            env=os.environ | {"COLUMNS": "200"},
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak = re.search(r"(step peak|peak \(live bytes\))[^\n]*?([\d.]+ [KMGT]?i?B)", done.stdout)
    shown = peak.group(2) if peak else (done.stderr.strip().splitlines() or ["?"])[-1][:60]
    return wall, cpu, shown, done.returncode


def main() -> None:
    table = Table(title=f"memfit plan hf:DIR (config.json only), {os.cpu_count()} CPUs")
    for column in ("case", "wall s", "CPU s", "planned peak", "exit"):
        table.add_column(column, justify="left" if column == "case" else "right")
    load = os.getloadavg()[0]
    for name, config, args in CASES:
        wall, cpu, peak, code = run(config, args)
        table.add_row(name, f"{wall:.1f}", f"{cpu:.1f}", peak, str(code))
    Console(width=120).print(table)
    print(f"load average at start: {load:.1f} (the CPUs are shared: CPU s is the cost)")


if __name__ == "__main__":
    main()

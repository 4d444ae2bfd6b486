"""Data side of memfit: text/JSONL/Parquet → token ids in Arrow IPC files → training windows.

Modules, in data-flow order: `corpus` (the embedded default corpus), `tokenizer`, `prepare`
(writes a prepared directory with `manifest.json`), `manifest`, `loader` (memory-mapped windows
with exact resume). Pure functions: the `memfit prepare` command over them is
`memfit/prepare_cmd.py`. Nothing is imported here so that prepare's worker processes do not
pay for torch.
"""

"""Models memfit can build from a MODEL string: built-in examples and `file.py:factory`.

A package so that other model sources (e.g. Hugging Face checkpoints) sit beside
`resolve` in modules of their own; callers import only what this file re-exports.
"""

from compiler.models.resolve import ModelSpecError, resolve_model

__all__ = ["ModelSpecError", "resolve_model"]

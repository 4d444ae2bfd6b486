"""Code generation: IR fused groups → kernel source (Triton), and hand-written kernel families."""

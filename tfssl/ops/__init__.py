"""Pure tensor math, XLA-compiled, each op tested against a NumPy reference."""

"""Fidelity evaluation of quantized models against their unquantized selves (`moe-llm eval`).
Off the import path of `import moe_llm`."""

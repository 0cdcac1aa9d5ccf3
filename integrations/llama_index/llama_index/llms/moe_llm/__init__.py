"""LlamaIndex integration for moe-llm: Mixture-of-Experts models with offloaded experts."""

from llama_index.llms.moe_llm.base import MoeLLM

__all__ = ["MoeLLM"]

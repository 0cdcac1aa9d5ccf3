"""LangChain integration for moe-llm: Mixture-of-Experts models with offloaded experts.

`MoeLLM` is a text-completion LLM, `ChatMoeLLM` a chat model with tool calling.
Both take `model_path=` (plus engine options) or `engine=` to share a loaded
`moe_llm.Engine`.
"""

from langchain_moe_llm.chat_models import ChatMoeLLM
from langchain_moe_llm.llms import MoeLLM

__all__ = ["ChatMoeLLM", "MoeLLM"]

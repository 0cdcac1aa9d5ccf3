"""`MoeLLM`: a LangChain text-completion model on a moe-llm engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from moe_llm.runtime.engine import StreamChunk
from moe_llm.serve.aio import astream

from ._base import MoeParams, usage


class MoeLLM(MoeParams, BaseLLM):
    """A Mixture-of-Experts model with offloaded experts, as a LangChain LLM (text in, text out).

    Example:
        ```python
        from langchain_moe_llm import MoeLLM

        llm = MoeLLM(model_path="/models/Mixtral-8x7B-Instruct-v0.1", experts_bits=2, gpu_budget="12GiB")
        for piece in llm.stream("The capital of France is"):
            print(piece, end="")
        ```
    Every generated piece reaches `on_llm_new_token`, in `invoke` as well as `stream`.
    """

    @property
    def _llm_type(self) -> str:
        return "moe_llm"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    def _final_info(self, last: StreamChunk, output_tokens: int) -> dict[str, Any]:
        stats = last.stats or {}
        return {
            "finish_reason": last.finish_reason,
            "model_name": self.model_name,
            "usage": usage(int(stats.get("prompt_tokens", 0)), output_tokens),
        }

    def _to_chunk(self, piece: StreamChunk, produced: int) -> GenerationChunk:
        info = self._final_info(piece, produced) if piece.finish_reason else None
        return GenerationChunk(text=piece.text, generation_info=info)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        produced = 0
        for piece in self._engine.stream(prompt, **self._gen_options(stop, kwargs)):
            produced += len(piece.token_ids)
            chunk = self._to_chunk(piece, produced)
            if run_manager:  # BaseLLM leaves token callbacks to the implementation
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        produced = 0
        async for piece in astream(self._engine, prompt, **self._gen_options(stop, kwargs)):
            produced += len(piece.token_ids)
            chunk = self._to_chunk(piece, produced)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    @staticmethod
    def _merge(chunks: list[GenerationChunk]) -> Generation:
        text = "".join(c.text for c in chunks)
        return Generation(text=text, generation_info=chunks[-1].generation_info if chunks else None)

    def _result(self, generations: list[Generation]) -> LLMResult:
        totals = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for g in generations:
            for k, v in ((g.generation_info or {}).get("usage") or {}).items():
                totals[k] += v
        return LLMResult(
            generations=[[g] for g in generations], llm_output={"token_usage": totals, "model_name": self.model_name}
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result([self._merge(list(self._stream(p, stop, run_manager, **kwargs))) for p in prompts])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for p in prompts:
            generations.append(self._merge([c async for c in self._astream(p, stop, run_manager, **kwargs)]))
        return self._result(generations)

"""Engine: prefill, decode, stream, on top of the offloaded transformers trunk.

`Engine.stream` is the core generator: tokenize (chat template for message
lists; a checkpoint without one gets the generic template of `moe_llm.serve.tools`,
with one warning per engine), then hand the request to the engine's `Batcher`
(`moe_llm.runtime.batching`), which prefills it in chunks into its own `DynamicCache` (after
restoring the longest prefix of the prompt that the prefix cache holds, to the token:
`moe_llm.runtime.prefill`) and decodes it one token a step together with every other request
on the engine, yielding text deltas. `generate`
drains `stream`, so threads sharing one engine share the batch. A FIFO lock keeps
steps and other model calls (`logits`, `reset_cache`) apart; a consumer that abandons
a stream leaves the batch in `finally`.
"""

from __future__ import annotations

import gc
import inspect
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EngineConfig, GenerationConfig
from ..errors import ConfigError, EngineClosedError, InputError
from ..experts.runtime import ExpertsRuntime
from ..planning import Plan, planned_context
from ..serve.tools import GENERIC_CHAT_TEMPLATE, ChatPrompt, check_renders, ensure_utf8, render_chat
from .batching import Batcher
from .prefix_cache import PrefixCache
from .sequence import RequestStream

log = logging.getLogger(__name__)


@dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # tokens generated since the previous chunk
    finish_reason: str | None = None  # set on the last chunk: "stop" or "length"
    stats: dict[str, Any] | None = None  # set on the last chunk


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats,
        }


class FifoLock:
    """A lock that admits waiters in arrival order."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def __enter__(self):
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._held = False
            self._cond.notify_all()


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        hf_config,
        config: EngineConfig,
        runtime: ExpertsRuntime,
        plan: Plan,
        model_path: str,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.config = config
        self.runtime = runtime
        self.cache = runtime.cache
        self.fmt = runtime.fmt
        self.stats = runtime.stats
        self.plan = plan
        self.model_path = model_path
        self.device = torch.device(config.device)
        self._lock = FifoLock()
        self.closed = False
        self.eos_ids = self._eos_ids()
        self.chat_template_source = self._install_chat_template()
        self._generic_warned = threading.Event()
        # transformers >= 5.2x renamed past_key_values to cache
        self._kv_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        exact = config.batch_mode == "exact" or (config.batch_mode == "auto" and self.device.type != "cuda")
        from ..kernels import trunk_ops

        # quantized decode on CUDA: norms and router in one launch each per token (with
        # quantization off the trunk runs transformers' modules verbatim: the oracle); batched
        # decode rows (`kernels.rows`) everywhere
        trunk_ops.install(model, kernels=self.device.type == "cuda" and self.fmt.bits is not None)
        self.graphs = self._graph_decoder(exact)
        self.prefix_cache = PrefixCache(config.prefix_cache) if config.prefix_cache else None
        self.batcher = Batcher(self, config.max_batch, config.max_queue, config.prefill_chunk, self.prefix_cache, exact)

    def _graph_decoder(self, exact_batching: bool = False):
        """The CUDA-graph decoder, or None where decode stays eager (CPU, host-dispatched experts,
        unsupported models, exact batching: a lone request must decode as a batched one does)."""
        if not (self.config.cuda_graphs and self.device.type == "cuda"):
            return None
        if exact_batching:
            log.info("decoding without CUDA graphs: batch_mode 'exact' decodes every request eagerly")
            return None
        if not self.runtime.device_dispatch:
            log.info("decoding without CUDA graphs: the experts are dispatched by the host")
            return None
        from .decode_graph import GraphDecoder, unsupported_reason

        reason = unsupported_reason(self.model, self.hf_config)
        if reason is not None:
            log.info("decoding without CUDA graphs: %s", reason)
            return None
        # the static KV covers the planned context, which no request goes past
        return GraphDecoder(self.model, self.hf_config, self.runtime, self.device, self.context_length)

    # -- properties ------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Positions a prompt plus its new tokens may hold: the context the KV is planned for."""
        return planned_context(self.config.max_context, getattr(self.hf_config, "max_position_embeddings", None))

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return Path(self.model_path).name

    @property
    def expert_bits_per_param(self) -> float:
        return self.fmt.bits_per_param

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.hf_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids

    # -- tokenization ------------------------------------------------------------
    def _install_chat_template(self) -> str:
        """Put the template chat uses on the tokenizer, once: `config.chat_template` ("option"),
        the checkpoint's own ("checkpoint"), or the generic ChatML one ("generic")."""
        if self.config.chat_template is not None:
            self.tokenizer.chat_template = self.config.chat_template
            try:
                check_renders(self.tokenizer)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            return "option"
        if self.tokenizer.chat_template:
            return "checkpoint"
        self.tokenizer.chat_template = GENERIC_CHAT_TEMPLATE
        return "generic"

    def chat_prompt(self, messages: list[dict[str, Any]], **options) -> ChatPrompt:
        """Chat messages -> `ChatPrompt` through the chat template; options as in `tools.render_chat`
        (tools, tool_choice, response_format)."""
        if self.chat_template_source == "generic" and not self._generic_warned.is_set():
            self._generic_warned.set()
            log.warning(
                "%s has no chat template; chat uses the generic ChatML template (set the chat_template "
                "option or MOE_LLM_CHAT_TEMPLATE for another)",
                self.model_name,
            )
        return render_chat(self.tokenizer, list(messages), **options)

    def encode(self, prompt: str | list[dict] | list[int]) -> list[int]:
        """Prompt text, chat messages, or token ids -> token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("prompt is empty")
            ensure_utf8(prompt)
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = self.hf_config.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise InputError(f"token ids must be in [0, {vocab})")
            return list(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self._chat_ids(prompt)[0]
        raise InputError("prompt must be a non-empty string, a list of chat messages, or a list of token ids")

    def _chat_ids(self, messages) -> tuple[list[int], tuple[str, ...]]:
        """(prompt ids, the template's extra stop strings) for a list of chat messages."""
        for m in messages:
            if "role" not in m or "content" not in m:
                raise InputError("each chat message needs 'role' and 'content'")
        prompt = self.chat_prompt(messages)
        return prompt.token_ids, prompt.stop

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(ensure_utf8(text, "text to tokenize"), add_special_tokens=False)["input_ids"])

    def _request(self, prompt, kwargs: dict[str, Any]) -> tuple[list[int], GenerationConfig]:
        """Validated (prompt ids, generation options) of one request."""
        self._check_open()
        gen = GenerationConfig.build(**kwargs)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            prompt_ids, stop = self._chat_ids(prompt)
            if stop:  # the generic template: a base model ends its turn with a marker, not EOS
                gen = gen.model_copy(update={"stop": [*gen.stop, *(s for s in stop if s not in gen.stop)]})
        else:
            prompt_ids = self.encode(prompt)
        if len(prompt_ids) >= self.context_length:
            raise InputError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        return prompt_ids, gen

    # -- model calls -------------------------------------------------------------
    def _new_kv(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.hf_config)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence logits [T, V] for one prompt (tests, perplexity)."""
        self._check_open()
        with self._lock:
            ids = torch.tensor([token_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=False)
            return out.logits[0].float()

    # -- generation ----------------------------------------------------------------
    def stream(self, prompt, **kwargs) -> Iterator[StreamChunk]:
        """Yield text deltas as they are generated. Options as in `GenerationConfig`."""
        return self._stream(*self._request(prompt, kwargs))

    def _stream(self, prompt_ids: list[int], gen: GenerationConfig) -> Iterator[StreamChunk]:
        """Queue the request (QueueFullError past `max_queue` waiting) and return its chunks."""
        return RequestStream(self.batcher, self.batcher.submit(prompt_ids, gen))

    def _graph_begin(self, graphs, kv, n: int):
        """Hand the prefill's KV to the graph decoder: (graphs, None), or (None, kv) and
        graphs off for good if its cache layout is not one the static KV can take."""
        try:
            graphs.begin(kv, n)
        except RuntimeError as exc:
            log.warning("CUDA graph decode cannot take this model's KV cache (%s); decoding eagerly", exc)
            self.graphs = None
            return None, kv
        return graphs, None  # the static KV holds the prompt now

    def _graphs_failed(self, exc: Exception) -> None:
        """A graph capture failed: graphs off for good, every request decodes eagerly."""
        log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", exc)
        self.graphs = None

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generate a completion. Options as in `GenerationConfig`."""
        prompt_ids, gen = self._request(prompt, kwargs)
        parts, ids, last = [], [], None
        for chunk in self._stream(prompt_ids, gen):
            parts.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        return GenerationResult("".join(parts), ids, len(prompt_ids), last.finish_reason, last.stats or {})

    def stats_dict(self) -> dict[str, Any]:
        """Cumulative counters: `Stats`, the batcher's (queue, batch, prefix cache) and the cache size."""
        d = self.stats.to_dict()
        d["expert_bits_per_param"] = self.expert_bits_per_param
        d["expert_slots"] = 0 if self.closed else self.cache.num_slots
        d.update(self._closed_batcher if self.closed else self.batcher.stats())
        return d

    def reset_cache(self) -> None:
        """Drop every resident expert and cached prompt prefix (benchmarks, tests)."""
        self._check_open()
        with self._lock:
            self.batcher.drop_ahead()
            self.runtime.reset()
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    # -- lifetime ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise EngineClosedError("the engine is closed")

    def close(self) -> None:
        """Give back the engine's device memory (trunk, expert slots, KV, decode graphs) and stop
        its CPU threads now, not whenever Python's cycle collector finds the engine (its parts
        point back at it, so dropping the last reference frees nothing until then). Requests
        still queued or running fail with `EngineClosedError`, and so does every later call.
        Closing twice is a no-op; `with moe_llm.load(...) as engine:` closes on leaving."""
        with self._lock:  # waits for a running step
            if self.closed:
                return
            self.closed = True
            self.batcher.fail_all(EngineClosedError("the engine is closed"))
            self.runtime.close()
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            self.graphs = self.model = self.runtime = self.cache = self.prefix_cache = None
            self._closed_batcher, self.batcher = self.batcher.stats(), None  # its parts hold the layers
        gc.collect()  # loading leaves closures in reference cycles that still point at the runtime
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

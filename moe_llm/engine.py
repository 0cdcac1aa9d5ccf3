"""Engine: prefill, decode, stream, on top of the offloaded transformers trunk.

`Engine.stream` is the core generator: tokenize (chat template for message
lists; a checkpoint without one gets the generic template of `moe_llm.tools`,
with one warning per engine), prefill the prompt into a fresh `DynamicCache`,
then decode one token at a time, yielding text deltas. `generate` drains `stream`. Requests are
serialised by a FIFO lock, so threads sharing one engine never interleave KV
state; a consumer that abandons a stream releases the engine in `finally`.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EngineConfig, GenerationConfig
from .errors import ConfigError, InputError
from .experts.runtime import ExpertsRuntime
from .planner import Plan
from .sampling import sample
from .stats import Stats
from .textstream import TextStream
from .tools import GENERIC_CHAT_TEMPLATE, ChatPrompt, check_renders, ensure_utf8, render_chat

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
        self._streams: dict[int, weakref.ref] = {}  # thread id -> its latest stream
        self.eos_ids = self._eos_ids()
        self.chat_template_source = self._install_chat_template()
        self._generic_warned = threading.Event()
        # transformers >= 5.2x renamed past_key_values to cache
        self._kv_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.graphs = self._graph_decoder()

    def _graph_decoder(self):
        """The CUDA-graph decoder, or None where decode stays eager (CPU, host-dispatched experts,
        unsupported models)."""
        if not (self.config.cuda_graphs and self.device.type == "cuda"):
            return None
        if not self.runtime.device_dispatch:
            log.info("decoding without CUDA graphs: the experts are dispatched by the host")
            return None
        from .decode_graph import GraphDecoder, unsupported_reason

        reason = unsupported_reason(self.model, self.hf_config)
        if reason is not None:
            log.info("decoding without CUDA graphs: %s", reason)
            return None
        from .planner import planned_context

        # the static KV covers the planned context; longer requests decode eagerly
        kv_len = planned_context(self.config.max_context, getattr(self.hf_config, "max_position_embeddings", None))
        return GraphDecoder(self.model, self.hf_config, self.runtime, self.device, min(kv_len, self.context_length))

    # -- properties ------------------------------------------------------------
    @property
    def context_length(self) -> int:
        n = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        return int(min(self.config.max_context, n)) if self.config.max_context else int(n)

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
        with self._lock:
            ids = torch.tensor([token_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=False)
            return out.logits[0].float()

    # -- generation ----------------------------------------------------------------
    def stream(self, prompt, **kwargs) -> Iterator[StreamChunk]:
        """Yield text deltas as they are generated. Options as in `GenerationConfig`."""
        return self._stream(*self._request(prompt, kwargs))

    def _stream(self, prompt_ids: list[int], gen: GenerationConfig) -> Iterator[StreamChunk]:
        self._close_abandoned()
        it = self._locked_run(prompt_ids, gen)
        self._streams[threading.get_ident()] = weakref.ref(it)
        return it

    def _locked_run(self, prompt_ids: list[int], gen: GenerationConfig) -> Iterator[StreamChunk]:
        with self._lock:
            yield from self._run(prompt_ids, gen)

    def _close_abandoned(self) -> None:
        """A stream this thread left suspended still holds the engine, so the next
        request from the same thread would wait forever: close it first."""
        ref = self._streams.pop(threading.get_ident(), None)
        prev = ref() if ref is not None else None
        if prev is not None and inspect.getgeneratorstate(prev) == inspect.GEN_SUSPENDED:
            log.warning("closing an unfinished stream that this thread abandoned")
            prev.close()

    @torch.inference_mode()
    def _run(self, prompt_ids: list[int], gen: GenerationConfig) -> Iterator[StreamChunk]:
        before = self.stats.copy()
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None
        max_new = min(gen.max_new_tokens, self.context_length - len(prompt_ids))
        text = TextStream(self.tokenizer, gen.stop)
        kv = self._new_kv()
        pending: list[int] = []
        finish = "length"
        ttft = None
        t_first = t0
        accounted = False
        try:
            self.runtime.prompt_start(len(prompt_ids))
            ids = torch.tensor([prompt_ids], device=self.device)
            graphs, tok = self.graphs, -1
            if graphs is not None and len(prompt_ids) + max_new - 1 > graphs.max_len:
                graphs = None  # past the static KV: this request decodes eagerly
            if graphs is not None:
                graphs.prefill_cache(kv)  # the prompt's KV goes straight into the static cache
            for step in range(max_new):
                if step > 0 or len(prompt_ids) == 1:  # a one-token forward, by graph or eagerly
                    self.runtime.begin_step()
                if step > 0 and graphs is not None:
                    logits = self._graph_step(graphs, tok, len(prompt_ids) + step - 1)
                    if logits is None:  # capture failed: continue eagerly from the same KV
                        graphs, kv = None, graphs.kv.dump(self._new_kv(), len(prompt_ids) + step - 1)
                        ids = torch.tensor([[tok]], device=self.device)
                if step == 0 or graphs is None:
                    out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._kv_arg: kv})
                    logits = out.logits[0, -1]
                    if step == 0 and graphs is not None:
                        graphs, kv = self._graph_begin(graphs, kv, len(prompt_ids))
                tok = sample(logits, gen.temperature, gen.top_k, gen.top_p, generator)
                self.runtime.end_step()  # the step is done: the cache sees its routing, admits experts
                if step == 0:
                    t_first = time.perf_counter()
                    ttft = t_first - t0
                    self.stats.prefill_seconds += ttft
                self.stats.tokens_generated += 1
                if tok in self.eos_ids:
                    finish = "stop"
                    break
                pending.append(tok)
                delta = text.push(tok)
                if text.stopped:
                    finish = "stop"
                    if delta:
                        yield StreamChunk(delta, pending)
                        pending = []
                    break
                if delta:
                    yield StreamChunk(delta, pending)
                    pending = []
                if graphs is None:
                    ids = torch.tensor([[tok]], device=self.device)
            tail = text.flush() if not text.stopped else ""
            self.stats.decode_seconds += time.perf_counter() - t_first
            self.stats.requests += 1
            self.stats.prompt_tokens += len(prompt_ids)
            accounted = True
            call = self.stats - before
            yield StreamChunk(tail, pending, finish, self._call_stats(call, ttft, len(prompt_ids), text))
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                # raised inside a forward (error, Ctrl-C): slot bookkeeping may be half
                # updated, so return every slot to the free list
                self.runtime.reset()
            raise
        finally:
            if not accounted and ttft is not None:  # cancelled: count what was generated
                self.stats.decode_seconds += time.perf_counter() - t_first
                self.stats.requests += 1
                self.stats.prompt_tokens += len(prompt_ids)
            # abandoned or failed streams: fence in-flight copies, drop per-request state
            self.cache.synchronize()
            kv = None

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

    def _graph_step(self, graphs, tok: int, pos: int) -> torch.Tensor | None:
        """Logits from the CUDA-graph decoder, or None (and graphs off for good) if capture fails."""
        from .decode_graph import GraphCaptureError

        try:
            return graphs.step(tok, pos)
        except GraphCaptureError as exc:
            log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", exc)
            self.graphs = None
            return None

    def _call_stats(self, call: Stats, ttft: float | None, prompt_tokens: int, text: TextStream) -> dict:
        d = call.to_dict()
        d.update(
            prompt_tokens=prompt_tokens,
            time_to_first_token_s=ttft or 0.0,
            expert_bits_per_param=self.expert_bits_per_param,
            expert_slots=self.cache.num_slots,
        )
        return d

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
        d = self.stats.to_dict()
        d["expert_bits_per_param"] = self.expert_bits_per_param
        d["expert_slots"] = self.cache.num_slots
        return d

    def reset_cache(self) -> None:
        """Drop every resident expert (benchmarks, tests)."""
        with self._lock:
            self.runtime.reset()

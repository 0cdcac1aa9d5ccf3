"""Measurements over real text through a loaded `Engine`: perplexity and routing traces.

* `perplexity`: sliding-window perplexity (windows of `window` tokens advanced by
  `stride`; every token after the first is scored once, with up to
  `window - stride` tokens of context), computed from `Engine.logits`, so
  quantized experts and attention are measured exactly as they run.
* `trace_routing`: forward hooks on every MoE layer's router (the architecture map's) record,
  per token, the experts it routed to and, for each later layer L+a, the
  experts that layer L+a's router picks when applied to the hidden state
  entering layer L's router (what a speculative prefetcher can know early).
  Routing of a token is the same in prefill and decode (causal model), so the
  recorded order is the decode order.
* `lru_hit_rate`, `prefetch_recall`: pure functions over a trace; `routing_report`
  turns a trace into the JSON of ``moe-llm trace``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.arch import ArchMap, resolve_arch

CACHE_SIZES = tuple(range(1, 8))
PREFETCH_COUNTS = (1, 2, 3, 4)
LAYERS_AHEAD = (1, 2, 4)


def tokenize_text(engine, text: str) -> list[int]:
    """The whole text as one token stream, starting with BOS when the tokenizer has one."""
    ids = engine.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = engine.tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


# -- perplexity -------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood, nats per token
    window: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "nll": self.nll, "window": self.window,
                "stride": self.stride}  # fmt: skip


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) are fed, targets at
    positions [first_scored, end) are scored. Every position 1..n-1 is scored exactly once."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window} stride={stride}")
    spans, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        spans.append((begin, end, scored_to))
        scored_to = end
        begin += stride
        if begin + 1 >= end:  # stride == window: the next window must still start before its first target
            begin = end - 1
    return spans


def evenly_spaced(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over `items` (all of them when `limit` is None or large enough)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"need at least one window, got {limit}")
    return [items[(i * len(items)) // limit] for i in range(limit)]


@torch.inference_mode()
def perplexity(
    engine, ids: list[int], window: int = 1024, stride: int = 512, max_windows: int | None = None
) -> PerplexityResult:
    """Sliding-window perplexity of a token stream under `engine`. With `max_windows`, only that
    many windows, evenly spaced over the stream, are scored (a uniform sample of a long text)."""
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    window = min(window, engine.context_length)
    stride = min(stride, window)
    total, count = 0.0, 0
    for begin, end, first in evenly_spaced(window_spans(len(ids), window, stride), max_windows):
        logits = engine.logits(ids[begin:end])  # [T, V], position i predicts token begin+i+1
        pred = logits[first - begin - 1 : end - begin - 1]
        target = torch.tensor(ids[first:end], device=pred.device)
        total += float(torch.nn.functional.cross_entropy(pred.float(), target, reduction="sum"))
        count += end - first
    nll = total / count
    return PerplexityResult(math.exp(nll), count, nll, window, stride)


# -- routing traces ---------------------------------------------------------------


@dataclass
class RoutingTrace:
    """Per MoE layer, in token order: routed experts and the guesses made from earlier layers."""

    layers: list[int]  # MoE decoder-layer indices, in order
    top_k: int
    num_experts: int
    routed: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> chunks of [T, k]
    # (source layer, ahead, rescaled) -> chunks of [T, max guesses]: target layer's router on source's hidden
    guesses: dict[tuple[int, int, bool], list[torch.Tensor]] = field(default_factory=dict)
    tokens: int = 0

    def routed_ids(self, layer: int) -> torch.Tensor:  # [N, k]
        return torch.cat(self.routed[layer])

    def guess_ids(self, source: int, ahead: int, rescaled: bool = True) -> torch.Tensor:  # [N, max guesses]
        return torch.cat(self.guesses[(source, ahead, rescaled)])


def _norm_weight(arch: ArchMap, layer) -> torch.Tensor | None:
    w = getattr(arch.norm_of(layer), "weight", None)
    return w.detach().float() if isinstance(w, torch.Tensor) else None


@torch.inference_mode()
def trace_routing(
    engine,
    ids: list[int],
    window: int = 1024,
    max_windows: int | None = None,
    ahead: tuple[int, ...] = LAYERS_AHEAD,
    max_guesses: int = 4,
) -> RoutingTrace:
    """Run `ids` through the engine in consecutive windows and record the routing
    (only `max_windows` evenly spaced windows when given)."""
    arch = resolve_arch(engine.model, engine.hf_config)
    layers = arch.decoder_layers(engine.model)
    moe = [i for i, layer in enumerate(layers) if arch.experts_of(layer) is not None]
    routers = {i: arch.router_weight(layers[i]).detach().float() for i in moe}
    num_experts = int(routers[moe[0]].shape[0])
    top_k = int(engine.runtime.top_k)
    trace = RoutingTrace(moe, top_k, num_experts)
    n_guess = min(max_guesses, num_experts)
    norms = {i: _norm_weight(arch, layers[i]) for i in moe}

    def hook_for(pos: int):
        src = moe[pos]

        def hook(module, inputs, output):
            hidden = inputs[0].reshape(-1, routers[src].shape[1]).float()  # [T, H], normed, entering the router
            trace.routed.setdefault(src, []).append(output[-1].to("cpu", torch.int8))
            for a in ahead:
                if pos + a >= len(moe):
                    continue
                dst = moe[pos + a]
                for rescaled in (False, True):
                    h = hidden
                    if rescaled and norms[src] is not None and norms[dst] is not None:
                        ws = norms[src]
                        h = hidden * torch.where(ws.abs() > 1e-6, norms[dst] / ws, torch.ones_like(ws))
                    top = torch.topk(h @ routers[dst].T, n_guess, dim=-1).indices  # [T, n_guess]
                    trace.guesses.setdefault((src, a, rescaled), []).append(top.to("cpu", torch.int8))

        return hook

    handles = [arch.router_of(layers[i]).register_forward_hook(hook_for(p)) for p, i in enumerate(moe)]
    try:
        window = min(window, engine.context_length)
        for begin in evenly_spaced(list(range(0, len(ids), window)), max_windows):
            chunk = ids[begin : begin + window]
            engine.logits(chunk)
            trace.tokens += len(chunk)
    finally:
        for h in handles:
            h.remove()
    return trace


def lru_hit_rate(routed: torch.Tensor, capacity: int) -> float:
    """Hit rate of an LRU cache of `capacity` experts over per-token expert sets `routed` [N, k].
    Per token the resident experts are hits; then every routed expert becomes most recent."""
    cache: list[int] = []  # least recent first
    hits = accesses = 0
    for row in routed.tolist():
        experts = list(dict.fromkeys(row))
        hit = [e for e in experts if e in cache]
        hits += len(hit)
        accesses += len(experts)
        for e in hit + [e for e in experts if e not in hit]:
            if e in cache:
                cache.remove(e)
            cache.append(e)
            if len(cache) > capacity:
                cache.pop(0)
    return hits / max(accesses, 1)


def prefetch_recall(guesses: torch.Tensor, routed: torch.Tensor, count: int) -> float:
    """Mean fraction of each token's routed experts found among its first `count` guesses."""
    g = guesses[:, :count].long()  # [N, count]
    r = routed.long()  # [N, k]
    found = (r.unsqueeze(-1) == g.unsqueeze(1)).any(dim=-1)  # [N, k]
    return float(found.float().mean())


def routing_report(
    trace: RoutingTrace, cache_sizes=CACHE_SIZES, counts=PREFETCH_COUNTS, ahead=LAYERS_AHEAD
) -> dict[str, Any]:
    """Hit rate per cache size and prefetch recall per (layers ahead, experts prefetched)."""
    cache_sizes = [c for c in cache_sizes if c <= trace.num_experts]
    per_layer_hits = {
        str(layer): [round(lru_hit_rate(trace.routed_ids(layer), c), 4) for c in cache_sizes] for layer in trace.layers
    }
    mean_hits = [
        round(sum(v[i] for v in per_layer_hits.values()) / len(per_layer_hits), 4) for i in range(len(cache_sizes))
    ]

    def recall(rescaled: bool) -> dict[str, list[float]]:
        out = {}
        for a in ahead:
            pairs = [(s, trace.layers[p + a]) for p, s in enumerate(trace.layers) if p + a < len(trace.layers)]
            if not pairs:
                continue
            row = []
            for n in counts:
                vals = [prefetch_recall(trace.guess_ids(s, a, rescaled), trace.routed_ids(d), n) for s, d in pairs]
                row.append(round(sum(vals) / len(vals), 4))
            out[str(a)] = row
        return out

    usage = torch.stack(
        [
            torch.bincount(trace.routed_ids(layer).long().flatten(), minlength=trace.num_experts)
            for layer in trace.layers
        ]
    ).float()
    usage = usage / usage.sum(dim=1, keepdim=True)
    return {
        "tokens": trace.tokens,
        "moe_layers": trace.layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "cache_sizes": cache_sizes,
        "lru_hit_rate": mean_hits,
        "lru_hit_rate_per_layer": per_layer_hits,
        "prefetch_counts": list(counts),
        "prefetch_recall": recall(True),  # the engine's prefetcher: norm-ratio rescaled hidden state
        "prefetch_recall_raw": recall(False),  # the paper's: router applied to the hidden state as is
        # load balance: each layer's share of routed slots per expert (1/num_experts when balanced)
        "expert_usage_per_layer": {
            str(layer): [round(float(u), 4) for u in row] for layer, row in zip(trace.layers, usage, strict=True)
        },
        "expert_usage_max": round(float(usage.max()), 4),
    }

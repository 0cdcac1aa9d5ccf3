"""`engine.stats_dict()` as Prometheus text (exposition format 0.0.4)."""

from __future__ import annotations

from typing import Any

# (metric name, stats key, type, help)
METRICS = (
    ("moe_llm_tokens_generated_total", "tokens_generated", "counter", "Tokens generated, every request."),
    ("moe_llm_prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens of finished requests."),
    ("moe_llm_requests_total", "requests", "counter", "Requests finished or cancelled after their first token."),
    ("moe_llm_tokens_per_second", "recent_tokens_per_second", "gauge", "Tokens per second over the last 10 s."),
    ("moe_llm_decode_tokens_per_second", "tokens_per_second", "gauge", "Per-request decode rate, cumulative."),
    ("moe_llm_queue_depth", "queue_depth", "gauge", "Requests waiting for a batch slot."),
    ("moe_llm_active_requests", "active_requests", "gauge", "Requests in the batch."),
    ("moe_llm_requests_rejected_total", "requests_rejected", "counter", "Requests refused with a full queue."),
    (
        "moe_llm_requests_kv_waited_total",
        "requests_kv_waited",
        "counter",
        "Requests that waited in the queue for KV room within the GPU budget's plan.",
    ),  # fmt: skip
    ("moe_llm_batch_steps_total", "batch_steps", "counter", "Engine steps (a prefill chunk and/or decode rows)."),
    ("moe_llm_max_batch_rows", "max_batch_rows", "gauge", "Most requests decoded in one step so far."),
    ("moe_llm_batch_graph_captures_total", "batch_graph_captures", "counter", "Batched decode graphs captured."),
    ("moe_llm_batch_graph_replays_total", "batch_graph_replays", "counter", "Batched decode steps replayed."),
    ("moe_llm_expert_cache_hits_total", "cache_hits", "counter", "Routed experts read from a device slot."),
    ("moe_llm_expert_cache_misses_total", "cache_misses", "counter", "Routed experts read from host RAM."),
    ("moe_llm_expert_cache_hit_rate", "hit_rate", "gauge", "Expert cache hits / (hits + misses)."),
    ("moe_llm_expert_evictions_total", "evictions", "counter", "Experts evicted from the cache."),
    ("moe_llm_prefetch_issued_total", "prefetch_issued", "counter", "Expert copies issued ahead of use."),
    ("moe_llm_prefetch_used_total", "prefetch_used", "counter", "Prefetched experts that were used."),
    ("moe_llm_bytes_to_device_total", "bytes_to_device", "counter", "Bytes copied into expert slots."),
    ("moe_llm_bytes_from_host_total", "bytes_from_host", "counter", "Bytes read in place from host RAM."),
    ("moe_llm_host_syncs_per_token", "host_syncs_per_token", "gauge", "Host waits per one-token decode step."),
    ("moe_llm_expert_slots", "expert_slots", "gauge", "Expert slots on the device."),
    ("moe_llm_prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens", "counter", "Prompt tokens reused."),
    ("moe_llm_prefix_cache_hit_rate", "prefix_cache_hit_rate", "gauge", "Reused / looked-up prompt tokens."),
    ("moe_llm_prefix_cache_bytes", "prefix_cache_bytes", "gauge", "Host bytes held by the prefix cache."),
    ("moe_llm_prefill_tokens_total", "prefill_tokens", "counter", "Prompt tokens run through prefill forwards."),
)


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def prometheus_text(stats: dict[str, Any], errors: dict[int, int] | None = None) -> str:
    lines = []
    for name, key, kind, help_ in METRICS:
        if key in stats and stats[key] is not None:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(stats[key])}"]
    name = "moe_llm_time_to_first_token_seconds"
    lines += [f"# HELP {name} Time from a request's arrival to its first token.", f"# TYPE {name} summary",
              f"{name}_sum {_num(stats.get('time_to_first_token_sum_s', 0.0))}",
              f"{name}_count {_num(stats.get('time_to_first_token_count', 0))}"]  # fmt: skip
    name = "moe_llm_http_errors_total"
    lines += [f"# HELP {name} Error responses by status.", f"# TYPE {name} counter"]
    lines += [f'{name}{{status="{code}"}} {n}' for code, n in sorted((errors or {}).items())]
    return "\n".join(lines) + "\n"

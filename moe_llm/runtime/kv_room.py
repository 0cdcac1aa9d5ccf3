"""Admission by KV room: how many requests may decode together within the KV a GPU budget's
plan reserves.

With a budget the plan holds one context (`max_context` positions) of KV for the requests that
decode together, besides the graph decoder's static cache when decode runs as CUDA graphs. A
batch's KV is rows x the widest row's window (`fused_decode`, `batch_graph.RowsKV`), so a
waiting request joins only while every active request and it, each counted at the widest of
their windows, fit that context; else it waits, in order, for requests to finish. A lone request
always fits. Without a budget nothing is planned, and `max_batch` alone applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence


def positions(seq: Sequence, engine: Engine) -> int:
    """Key positions `seq` may come to hold on the device while it decodes among others: the
    graph decoder's window of its last position, else its prompt plus its new tokens."""
    last = len(seq.prompt_ids) + seq.max_new - 1
    return engine.graphs.window_for(last) if engine.graphs is not None else last + 1


def fits(active: list[Sequence], seq: Sequence, engine: Engine) -> bool:
    """Whether `seq` may join `active` within the budget's planned KV (module docstring)."""
    if not active or engine.plan.budget_bytes is None:
        return True
    widest = max(positions(s, engine) for s in [*active, seq])
    return (len(active) + 1) * widest <= engine.context_length

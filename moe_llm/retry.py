"""Retries for failures where retrying is the right answer, and only those.

Allocating the expert slot pool can hit a transient out-of-memory (another process
holds memory, the caching allocator is fragmented). The answer is to free cached
blocks and try again with fewer slots, logging each step. Anything that is not an
out-of-memory error (a bad argument, a programming error) propagates at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from tenacity import RetryCallState, Retrying, retry_if_exception

from .config import format_size
from .errors import BudgetError

log = logging.getLogger(__name__)

T = TypeVar("T")
SHRINK = 0.75  # keep this fraction of the slots after each out-of-memory


def is_oom(exc: BaseException) -> bool:
    """CUDA (or host) allocation failure, as opposed to any other error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower()
    )


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allocate_shrinking(
    alloc: Callable[[int], T],
    slots: int,
    bytes_per_slot: int,
    shrink: bool = True,
    max_attempts: int = 8,
) -> tuple[T, int]:
    """`alloc(k)` with k = `slots`, shrinking k by `SHRINK` after each out-of-memory.

    Returns (result, k). With `shrink=False` (the user fixed the slot count) or once
    k is 1, an out-of-memory becomes a `BudgetError`.
    """
    state = {"slots": slots}

    def stop(rs: RetryCallState) -> bool:
        return not shrink or state["slots"] <= 1 or rs.attempt_number >= max_attempts

    def before_sleep(rs: RetryCallState) -> None:
        old = state["slots"]
        state["slots"] = max(1, min(old - 1, int(old * SHRINK)))
        _release_cached_memory()
        log.warning(
            "out of memory allocating %d expert slots (%s); retrying with %d",
            old, format_size(old * bytes_per_slot), state["slots"],
        )  # fmt: skip

    retrying = Retrying(retry=retry_if_exception(is_oom), stop=stop, before_sleep=before_sleep, reraise=True)
    try:
        for attempt in retrying:
            with attempt:
                result = alloc(state["slots"])
    except Exception as exc:
        if not is_oom(exc):
            raise
        _release_cached_memory()
        raise BudgetError(
            f"out of memory allocating {state['slots']} expert slot(s) "
            f"({format_size(state['slots'] * bytes_per_slot)}); lower --cache-per-layer or --gpu-budget, "
            "or free device memory"
        ) from None
    if state["slots"] != slots:
        log.warning("expert cache shrunk from %d to %d slots after out-of-memory", slots, state["slots"])
    return result, state["slots"]

"""The offloaded experts, in the order of the data path:

format (bytes of one expert) -> store (pinned host RAM) -> cache (global GPU slots, address
table, policy) -> prefetch (a prompt's next layer) -> runtime (dispatch: one-token steps on
the device, prompts by the host). `ExpertsRuntime` is the one object the engine talks to.
"""

from .cache import ExpertCache
from .format import ExpertFormat
from .policy import POLICIES
from .prefetch import PromptPrefetcher
from .store import ExpertStore


def __getattr__(name: str):
    """The runtime on first use: it imports `moe_llm.kernels`, which imports `experts.format`, so
    importing it here eagerly would make `import moe_llm.kernels` first a circular import."""
    if name in ("ExpertsRuntime", "OffloadedExperts"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "POLICIES", "ExpertCache", "ExpertFormat", "ExpertStore", "ExpertsRuntime", "OffloadedExperts", "PromptPrefetcher",
]  # fmt: skip

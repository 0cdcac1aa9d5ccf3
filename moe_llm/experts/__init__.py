"""The offloaded experts, in the order of the data path:

format (bytes of one expert) -> store (pinned host RAM) -> cache (global GPU slots, address
table, policy) -> prefetch (a prompt's next layer) -> runtime (dispatch: one-token steps on
the device, prompts by the host). `ExpertsRuntime` is the one object the engine talks to.
"""

from .cache import ExpertCache
from .format import ExpertFormat
from .policy import POLICIES
from .prefetch import PromptPrefetcher
from .runtime import ExpertsRuntime, OffloadedExperts
from .store import ExpertStore

__all__ = [
    "POLICIES", "ExpertCache", "ExpertFormat", "ExpertStore", "ExpertsRuntime", "OffloadedExperts", "PromptPrefetcher",
]  # fmt: skip

"""Architecture maps: one declarative map per MoE family, and a generic one.

Every module that needs to know where a family keeps its layers, experts, router
and norms, or how its checkpoint names them, asks the map (`ArchMap`) instead of
probing module names. See `spec` for what a map says, `families` for the maps and
`resolve` for picking one and checking it against the transformers skeleton.
"""

from .families import FAMILIES, GENERIC_VERIFIED
from .resolve import GENERIC, MoeGeometry, arch_for_type, bind, contract_problem, resolve_arch
from .spec import ArchMap, CheckpointKeys, ExpertLayout, RouterSpec

__all__ = [
    "FAMILIES",
    "GENERIC_VERIFIED",
    "GENERIC",
    "ArchMap",
    "CheckpointKeys",
    "ExpertLayout",
    "MoeGeometry",
    "RouterSpec",
    "arch_for_type",
    "bind",
    "contract_problem",
    "resolve_arch",
]

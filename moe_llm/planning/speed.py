"""The decode speed to expect: the CPU road's cost model (`experts.roads`) on a plan and a machine.

A projection, not a measurement. For one decoded token at batch 1:

- **Routing is uniform**, the worst case for a cache: the global pool's S slots spread
  evenly over the L MoE layers (S = q L + r: r layers hold q + 1), and a layer's k routed
  experts are k distinct of its E, so its miss count m is hypergeometric. Trained routers
  are skewed and repeat across tokens, so real hit rates are higher.
- **Resident time**: the trunk bytes a token reads (`ModelPlan.token_trunk_bytes`) and every
  hit, at HBM_EFFICIENCY of the HBM bandwidth, at most EXPERT_KERNEL_GBPS (what the decode
  kernels reach).
- **Two roads to a missed expert**: over PCIe (zero-copy: the GPU kernel reads it in place
  at ZERO_COPY_EFFICIENCY of the link's copy bandwidth), or on the CPU threads, which read it
  at ``min(ram_gbps * CPU_EFFICIENCY, CPU_GBPS_PER_THREAD * threads)``, ``threads = cores - 1``
  (one core drives the GPU, as the split's serving thread leaves it). The engine's own
  split (`experts.roads.road_rates`) uses these same rates.
- **Per layer the roads overlap**: `predicted_layer_s` is the larger of the GPU's time (hits,
  and its share of each miss) and the CPU's (its share, plus HANDOFF_S to hand the layer over
  and back), and at least the time host RAM (``ram_gbps``) takes to serve both roads' reads. `take_table` gives the CPU's share: `off` none, `all` every miss, `auto` the
  share at which both roads finish together (at SHARE_STEPS granularity; none or all of the
  miss where either is faster still), so `auto` is never slower than `off` or `all`.
- **Not counted**: KV reads (a short context), admission copies sharing the link, kernel
  launches and syncs. docs/tuning.md checks these projections against the H200 benchmark.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from math import comb
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..experts.roads import MODES, Roads, cpu_read_fraction, predicted_layer_s, take_table

# The CPU road reads a missed expert at this fraction of the RAM read bandwidth: the CPU kernel
# read 14.4 of 26.2 GB/s (55%) with 2 threads on the 2-core development machine
# (scripts/bench_cpu_kernel.py --bits 2 --threads 1 2); on the H200 host's 15 threads it reached
# 38 GB/s in steady state at 4 GiB (docs/benchmarks.md).
CPU_EFFICIENCY = 0.55
# ...and at most this many GB/s per thread (the same run: 10.0 GB/s on one thread, 14.4 on two).
CPU_GBPS_PER_THREAD = 7.0
# What the decode kernels reach of the raw bandwidths (measured on the H200, docs/benchmarks.md):
# a memory-bound GEMV reads HBM at about 70% of its peak (torch's bf16 GEMV: 3.4 of 4.8 TB/s),
# but a resident token reads its bytes at about 1,350 GB/s there: 4.36 GB of experts, attention
# and LM head in 3.21 ms at tree 396cd41 (the 2-bit expert GEMVs themselves reach 2.1 TB/s; the
# trunk's small kernels and the launches between them take the rest; a GPU with fewer or slower
# SMs than the H200 would have a lower such limit, which is not modelled); a kernel reads pinned
# host RAM in place at about 36 GB/s where the copy engine moves 55.
HBM_EFFICIENCY = 0.7
EXPERT_KERNEL_GBPS = 1350.0
ZERO_COPY_EFFICIENCY = 0.65
# Raising a layer's flag to the CPU thread and waiting for its rows: with a take of 0 the split
# cost 31.03 -> 29.50 tok/s at 12 GiB on the H200, about 50 us per layer.
HANDOFF_S = 50e-6
SHARE_STEPS = 256  # the CPU's share of a missed expert in 1/256ths (the kernels cut at whole tiles)

# documented defaults, used where a value is neither given nor measured nor detected
DEFAULTS = {
    "pcie_gbps": (25.0, "PCIe 4 x16 in practice"),
    "ram_gbps": (60.0, "dual-channel DDR5 in practice"),
    "hbm_gbps": (500.0, "an RTX 4070-class card, 504 GB/s"),
}
_FLAGS = {"pcie_gbps": "--pcie-gbps", "ram_gbps": "--ram-gbps", "hbm_gbps": "--hbm-gbps", "cores": "--cores",
          "cpu_road_gbps": "--cpu-gbps"}  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """What a projection assumes of a machine; `sources` says where each value came from."""

    pcie_gbps: float  # host -> GPU, as a kernel reads pinned host RAM (zero-copy)
    ram_gbps: float  # host RAM read bandwidth
    cores: int  # physical cores
    hbm_gbps: float  # GPU memory bandwidth
    sources: tuple[tuple[str, str], ...] = ()
    cpu_road_gbps: float | None = None  # the CPU road's rate when known (scripts/bench_cpu_kernel.py); else modelled

    def __post_init__(self):
        for name in ("pcie_gbps", "ram_gbps", "hbm_gbps", "cpu_road_gbps"):
            v = getattr(self, name)
            if name == "cpu_road_gbps" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} ({_FLAGS[name]}) must be a positive number of GB/s, got {v!r}")
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ConfigError(f"cores (--cores) must be a whole number of at least 1, got {self.cores!r}")

    @property
    def cpu_threads(self) -> int:
        return max(1, self.cores - 1)

    @property
    def cpu_gbps(self) -> float:
        """The CPU road's rate: as given, else RAM bandwidth x CPU_EFFICIENCY, or the threads' limit
        if lower."""
        if self.cpu_road_gbps is not None:
            return self.cpu_road_gbps
        return min(self.ram_gbps * CPU_EFFICIENCY, CPU_GBPS_PER_THREAD * self.cpu_threads)

    def roads(self) -> Roads:
        """The rates the engine's kernels reach on this machine: HBM and the zero-copy link at
        their efficiencies (HBM at most the expert kernel's limit), the CPU road at `cpu_gbps`."""
        return Roads(
            gpu_hbm=min(self.hbm_gbps * HBM_EFFICIENCY, EXPERT_KERNEL_GBPS) * 1e9,
            zero_copy=self.pcie_gbps * 1e9 * ZERO_COPY_EFFICIENCY,
            cpu=self.cpu_gbps * 1e9, handoff_s=HANDOFF_S, ram=self.ram_gbps * 1e9,
        )  # fmt: skip

    def source(self, name: str) -> str:
        return dict(self.sources).get(name, "given")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = dict(self.sources)
        d["cpu_threads"], d["cpu_gbps"] = self.cpu_threads, self.cpu_gbps
        return d


def machine_file() -> Path:
    """Where `measure_machine` keeps this machine's measured bandwidths."""
    from ..defaults import cache_dir

    return cache_dir() / "machine.json"


def _measured() -> dict[str, Any]:
    """This host's measured values, if `measure_machine` ran here (another host's are ignored)."""
    try:
        d = json.loads(machine_file().read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) and d.get("host") == platform.node() else {}


def _detected_hbm() -> tuple[float, str] | None:
    """Peak memory bandwidth of the current CUDA device, from its memory clock and bus width."""
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * bus_bits / 8 * clock_khz * 1e3 / 1e9, p.name


def machine(
    pcie_gbps: float | None = None, ram_gbps: float | None = None, cores: int | None = None,
    hbm_gbps: float | None = None, cpu_gbps: float | None = None,
) -> Machine:  # fmt: skip
    """A machine from the values given; the others measured here (`measure_machine`), detected
    (cores: this process's physical cores; HBM: the CUDA device's peak) or the DEFAULTS."""
    from ..experts.cpu.kernel import default_threads

    given = {"pcie_gbps": pcie_gbps, "ram_gbps": ram_gbps, "cores": cores, "hbm_gbps": hbm_gbps}
    values, sources = {}, {}
    measured = _measured() if pcie_gbps is None or ram_gbps is None else {}
    for name, value in given.items():
        if value is not None:
            values[name], sources[name] = value, "given"
        elif name in ("pcie_gbps", "ram_gbps") and isinstance(measured.get(name), (int, float)):
            values[name], sources[name] = float(measured[name]), f"measured {measured.get('measured_at', '')}".strip()
        elif name == "cores":
            values[name], sources[name] = default_threads(), "detected on this machine"
        elif name == "hbm_gbps" and (hbm := _detected_hbm()) is not None:
            values[name], sources[name] = hbm[0], f"detected: {hbm[1]} peak"
        else:
            values[name], why = DEFAULTS[name]
            sources[name] = f"default: {why}"
    return Machine(**values, sources=tuple(sources.items()), cpu_road_gbps=cpu_gbps)


def measure_machine() -> dict[str, Any]:
    """Measure this machine's RAM read bandwidth (the CPU kernel's probe, every physical core)
    and, with a CUDA device, its pinned host -> device bandwidth; keep them in `machine_file`."""
    from ..experts.cpu import CpuKernelUnavailable, default_threads, measure_read_bandwidth

    out: dict[str, Any] = {
        "host": platform.node(),
        "measured_at": time.strftime("%Y-%m-%d"),
        "cores": default_threads(),
    }
    try:
        out["ram_gbps"] = round(measure_read_bandwidth(), 2)
    except CpuKernelUnavailable as exc:
        raise ConfigError(f"cannot measure the RAM bandwidth: {exc}") from None
    import torch

    if torch.cuda.is_available():
        from ..bench.protocol import pinned_bandwidth

        out["pcie_gbps"] = round(pinned_bandwidth(torch.device("cuda")) / 1e9, 2)
    path = machine_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


@dataclass(frozen=True)
class RoadProjection:
    """One `cpu_experts` setting's expected decode step (per token, all MoE layers)."""

    cpu_experts: str
    misses_per_token: float  # routed experts without a GPU slot
    pcie_experts_per_token: float  # of them, the expert-equivalents the GPU reads over PCIe
    cpu_experts_per_token: float  # ... and those the CPU threads compute
    pcie_bytes_per_token: float
    cpu_bytes_per_token: float  # a partly taken expert: its share of gate_up, and all of down
    resident_s_per_token: float  # the trunk a token reads, at HBM speed (hits count in the layers)
    s_per_token: float

    @property
    def tok_s(self) -> float:
        return 1.0 / self.s_per_token

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tok_s": self.tok_s}


def _miss_counts(experts: int, slots: int, k: int) -> list[float]:
    """P(m misses) for m = 0..k: k distinct experts of `experts`, `slots` of them resident."""
    total = comb(experts, k)
    return [comb(experts - slots, m) * comb(slots, k - m) / total for m in range(k + 1)]


def _auto_take(m: int, k: int, balanced: int, roads: Roads, expert_bytes: int, bits: int | None) -> int:
    """The cost model's balanced take, or a neighbouring step, none or all where faster."""
    steps = [t for t in (balanced, balanced - 1, balanced + 1, 0, SHARE_STEPS) if 0 <= t <= SHARE_STEPS]
    return min(steps, key=lambda t: predicted_layer_s(m, k, t, SHARE_STEPS, roads, expert_bytes, bits))


def project_decode(mp, mach: Machine) -> dict[str, RoadProjection]:
    """`cpu_experts` mode -> the expected decode step of plan `mp` (a `ModelPlan`) on `mach`."""
    roads = mach.roads()
    layers, experts, k, nbytes = mp.moe_layers, mp.num_experts, mp.top_k, mp.plan.expert_bytes
    q, r = divmod(mp.plan.slots, layers)
    groups = [(n, s) for n, s in ((layers - r, q), (r, q + 1)) if n]  # (layers, slots each)
    bits = mp.experts_bits
    g = cpu_read_fraction(bits)  # as the engine's split counts the CPU's bytes
    resident_s = mp.token_trunk_bytes / roads.gpu_hbm
    out = {}
    for mode in MODES:
        table = [0] * (k + 1) if mode == "off" else take_table(mode, k, SHARE_STEPS, 1, roads, nbytes, bits)
        t = misses = on_cpu = cpu_bytes = 0.0
        for n, slots in groups:
            for m, p in enumerate(_miss_counts(experts, slots, k)):
                take = _auto_take(m, k, table[m], roads, nbytes, bits) if mode == "auto" and m else table[m]
                f = take / SHARE_STEPS
                t += n * p * predicted_layer_s(m, k, take, SHARE_STEPS, roads, nbytes, bits)
                misses += n * p * m
                on_cpu += n * p * m * f
                cpu_bytes += n * p * m * (f * g + (1 - g)) * nbytes if take else 0.0
        out[mode] = RoadProjection(
            cpu_experts=mode, misses_per_token=misses, pcie_experts_per_token=misses - on_cpu,
            cpu_experts_per_token=on_cpu, pcie_bytes_per_token=(misses - on_cpu) * nbytes,
            cpu_bytes_per_token=cpu_bytes, resident_s_per_token=resident_s, s_per_token=resident_s + t,
        )  # fmt: skip
    return out

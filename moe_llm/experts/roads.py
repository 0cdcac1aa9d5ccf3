"""The cost model of the CPU road: how much of each missed expert the CPU threads compute.

Two roads lead to a missed expert's bytes in host RAM: the GPU reads them over the link
(zero-copy), or the CPU threads compute the expert where it lies (`experts.split`). For a
layer with m of its k routed experts missed, the CPU takes a share f of each miss that makes
both roads finish together (`take_table`), from the roads' rates (`Roads`): the planner's,
measured once per machine (`road_rates`). The engine's `auto` only starts there; the tables
the model gives at other CPU rates are the candidates its search times (`take_search`). The
planner projects whole tokens with the same model (`planning.speed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("off", "auto", "all")


@dataclass(frozen=True)
class Roads:
    """Bandwidths of the two roads to a missed expert (bytes/s), and a fixed cost per layer."""

    gpu_hbm: float  # a resident expert, read by the decode kernel
    zero_copy: float  # a missed expert read by the GPU over the link
    cpu: float  # a missed expert computed by the CPU threads
    handoff_s: float = 15e-6  # flag to the CPU and back, per layer with a CPU share
    ram: float = math.inf  # host RAM read rate, which both roads' reads of a miss share


def cpu_read_fraction(bits: int | None) -> float:
    """g: the part of a missed expert whose bytes the CPU reads only for its share. At 2 and 4
    bits that is all of it (the share's gate_up rows and the share's bytes of every down row); at
    3 bits down's rows are unpacked whole, so only gate_up, 2/3 of the bytes."""
    return 2 / 3 if bits == 3 else 1.0


def take_table(mode: str, k: int, pd: int, align: int, roads: Roads, expert_bytes: int, bits: int | None) -> list[int]:
    """Bytes of the down plane (of PD) the CPU takes from each missed expert of `bits`-bit
    experts, by number of misses m = 0..k in the layer. ``all``: every miss; ``auto``: the share
    f that makes both roads finish together. The GPU reads (k - m) hits and (1 - f) of each
    miss; the CPU reads (f g + (1 - g)) of each miss, g = `cpu_read_fraction`."""
    table = [0] * (k + 1)
    g = cpu_read_fraction(bits)
    t_hit, t_zc, t_cpu = (expert_bytes / bw for bw in (roads.gpu_hbm, roads.zero_copy, roads.cpu))
    for m in range(1, k + 1):
        if mode == "all":
            table[m] = pd
            continue
        f = ((k - m) * t_hit + m * t_zc - m * (1 - g) * t_cpu - roads.handoff_s) / (m * (t_zc + g * t_cpu))
        f = min(1.0, max(0.0, f))
        table[m] = min(pd, int(round(f * pd / align)) * align)
    return table


def predicted_layer_s(
    m: int, k: int, take: int, pd: int, roads: Roads, expert_bytes: int, bits: int | None
) -> float:  # fmt: skip
    """Modelled time of one MoE layer's `bits`-bit experts with m misses and the CPU taking
    `take` of PD: the longer road, and at least the time host RAM takes to serve both roads'
    reads of the misses (on the H200 hosts the split's rows were bound by it: docs/benchmarks.md)."""
    f = take / pd if pd else 0.0
    g = cpu_read_fraction(bits)
    on_cpu = m * (f * g + (1 - g)) * expert_bytes if take else 0.0  # bytes the CPU threads read
    on_link = m * (1 - f) * expert_bytes  # ... and the GPU over the link
    gpu = (k - m) * expert_bytes / roads.gpu_hbm + on_link / roads.zero_copy
    cpu = on_cpu / roads.cpu + roads.handoff_s if take else 0.0
    return max(gpu, cpu, (on_cpu + on_link) / roads.ram)


@dataclass(frozen=True)
class TakeModel:
    """What the take tables of a split depend on besides the roads' rates: one table per step
    of 1 .. `max_rows` decoded rows, for b * k routed positions (`take_table`)."""

    mode: str
    top_k: int
    pd: int
    align: int
    expert_bytes: int
    bits: int | None
    max_rows: int

    def tables(self, roads: Roads) -> list[list[int]]:
        return [
            take_table(self.mode, b * self.top_k, self.pd, self.align, roads, self.expert_bytes, self.bits)
            for b in range(1, self.max_rows + 1)
        ]


def road_rates() -> Roads:
    """The two roads' rates on this machine: the planner's (`planning.speed.machine`: RAM read
    and pinned host-to-device bandwidths measured once and cached, the GPU's peak), as the
    decode kernels and the CPU kernel reach them (`Machine.roads`)."""
    from ..planning import speed

    mach = speed.machine()
    if not all(mach.source(name).startswith("measured") for name in ("pcie_gbps", "ram_gbps")):
        speed.measure_machine()  # once per machine: kept in machine.json
        mach = speed.machine()
    return mach.roads()

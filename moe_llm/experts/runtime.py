"""ExpertsRuntime: the one object that owns the offloaded experts (cache, prompt prefetch,
dispatch) and that the engine and the transformers trunk talk to.

Each MoE layer's ``mlp.experts`` is replaced by `OffloadedExperts`, which keeps the
transformers call ``forward(hidden_states[T,H], top_k_index[T,k], top_k_weights[T,k])``
and hands it to the runtime. Two paths:

- **one token** (decode): the routed experts are computed from wherever they lie, with
  no host round trip. On CUDA with the compact format, `kernels.triton_moe` reads
  ``top_k_index`` and the cache's address table on the device (a slot, or pinned host
  RAM for a miss), so a whole decode step can be captured as one CUDA graph. On CPU
  the same semantics run in torch (slot views, or the host buffer in place). The
  routing of every layer is recorded on the device; `end_step`, once the step has
  finished, shows it to the cache, which counts hits and misses and admits experts
  into slots for the steps that follow, off the critical path. A step run ahead
  (`decode_graph.GraphDecoder.enqueue`) has its routing copied out when it is enqueued
  (`snapshot`), since the step after it overwrites the device record before the host
  ends it.
- **a prompt** (and every decode where no device kernel fits, e.g. unquantized experts
  on CUDA): one host sync per layer reads the routed experts; resident experts run
  first, misses are copied into slots (recycled in order behind their release events
  when a layer needs more experts than the cache has slots), and the next layer's
  prompt prefetch is queued behind those copies.

Every routed (token, k) position gets its own output row and rows are summed in k
order, so the result does not depend on where an expert was read from or when.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ActFn, fast_path, rows
from .cache import ExpertCache
from .compute import expert_forward
from .format import ExpertFormat
from .prefetch import PromptPrefetcher

log = logging.getLogger(__name__)


def kernels_compute(fmt: ExpertFormat, act_fn: ActFn | None) -> bool:
    """Whether the compiled expert kernels (Triton decode, the C CPU kernel) compute these experts:
    a plain layout (no biases, act_fn(gate) * up, decided by the architecture map) with a SiLU
    act_fn. Every other expert takes the torch path (`compute.expert_forward`)."""
    if not fmt.compute.plain:
        return False
    probe = torch.linspace(-4.0, 4.0, 17)
    try:
        return bool(torch.allclose(act_fn(probe), F.silu(probe), atol=1e-6))
    except Exception:  # an activation that rejects a plain CPU tensor: use the generic path
        return False


def _device_kernels(cache: ExpertCache, fmt: ExpertFormat, act_fn: ActFn):
    """The Triton dispatch module if one-token steps can run on the device, else None."""
    if not cache.cuda or fmt.specs is None or not kernels_compute(fmt, act_fn):
        return None
    try:
        from ..kernels import triton_moe
    except Exception as exc:  # no Triton, or one that fails to initialise
        log.info("device-side expert dispatch unavailable (%s)", exc)
        return None
    return triton_moe if triton_moe.supported(fmt) else None


class Routed(NamedTuple):
    """The routing of one decode step, copied to the host when the step was enqueued."""

    ids: torch.Tensor  # [moe layers, k] int64 on the host: valid once the step has finished
    step: int  # the cache's number of the step (`ExpertCache.steps`): hits are judged as of it


class ExpertsRuntime:
    def __init__(
        self,
        cache: ExpertCache,
        fmt: ExpertFormat,
        act_fn: ActFn,
        top_k: int,
        prefetcher: PromptPrefetcher | None = None,
        evict_on_admit: bool = True,
        kernel_tuning: str | None = None,
        cpu_experts: str = "off",
        max_rows: int = 1,
    ):
        self.cache = cache
        self.stats = cache.stats
        self.fmt = fmt
        self.act_fn = act_fn
        self.top_k = top_k
        self.prefetcher = prefetcher
        # after each decode step missed experts are copied into free slots; with this, also into
        # slots whose experts the policy finds less worth keeping
        self.evict_on_admit = evict_on_admit
        self.kernel_tuning = kernel_tuning  # JSON from scripts/tune_moe.py, or None: the defaults
        self._kernels = _device_kernels(cache, fmt, act_fn)
        # "device": dispatch on the GPU; "host": CPU, same semantics; "copy": host-driven copies
        self.mode = "device" if self._kernels is not None else ("copy" if cache.cuda else "host")
        self._dispatch = None  # triton_moe.MoeDecode, allocated on first use
        self._decode_out: dict[int, torch.Tensor] = {}  # layer -> [1, H]
        # [moe layers, k] routed ids of the last one-token step, where `_device_step` or `_host_step` runs it
        self._routing = None
        if self.mode != "copy":
            self._routing = torch.zeros(len(cache.layers), top_k, dtype=torch.long, device=cache.device)
        self._stepped = False  # a step has begun and not ended
        self._lone_end: float | None = None  # when the last lone decode step ended (the split's search)
        self._untimed = 0  # lone step ends not to time: a prompt's, and the first step after it
        self._rows_records: dict[int, torch.Tensor] = {}  # B rows -> [moe layers, B * k] record (kept for graphs)
        self._dequant_ws: torch.Tensor | None = None  # prefill: one expert's matrices, dequantized
        self.cpu_experts = cpu_experts
        self.max_rows = max_rows  # the most decode rows a batched step holds (the CPU road's mailbox room)
        self._split = None  # experts.split.CpuSplit: misses shared with CPU threads (device mode)
        self._cpu = None  # experts.cpu: the CPU kernel for one-token experts (host mode)
        if self.mode == "device":
            self._make_dispatch()
        if cpu_experts != "off" and fmt.specs is not None and self.mode != "copy":
            self._start_cpu_road(cpu_experts)

    @property
    def device_dispatch(self) -> bool:
        return self.mode == "device"

    @property
    def cpu_road(self) -> str:
        """Where missed experts of decode steps are computed besides the GPU: "split" (a
        share of each on CPU threads, inside the graph), "cpu" (the CPU kernel, no GPU), or "off"."""
        return "split" if self._split is not None else ("cpu" if self._cpu is not None else "off")

    @property
    def split_take(self) -> dict | None:
        """The split's table: down-plane bytes of each missed expert the CPU takes, by the
        number of misses in a layer, the plane's size and ('auto') where its search stands
        (`CpuSplit.search_report`; None without a split)."""
        if self._split is None:
            return None
        return {"take": self._split.take, "plane_bytes": self._split.plane_bytes,
                "search": self._split.search_report()}  # fmt: skip

    def _make_dispatch(self) -> None:
        k = self._kernels
        tuning = k.Tuning.from_file(self.kernel_tuning, self.fmt.bits) if self.kernel_tuning else None
        self._dispatch = k.MoeDecode(self.fmt, self.top_k, self.cache.device, tuning)

    def _start_cpu_road(self, mode: str) -> None:
        """Start the CPU road for misses; 'auto' falls back to none where it cannot run."""
        from ..errors import ConfigError
        from . import cpu
        from .split import SplitUnavailable

        if not kernels_compute(self.fmt, self.act_fn):
            if mode == "all":
                raise ConfigError(
                    "cpu_experts='all' needs bias-free SiLU experts (the CPU kernel computes silu(gate) * up)"
                )
            return
        cache = self.cache
        if self.mode == "device" and cache.num_slots >= len(cache.layers) * cache.num_experts:
            # every expert has a GPU slot: nothing ever misses, and the split's per-layer hand-off
            # (publish, flag, wait) would only cost time (about 0.5 ms a token on the H200)
            log.info("CPU experts off: every expert fits the GPU cache")
            return
        if self.mode == "device" and not self._dispatch.matches_cpu:
            # the GPU kernels quantize activations in blocks narrower than the CPU kernel's 32
            # columns (tiny shapes): a shared expert would not give the GPU's bits
            if mode == "all":
                raise ConfigError(
                    "cpu_experts='all' needs experts whose GPU kernels compute as the CPU kernel does "
                    "(int8 activations in blocks of 32 columns); this model's shapes do not allow it"
                )
            log.info("CPU experts off: the GPU kernels' activation blocks differ from the CPU kernel's")
            return
        try:
            if self.mode == "device":
                from .split import start_split

                self._split = start_split(
                    self.cache, self.fmt, self._dispatch, self.top_k, mode, max_rows=self.max_rows
                )
                weakref.finalize(self, self._split.close)  # stops the serving thread with the runtime
            else:
                cpu.kernel.lib()  # builds the kernel now, not inside the first step
                self._cpu = cpu
        except (cpu.CpuKernelUnavailable, SplitUnavailable) as exc:
            if mode == "all":
                raise ConfigError(f"cpu_experts='all' cannot run here: {exc}") from None
            log.info("CPU experts off: %s", exc)

    def close(self) -> None:
        """Stop the CPU road's thread (if any)."""
        if self._split is not None:
            self._split.close()
            self._split = None

    # -- per request / per step -------------------------------------------------
    def prompt_start(self, tokens: int) -> None:
        """Called before a prompt of `tokens` tokens runs through the trunk."""
        self._lone_end, self._untimed = None, 2  # a prompt's end and the step after it are not timed
        if self.prefetcher is not None and tokens > 1:
            self.prefetcher.prompt_start(tokens, self.top_k)

    def begin_step(self) -> None:
        """Called before each one-token forward is enqueued (or its graph replayed): a
        replayed graph runs no Python, so the step is flagged here, for `end_step`."""
        self._stepped = True
        self.cache.before_step()

    def snapshot(self, into: torch.Tensor) -> Routed:
        """The routing of the step just enqueued, copied into `into` (host, pinned on CUDA)
        without waiting, for `end_step` once the step has finished: steps enqueued after it
        overwrite the device record first."""
        into.copy_(self._routing, non_blocking=True)
        return Routed(into, self.cache.steps)

    def end_step(self, routed: Routed | None = None, rows: int = 1) -> None:
        """Called once a one-token step has finished: count it, show its routing to the cache
        (hits and misses) and admit missed experts for the steps that follow. `routed`: the
        step's routing as `snapshot` took it (steps enqueued after it may be in flight);
        by default the last step's, read now. `rows` > 1: the step decoded that many rows
        (`kernels.rows`), whose routing `_rows` recorded. A step never ended (run ahead, then
        discarded) is not counted."""
        if routed is None and not self._stepped:
            return
        self._stepped = False
        self.stats.decode_steps += 1
        if self.mode == "copy":  # host-dispatched: the forward acquired its experts, counting hits and misses
            return
        cache = self.cache
        if routed is not None:
            record = routed.ids
        else:
            record = self._routing if rows == 1 else self._rows_record(rows)
        routed_keys = [(layer, e) for layer, row in zip(cache.layers, record.tolist(), strict=True) for e in row]
        if self._split is not None:  # what the CPU thread has computed since the last step
            calls, nbytes, ns = self._split.new_counts()
            self.stats.cpu_expert_calls += calls
            self.stats.cpu_expert_bytes += nbytes
            self.stats.cpu_expert_ms += ns / 1e6
        keys = list(dict.fromkeys(routed_keys))
        _, misses = cache.observe(keys, None if routed is None else routed.step)
        if self._split is not None:
            self._time_lone_step(rows, misses)
        protect = set(keys)
        for key in keys:
            if not cache.is_resident(*key):
                cache.admit(key, protect, evict=self.evict_on_admit)

    def _time_lone_step(self, rows: int, misses: int) -> None:
        """Feed the split's search ('auto') the wall time between two lone decode steps' ends
        (the host waits for each, and a run-ahead step keeps the GPU busy in between), with the
        ended step's missed experts. A batched step, a prompt, and the first step after either
        are not timed."""
        now = time.perf_counter()
        if rows != 1:
            self._lone_end = None
            return
        if self._lone_end is not None and self._untimed == 0:
            self._split.step_time(now - self._lone_end, misses)
        self._untimed = max(0, self._untimed - 1)
        self._lone_end = now

    def reset(self) -> None:
        self._stepped = False
        self._lone_end = None
        self.cache.reset()

    # -- the experts call --------------------------------------------------------------
    def forward(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if hidden.shape[0] == 1 and self.mode != "copy":
            if self.mode == "device":
                return self._device_step(layer, hidden, top_k_index, top_k_weights)
            return self._host_step(layer, hidden, top_k_index, top_k_weights)
        if rows.batched(hidden):
            return self._rows(layer, hidden, top_k_index, top_k_weights)
        return self._grouped(layer, hidden, top_k_index, top_k_weights)

    def _rows(self, layer, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """B decoded rows (`kernels.rows`), each computed as alone: on the device in one launch
        per GEMV (misses read in place, or shared with the CPU road as a lone token's); on CPU with the CPU kernel each routed
        expert once for all its rows (`_host_rows`); elsewhere one lone step per row. The
        routing of every row is recorded for `end_step`."""
        if self.mode == "device":
            split = self._split.row(self.cache.row[layer]) if self._split is not None else None
            if split is not None and not split.fits(hidden.shape[0]):
                split = None  # more rows than the mailbox has room for: the GPU reads every miss
            out = self._dispatch.rows(
                hidden, top_k_index, top_k_weights, self.cache.table_row(layer), self.cache.pool, split
            )
        elif self.mode == "host" and self._cpu is not None:
            out = self._host_rows(layer, hidden, top_k_index, top_k_weights)
        else:
            out = torch.cat([
                self.forward(layer, hidden[b : b + 1], top_k_index[b : b + 1], top_k_weights[b : b + 1]).clone()
                for b in range(hidden.shape[0])
            ])  # fmt: skip
        if self._routing is not None:
            self._rows_record(hidden.shape[0])[self.cache.row[layer]].copy_(top_k_index.reshape(-1))
        return out

    def _rows_record(self, rows: int) -> torch.Tensor:
        """The persistent [moe layers, rows * k] routing record of a step of `rows` decoded rows
        (a captured graph of such a step writes it on every replay; `end_step` reads it)."""
        record = self._rows_records.get(rows)
        if record is None:
            record = torch.zeros(len(self.cache.layers), rows * self.top_k, dtype=torch.long, device=self.cache.device)
            self._rows_records[rows] = record
        return record

    def _out(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The persistent [1, H] output buffer of `layer` for one-token steps (static for graphs)."""
        out = self._decode_out.get(layer)
        if out is None:
            out = self._decode_out[layer] = torch.empty_like(hidden)
        return out

    def _device_step(self, layer, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        out = self._out(layer, hidden)
        cache = self.cache
        split = self._split.row(cache.row[layer]) if self._split is not None else None
        self._dispatch(hidden.reshape(-1), top_k_index, top_k_weights, cache.table_row(layer), cache.pool, out, split)
        self._routing[self.cache.row[layer]].copy_(top_k_index.reshape(-1))
        return out

    def _host_step(self, layer, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """CPU: each routed expert from its slot, or from the host buffer in place (a miss)."""
        cache = self.cache
        ids = top_k_index.reshape(-1).tolist()
        self._routing[cache.row[layer]] = top_k_index.reshape(-1)
        rows = []
        for j, e in enumerate(ids):
            slot = cache.slot_of(layer, e)
            if self._cpu is not None:  # the CPU kernel, from the slot or the host buffer in place
                y = self._cpu_expert(hidden, cache.pool[slot] if slot is not None else cache.store.buffer(layer, e))
            else:
                views = cache.views(slot) if slot is not None else cache.store.views(layer, e)
                y = expert_forward(hidden, views, self.fmt, self.act_fn)  # [1, H]
            rows.append(y.float() * top_k_weights.reshape(-1)[j].float())
        return torch.stack(rows).sum(dim=0).to(hidden.dtype)  # [1, H], summed in k order

    def _host_rows(self, layer, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """`_host_step` for B rows, each distinct routed expert read once: the CPU kernel takes
        all the rows routed to it in one call (a row's result does not depend on the others in
        the call), and each row's outputs are weighted and summed in k order as alone."""
        cache = self.cache
        ids = top_k_index.tolist()
        users: dict[int, list[tuple[int, int]]] = {}  # expert -> its (row, k) positions
        for b, row in enumerate(ids):
            for j, e in enumerate(row):
                users.setdefault(e, []).append((b, j))
        ys = {}
        for e, pos in users.items():
            slot = cache.slot_of(layer, e)
            buf = cache.pool[slot] if slot is not None else cache.store.buffer(layer, e)
            y = self._cpu_expert(hidden[[b for b, _ in pos]], buf)  # fp32 [len(pos), H]
            for i, key in enumerate(pos):
                ys[key] = y[i : i + 1]
        return torch.cat([
            torch.stack([ys[b, j].float() * top_k_weights[b, j].float() for j in range(len(row))]).sum(dim=0)
            for b, row in enumerate(ids)
        ]).to(hidden.dtype)  # fmt: skip

    def _cpu_expert(self, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self._cpu.expert_mlp(x, buf, self.fmt)  # fp32 [n, H]
        self.stats.cpu_expert_ms += (time.perf_counter() - t0) * 1e3
        self.stats.cpu_expert_calls += 1
        self.stats.cpu_expert_bytes += self.fmt.nbytes
        return y

    def _route_ids(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """What the host reads: routed ids [T*k], then the prompt prefetch guess (if any)."""
        flat = top_k_index.reshape(-1)
        guess = self.prefetcher.guess(layer, hidden) if self.prefetcher is not None else None
        return flat if guess is None else torch.cat([flat, guess.to(flat.dtype)])

    def _grouped(self, layer, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """Any number of tokens: each expert's tokens in one batch (dequantize + GEMM)."""
        T, H = hidden.shape
        k = top_k_index.shape[1]
        if T == 1:
            self.stats.decode_host_syncs += 1
        host = self._route_ids(layer, hidden, top_k_index).tolist()  # the one host sync of this layer
        routed, guessed = host[: T * k], host[T * k :]
        counts: dict[int, int] = {}
        for e in routed:
            counts[e] = counts.get(e, 0) + 1
        cache = self.cache
        order = sorted(counts, key=lambda e: (not cache.is_resident(layer, e), e))  # hits first
        slots = {}
        for e in order[: cache.num_slots]:  # as many as fit at once; none evicts another of this layer
            slots[e] = cache.acquire(layer, e, protect=order)

        flat = top_k_index.reshape(-1)
        offsets, start = {}, 0
        for e in sorted(counts):  # argsort groups positions by ascending expert id
            offsets[e] = (start, start + counts[e])
            start += counts[e]
        perm = torch.argsort(flat, stable=True)  # [T*k] positions grouped by expert
        tokens = perm // k  # [T*k] token of each position
        weights = top_k_weights.reshape(-1)[perm].float()  # [T*k]
        workspace = self._workspace(hidden)
        rows = torch.empty(T * k, H, dtype=torch.float32, device=hidden.device)  # one row per position
        for i, e in enumerate(order):
            if e not in slots:  # more routed experts than slots: recycle, behind the release events
                slots[e] = cache.acquire(layer, e, protect=order[i + 1 :])
            slot = slots[e]
            cache.wait(slot)
            a, b = offsets[e]
            y = expert_forward(hidden[tokens[a:b]], cache.views(slot), self.fmt, self.act_fn, workspace)  # [n, H]
            rows.index_copy_(0, perm[a:b], y.float() * weights[a:b, None])
            cache.release(slot)
        if guessed:
            # behind this layer's on-demand copies on the copy stream: they are on the critical
            # path, and the next layer's copies then keep the copy engine busy across the boundary
            self.prefetcher.issue(layer, guessed)
        return rows.view(T, k, H).sum(dim=1).to(hidden.dtype)

    def _workspace(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._dequant_ws is None and fast_path(hidden, self.fmt) is not None:
            # a whole gate_up [2I, H]: one dequantize and one GEMM per matrix (row chunks cost
            # prefill time on the H200); the plan (moe_llm.planning) counts this size
            n = 2 * self.fmt.intermediate * self.fmt.hidden
            self._dequant_ws = torch.empty(n, dtype=self.fmt.dtype, device=hidden.device)
        return self._dequant_ws


class OffloadedExperts(nn.Module):
    """Drop-in replacement for a transformers experts module (no parameters)."""

    handles_rows = True  # decoded rows (`kernels.rows`): `ExpertsRuntime._rows`

    def __init__(self, layer_idx: int, runtime: ExpertsRuntime, num_experts: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.runtime = runtime
        self.num_experts = num_experts
        self.act_fn = runtime.act_fn  # as on the module it replaces

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.runtime.forward(self.layer_idx, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, offloaded"

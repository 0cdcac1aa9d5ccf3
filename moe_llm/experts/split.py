"""The CPU road for missed experts: a split of each decode step between GPU and CPU.

When a routed expert is not in a GPU slot, two roads lead to its bytes in host RAM: the
GPU reads them over PCIe (zero-copy), or CPU worker threads compute the expert where it
lies, over the memory bus. This module runs both at once inside one captured decode step:

- per MoE layer the GPU `publish` kernel (`kernels.triton_moe`) decides, from the routing
  and the cache table, how much of each missed expert the CPU takes (a `take` table by miss
  count), and writes the routed positions (expert, cut, and which row's hidden state each
  reads) and the hidden states into a pinned mailbox row; a stream memory operation then
  raises the row's flag. A lone token's step publishes its k positions and one hidden state;
  a step of B batched rows (`kernels.rows`) publishes B * k positions and B hidden states,
  with take tables for B * k positions (`CpuSplit.takes`);
- a C thread (`cpu/split_loop.c`, with a team of its own: workers awake through a decode step,
  parked between requests) polls the flags, computes its share of each missed expert
  for every position that routes to it, reading the expert once for them (intermediate
  neurons ``i % PD >= cut``: those rows of gate_up, and every down row against h that is zero
  outside the share, reading only the share's bytes of each down row but at 3 bits), writes
  float64 rows back, and raises ``done``;
- meanwhile the GPU computes the rest (hits, and the other share of each miss, zero-copy);
  a stream wait on ``done`` precedes the combine, which adds the CPU rows in k order.

The step never returns to Python, so it stays one CUDA graph. Both roads compute an expert
with the same exact arithmetic (`experts/cpu/moe_cpu.c`, `kernels/triton_gemv.py`): the CPU's
share comes back as float64 sums that the combine adds to the GPU's without rounding, so
where a missed expert ran never changes the output. `cpu_experts="all"` sends every miss to
the CPU; `"auto"` (the default on CUDA) starts from the share of each miss that makes both
roads finish together by this machine's measured bandwidths (`take_table`, `road_rates`),
then moves to the tables that lone decode steps measure fastest (`take_search.TakeSearch`,
fed by `CpuSplit.step_time`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from .cpu import kernel as ck
from .cpu.kernel import ExpertLayoutC
from .roads import Roads, TakeModel, road_rates
from .take_search import TakeSearch

log = logging.getLogger(__name__)

_LINE = 64  # bytes: one flag per cache line
MAX_POSITIONS = 1024  # routed positions one step may publish (MAX_POSITIONS of cpu/split_loop.c)


class SplitUnavailable(RuntimeError):
    """The GPU/CPU split cannot run here (no stream memory operations, no CPU kernel)."""


class StreamMemOps:
    """cuStreamWriteValue32 / cuStreamWaitValue32 from the driver, on the current stream.

    Both are captured into CUDA graphs as memory-operation nodes. The write orders every
    earlier write of the stream before the flag (the default memory barrier)."""

    WAIT_EQ = 0x1

    def __init__(self):
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise SplitUnavailable(f"the CUDA driver library cannot be loaded ({exc})") from exc
        self._write = self._symbol(lib, "cuStreamWriteValue32")
        self._wait = self._symbol(lib, "cuStreamWaitValue32")

    @staticmethod
    def _symbol(lib, name: str):
        for sym in (name + "_v2", name):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
                fn.restype = ctypes.c_int
                return fn
        raise SplitUnavailable(f"the CUDA driver has no {name}")

    @staticmethod
    def _stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    def write(self, addr: int, value: int) -> None:
        rc = self._write(self._stream(), addr, value, 0)
        if rc != 0:
            raise SplitUnavailable(f"cuStreamWriteValue32 failed (CUresult {rc})")

    def wait(self, addr: int, value: int) -> None:
        rc = self._wait(self._stream(), addr, value, self.WAIT_EQ)
        if rc != 0:
            raise SplitUnavailable(f"cuStreamWaitValue32 failed (CUresult {rc})")


class HostPtr:
    """A device-visible pointer into pinned host memory, as a Triton kernel argument."""

    def __init__(self, addr: int, dtype: torch.dtype):
        self.addr, self.dtype = addr, dtype

    def data_ptr(self) -> int:
        return self.addr


def _align(n: int, a: int = _LINE) -> int:
    return -(-n // a) * a


@dataclass
class Mailbox:
    """Pinned, mapped host memory shared by the GPU step and the CPU thread.

    Per MoE row r: a flag and a done word (one cache line each), and a row of ``header``
    (int32: the step's position count n, then routed ids [P], cuts [P] and the hidden state
    each position reads, tokens [P]; P = `positions`), ``x`` (fp32 [`tokens`, H]: the step's
    hidden states) and ``y`` (float64 [P, H], the CPU's share of each position as exact sums:
    see cpu/moe_cpu.c)."""

    rows: int
    positions: int  # routed positions a step may publish: k times the most batched rows
    tokens: int  # hidden states a step may publish: the most batched rows
    hidden: int
    buf: torch.Tensor  # uint8, pinned

    @classmethod
    def allocate(cls, rows: int, positions: int, tokens: int, hidden: int) -> Mailbox:
        row = cls._row_bytes(positions, tokens, hidden)
        nbytes = 2 * rows * _LINE + rows * row + 4 * _LINE  # + stats line
        # pinned (device-visible under UVA) where there is a GPU; plain RAM for CPU-only tests
        buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return cls(rows, positions, tokens, hidden, buf)

    @staticmethod
    def _row_bytes(positions: int, tokens: int, hidden: int) -> int:
        return _align(4 * (1 + 3 * positions)) + _align(4 * tokens * hidden) + _align(8 * positions * hidden)

    @property
    def base(self) -> int:
        return self.buf.data_ptr()

    @property
    def row_bytes(self) -> int:
        return self._row_bytes(self.positions, self.tokens, self.hidden)

    def flag(self, r: int) -> int:
        return self.base + r * _LINE

    def done(self, r: int) -> int:
        return self.base + (self.rows + r) * _LINE

    def row(self, r: int) -> int:
        return self.base + 2 * self.rows * _LINE + r * self.row_bytes

    def x(self, r: int) -> int:
        return self.row(r) + _align(4 * (1 + 3 * self.positions))

    def y(self, r: int) -> int:
        return self.x(r) + _align(4 * self.tokens * self.hidden)

    def _view(self, addr: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        off = addr - self.base
        return self.buf[off : off + nbytes].view(dtype)

    def views(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row r as tensors over the mailbox: (header int32 [1 + 3P], x fp32 [tokens, H], y
        float64 [P, H]), as the publish kernel and the C thread read and write them."""
        P, T, H = self.positions, self.tokens, self.hidden
        return (
            self._view(self.row(r), 4 * (1 + 3 * P), torch.int32),
            self._view(self.x(r), 4 * T * H, torch.float32).view(T, H),
            self._view(self.y(r), 8 * P * H, torch.float64).view(P, H),
        )

    @property
    def stats_addr(self) -> int:
        return self.base + 2 * self.rows * _LINE + self.rows * self.row_bytes

    def stats(self) -> dict[str, int]:
        """(calls, bytes, ns) the CPU thread has counted: int64 words of the stats line."""
        off = self.stats_addr - self.base
        words = self.buf[off : off + 24].view(torch.int64).tolist()
        return {"cpu_expert_calls": words[0], "cpu_expert_bytes": words[1], "cpu_expert_ns": words[2]}


@dataclass
class SplitRow:
    """What the decode kernels of one MoE row need (see `kernels.triton_moe.MoeDecode`)."""

    pcut: torch.Tensor  # int32 [P] on the device: the cut of each routed position
    takes: torch.Tensor  # int32 [B + 1, P + 1] on the device: the cost model's take by miss count, per rows
    head: HostPtr
    xbox: HostPtr
    ybox: HostPtr
    _flag: int
    _done: int
    _ops: StreamMemOps

    @property
    def positions(self) -> int:
        """P: the routed positions a step may publish."""
        return self.pcut.numel()

    def take(self, rows: int) -> torch.Tensor:
        """The take table (by miss count) of a step of `rows` decoded rows."""
        return self.takes[rows]

    def fits(self, rows: int) -> bool:
        """Whether the mailbox has room for a step of `rows` rows."""
        return rows < self.takes.shape[0]

    def raise_flag(self) -> None:
        self._ops.write(self._flag, 1)

    def wait_done(self) -> None:
        self._ops.wait(self._done, 1)
        self._ops.write(self._done, 0)


class _Ctx(ctypes.Structure):
    """`moe_split_ctx` of cpu/split_loop.c."""

    _fields_ = [
        ("rows", ctypes.c_int32), ("positions", ctypes.c_int32), ("experts", ctypes.c_int32), ("pd", ctypes.c_int32),
        ("threads", ctypes.c_int32), ("tokens", ctypes.c_int32),
        ("row_bytes", ctypes.c_int64), ("x_off", ctypes.c_int64), ("y_off", ctypes.c_int64),
        ("flags", ctypes.c_void_p), ("dones", ctypes.c_void_p), ("box", ctypes.c_void_p), ("addr", ctypes.c_void_p),
        ("stop", ctypes.c_void_p), ("stats", ctypes.c_void_p), ("started", ctypes.c_void_p), ("layout", ExpertLayoutC),
    ]  # fmt: skip


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    """The CPU kernel library with the split's two entry points declared."""
    lib = ck.lib()
    lib.moe_split_expert_share.argtypes = [
        ctypes.c_void_p, ctypes.POINTER(ExpertLayoutC), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int,
    ]  # fmt: skip
    lib.moe_split_expert_share.restype = ctypes.c_int
    lib.moe_split_serve.argtypes = [ctypes.c_void_p]
    lib.moe_split_serve.restype = ctypes.c_int
    return lib


def expert_share(buffer: torch.Tensor, fmt, x: torch.Tensor, cut: int, pd: int, threads: int | None = None):
    """The CPU share (intermediate neurons i % pd >= cut) of one expert for one token x [H],
    as the serving thread computes it: float64 [H], exact sums that the GPU's share adds to
    without rounding. cut = 0 is the whole expert."""
    xs = x.detach().reshape(-1).to(torch.float32).contiguous()
    y = torch.empty(fmt.hidden, dtype=torch.float64)
    layout = ck.layout_struct(fmt)
    rc = _lib().moe_split_expert_share(
        ctypes.c_void_p(buffer.data_ptr()), ctypes.byref(layout), ctypes.c_void_p(xs.data_ptr()), cut, pd,
        ctypes.c_void_p(y.data_ptr()), ck._threads(threads),
    )  # fmt: skip
    ck._check(rc, "moe_split_expert_share")
    return y


class CpuSplit:
    """The mailbox, the serving C thread and the device tables of the split, for one runtime.

    `takes[b]`: the take table (CPU bytes of each missed position's down plane, by the number
    of missed positions) of a step of b decoded rows, b = 1 .. len(takes) - 1 (a lone token's is
    takes[1], of k + 1 entries). With `search` ('auto'), the tables are the search's, and
    move with the lone decode steps' measured times (`step_time`)."""

    def __init__(
        self, cache, fmt, top_k: int, plane_bytes: int, takes: list[list[int]], threads: int | None = None, ops=None,
        search: TakeSearch | None = None,
    ):  # fmt: skip
        self.ops = ops if ops is not None else StreamMemOps()
        rows = len(cache.layers)
        max_rows = len(takes)
        positions = max_rows * top_k
        if positions > MAX_POSITIONS:
            raise ValueError(
                f"{max_rows} rows of {top_k} routed experts exceed the mailbox's {MAX_POSITIONS} positions"
            )
        self.top_k = top_k
        self.plane_bytes = plane_bytes
        store = cache.store
        # the serving loop makes the same checks (layout, shape) before it starts; make them here,
        # where they raise, and not in a thread the GPU would then wait on
        expert_share(store.buffer(cache.layers[0], 0), fmt, torch.zeros(fmt.hidden), plane_bytes, plane_bytes, 1)
        self.box = box = Mailbox.allocate(rows, positions, max_rows, fmt.hidden)
        dev = cache.device
        self._host_takes = self._table(takes)  # what the device table holds
        self.takes = self._host_takes.to(dev)
        self.search = search
        self._written = None if search is None else search.at  # the ladder index the device table holds
        self.pcut = torch.full((rows, positions), plane_bytes, dtype=torch.int32, device=dev)
        self._addr = torch.tensor(
            [store.address(layer, e) for layer in cache.layers for e in range(cache.num_experts)], dtype=torch.int64
        )  # [rows * E] host addresses (uint64 in C)
        self._stop = ctypes.c_int32(0)
        self._started = ctypes.c_int32(0)  # the loop writes 1 once it serves, or its error code
        self._seen = (0, 0, 0)  # counts already reported by new_counts
        self._ctx = _Ctx(
            rows=rows, positions=positions, experts=cache.num_experts, pd=plane_bytes, threads=ck._threads(threads),
            tokens=max_rows,
            row_bytes=box.row_bytes, x_off=box.x(0) - box.row(0), y_off=box.y(0) - box.row(0),
            flags=box.flag(0), dones=box.done(0), box=box.row(0), addr=self._addr.data_ptr(),
            stop=ctypes.addressof(self._stop), stats=box.stats_addr, started=ctypes.addressof(self._started),
            layout=ck.layout_struct(fmt),
        )  # fmt: skip
        self._rows = [
            SplitRow(
                self.pcut[r],
                self.takes,
                HostPtr(box.row(r), torch.int32),
                HostPtr(box.x(r), torch.float32),
                HostPtr(box.y(r), torch.float64),
                box.flag(r),
                box.done(r),
                self.ops,
            )  # fmt: skip
            for r in range(rows)
        ]
        self._thread = threading.Thread(
            target=_lib().moe_split_serve, args=(ctypes.addressof(self._ctx),), name="moe-llm-cpu-experts", daemon=True
        )
        self._thread.start()
        self._await_start()

    def _await_start(self, timeout_s: float = 10.0) -> None:
        """Return once the serving loop serves; raise SplitUnavailable if it stopped at start
        (its workspace could not be allocated, a count out of range) or did not start in time:
        a GPU step would otherwise wait for it forever."""
        deadline = time.monotonic() + timeout_s
        while self._started.value == 0 and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(1e-4)
        rc = self._started.value
        if rc == 1:
            return
        self.close()
        if rc < 0:
            reason = _lib().moe_cpu_strerror(rc).decode()
        else:
            reason = "it did not start in time" if self._thread.is_alive() else "it stopped"
        raise SplitUnavailable(f"the CPU experts' serving thread cannot run: {reason}")

    def _table(self, takes: list[list[int]]) -> torch.Tensor:
        """int32 [B + 1, P + 1]: row b the take table of a step of b rows (row 0 unused)."""
        table = torch.zeros(len(takes) + 1, self.box.positions + 1, dtype=torch.int32)
        for b, take in enumerate(takes, start=1):
            table[b, : len(take)] = torch.tensor(take, dtype=torch.int32)
        return table

    @property
    def take(self) -> list[int]:
        """A lone token's take table (by miss count 0..k), as the device holds it, for reports."""
        return self._host_takes[1, : self.top_k + 1].tolist()

    def search_report(self) -> dict | None:
        """'auto': where the search runs on its ladder, of how many tables, after how many windows."""
        if self.search is None:
            return None
        sr = self.search
        return {"ladder_index": sr.at, "ladder": len(sr.tables), "best": sr.best, "windows": sr.windows}

    def row(self, r: int) -> SplitRow:
        return self._rows[r]

    def stats(self) -> dict[str, int]:
        return self.box.stats()

    def new_counts(self) -> tuple[int, int, int]:
        """(calls, bytes, ns) the serving thread added since the last call."""
        now = tuple(self.box.stats().values())
        new = tuple(a - b for a, b in zip(now, self._seen, strict=True))
        self._seen = now
        return new

    def step_time(self, seconds: float, misses: int | None = None) -> None:
        """'auto': a lone decode step took `seconds` (as the host saw it finish) and missed
        `misses` experts (`TakeSearch.observe`). Whenever the search's tables are not the ones
        the device holds (and no graph is being captured), they are written over the device
        table in place (the captured steps hold its address), in stream order; a step already
        enqueued may read some entries old and some new, and each is a take both roads compute
        to the same bits."""
        search = self.search
        if search is None:
            return
        search.observe(seconds, misses)
        if search.at == self._written or torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        self._written = search.at
        self._host_takes = self._table(search.current)
        self.takes.copy_(self._host_takes)
        log.info("CPU experts auto: tables %d of %d (of each missed expert the CPU takes %s of %d)",
                 search.at, len(search.tables), self.take, self.plane_bytes)  # fmt: skip

    def close(self) -> None:
        self._stop.value = 1
        self._thread.join(timeout=5)


def start_split(
    cache, fmt, dispatch, top_k: int, mode: str = "all", threads: int | None = None, max_rows: int = 1
) -> CpuSplit:  # fmt: skip
    """The split for a device-dispatch runtime: the take tables ('all': every miss on the CPU;
    'auto': the search's, starting from the share of each miss that makes both roads finish
    together by this machine's measured bandwidths, `road_rates`), for steps of 1 .. `max_rows` decoded rows, the
    mailbox and the serving thread. For b rows the model counts the b * k routed positions as
    k would be counted; it ignores that rows on one expert read it once (on either road)."""
    if not torch.cuda.is_available():
        raise SplitUnavailable("the GPU/CPU split needs CUDA")
    n = threads or max(1, ck.default_threads() - 1)  # one core stays with the thread that drives the GPU
    pd = dispatch.plane_bytes
    roads = road_rates() if mode == "auto" else Roads(1.0, 1.0, 1.0)
    # more rows than the mailbox holds: their steps keep every miss on the GPU (`SplitRow.fits`)
    rows = max(1, min(max_rows, MAX_POSITIONS // top_k))
    model = TakeModel(mode, top_k, pd, dispatch.cut_align, fmt.nbytes, fmt.bits, rows)
    search = TakeSearch(model, roads) if mode == "auto" else None
    takes = search.current if search is not None else model.tables(roads)
    log.info("CPU experts %s: of each missed expert the CPU takes %s of %d down-plane bytes by miss count (%s)",
             mode, takes[0], pd, roads)  # fmt: skip
    return CpuSplit(cache, fmt, top_k, pd, takes, threads=n, search=search)

"""llama.cpp `--n-cpu-moe` as the peer: read llama-bench's output, pick the configuration that fits a
budget, and set our rows beside it (pure functions; `moe-llm peer merge` is the command, and
`peer_tables` prints the results).

`benchmarks/peers/llamacpp.sh bench` leaves one pair of files per `-ncmoe N` in its output folder:
`ncmoeN.json` (llama-bench `-o json`) and `ncmoeN.log` (its `-v` log, stderr; `ncmoeN.log.xz` in
the committed results). docs/peer.md has the
commands. The fit rule is the protocol's: a configuration fits a budget when its GPU buffers do,

    CUDA0 model buffer + largest CUDA0 KV buffer + largest CUDA0 compute buffer <= budget

which counts what `torch.cuda.max_memory_allocated()` counts on our side: neither counts the CUDA
context. Ratios are ours ÷ llama.cpp's, so below 1 means llama.cpp is faster.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
DEVICE = "CUDA0"
HEADLINE_BUDGET = 12 * GIB
PROMPT = 1024  # prompt length of the prefill comparison

FIT_RULE = "fits when CUDA0 model + largest CUDA0 KV + largest CUDA0 compute buffer <= budget (from the -v log)"

# "load_tensors:        CUDA0 model buffer size = 11837.52 MiB", "llama_kv_cache:      CUDA0 KV buffer size = ...",
# "sched_reserve:      CUDA0 compute buffer size = ..." (src/llama-model.cpp, llama-kv-cache.cpp, llama-context.cpp)
_BUFFER = re.compile(r"(?P<device>[\w.-]+) +(?P<kind>model|KV|compute) buffer size = *(?P<mib>[\d.]+) MiB")
_CONTEXT = "constructing llama_context"  # the first line a new context logs: each llama-bench test makes one
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONFIG_FILE = re.compile(r"ncmoe(\d+)\.json")

# Our rows compared with the peer: the engine as shipped, at each budget, and the resident row.
# Ablations (no-prefetch, no-cache-no-prefetch, full-eager, full-lookahead2) are left out.
ENGINE_ROW = re.compile(r"(full|resident)(-[\d.]+GiB)?(-\d+bit)?")
CPU_ALL_ROW = re.compile(r"full-cpu-all(-[\d.]+GiB)?(-\d+bit)?")  # cpu_experts="all": the --cpu-moe analogue


# ---------------------------------------------------------------- llama-bench output


def parse_buffers(text: str, device: str = DEVICE) -> dict[str, int | None]:
    """GPU buffer bytes of one llama-bench run from its `-v` log: {"model", "kv", "compute"}.

    model: the device's model buffers of one load, summed (one loop prints a load's buffers back to
    back), the largest load. kv: the device's KV buffers of one context, summed (a model with a
    sliding-window cache has two), the largest context. compute: the largest compute buffer (a
    context that reserves again replaces its buffer). A kind the log never mentions is None. The log
    prints MiB with two decimals, so each value is exact to about 5 KiB.
    """
    model: list[int] = []
    kv: list[list[int]] = [[]]  # per context
    compute: list[int] = []
    contexts = 0
    in_model_block = False
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        if _CONTEXT in line:
            contexts += 1
            kv.append([])
        m = _BUFFER.search(line)
        is_model = m is not None and m["kind"] == "model"
        if is_model and not in_model_block:
            model.append(0)
        in_model_block = is_model
        if m is None or m["device"] != device:
            continue
        size = round(float(m["mib"]) * MIB)
        if is_model:
            model[-1] += size
        elif m["kind"] == "KV":
            kv[-1].append(size)
        else:
            compute.append(size)
    kv_lines = [s for ctx in kv for s in ctx]
    # without context markers (another log format) lines of different tests cannot be told apart
    kv_total = max((sum(ctx) for ctx in kv), default=0) if contexts else max(kv_lines, default=0)
    return {
        "model": (max(model) or None) if model else None,
        "kv": kv_total if kv_lines else None,
        "compute": max(compute) if compute else None,
    }


def parse_results(records: list[dict]) -> dict:
    """Speeds from llama-bench `-o json` records: a test with n_prompt = 0 is decode (`tg`), one with
    n_gen = 0 is a prompt of that length (`pp`). avg_ts and stddev_ts are over the `-r` repetitions."""
    out: dict = {}
    for r in records:
        if r.get("n_depth", 0):
            log.debug("skipping a test at depth %s", r["n_depth"])
            continue
        if r["n_prompt"] == 0 and r["n_gen"] > 0:
            key, out["decode_tokens"] = "decode_tok_s", r["n_gen"]
        elif r["n_gen"] == 0 and r["n_prompt"] > 0:
            key = f"prefill_{r['n_prompt']}_tok_s"
        else:
            log.debug("skipping a mixed test pp%s+tg%s", r["n_prompt"], r["n_gen"])
            continue
        out[key] = r["avg_ts"]
        out[key + "_std"] = r["stddev_ts"]
        out[key + "_samples"] = list(r.get("samples_ts", []))
    return out


def load_records(path: Path) -> list[dict]:
    """llama-bench's JSON array. It prints each test as it ends, so a run that died part way leaves
    an array without its closing bracket: that is read as the tests that did finish."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        body = text.rstrip().rstrip(",")
        if not body.startswith("["):
            raise
        records = json.loads(body + "\n]")
        log.warning("%s is cut short (llama-bench did not finish): read %d tests", path, len(records))
        return records


def parse_config(json_path: Path, log_path: Path | None = None, device: str = DEVICE) -> dict:
    """One `-ncmoe N` run: its buffers, its fit total and its speeds."""
    records = load_records(json_path)
    if not records:
        raise ValueError(f"{json_path}: llama-bench wrote no tests")
    first = records[0]
    named = _CONFIG_FILE.fullmatch(json_path.name)
    ncmoe = int(first.get("n_cpu_moe", named.group(1) if named else -1))
    if named and int(named.group(1)) != ncmoe:
        raise ValueError(f"{json_path}: the file is named for -ncmoe {named.group(1)}, its tests ran {ncmoe}")
    log_path = log_path or _log_of(json_path)
    buffers = parse_buffers(_read_log(log_path), device) if log_path.exists() else {}
    parts = [buffers.get(k) for k in ("model", "kv", "compute")]
    if parts[0] is None:
        log.warning("%s: no %s model buffer in %s (was -v given?): this configuration fits no budget",
                    json_path, device, log_path)  # fmt: skip
    config = {
        "ncmoe": ncmoe,
        "n_gpu_layers": first.get("n_gpu_layers"),
        "flash_attn": first.get("flash_attn"),
        "n_threads": first.get("n_threads"),
        "n_ubatch": first.get("n_ubatch"),
        "context_tokens": max(r["n_prompt"] + r["n_gen"] + r.get("n_depth", 0) for r in records),
        "cuda_model_bytes": parts[0],
        "cuda_kv_bytes": parts[1],
        "cuda_compute_bytes": parts[2],
        # a missing KV or compute line counts as 0; a missing model buffer means nothing is known
        "cuda_total_bytes": sum(p or 0 for p in parts) if parts[0] is not None else None,
    }
    config.update(parse_results(records))
    return config


def _log_of(json_path: Path) -> Path:
    """A run's `-v` log beside its JSON: ncmoeN.log, or ncmoeN.log.xz as the results folders keep
    them (a log is mostly the model loader's tensor list: 0.9 MB, 6 kB compressed)."""
    plain = json_path.with_suffix(".log")
    packed = plain.with_name(plain.name + ".xz")
    return packed if packed.exists() and not plain.exists() else plain


def _read_log(path: Path) -> str:
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(path.read_bytes()).decode(errors="replace")
    return path.read_text(errors="replace")


def _ncmoe_of(path: Path) -> int:
    return int(_CONFIG_FILE.fullmatch(path.name).group(1))


def parse_peer_dir(path: Path, device: str = DEVICE) -> dict:
    """The `llamacpp` block of our JSON from a bench output folder (ncmoe*.json, ncmoe*.log)."""
    path = Path(path)
    files = sorted((p for p in path.glob("ncmoe*.json") if _CONFIG_FILE.fullmatch(p.name)), key=_ncmoe_of)
    if not files:
        raise FileNotFoundError(f"{path}: no ncmoe*.json from benchmarks/peers/llamacpp.sh bench")
    configs, first = [], None
    for f in files:
        try:
            configs.append(parse_config(f, device=device))
            first = first or load_records(f)[0]
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("%s: %s", f, exc)
            configs.append({"ncmoe": _ncmoe_of(f), "error": f"{exc}"})
    first = first or {}
    commit, number = first.get("build_commit", "unknown"), first.get("build_number", 0)
    block = {
        "tool": "llama-bench",
        "version": f"b{number}-{commit}",  # llama.cpp's own llama_build_info() form
        "build_commit": commit,
        "build_number": number,
        "gpu_info": first.get("gpu_info"),
        "cpu_info": first.get("cpu_info"),
        "model_type": first.get("model_type"),
        "model_size_bytes": first.get("model_size"),
        "model_n_params": first.get("model_n_params"),
        "device": device,
        "fit_rule": FIT_RULE,
        "configs": configs,
    }
    for name, key in (("source.txt", "source"), ("commands.txt", "commands")):
        if (path / name).exists():
            block[key] = (path / name).read_text().strip()
    return block


# ---------------------------------------------------------------- fit and pick


def fits(config: dict, budget_bytes: int | None) -> bool:
    """The protocol's fit rule on a parsed configuration; no budget means anything fits."""
    total = config.get("cuda_total_bytes")
    if total is None or "error" in config:
        return False
    return budget_bytes is None or total <= budget_bytes


def best_fitting(configs: Iterable[dict], budget_bytes: int | None, metric: str = "decode_tok_s") -> dict | None:
    """The fastest configuration by `metric` that fits the budget (None when none does). On a tie the
    first one wins, which in a parsed block is the one with the fewest CPU layers."""
    fitting = [c for c in configs if fits(c, budget_bytes) and c.get(metric) is not None]
    return max(fitting, key=lambda c: c[metric], default=None)


# ---------------------------------------------------------------- our rows


def row_bits(row: dict) -> int | None:
    return row.get("bits", row.get("experts_bits"))


def is_resident(row: dict) -> bool:
    return bool(row["resident"]) if "resident" in row else row.get("gpu_budget_bytes") is None


def prefill_tok_s(row: dict, prompt: int = PROMPT) -> float | None:
    """Our prefill speed: prompt tokens over the cold time to first token."""
    ttft = (row.get("ttft_s") or {}).get(str(prompt))
    return prompt / ttft if ttft else None


def engine_rows(rows: Iterable[dict], bits: int, names: re.Pattern = ENGINE_ROW) -> tuple[dict | None, dict[int, dict]]:
    """(the resident row, {budget bytes: the engine's row at that budget}) at `bits` expert bits."""
    resident, by_budget = None, {}
    for r in rows:
        if row_bits(r) != bits or not names.fullmatch(r.get("name", "")):
            continue
        if is_resident(r):
            resident = resident or r
            continue
        budget = r["gpu_budget_bytes"]
        if budget in by_budget:
            log.warning("two rows at %d bits and %s bytes: keeping %s, not %s", bits, budget,
                        by_budget[budget]["name"], r["name"])  # fmt: skip
            continue
        by_budget[budget] = r
    return resident, dict(sorted(by_budget.items()))


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def compare(row: dict, config_decode: dict | None, config_prefill: dict | None, prompt: int = PROMPT) -> dict:
    """One side-by-side entry: our row against the llama.cpp configurations picked for it."""
    metric = f"prefill_{prompt}_tok_s"
    ours_pp = prefill_tok_s(row, prompt)
    theirs_dec = config_decode.get("decode_tok_s") if config_decode else None
    theirs_pp = config_prefill.get(metric) if config_prefill else None
    entry = {
        "budget_bytes": None if is_resident(row) else row["gpu_budget_bytes"],
        "ours": row.get("name"),
        "ours_decode_tok_s": row.get("decode_tok_s"),
        f"ours_prefill_{prompt}_tok_s": ours_pp,
        f"ours_ttft_{prompt}_s": (row.get("ttft_s") or {}).get(str(prompt)),
        "ours_peak_gpu_bytes": row.get("peak_gpu_bytes"),
        "ours_kv_bytes": (row.get("plan") or {}).get("kv_bytes"),
        "llamacpp_ncmoe": config_decode["ncmoe"] if config_decode else None,
        "llamacpp_cuda_total_bytes": config_decode["cuda_total_bytes"] if config_decode else None,
        "llamacpp_kv_bytes": config_decode["cuda_kv_bytes"] if config_decode else None,
        "llamacpp_decode_tok_s": theirs_dec,
        "llamacpp_prefill_ncmoe": config_prefill["ncmoe"] if config_prefill else None,
        f"llamacpp_prefill_{prompt}_tok_s": theirs_pp,
        "speedup_decode": _ratio(row.get("decode_tok_s"), theirs_dec),
        "speedup_prefill": _ratio(ours_pp, theirs_pp),
    }
    if config_decode is None:
        entry["note"] = "no llama.cpp configuration fits this budget"
    return entry


def speedups(rows: Iterable[dict], block: dict, bits: int = 2, headline_budget: int = HEADLINE_BUDGET,
             prompt: int = PROMPT) -> dict:  # fmt: skip
    """Top-level speedup fields and a per-budget side-by-side list (`vs_llamacpp`).

    speedup_vs_llamacpp_decode: our `bits`-bit row at `headline_budget` ÷ the fastest llama.cpp
    configuration fitting that budget. speedup_vs_llamacpp_prefill: the same for `prompt` tokens (ours
    is prompt ÷ cold TTFT, theirs llama-bench's pp). speedup_vs_llamacpp_resident: our resident row ÷
    `-ncmoe 0`, whatever its size. Each budget our rows have gets an entry, and the resident row too.
    """
    configs = block.get("configs", [])
    metric = f"prefill_{prompt}_tok_s"
    resident, by_budget = engine_rows(rows, bits)
    entries = [
        compare(r, best_fitting(configs, b), best_fitting(configs, b, metric), prompt) for b, r in by_budget.items()
    ]
    if resident is not None:
        all_gpu = next((c for c in configs if c.get("ncmoe") == 0 and "error" not in c), None)
        entries.append(compare(resident, all_gpu, all_gpu, prompt))
    headline = next((e for e in entries if e["budget_bytes"] == headline_budget), {})
    resident_entry = next((e for e in entries if e["budget_bytes"] is None), {})
    cpu_all = cpu_all_entry(rows, configs, bits, prompt)
    return {
        "speedup_vs_llamacpp_decode": headline.get("speedup_decode"),
        "speedup_vs_llamacpp_prefill": headline.get("speedup_prefill"),
        "speedup_vs_llamacpp_resident": resident_entry.get("speedup_decode"),
        "speedup_vs_llamacpp_cpu_all": cpu_all.get("speedup_decode"),
        "vs_llamacpp": entries,
        "vs_llamacpp_cpu_all": cpu_all or None,
    }


def cpu_all_entry(rows: Iterable[dict], configs: list[dict], bits: int, prompt: int = PROMPT) -> dict:
    """Every miss on the CPU against every MoE layer's experts on the CPU: our `full-cpu-all` row
    at the smallest budget it ran at, beside llama.cpp's largest -ncmoe (`--cpu-moe`); {} when
    either is missing."""
    _, by_budget = engine_rows(rows, bits, CPU_ALL_ROW)
    peer = max((c for c in configs if "error" not in c), key=lambda c: c["ncmoe"], default=None)
    if not by_budget or peer is None:
        return {}
    return compare(next(iter(by_budget.values())), peer, peer, prompt)


# ---------------------------------------------------------------- tables


# ---------------------------------------------------------------- merge into our JSON


# the bars against the peer: (key, target), each a minimum; issue 11's three, then issue 12's
# (every miss on the CPU against every MoE layer's experts on the CPU)
PEER_TARGETS = (
    ("speedup_vs_llamacpp_decode", 1.1),
    ("speedup_vs_llamacpp_resident", 0.8),
    ("speedup_vs_llamacpp_prefill", 1.5),
    ("speedup_vs_llamacpp_cpu_all", 1.0),
)
CPU_ALL_BUDGET = 2 * GIB  # the budget issue 12 asks the cpu_experts="all" row at


def peer_targets(run: dict) -> list[dict]:
    """The PEER_TARGETS entries of `run`'s targets list (see `report.check_targets`)."""
    from .report import check_targets

    return check_targets(run, [(key, target, "min") for key, target in PEER_TARGETS])


def merge(run: dict, block: dict, bits: int | None = None, budget: int | None = None) -> dict:
    """Add the `llamacpp` block and the speedup fields to a `moe-llm bench` result dict (in place).
    bits and budget default to the headline row's: the `full` row, else 2 bits at 12 GiB."""
    full = next((r for r in run.get("variants", []) if r.get("name") == "full"), {})
    bits = bits if bits is not None else row_bits(full) or 2
    budget = (
        budget if budget is not None else run.get("gpu_budget_bytes") or full.get("gpu_budget_bytes") or HEADLINE_BUDGET
    )
    run["llamacpp"] = block
    run.update(speedups(run.get("variants", []), block, bits=bits, headline_budget=budget))
    keys = {key for key, _ in PEER_TARGETS}
    targets = peer_targets(run)
    cpu_all = run.get("vs_llamacpp_cpu_all") or {}
    if cpu_all.get("budget_bytes") and cpu_all["budget_bytes"] > CPU_ALL_BUDGET:
        for t in targets:
            if t["key"] == "speedup_vs_llamacpp_cpu_all":
                t["note"] = (
                    f"measured at {cpu_all['budget_bytes'] / GIB:g} GiB; issue 12 asks {CPU_ALL_BUDGET / GIB:g} GiB"
                )
    run["targets"] = [t for t in run.get("targets", []) if t.get("key") not in keys] + targets
    return run

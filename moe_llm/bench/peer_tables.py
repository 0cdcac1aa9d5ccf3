"""Markdown tables of the llama.cpp peer: every configuration measured, and our rows beside the
ones that fit the same budgets (`peer.speedups`)."""

from __future__ import annotations

import re

from .peer import GIB, PROMPT


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def comparison_table(result: dict, block: dict, prompt: int = PROMPT) -> str:
    """Markdown: each budget, the llama.cpp configuration picked, its buffers and speeds, ours, ratios."""
    by_n = {c["ncmoe"]: c for c in block.get("configs", [])}
    lines = [
        f"| budget | llama.cpp config | its buffers GiB (model + KV + compute) | its decode tok/s | its pp{prompt} tok/s "
        f"| ours decode tok/s | ours prefill {prompt} tok/s (cold TTFT) | ratio decode | ratio prefill |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["vs_llamacpp"]:
        budget = "resident" if e["budget_bytes"] is None else f"{e['budget_bytes'] / GIB:g} GiB"
        c = by_n.get(e["llamacpp_ncmoe"], {})
        cfg = "none fits" if not c else f"`-ncmoe {c['ncmoe']}`"
        if c and e["llamacpp_prefill_ncmoe"] != c["ncmoe"]:
            cfg += f" (pp: `-ncmoe {e['llamacpp_prefill_ncmoe']}`)"
        bufs = "-" if not c else (
            f"{_gib(c['cuda_model_bytes'])} + {_gib(c['cuda_kv_bytes'])} + {_gib(c['cuda_compute_bytes'])} "
            f"= {_gib(c['cuda_total_bytes'])}"
        )  # fmt: skip
        dec = "-" if not c else f"{_num(c.get('decode_tok_s'))} ± {_num(c.get('decode_tok_s_std'))}"
        ttft = e[f"ours_ttft_{prompt}_s"]
        ours_pp = _num(e[f"ours_prefill_{prompt}_tok_s"], ",.0f") + (f" ({ttft:.3f} s)" if ttft else "")
        lines.append(
            f"| {budget} | {cfg} | {bufs} | {dec} | {_num(e[f'llamacpp_prefill_{prompt}_tok_s'], ',.0f')} "
            f"| {_num(e['ours_decode_tok_s'], '.2f')} | {ours_pp} "
            f"| {_num(e['speedup_decode'], '.2f')}× | {_num(e['speedup_prefill'], '.2f')}× |"
        )
    return "\n".join(lines)


def configs_table(block: dict) -> str:
    """Markdown: every llama.cpp configuration measured, its buffers and speeds."""
    prompts = sorted(
        {int(k.split("_")[1]) for c in block["configs"] for k in c if re.fullmatch(r"prefill_\d+_tok_s", k)}
    )
    head = "| -ncmoe | model GiB | KV GiB | compute GiB | total GiB | decode tok/s | " + " | ".join(
        f"pp{p} tok/s" for p in prompts
    )
    lines = [head + " |", "|" + "---|" * (6 + len(prompts))]
    for c in block["configs"]:
        if "error" in c:
            lines.append(f"| {c['ncmoe']} | error: {c['error']} |")
            continue
        pps = " | ".join(_num(c.get(f"prefill_{p}_tok_s"), ",.0f") for p in prompts)
        lines.append(
            f"| {c['ncmoe']} | {_gib(c['cuda_model_bytes'])} | {_gib(c['cuda_kv_bytes'])} "
            f"| {_gib(c['cuda_compute_bytes'])} | {_gib(c['cuda_total_bytes'])} "
            f"| {_num(c.get('decode_tok_s'))} ± {_num(c.get('decode_tok_s_std'))} | {pps} |"
        )
    return "\n".join(lines)

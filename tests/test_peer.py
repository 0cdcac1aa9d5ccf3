"""The llama.cpp peer: llama-bench's `-o json` and `-v` log are parsed into buffers and speeds, the fit
rule and the pick of the fastest fitting configuration hold at their boundaries, and the speedups
set the right rows side by side (moe_llm/bench/peer.py). Formats are llama.cpp's (the October 2026
tree in the llama-cpp-python 0.3.36 sdist): json_printer in tools/llama-bench/llama-bench.cpp, the
buffer lines of src/llama-model.cpp, llama-kv-cache.cpp and llama-context.cpp."""

from __future__ import annotations

import json

import pytest

from moe_llm.bench import peer

MIB, GIB = 1 << 20, 1 << 30

# One record exactly as this llama-bench prints it (from a CPU build of the same tree, 2-layer GGUF).
REAL_RECORD = """\
  {
    "build_commit": "0c1e570",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/tmp/peerwork/synth-mixtral-8x7b-L2.gguf",
    "model_type": "llama ?B Q2_K - Medium",
    "model_size": 1153622016,
    "model_n_params": 3164688384,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "n_cpu_moe": 1,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": 1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 8,
    "n_depth": 0,
    "test_time": "2026-12-01T21:20:44Z",
    "avg_ns": 158841467,
    "stddev_ns": 17672691,
    "avg_ts": 50.678350,
    "stddev_ts": 5.638467,
    "samples_ns": [ 146344994, 171337941 ],
    "samples_ts": [ 54.6653, 46.6914 ]
  }"""

# An excerpt of the same run's -v log: one model load, then one context per test (pp32, pp64, tg8).
REAL_CPU_LOG = """\
llama_model_loader: loaded meta data with 21 key-value pairs and 23 tensors from /tmp/peerwork/synth-mixtral-8x7b-L2.gguf (version GGUF V3 (latest))
tensor blk.0.ffn_gate_exps.weight (147 MiB q2_K) buffer type overridden to CPU_REPACK
done_getting_tensors: tensor 'token_embd.weight' (q4_K) (and 8 others) cannot be used with preferred buffer type CPU_REPACK, using CPU instead
load_tensors:   CPU_Mapped model buffer size =   659.18 MiB
load_tensors:   CPU_REPACK model buffer size =   927.00 MiB
..repack: repack tensor blk.0.attn_q.weight with q4_K_8x8
llama_context: constructing llama_context
llama_context: n_ctx                 = 256
llama_context:        CPU  output buffer size =     0.12 MiB
llama_kv_cache:        CPU KV buffer size =     2.00 MiB
llama_kv_cache: size =    2.00 MiB (   256 cells,   2 layers,  1/1 seqs), K (f16):    1.00 MiB, V (f16):    1.00 MiB
sched_reserve:        CPU compute buffer size =    12.52 MiB
~llama_context:        CPU compute buffer size is  12.5165 MiB, matches expectation of  12.5165 MiB
llama_context: constructing llama_context
llama_context: n_ctx                 = 256
llama_kv_cache:        CPU KV buffer size =     2.00 MiB
sched_reserve:        CPU compute buffer size =    25.03 MiB
~llama_context:        CPU compute buffer size is  25.0330 MiB, matches expectation of  25.0330 MiB
llama_context: constructing llama_context
llama_kv_cache:        CPU KV buffer size =     2.00 MiB
sched_reserve:        CPU compute buffer size =     3.13 MiB
"""

FIELDS = [
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size",
    "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll", "type_k", "type_v",
    "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode", "embeddings", "no_op_offload", "no_host", "repack",
    "fit_target", "fit_min_ctx", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts",
    "stddev_ts",
]  # fmt: skip


def _record(ncmoe: int, n_prompt: int, n_gen: int, samples_ts: list[float]) -> dict:
    """A record of a CUDA run on the full geometry, every field llama-bench writes, in its order."""
    n = n_prompt + n_gen
    ns = [round(1e9 * n / t) for t in samples_ts]
    mean = sum(samples_ts) / len(samples_ts)
    var = sum((t - mean) ** 2 for t in samples_ts) / (len(samples_ts) - 1) if len(samples_ts) > 1 else 0.0
    std = var**0.5  # llama-bench's stdev: Bessel-corrected, 0 for one sample
    values = {
        "build_commit": "0c1e570", "build_number": 0, "cpu_info": "INTEL(R) XEON(R) PLATINUM 8592+",
        "gpu_info": "NVIDIA H200", "backends": "CUDA", "model_filename": "/root/.peer/work/synth-mixtral-8x7b-L32.gguf",
        "model_type": "llama 8x7B Q2_K - Medium", "model_size": 15722176512, "model_n_params": 46702792704,
        "n_batch": 2048, "n_ubatch": 512, "n_threads": 16, "cpu_mask": "0x0", "cpu_strict": False, "poll": 50,
        "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "n_cpu_moe": ncmoe, "split_mode": "layer",
        "main_gpu": 0, "no_kv_offload": False, "flash_attn": 1, "devices": "auto", "tensor_split": "0.00",
        "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto", "embeddings": False,
        "no_op_offload": 0, "no_host": False, "repack": True, "fit_target": 0, "fit_min_ctx": 0,
        "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0, "test_time": "2026-12-01T10:00:00Z",
        "avg_ns": round(sum(ns) / len(ns)), "stddev_ns": 1000, "avg_ts": mean, "stddev_ts": std,
    }  # fmt: skip
    assert list(values) == FIELDS
    return values | {"samples_ns": ns, "samples_ts": samples_ts}


def _printed(records: list[dict]) -> str:
    """The records as llama-bench's json_printer writes them."""

    def value(v):
        return json.dumps(v) if not isinstance(v, float) else f"{v:.6f}"

    blocks = []
    for r in records:
        lines = [f'    "{k}": {value(r[k])},' for k in FIELDS]
        lines.append(f'    "samples_ns": [ {", ".join(str(x) for x in r["samples_ns"])} ],')
        lines.append(f'    "samples_ts": [ {", ".join(f"{x:g}" for x in r["samples_ts"])} ]')
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return "[\n" + ",\n".join(blocks) + "\n]\n"


def _cuda_log(model_mib: float, contexts: list[tuple[float, float]], host_mib: float = 70.31) -> str:
    """A -v log of a CUDA run: one model load, then per test (pp512, pp1024, tg128) a context with its
    KV and compute buffers (MiB), in llama.cpp's wording and padding."""
    out = [
        "llama_model_loader: loaded meta data with 21 key-value pairs and 323 tensors from /root/mix.gguf",
        "load_tensors: offloading output layer to GPU",
        "load_tensors: offloading 31 repeating layers to GPU",
        "load_tensors: offloaded 33/33 layers to GPU",
        f"load_tensors:        CUDA0 model buffer size = {model_mib:8.2f} MiB",
        f"load_tensors:   CPU_Mapped model buffer size = {host_mib:8.2f} MiB",
        "....................................................................................................",
    ]
    for kv, compute in contexts:
        out += [
            "llama_context: constructing llama_context",
            "llama_context:  CUDA_Host  output buffer size =     0.12 MiB",
            f"llama_kv_cache:      CUDA0 KV buffer size = {kv:8.2f} MiB",
            f"llama_kv_cache: size = {kv:7.2f} MiB (  1024 cells,  32 layers,  1/1 seqs), K (f16):   64.00 MiB",
            f"sched_reserve:      CUDA0 compute buffer size = {compute:8.2f} MiB",
            "sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB",
            "sched_reserve: graph: nodes = 1126, splits = 2, input objects = 4, input tensors = 6",
        ]
    return "\n".join(out) + "\n"


# The full geometry: 441 MiB of experts a layer; KV 64/128/32 MiB and compute 290.5/302.5/75 MiB for
# pp512/pp1024/tg128, so a configuration needs model + 128 + 302.5 MiB. Speeds like the H200 run.
ALL_GPU_MODEL_MIB = 14924.06
SPEEDS = {  # ncmoe: (decode, pp512, pp1024)
    0: (197.4, 4300.0, 4118.0),
    6: (58.9, 2400.0, 2300.0),
    7: (54.5, 2250.0, 2190.0),
    8: (49.9, 2120.0, 2071.0),
    12: (34.8, 1550.0, 1503.0),
    26: (17.0, 1020.0, 1000.0),
    32: (14.5, 890.0, 873.0),
}
CONTEXTS = [(64.0, 290.5), (128.0, 302.5), (32.0, 75.0)]


def model_mib(ncmoe: int) -> float:
    return ALL_GPU_MODEL_MIB - 441.0 * ncmoe


def total_bytes(ncmoe: int) -> int:
    return round(model_mib(ncmoe) * MIB) + 128 * MIB + round(302.5 * MIB)


def write_config(folder, ncmoe: int, speeds: tuple[float, float, float] | None = None) -> None:
    dec, pp512, pp1024 = speeds or SPEEDS[ncmoe]
    records = [
        _record(ncmoe, 512, 0, [pp512 * f for f in (0.99, 1.0, 1.01)]),
        _record(ncmoe, 1024, 0, [pp1024 * f for f in (0.99, 1.0, 1.01)]),
        _record(ncmoe, 0, 128, [dec * f for f in (0.98, 1.0, 1.02)]),
    ]
    (folder / f"ncmoe{ncmoe}.json").write_text(_printed(records))
    (folder / f"ncmoe{ncmoe}.log").write_text(_cuda_log(model_mib(ncmoe), CONTEXTS))


@pytest.fixture
def peer_dir(tmp_path):
    folder = tmp_path / "L32"
    folder.mkdir()
    for n in (32, 12, 7, 0, 26, 8, 6):  # written out of order: the block is sorted by -ncmoe, as numbers
        write_config(folder, n)
    (folder / "source.txt").write_text("source=llama-cpp-python==0.3.36 sdist, vendor/llama.cpp\ncommit=0c1e570\n")
    return folder


# Our rows, shaped as in benchmarks/results/h200-mixtral8x7b-2bit.json (fields the peer reads, plus names
# and ablations the comparison must skip).
def _row(name, bits, budget_gib, decode, ttft_1024, **extra):
    return {
        "name": name,
        "experts_bits": bits,
        "gpu_budget_bytes": None if budget_gib is None else int(budget_gib * GIB),
        "decode_tok_s": decode,
        "ttft_s": {"512": ttft_1024 * 1.01, "1024": ttft_1024},
        "peak_gpu_bytes": 11114633728,
        "plan": {"kv_bytes": 536870912},
        **extra,
    }


OUR_ROWS = [
    _row("resident", 2, None, 57.16458078955356, 0.264337182999995),
    _row("full", 2, 12, 28.056043787234575, 0.26449820300000226),
    _row("no-prefetch", 2, 12, 27.486296520741842, 0.3001977450000197),
    _row("no-cache-no-prefetch", 2, 12, 12.978986566178232, 0.3385259160000089),
    _row("full-eager", 2, 12, 15.224783860771522, 0.26672188000000574),
    _row("full-lookahead2", 2, 12, 28.331732072915084, 0.2618415110000001),  # faster than full: still not picked
    _row("full-16GiB", 2, 16, 66.60685252431637, 0.26087366600000905),
    _row("full-4GiB", 2, 4, 9.1, 0.331),
    _row("full-cpu-all", 2, 12, 14.0, 0.35),
    _row("full-cpu-all-4GiB", 2, 4, 12.5, 0.34),
    _row("resident-3bit", 3, None, 60.56425829081673, 0.33473960199995645),
    _row("full-3bit", 3, 12, 17.963227457552605, 0.3372824979999791),
]


# ---------------------------------------------------------------- parsing


def test_buffers_from_a_cuda_log_take_the_gpu_lines_and_the_largest_context():
    b = peer.parse_buffers(_cuda_log(11837.06, CONTEXTS))
    assert b["model"] == round(11837.06 * MIB)  # CPU_Mapped (host) not counted
    assert b["kv"] == 128 * MIB  # the pp1024 context, not the first or the last
    assert b["compute"] == round(302.5 * MIB)  # CUDA_Host compute (pinned host) not counted


def test_buffers_sum_within_one_load_and_one_context():
    log = "\n".join(
        [
            "\x1b[34m0.01.2\x1b[0m \x1b[32mI \x1b[0mload_tensors:        CUDA0 model buffer size =  1000.00 MiB",
            "load_tensors:   CPU_Mapped model buffer size =   500.00 MiB",
            "load_tensors:        CUDA0 model buffer size =    24.00 MiB",  # same load: summed
            "llama_context: constructing llama_context",
            "llama_kv_cache_iswa: creating non-SWA KV cache, size = 1024 cells",
            "llama_kv_cache:      CUDA0 KV buffer size =    96.00 MiB",
            "llama_kv_cache: size =   96.00 MiB (  1024 cells,   8 layers,  1/1 seqs)",
            "llama_kv_cache_iswa: creating     SWA KV cache, size = 4352 cells",
            "llama_kv_cache:      CUDA0 KV buffer size =    10.00 MiB",  # same context: summed
            "sched_reserve:      CUDA0 compute buffer size =   200.00 MiB",
            "sched_reserve:      CUDA0 compute buffer size =   250.00 MiB",  # a reserve again replaces it
            "llama_context: constructing llama_context",
            "llama_kv_cache:      CUDA0 KV buffer size =   100.00 MiB",
            "sched_reserve:      CUDA0 compute buffer size =   100.00 MiB",
        ]
    )
    assert peer.parse_buffers(log) == {"model": 1024 * MIB, "kv": 106 * MIB, "compute": 250 * MIB}


def test_buffers_of_a_real_cpu_log():
    cpu = peer.parse_buffers(REAL_CPU_LOG, device="CPU")
    assert cpu["kv"] == 2 * MIB
    assert cpu["compute"] == round(25.03 * MIB)  # the destructor's "size is 25.0330 MiB" line is not a buffer
    assert cpu["model"] is None  # that build's model buffers are CPU_Mapped and CPU_REPACK
    assert peer.parse_buffers(REAL_CPU_LOG) == {"model": None, "kv": None, "compute": None}  # no CUDA0 at all


def test_results_from_a_real_record():
    records = json.loads("[\n" + REAL_RECORD + "\n]\n")
    r = peer.parse_results(records)
    assert r["decode_tok_s"] == 50.678350 and r["decode_tok_s_std"] == 5.638467
    assert r["decode_tok_s_samples"] == [54.6653, 46.6914] and r["decode_tokens"] == 8
    assert not any(k.startswith("prefill") for k in r)


def test_results_split_prompt_and_decode_tests():
    records = [_record(7, 512, 0, [2000.0, 2100.0]), _record(7, 1024, 0, [1900.0]), _record(7, 0, 128, [54.0, 55.0])]
    records.append(_record(7, 512, 128, [300.0]))  # a -pg test: neither, skipped
    r = peer.parse_results(records)
    assert r["prefill_512_tok_s"] == pytest.approx(2050.0) and r["prefill_1024_tok_s"] == 1900.0
    assert r["decode_tok_s"] == pytest.approx(54.5) and r["decode_tok_s_std"] == pytest.approx(0.7071, abs=1e-4)
    assert r["prefill_512_tok_s_samples"] == [2000.0, 2100.0]


def test_peer_dir_becomes_the_llamacpp_block(peer_dir):
    block = peer.parse_peer_dir(peer_dir)
    assert block["version"] == "b0-0c1e570" and block["build_commit"] == "0c1e570"
    assert block["gpu_info"] == "NVIDIA H200" and "0.3.36" in block["source"]
    assert [c["ncmoe"] for c in block["configs"]] == [0, 6, 7, 8, 12, 26, 32]
    c7 = block["configs"][2]
    assert c7["cuda_model_bytes"] == round(model_mib(7) * MIB)
    assert c7["cuda_kv_bytes"] == 128 * MIB and c7["cuda_compute_bytes"] == round(302.5 * MIB)
    assert c7["cuda_total_bytes"] == total_bytes(7)
    assert c7["cuda_total_bytes"] / GIB == pytest.approx(11.98, abs=0.005)  # the H200 run's 12 GiB pick
    assert c7["decode_tok_s"] == pytest.approx(54.5) and c7["prefill_1024_tok_s"] == pytest.approx(2190.0)
    assert c7["prefill_512_tok_s"] == pytest.approx(2250.0) and c7["context_tokens"] == 1024
    assert c7["n_threads"] == 16 and c7["flash_attn"] == 1


def test_a_compressed_log_gives_the_same_block(peer_dir):
    """The results folders keep each -v log xz-compressed (ncmoeN.log.xz): the same buffers."""
    import lzma

    want = peer.parse_peer_dir(peer_dir)
    for log in peer_dir.glob("ncmoe*.log"):
        log.with_name(log.name + ".xz").write_bytes(lzma.compress(log.read_bytes()))
        log.unlink()
    assert peer.parse_peer_dir(peer_dir) == want


def test_a_run_cut_short_keeps_its_finished_tests_and_a_dead_one_is_marked(peer_dir):
    text = (peer_dir / "ncmoe8.json").read_text()
    cut = text[: text.rindex("  {")].rstrip()  # died during tg128: "[ {pp512}, {pp1024}," with no "]"
    (peer_dir / "ncmoe8.json").write_text(cut)
    (peer_dir / "ncmoe12.json").write_text("")
    block = peer.parse_peer_dir(peer_dir)
    by_n = {c["ncmoe"]: c for c in block["configs"]}
    assert by_n[8]["prefill_1024_tok_s"] == pytest.approx(2071.0) and "decode_tok_s" not in by_n[8]
    assert "error" in by_n[12] and not peer.fits(by_n[12], None)
    assert peer.best_fitting(block["configs"], 12 * GIB)["ncmoe"] == 7


def test_a_file_named_for_another_ncmoe_is_refused(tmp_path):
    write_config(tmp_path, 7)
    (tmp_path / "ncmoe7.json").rename(tmp_path / "ncmoe9.json")
    (tmp_path / "ncmoe7.log").rename(tmp_path / "ncmoe9.log")
    with pytest.raises(ValueError, match="named for -ncmoe 9"):
        peer.parse_config(tmp_path / "ncmoe9.json")


def test_no_peer_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ncmoe"):
        peer.parse_peer_dir(tmp_path)


# ---------------------------------------------------------------- fit rule and pick


def test_fit_rule_is_inclusive_and_needs_the_model_buffer():
    c = {"ncmoe": 7, "cuda_total_bytes": 12 * GIB}
    assert peer.fits(c, 12 * GIB) and not peer.fits(c, 12 * GIB - 1) and peer.fits(c, None)
    assert not peer.fits({"ncmoe": 7, "cuda_total_bytes": None}, 100 * GIB)


def test_best_fitting_is_the_fastest_that_fits(peer_dir):
    configs = peer.parse_peer_dir(peer_dir)["configs"]
    assert total_bytes(6) > 12 * GIB >= total_bytes(7)  # the fixture brackets the budget
    assert peer.best_fitting(configs, 12 * GIB)["ncmoe"] == 7  # 0 and 6 are faster but too big
    assert peer.best_fitting(configs, 16 * GIB)["ncmoe"] == 0
    assert peer.best_fitting(configs, 4 * GIB)["ncmoe"] == 26
    assert peer.best_fitting(configs, None)["ncmoe"] == 0
    assert peer.best_fitting(configs, 1 * GIB) is None  # -ncmoe 32 needs 1.21 GiB
    assert peer.best_fitting(configs, total_bytes(7) - 1)["ncmoe"] == 8  # one byte short of -ncmoe 7


def test_best_fitting_by_another_metric(tmp_path):
    write_config(tmp_path, 7, (54.5, 2250.0, 2190.0))
    write_config(tmp_path, 8, (49.9, 2500.0, 2400.0))  # slower decode, faster prompt
    configs = peer.parse_peer_dir(tmp_path)["configs"]
    assert peer.best_fitting(configs, 12 * GIB)["ncmoe"] == 7
    assert peer.best_fitting(configs, 12 * GIB, "prefill_1024_tok_s")["ncmoe"] == 8
    assert peer.best_fitting(configs, 12 * GIB, "prefill_2048_tok_s") is None  # not measured


# ---------------------------------------------------------------- speedups


def test_speedups_set_each_engine_row_beside_its_best_fitting_peer(peer_dir):
    block = peer.parse_peer_dir(peer_dir)
    s = peer.speedups(OUR_ROWS, block, bits=2, headline_budget=12 * GIB)
    assert s["speedup_vs_llamacpp_decode"] == pytest.approx(28.056043787234575 / 54.5)
    assert s["speedup_vs_llamacpp_prefill"] == pytest.approx((1024 / 0.26449820300000226) / 2190.0)
    assert s["speedup_vs_llamacpp_resident"] == pytest.approx(57.16458078955356 / 197.4)
    by_budget = {e["budget_bytes"]: e for e in s["vs_llamacpp"]}
    assert list(by_budget) == [4 * GIB, 12 * GIB, 16 * GIB, None]  # budgets ascending, resident last
    assert by_budget[12 * GIB]["ours"] == "full"  # not full-lookahead2, not the 3-bit row
    assert by_budget[12 * GIB]["llamacpp_ncmoe"] == 7 and by_budget[12 * GIB]["llamacpp_prefill_ncmoe"] == 7
    assert by_budget[12 * GIB]["llamacpp_cuda_total_bytes"] == total_bytes(7)
    assert by_budget[4 * GIB]["llamacpp_ncmoe"] == 26
    assert by_budget[4 * GIB]["speedup_decode"] == pytest.approx(9.1 / 17.0)
    assert by_budget[16 * GIB]["ours"] == "full-16GiB" and by_budget[16 * GIB]["llamacpp_ncmoe"] == 0
    assert by_budget[16 * GIB]["speedup_decode"] == pytest.approx(66.60685252431637 / 197.4)
    assert by_budget[None]["ours"] == "resident" and by_budget[None]["llamacpp_ncmoe"] == 0
    assert by_budget[None]["speedup_prefill"] == pytest.approx((1024 / 0.264337182999995) / 4118.0)
    assert by_budget[12 * GIB]["ours_kv_bytes"] == 512 * MIB and by_budget[12 * GIB]["llamacpp_kv_bytes"] == 128 * MIB
    assert peer.speedups(OUR_ROWS[::-1], block) == s  # the ablations, now ahead of `full`, are still skipped


def test_every_miss_on_the_cpu_is_set_beside_every_moe_layer_on_the_cpu(peer_dir):
    """speedup_vs_llamacpp_cpu_all: our cpu_experts="all" row at its smallest budget against the
    largest -ncmoe (all 32 layers' experts on the CPU), whatever that configuration's size."""
    s = peer.speedups(OUR_ROWS, peer.parse_peer_dir(peer_dir), bits=2)
    assert s["speedup_vs_llamacpp_cpu_all"] == pytest.approx(12.5 / 14.5)
    entry = s["vs_llamacpp_cpu_all"]
    assert entry["ours"] == "full-cpu-all-4GiB" and entry["budget_bytes"] == 4 * GIB
    assert entry["llamacpp_ncmoe"] == 32 and entry["llamacpp_cuda_total_bytes"] == total_bytes(32)
    assert "full-cpu-all" not in [e["ours"] for e in s["vs_llamacpp"]]  # not an engine row of its budget
    run = peer.merge({"variants": [dict(r) for r in OUR_ROWS]}, peer.parse_peer_dir(peer_dir))
    target = next(t for t in run["targets"] if t["key"] == "speedup_vs_llamacpp_cpu_all")
    assert target["met"] is False and target["note"] == "measured at 4 GiB; issue 12 asks 2 GiB"
    no_cpu_rows = peer.speedups([r for r in OUR_ROWS if "cpu" not in r["name"]], peer.parse_peer_dir(peer_dir))
    assert no_cpu_rows["speedup_vs_llamacpp_cpu_all"] is None and no_cpu_rows["vs_llamacpp_cpu_all"] is None


def test_speedups_of_the_3bit_rows(peer_dir):
    s = peer.speedups(OUR_ROWS, peer.parse_peer_dir(peer_dir), bits=3)
    assert s["speedup_vs_llamacpp_decode"] == pytest.approx(17.963227457552605 / 54.5)
    assert [e["ours"] for e in s["vs_llamacpp"]] == ["full-3bit", "resident-3bit"]


def test_speedups_accept_plain_rows(peer_dir):
    rows = [
        {"name": "full", "bits": 2, "gpu_budget_bytes": 12 * GIB, "resident": False, "decode_tok_s": 30.0,
         "ttft_s": {"1024": 0.256}},
        {"name": "resident", "bits": 2, "gpu_budget_bytes": 20 * GIB, "resident": True, "decode_tok_s": 98.7,
         "ttft_s": {"1024": 0.2}},
    ]  # fmt: skip
    s = peer.speedups(rows, peer.parse_peer_dir(peer_dir))
    assert s["speedup_vs_llamacpp_decode"] == pytest.approx(30.0 / 54.5)
    assert s["speedup_vs_llamacpp_prefill"] == pytest.approx(4000.0 / 2190.0)
    assert s["speedup_vs_llamacpp_resident"] == pytest.approx(0.5)  # resident: True wins over its budget
    assert [e["budget_bytes"] for e in s["vs_llamacpp"]] == [12 * GIB, None]


def test_a_budget_nothing_fits_has_no_ratio(peer_dir):
    rows = [_row("full-1GiB", 2, 1, 5.0, 0.4)]
    s = peer.speedups(rows, peer.parse_peer_dir(peer_dir), headline_budget=1 * GIB)
    (e,) = s["vs_llamacpp"]
    assert e["llamacpp_ncmoe"] is None and e["speedup_decode"] is None and "no llama.cpp" in e["note"]
    assert s["speedup_vs_llamacpp_decode"] is None and s["speedup_vs_llamacpp_resident"] is None


# ---------------------------------------------------------------- merge CLI


def run_cli(argv, capsys):
    from moe_llm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code or 0, capsys.readouterr()


def test_merge_writes_the_block_and_speedups_into_our_json(peer_dir, tmp_path, capsys):
    ours = tmp_path / "h200.json"
    run = {"gpu_budget_bytes": 12 * GIB, "decode_tok_s": 28.056043787234575, "variants": OUR_ROWS}
    ours.write_text(json.dumps(run))
    code, captured = run_cli(["peer", "merge", str(ours), str(peer_dir)], capsys)
    assert code == 0
    out = captured.out
    merged = json.loads(ours.read_text())
    assert merged["llamacpp"]["version"] == "b0-0c1e570" and len(merged["llamacpp"]["configs"]) == 7
    assert merged["speedup_vs_llamacpp_decode"] == pytest.approx(28.056043787234575 / 54.5)
    assert merged["decode_tok_s"] == run["decode_tok_s"] and len(merged["variants"]) == len(OUR_ROWS)
    row12 = next(line for line in out.splitlines() if line.startswith("| 12 GiB |"))
    cells = [c.strip() for c in row12.strip("|").split("|")]
    assert cells[1] == "`-ncmoe 7`" and cells[2].endswith("= 11.98") and cells[3].startswith("54.5")
    assert cells[4] == "2,190" and cells[5] == "28.06" and cells[7] == f"{28.056043787234575 / 54.5:.2f}×"
    assert "| resident | `-ncmoe 0` |" in out
    assert run_cli(["peer", "merge", str(ours), str(peer_dir)], capsys)[0] == 0  # again: the same, nothing doubled
    assert json.loads(ours.read_text()) == merged


def test_merge_reports_missing_inputs(tmp_path, peer_dir, capsys):
    code, captured = run_cli(["peer", "merge", str(tmp_path / "none.json"), str(peer_dir)], capsys)
    assert code == 2 and "does not exist" in captured.err and len(captured.err.strip().splitlines()) == 1
    code, captured = run_cli(["peer", "merge", str(tmp_path / "none.json"), str(tmp_path / "empty")], capsys)
    assert code == 2 and captured.err.startswith("error: ")


def test_peer_targets_say_what_was_met_and_by_how_much_the_rest_fell_short():
    from moe_llm.bench.peer import peer_targets

    got = {t["key"]: t for t in peer_targets({"speedup_vs_llamacpp_decode": 0.55, "speedup_vs_llamacpp_prefill": 1.9})}
    assert got["speedup_vs_llamacpp_decode"]["met"] is False
    assert abs(got["speedup_vs_llamacpp_decode"]["missed_by"] - 0.5) < 1e-9
    assert got["speedup_vs_llamacpp_prefill"]["met"] is True and "missed_by" not in got["speedup_vs_llamacpp_prefill"]
    assert got["speedup_vs_llamacpp_resident"]["value"] is None and got["speedup_vs_llamacpp_resident"]["met"] is None
    assert got["speedup_vs_llamacpp_cpu_all"]["target"] == 1.0

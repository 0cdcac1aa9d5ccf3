"""Prompt-prefix reuse to the token (CPU, tiny Mixtral, 16-token prefill chunks).

A finished request leaves its sequence (prompt, and reply where decode computes keys and
values as a prefill does) in the prefix cache's radix tree; the next turn restores the
longest common prefix and prefills only the rest. Greedy tokens equal those of an engine
without the cache, turn after turn, including a turn that diverges inside a chunk."""

from __future__ import annotations

import pytest
import torch

import moe_llm
from moe_llm.runtime.prefix_cache import PrefixCache

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 16
NEW = 10
SYSTEM = {"role": "system", "content": "Be kind. " * 5}
VARIANTS = {
    "unquantized": {},
    "2-bit experts": {"experts_bits": 2},  # on CPU: the CPU expert kernel decodes (int8 activations)
    "2-bit experts, torch decode": {"experts_bits": 2, "cpu_experts": "off"},
    "4-bit experts and attention": {"experts_bits": 4, "attn_bits": 4},
}


def load(path, **opts):
    return moe_llm.load(path, cache_per_layer=2, prefill_chunk=CHUNK, **opts)


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def in_kv(result) -> list[int]:
    """The generated tokens whose keys and values the request computed: all but the last sampled."""
    return result.token_ids[: result.stats["tokens_generated"] - 1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conversation_turns_give_the_tokens_of_a_fresh_prefill(tiny_mixtral, variant):
    cached, plain = load(tiny_mixtral, **VARIANTS[variant]), load(tiny_mixtral, prefix_cache=0, **VARIANTS[variant])
    like_prefill = cached.batcher.prefill.like_prefill
    assert like_prefill == (cached.runtime.cpu_road == "off")  # the CPU kernel's decode KV is not a prefill's
    conv = [SYSTEM, {"role": "user", "content": "Hello there"}]
    ran: list[tuple[list[int], list[int]]] = []  # (prompt, prompt + the reply positions in its KV)
    follow_ups = ["Tell me more", "Why?", None, "Explain caching", "ok"]  # None: edit the last message
    hits: list[int] = []
    for turn, msg in enumerate(follow_ups):
        ids = cached.encode(conv)
        got, want = cached.generate(conv, max_new_tokens=NEW), plain.generate(conv, max_new_tokens=NEW)
        assert got.token_ids == want.token_ids, f"turn {turn}"
        hit, prefilled = got.stats["prefix_cache_hit_tokens"], got.stats["prefill_tokens"]
        assert hit + prefilled == len(ids) and want.stats["prefill_tokens"] == len(ids)
        whole = min(len(ids) - 1, max((lcp(ids, seq) for _, seq in ran), default=0))
        prompts = min(len(ids) - 1, max((lcp(ids, p) for p, _ in ran), default=0))
        if like_prefill:  # to the token, the previous replies included
            assert hit == whole
        else:  # the previous prompts to the token (less at most the two one-token chunk positions)
            assert prompts - 2 <= hit <= prompts
        hits.append(hit)
        ran.append((ids, ids + in_kv(got)))
        if msg is None:  # a branch: the last user message edited, so the prompt diverges inside a chunk
            edits = ([*conv[:-1], {"role": "user", "content": text}] for text in ("Tell me less", "Why not?", "Wh"))
            conv = next(e for e in edits if lcp(cached.encode(e), ids) % CHUNK)
        else:
            conv = [*conv, {"role": "assistant", "content": got.text}, {"role": "user", "content": msg}]
    assert hits[0] == 0 and any(h % CHUNK for h in hits[1:])  # to the token, not whole chunks
    d = cached.stats_dict()
    assert d["prefill_tokens"] < plain.stats_dict()["prefill_tokens"]
    assert d["prefix_cache_hit_tokens"] + d["prefill_tokens"] == sum(len(p) for p, _ in ran)
    assert d["prefix_cache_tokens"] < sum(len(s) for _, s in ran)  # shared prefixes are held once


def test_a_second_turn_prefills_only_its_new_tokens(tiny_mixtral):
    """Token ids: the second prompt is the first, the reply and a new message."""
    engine = load(tiny_mixtral)
    first = engine.encode([SYSTEM, {"role": "user", "content": "Hello there"}])
    r1 = engine.generate(first, max_new_tokens=NEW)
    new = engine.encode("[INST] Tell me more [/INST]")
    second = first + r1.token_ids + new
    r2 = engine.generate(second, max_new_tokens=NEW)
    computed = len(first) + len(in_kv(r1))  # the positions the first request ran
    assert r2.stats["prefix_cache_hit_tokens"] == computed
    assert r2.stats["prefill_tokens"] == len(second) - computed == len(new) + len(r1.token_ids) - len(in_kv(r1))
    assert r2.token_ids == load(tiny_mixtral, prefix_cache=0).generate(second, max_new_tokens=NEW).token_ids
    again = engine.generate(second, max_new_tokens=NEW)  # the same prompt: only its last token runs
    assert again.stats["prefill_tokens"] == 1 and again.token_ids == r2.token_ids


def test_a_chat_follow_up_prefills_only_the_new_message(tiny_mixtral):
    """Through the chat template: the old reply, re-rendered, matches what the engine generated."""
    engine = load(tiny_mixtral)
    turn1 = [SYSTEM, {"role": "user", "content": "Hello there"}]
    r1 = engine.generate(turn1, max_new_tokens=8)
    turn2 = [*turn1, {"role": "assistant", "content": r1.text}, {"role": "user", "content": "Go on."}]
    p1, p2 = engine.encode(turn1), engine.encode(turn2)
    ran = p1 + in_kv(r1)
    assert p2[: len(ran)] == ran  # this reply re-tokenizes to the tokens generated
    r2 = engine.generate(turn2, max_new_tokens=8)
    assert r2.stats["prefill_tokens"] == len(p2) - len(ran)  # the reply's unrun last token, eos, the message
    assert r2.stats["prefix_cache_hit_tokens"] == len(ran)
    assert engine.stats_dict()["prefill_tokens"] == len(p1) + len(p2) - len(ran)


def test_decoded_positions_are_kept_only_where_decode_computes_them_as_a_prefill_does(tiny_mixtral):
    """The gate behind the guarantee: keys a one-token step wrote equal a prefill's up to float
    rounding exactly where `like_prefill` holds; the CPU kernel's int8 activations move them ~1%."""
    for opts in VARIANTS.values():
        engine = load(tiny_mixtral, prefix_cache=0, **opts)
        ids = engine.encode("The quick brown fox jumps over the lazy dog")
        kv = engine._new_kv()
        with torch.inference_mode():
            out = engine.model(input_ids=torch.tensor([ids]), use_cache=True, **{engine._kv_arg: kv})
            toks = [int(out.logits[0, -1].argmax())]
            for _ in range(6):
                engine.runtime.begin_step()
                step = engine.model(input_ids=torch.tensor([[toks[-1]]]), use_cache=True, **{engine._kv_arg: kv})
                engine.runtime.end_step()
                toks.append(int(step.logits[0, -1].argmax()))
            fresh = engine._new_kv()
            engine.model(input_ids=torch.tensor([ids + toks[:-1]]), use_cache=True, **{engine._kv_arg: fresh})
        diff = max((a.keys - b.keys).abs().max().item() for a, b in zip(kv.layers, fresh.layers, strict=True))
        assert (diff < 1e-4) == engine.batcher.prefill.like_prefill, (opts, diff)


def test_prefix_cache_stays_within_its_memory_limit_least_recent_first(tiny_mixtral):
    per_token = 2 * 2 * 2 * 16 * 4  # layers, keys and values, KV heads, head dim, fp32
    prompts = [f"{i} " + "Namespaces are one honking great idea. " * 3 for i in range(4)]
    probe = load(tiny_mixtral, prefix_cache=0)
    ids = [probe.encode(p) for p in prompts]
    limit = (len(ids[0]) + 20) * per_token  # one sequence fits, two do not
    engine = load(tiny_mixtral, prefix_cache=limit)
    for p in prompts:
        engine.generate(p, max_new_tokens=2)
    d = engine.stats_dict()
    assert 0 < d["prefix_cache_bytes"] <= limit and d["prefix_cache_evictions"] >= 3
    assert d["prefix_cache_bytes"] == d["prefix_cache_tokens"] * per_token
    last = engine.generate(prompts[-1], max_new_tokens=2)  # the most recent survives
    assert last.stats["prefix_cache_hit_tokens"] == len(ids[-1]) - 1
    first = engine.generate(prompts[0], max_new_tokens=2)  # the oldest went, but for what it shares
    assert first.stats["prefix_cache_hit_tokens"] == lcp(ids[0], ids[-1]) < 5


# -- the radix tree itself ----------------------------------------------------------------------


def _kv(ids: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer keys and values [1, 2, n, 3] that name each position's token and index."""
    base = torch.tensor(ids, dtype=torch.float32)[None, None, :, None] * 1000 + torch.arange(len(ids))[:, None]
    return [
        (base + layer + torch.zeros(1, 2, 1, 3), -base - layer + torch.zeros(1, 2, 1, 3)) for layer in range(layers)
    ]


def test_radix_tree_matches_to_the_token_and_holds_shared_prefixes_once():
    from transformers import DynamicCache

    cache = PrefixCache(10**6)
    a = list(range(1, 21))
    b = a[:12] + [90, 91, 92, 93]  # diverges inside a's node: the node splits
    c = [7, 8, 9]
    for seq in (a, b, c):
        cache.store(seq, _kv(seq), len(seq))
    assert cache.tokens == 20 + 4 + 3 and len(cache) == 4  # a[:12], a[12:], b[12:], c
    assert cache.nbytes == cache.tokens * 2 * 2 * 2 * 3 * 4
    for prompt, want in ((a[:15] + [0], 15), (b + [5], 16), (b, 15), ([7, 8, 1], 2), ([1], 0), ([3, 1], 0)):
        m = cache.match(prompt)
        assert m.tokens == want, prompt
        if want:
            kv = DynamicCache()
            cache.restore(kv, m, want, torch.device("cpu"))
            ref = _kv(prompt[:want])
            for i, layer in enumerate(kv.layers):
                assert torch.equal(layer.keys, ref[i][0]) and torch.equal(layer.values, ref[i][1])
    cache.store(a + [50], _kv(a + [50]), 21)  # extends a leaf: only the new position is copied
    assert cache.tokens == 28


def test_radix_tree_evicts_least_recently_used_leaves_within_its_limit():
    per_token = 2 * 2 * 2 * 3 * 4
    cache = PrefixCache(30 * per_token)
    old, mid = [1] * 10 + [2] * 5, [1] * 10 + [3] * 5
    cache.store(old, _kv(old), len(old))
    cache.store(mid, _kv(mid), len(mid))
    cache.match(old + [0])  # old is used again: mid is now the least recent leaf
    new = [4] * 12
    cache.store(new, _kv(new), len(new))
    assert cache.nbytes <= 30 * per_token and cache.evictions == 1
    assert cache.match(old + [0]).tokens == 15 and cache.match(mid + [0]).tokens == 10
    assert cache.match(new + [0]).tokens == 12
    huge = list(range(100, 160))
    cache.store(huge, _kv(huge), len(huge))  # longer than the whole limit: its head is kept
    assert cache.nbytes <= 30 * per_token and cache.match(huge).tokens == 30
